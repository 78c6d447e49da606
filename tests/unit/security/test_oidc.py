"""OIDC JWT validation: issuer, audience, expiry, algorithm allow-list; claims mapped to role and departments."""

from __future__ import annotations

import pytest

from openpacs.services.auth import AuthError, OIDCValidator

from .jwt_helpers import AUDIENCE, ISSUER, Issuer


@pytest.fixture(scope="module")
def issuer() -> Issuer:
    return Issuer()


def validator(issuer: Issuer, **kw) -> OIDCValidator:
    return OIDCValidator(ISSUER, AUDIENCE, jwks_client=issuer, **kw)


def test_valid_token_maps_claims(issuer: Issuer) -> None:
    p = validator(issuer).validate(issuer.good())
    assert p is not None
    assert (p.name, p.role, p.departments, p.method) == ("oidc-user", "viewer", ("cardiology",), "oidc")
    admin = validator(issuer).validate(issuer.good(roles=["viewer", "admin"]))
    assert admin.role == "admin" and admin.departments is None


def test_role_map_and_no_role(issuer: Issuer) -> None:
    v = validator(issuer, role_map={"pacs-readers": "radiologist"})
    assert v.validate(issuer.good(roles=["pacs-readers"])).role == "radiologist"
    assert v.validate(issuer.good(roles=["viewer"])) is None  # not mapped: no access
    assert validator(issuer).validate(issuer.good(roles=None)) is None


def test_non_admin_without_department_claim_sees_nothing(issuer: Issuer) -> None:
    p = validator(issuer).validate(issuer.good(departments=None))
    assert p is not None and p.departments == ()


@pytest.mark.parametrize(
    "kind",
    [
        "alg-none",
        "alg-none-upper",
        "hs256-with-public-key",
        "wrong-audience",
        "wrong-issuer",
        "expired",
        "other-key",
        "tampered",
        "no-exp",
    ],
)
def test_forged_tokens_rejected(issuer: Issuer, kind: str) -> None:
    assert validator(issuer).validate(issuer.forged()[kind]) is None


def test_algorithm_allow_list_cannot_admit_none_or_hmac(issuer: Issuer) -> None:
    v = validator(issuer, algorithms=["none", "HS256", "RS256"])
    assert v.algorithms == ["RS256"]
    with pytest.raises(AuthError):
        validator(issuer, algorithms=["none", "HS256"])


def test_keys_fetched_from_the_issuers_jwks_url(issuer: Issuer) -> None:
    """The real PyJWKClient path: keys come from an HTTP JWKS document, selected by ``kid``."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from jwt.algorithms import RSAAlgorithm

    jwk = json.loads(RSAAlgorithm.to_jwk(issuer.key.public_key()))
    jwk.update(kid="k1", use="sig", alg="RS256")
    body = json.dumps({"keys": [jwk]}).encode()
    hits = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            hits.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    httpd = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        v = OIDCValidator(ISSUER, AUDIENCE, jwks_url=f"http://127.0.0.1:{httpd.server_port}/jwks")
        p = v.validate(issuer.good())
        assert p is not None and p.role == "viewer"
        assert v.validate(issuer.forged()["other-key"]) is None
        assert v.validate(issuer.forged()["wrong-audience"]) is None
        assert hits  # fetched over HTTP
    finally:
        httpd.shutdown()
