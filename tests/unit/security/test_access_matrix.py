"""The HTTP access matrix: every route of the node × every kind of caller → allow or deny, 0 unauthorized successes.

Callers: anonymous, each role (bearer token), a session, a user scoped to cardiology asking for a radiology study,
expired and revoked tokens, forged JWTs (alg=none, HMAC with the public key, wrong audience/issuer, expired, other
key, tampered claims) and a genuine OIDC token scoped to cardiology. A scoped caller must never see the radiology
study: not its UID, not its patient, in any response body.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

import pytest
from starlette.routing import Mount, Route
from starlette.testclient import TestClient

from openpacs.services.auth import OIDCValidator
from openpacs.web.app import build_app
from openpacs.web.auth import SELF_CHECKED_PATHS, route_policy

from .conftest import ROLES, bearer, part10
from .jwt_helpers import AUDIENCE, ISSUER, Issuer

PARAM = re.compile(r"\{(\w+)(?::\w+)?\}")


def all_routes(app: Any) -> list[tuple[str, list[str]]]:
    out: list[tuple[str, list[str]]] = []

    def walk(routes: Any, prefix: str) -> None:
        for r in routes:
            if isinstance(r, Mount):
                sub = getattr(r, "routes", None)
                if sub:
                    walk(sub, prefix + r.path)
                else:
                    out.append((prefix + r.path + "/index.html", ["GET"]))
            elif isinstance(r, Route):
                methods = sorted((r.methods or {"GET"}) - {"HEAD"})
                out.append((prefix + r.path, methods))

    walk(app.routes, "")
    return out


def concrete(path: str, uids: tuple[str, str, str]) -> str:
    values = {"study": uids[0], "series": uids[1], "instance": uids[2], "frames": "1", "path": "7FE00010"}
    return PARAM.sub(lambda m: values.get(m.group(1), "x"), path)


def stow_body(study: str | None = None) -> tuple[bytes, dict[str, str]]:
    data = part10("CT", "STOW01", study_uid=study)[0]
    b = uuid.uuid4().hex
    body = (f"--{b}\r\nContent-Type: application/dicom\r\n\r\n").encode() + data + f"\r\n--{b}--\r\n".encode()
    return body, {"Content-Type": f'multipart/related; type="application/dicom"; boundary={b}'}


@pytest.fixture
def client(world) -> TestClient:
    issuer = Issuer()
    world.ctx.auth.oidc = OIDCValidator(ISSUER, AUDIENCE, jwks_client=issuer)
    world.issuer = issuer
    return TestClient(build_app(world.ctx), base_url="http://127.0.0.1:8042")


def callers(world) -> dict[str, tuple[dict[str, str], str | None, tuple[str, ...] | None]]:
    """name -> (headers, role or None for 'must be denied', department scope)."""
    out: dict[str, tuple[dict[str, str], str | None, tuple[str, ...] | None]] = {"anonymous": ({}, None, None)}
    for role in ROLES:
        out[role] = (bearer(world.tokens[role]), role, None)
    out["cardio-radiologist"] = (bearer(world.tokens["cardio"]), "radiologist", ("cardiology",))
    out["cardio-viewer"] = (bearer(world.tokens["cardioviewer"]), "viewer", ("cardiology",))
    out["expired-token"] = (bearer(world.expired), None, None)
    out["revoked-token"] = (bearer(world.revoked), None, None)
    out["garbage-token"] = (bearer("opk_" + "x" * 43), None, None)
    out["basic-auth"] = ({"Authorization": "Basic YWRtaW46YWRtaW4="}, None, None)
    for kind, tok in world.issuer.forged().items():
        out[f"jwt-{kind}"] = (bearer(tok), None, None)
    out["jwt-cardio-viewer"] = (bearer(world.issuer.good()), "viewer", ("cardiology",))
    return out


def test_access_matrix(world, client: TestClient) -> None:
    from openpacs.services.auth import ROLES as RIGHTS

    rad = world.studies["radiology"]
    card = world.studies["cardiology"]
    secrets_of_radiology = (rad[0], "RAD001")
    routes = all_routes(client.app)
    assert len(routes) >= 20
    failures: list[str] = []
    checked = 0
    for name, (headers, role, scope) in callers(world).items():
        for path_tpl, methods in routes:
            for method in methods:
                for target_name, target in (("radiology", rad), ("cardiology", card)):
                    if "{" not in path_tpl and target_name == "cardiology":
                        continue
                    path = concrete(path_tpl, target)
                    policy = route_policy(path, method)
                    if method == "DELETE" and role is not None and "delete" in RIGHTS[role]:
                        continue  # allowed deletes are exercised at the end
                    body: bytes | None = None
                    h = dict(headers)
                    if method == "POST" and path.startswith("/dicom-web"):
                        body, ct = stow_body(target[0] if "{study}" in path_tpl else None)
                        h.update(ct)
                    elif method == "POST":
                        body = b""
                        h["Content-Type"] = "application/x-www-form-urlencoded"
                    r = client.request(method, path, headers=h, content=body, follow_redirects=False)
                    checked += 1
                    public = policy.right is None and path not in SELF_CHECKED_PATHS
                    may = public or (role is not None and policy.right in RIGHTS[role])
                    if path in SELF_CHECKED_PATHS:  # /metrics from off loopback (the TestClient): admin tokens only
                        may = role is not None and "admin" in RIGHTS[role]
                    in_scope = scope is None or target_name == "cardiology" or "{" not in path_tpl
                    label = f"{name} {method} {path_tpl} [{target_name}] -> {r.status_code}"
                    if not may or not in_scope:
                        if r.status_code not in (401, 403, 404, 405):
                            failures.append("UNAUTHORIZED SUCCESS: " + label)
                    elif r.status_code in (401, 403):
                        failures.append("wrongly denied: " + label)
                    if scope is not None and not public:
                        for secret in secrets_of_radiology:
                            if secret.encode() in r.content:
                                failures.append(f"LEAK of {secret}: {label}")
    assert checked > 500
    assert not failures, "\n".join(failures)
    # allowed deletes: admin removes the radiology study; the cardiology one is untouched
    r = client.delete(f"/dicom-web/studies/{rad[0]}", headers=bearer(world.tokens["admin"]))
    assert r.status_code == 204
    r = client.get(f"/dicom-web/studies/{card[0]}/metadata", headers=bearer(world.tokens["admin"]))
    assert r.status_code == 200


def test_scoped_qido_and_study_list_show_only_own_department(world, client: TestClient) -> None:
    rad, card = world.studies["radiology"][0], world.studies["cardiology"][0]
    for tok in ("cardio", "cardioviewer"):
        r = client.get("/dicom-web/studies", headers=bearer(world.tokens[tok]))
        assert r.status_code == 200
        assert card in r.text and rad not in r.text
        for level in ("series", "instances"):
            r = client.get(f"/dicom-web/{level}", headers=bearer(world.tokens[tok]))
            assert rad not in r.text
        r = client.get("/ui/studies", headers=bearer(world.tokens[tok]))
        assert r.status_code == 200 and card in r.text and rad not in r.text and "RAD001" not in r.text
        r = client.get(f"/dicom-web/studies?StudyInstanceUID={rad}", headers=bearer(world.tokens[tok]))
        assert rad not in r.text
        r = client.get(
            f"/wado?requestType=WADO&studyUID={rad}&seriesUID={world.studies['radiology'][1]}"
            f"&objectUID={world.studies['radiology'][2]}&contentType=application/dicom",
            headers=bearer(world.tokens[tok]),
        )
        assert r.status_code == 404
    r = client.get("/dicom-web/studies", headers=bearer(world.tokens["viewer"]))
    assert rad in r.text and card in r.text


def test_session_cookie_flags_csrf_and_throttle(world, client: TestClient) -> None:
    r = client.get("/login")
    assert r.status_code == 200
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', r.text).group(1)
    assert "HttpOnly" in r.headers["set-cookie"] and "SameSite=strict" in r.headers["set-cookie"]
    r = client.post(
        "/login",
        data={
            "username": "admin",
            "password": world.passwords["admin"],
            "csrf_token": csrf,
            "next": "//evil.example/x",
        },
        follow_redirects=False,
    )
    assert r.status_code == 303 and r.headers["location"] == "/ui/studies"  # no open redirect
    cookie = r.headers["set-cookie"]
    assert "openpacs_session=" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie
    assert "Secure" not in cookie  # plain HTTP here; behind HTTPS the flag is set (next test)
    assert client.get("/ui/studies").status_code == 200
    # a state-changing request with the cookie but without the CSRF header is refused
    body, ct = stow_body()
    assert client.post("/dicom-web/studies", content=body, headers=ct).status_code == 403
    p = world.ctx.auth.principal_for_session(client.cookies.get("openpacs_session"))
    body, ct = stow_body()
    assert (
        client.post("/dicom-web/studies", content=body, headers={**ct, "X-CSRF-Token": p.csrf_token}).status_code == 200
    )
    # logout needs the token too
    assert client.post("/logout", data={"csrf_token": "wrong"}).status_code == 403
    r = client.post("/logout", data={"csrf_token": p.csrf_token}, follow_redirects=False)
    assert r.status_code == 303
    client.cookies.clear()
    assert client.get("/dicom-web/studies").status_code == 401
    # login throttling: after 5 failures even the right password is refused for a while
    for _ in range(5):
        r = client.get("/login")
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', r.text).group(1)
        assert (
            client.post(
                "/login",
                data={"username": "viewer", "password": "wrong-password", "csrf_token": csrf},
                follow_redirects=False,
            ).status_code
            == 401
        )
    r = client.get("/login")
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', r.text).group(1)
    r = client.post(
        "/login",
        data={"username": "viewer", "password": world.passwords["viewer"], "csrf_token": csrf},
        follow_redirects=False,
    )
    assert r.status_code == 429
    # login CSRF: a form without the double-submit cookie is refused
    client.cookies.clear()
    r = client.post(
        "/login",
        data={"username": "admin", "password": world.passwords["admin"], "csrf_token": "x"},
        follow_redirects=False,
    )
    assert r.status_code == 400


def test_secure_cookie_and_hsts_behind_trusted_proxy(world) -> None:
    world.ctx.settings.trusted_proxies = "127.0.0.0/8"
    client = TestClient(build_app(world.ctx), base_url="http://127.0.0.1:8042", client=("127.0.0.1", 5000))
    r = client.get("/login", headers={"X-Forwarded-Proto": "https", "X-Forwarded-For": "10.1.2.3"})
    assert "Secure" in r.headers["set-cookie"]
    assert "max-age" in r.headers.get("strict-transport-security", "")
    # an untrusted peer cannot claim HTTPS
    untrusted = TestClient(build_app(world.ctx), base_url="http://10.9.9.9:8042", client=("10.9.9.9", 5000))
    r = untrusted.get("/login", headers={"X-Forwarded-Proto": "https"})
    assert "Secure" not in r.headers["set-cookie"]


def test_security_headers_everywhere(world, client: TestClient) -> None:
    for path in ("/healthz", "/login", "/ui/studies", "/dicom-web/studies", "/nonexistent"):
        r = client.get(path, headers=bearer(world.tokens["admin"]))
        assert r.headers["x-content-type-options"] == "nosniff", path
        assert "frame-ancestors" in r.headers["content-security-policy"], path


def test_browser_is_sent_to_login(world, client: TestClient) -> None:
    r = client.get("/ui/studies?PatientID=X", headers={"Accept": "text/html"}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/login?next=%2Fui%2Fstudies")


def test_scoped_sender_cannot_add_to_another_departments_study(world, client: TestClient) -> None:
    world.ctx.auth.add_user("cardiotech", "pw-ct-0123456789", "technologist", "cardiology")
    tok = world.ctx.auth.create_token("cardiotech")[1]
    rad_study, card_study = world.studies["radiology"][0], world.studies["cardiology"][0]
    body, ct = stow_body(rad_study)  # an instance of the existing radiology study
    r = client.post("/dicom-web/studies", content=body, headers={**bearer(tok), **ct})
    assert r.status_code == 409
    assert "00081197" in r.text and "292" in r.text  # FailureReason 0x0124 (292): refused, not authorized
    assert len(world.ctx.retrieve.list_instances(rad_study)) == 1  # nothing added
    body, ct = stow_body(card_study)
    assert client.post("/dicom-web/studies", content=body, headers={**bearer(tok), **ct}).status_code == 200
    body, ct = stow_body(None)  # a new study is fine (its department comes from the rules)
    assert client.post("/dicom-web/studies", content=body, headers={**bearer(tok), **ct}).status_code == 200


def test_routes_scope_on_their_own_without_the_middleware(world) -> None:
    """Defense in depth: the DICOMweb routes narrow by the principal even if the middleware's path check were absent."""
    from openpacs.dicomweb.app import build_dicomweb
    from openpacs.services.auth import ROLES as RIGHTS
    from openpacs.services.auth import Principal

    inner = build_dicomweb(world.ctx)
    scoped = Principal("c", "radiologist", RIGHTS["radiologist"], ("cardiology",), method="token")

    async def app(scope, receive, send):
        scope["openpacs.principal"] = scoped
        await inner(scope, receive, send)

    client = TestClient(app)
    st, se, sop = world.studies["radiology"]
    accept = {"Accept": 'multipart/related; type="application/dicom"'}
    assert client.get(f"/studies/{st}", headers=accept).status_code == 404
    assert client.get(f"/studies/{st}/metadata").status_code == 404
    assert client.get(f"/studies/{st}/series/{se}/instances/{sop}/rendered").status_code == 404
    assert client.get(f"/wado?requestType=WADO&studyUID={st}&seriesUID={se}&objectUID={sop}").status_code == 404
    assert st not in client.get("/studies").text
    cst = world.studies["cardiology"][0]
    assert client.get(f"/studies/{cst}/metadata").status_code == 200
    assert client.delete(f"/studies/{cst}").status_code == 403  # the delete right, checked by the route too
