"""An in-test OIDC issuer: an RSA key, a JWKS client stub, and good and forged tokens."""

from __future__ import annotations

import base64
import json
import time
from types import SimpleNamespace
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

ISSUER = "https://idp.example.org/realms/hospital"
AUDIENCE = "openpacs"


class Issuer:
    def __init__(self) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.public_pem = self.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    # the PyJWKClient interface the validator uses
    def get_signing_key_from_jwt(self, token: str) -> Any:
        return SimpleNamespace(key=self.key.public_key())

    def claims(self, **over: Any) -> dict[str, Any]:
        now = int(time.time())
        c = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": "u-123",
            "preferred_username": "oidc-user",
            "iat": now,
            "exp": now + 600,
            "roles": ["viewer"],
            "departments": ["cardiology"],
        }
        c.update(over)
        return {k: v for k, v in c.items() if v is not None}

    def good(self, **over: Any) -> str:
        return jwt.encode(self.claims(**over), self.key, algorithm="RS256", headers={"kid": "k1"})

    def forged(self) -> dict[str, str]:
        """Tokens every validator must reject."""
        c = self.claims(roles=["admin"], departments=None)
        none = _b64(json.dumps({"alg": "none", "typ": "JWT"})) + "." + _b64(json.dumps(c)) + "."
        hs = _hs256_with(self.public_pem, c)
        return {
            "alg-none": none,
            "alg-none-upper": _b64(json.dumps({"alg": "None"})) + "." + _b64(json.dumps(c)) + ".",
            "hs256-with-public-key": hs,
            "wrong-audience": jwt.encode({**c, "aud": "someone-else"}, self.key, algorithm="RS256"),
            "wrong-issuer": jwt.encode({**c, "iss": "https://evil.example"}, self.key, algorithm="RS256"),
            "expired": jwt.encode({**c, "exp": int(time.time()) - 3600}, self.key, algorithm="RS256"),
            "other-key": jwt.encode(c, self.other, algorithm="RS256"),
            "tampered": _tamper(jwt.encode(self.claims(), self.key, algorithm="RS256")),
            "no-exp": jwt.encode({k: v for k, v in c.items() if k != "exp"}, self.key, algorithm="RS256"),
        }


def _b64(s: str | bytes) -> str:
    b = s.encode() if isinstance(s, str) else s
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def _hs256_with(secret: bytes, claims: dict[str, Any]) -> str:
    import hashlib
    import hmac

    head = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}))
    body = _b64(json.dumps(claims))
    sig = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64(sig)}"


def _tamper(token: str) -> str:
    head, body, sig = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    claims["roles"] = ["admin"]
    claims.pop("departments", None)
    return f"{head}.{_b64(json.dumps(claims))}.{sig}"
