"""services.auth: passwords, tokens, sessions, roles and department scope."""

from __future__ import annotations

import time

import pytest

from openpacs.services import auth as A
from openpacs.services.auth import AuthError


def test_password_hash_is_argon2id_and_verifies(world) -> None:
    h = A.hash_password("correct horse battery")
    assert h.startswith("$argon2id$")
    assert A.verify_password(h, "correct horse battery")
    assert not A.verify_password(h, "wrong")
    assert not A.verify_password(None, "anything")
    assert not A.verify_password("garbage", "anything")


def test_authenticate(world) -> None:
    auth = world.ctx.auth
    p = auth.authenticate("viewer", world.passwords["viewer"])
    assert p is not None and p.role == "viewer" and p.rights == {"read"} and p.departments is None
    assert auth.authenticate("viewer", "nope") is None
    assert auth.authenticate("nobody", "x" * 12) is None
    auth.set_disabled("viewer")
    assert auth.authenticate("viewer", world.passwords["viewer"]) is None
    assert auth.principal_for_token(world.tokens["viewer"]) is None  # cache cleared on disable


def test_password_policy_and_roles(world) -> None:
    auth = world.ctx.auth
    with pytest.raises(AuthError):
        auth.add_user("short", "123", "viewer")
    with pytest.raises(AuthError):
        auth.add_user("x", "long-enough-password", "superuser")
    with pytest.raises(AuthError):
        auth.add_user("admin", "long-enough-password", "admin")  # exists
    with pytest.raises(AuthError):
        auth.add_user("bad name", "long-enough-password", "viewer")


def test_tokens_are_stored_hashed_and_revocable(world) -> None:
    from sqlalchemy import select

    from openpacs.index.security_schema import api_tokens

    auth = world.ctx.auth
    with world.ctx.index.engine.connect() as c:
        stored = {r.token_hash for r in c.execute(select(api_tokens))}
    assert world.tokens["viewer"] not in stored
    assert A.token_hash(world.tokens["viewer"]) in stored
    p = auth.principal_for_token(world.tokens["cardio"])
    assert p is not None and p.departments == ("cardiology",) and p.method == "token"
    assert auth.principal_for_token(world.expired) is None
    assert auth.principal_for_token(world.revoked) is None
    assert auth.principal_for_token("opk_" + "A" * 43) is None
    assert auth.principal_for_token("not-a-token") is None
    tid = auth.list_tokens("cardio")[0]["id"]
    assert auth.revoke_token(tid)
    assert auth.principal_for_token(world.tokens["cardio"]) is None


def test_token_lookup_is_cached_not_a_kdf(world) -> None:
    auth = world.ctx.auth
    tok = world.tokens["viewer"]
    auth.principal_for_token(tok)
    t0 = time.perf_counter()
    for _ in range(2000):
        assert auth.principal_for_token(tok) is not None
    assert (time.perf_counter() - t0) / 2000 < 0.0005


def test_cached_principal_answers_from_memory_only(world) -> None:
    """What the security middleware decides on the event loop: a cached caller, else 'ask the index'."""
    auth = world.ctx.auth
    tok = world.tokens["radiologist"]
    assert auth.cached_principal("token", tok) == (False, None)  # never looked up: the index must be asked
    assert auth.cached_principal("token", "not-a-token") == (True, None)  # refused without a lookup
    p = auth.principal_for_token(tok)
    assert p is not None and auth.cached_principal("token", tok) == (True, p)
    assert auth.principal_for_token(world.revoked) is None
    assert auth.cached_principal("token", world.revoked) == (True, None)  # a known refusal is cached too
    tid = next(t["id"] for t in auth.list_tokens("radiologist"))
    assert auth.revoke_token(tid)
    assert auth.cached_principal("token", tok)[1] is None  # revocation empties the cache: never a stale yes
    session = auth.authenticate("viewer", world.passwords["viewer"])
    cookie, _ = auth.create_session(session)
    assert auth.cached_principal("session", cookie)[1] in (None, auth.principal_for_session(cookie))
    assert auth.cached_principal("session", cookie) == (True, auth.principal_for_session(cookie))
    auth.end_session(cookie)
    assert auth.cached_principal("session", cookie)[1] is None


def test_sessions(world) -> None:
    auth = world.ctx.auth
    p = auth.authenticate("radiologist", world.passwords["radiologist"])
    cookie, csrf = auth.create_session(p, "127.0.0.1")
    s = auth.principal_for_session(cookie)
    assert s is not None and s.name == "radiologist" and s.csrf_token == csrf and s.method == "session"
    auth.end_session(cookie)
    assert auth.principal_for_session(cookie) is None
    cookie2, _ = auth.create_session(p)
    auth.set_password("radiologist", "a-new-password-123")
    assert auth.principal_for_session(cookie2) is None


def test_first_start_admin(tmp_path) -> None:
    from openpacs.config import Settings
    from openpacs.context import build_context

    ctx = build_context(Settings(data_dir=tmp_path, auth="on"))
    try:
        pw = ctx.auth.ensure_admin()
        assert pw and len(pw) >= 16
        assert ctx.auth.authenticate("admin", pw).role == "admin"
        assert ctx.auth.ensure_admin() is None
    finally:
        ctx.close()


def test_parse_departments() -> None:
    assert A.parse_departments(None) is None
    assert A.parse_departments("*") is None
    assert A.parse_departments("") == ()
    assert A.parse_departments(" Cardiology,radiology ,") == ("cardiology", "radiology")


def test_require() -> None:
    p = A.Principal("v", "viewer", A.ROLES["viewer"], method="token")
    assert A.require(p, "read") is p
    with pytest.raises(A.AccessDenied):
        A.require(p, "delete")
