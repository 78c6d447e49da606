"""/api/users, tokens, departments, rules and the audit trail through the real app with authentication on: every
endpoint, bad parameters, the rights matrix across roles, Security Alerts for each change, /admin/api still an alias."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from openpacs.config import Settings
from openpacs.context import Context, build_context
from openpacs.web.app import build_app

ROLES = ("admin", "radiologist", "physician", "technologist", "viewer", "auditor")


@pytest.fixture
def env(tmp_path: Path) -> Iterator[tuple[Context, TestClient, dict[str, dict[str, str]]]]:
    ctx = build_context(Settings(data_dir=tmp_path / "data", auth="on"))
    assert ctx.auth is not None and ctx.departments is not None
    ctx.departments.ensure_standard()
    heads = {}
    for role in ROLES:
        ctx.auth.add_user(role, f"pw-{role}-0123456789", role)
        heads[role] = {"Authorization": f"Bearer {ctx.auth.create_token(role)[1]}"}
    with TestClient(build_app(ctx)) as client:
        yield ctx, client, heads
    ctx.close()


def test_users_and_tokens(env) -> None:
    ctx, c, heads = env
    a = heads["admin"]
    r = c.post("/api/users", json={"username": "nm1", "role": "viewer", "departments": ["nuclear-medicine"]}, headers=a)
    assert r.status_code == 201 and len(r.json()["password"]) >= 16
    assert c.post("/api/users", json={"username": "nm1", "role": "viewer"}, headers=a).status_code == 409
    for bad in ({"username": "x", "role": "god"}, {"username": "a b", "role": "viewer"}, {"role": "viewer"},
                {"username": "y", "role": "viewer", "password": "short"}, {"username": "z", "role": "viewer", "x": 1}):
        r = c.post("/api/users", json=bad, headers=a)
        assert r.status_code == 400 and r.json()["detail"], bad
    u = c.get("/api/users/nm1", headers=a).json()
    assert u["role"] == "viewer" and u["departments"] == ["nuclear-medicine"]
    assert c.get("/api/users/nobody", headers=a).status_code == 404
    r = c.patch("/api/users/nm1", json={"role": "technologist"}, headers=a)
    assert r.status_code == 200 and r.json()["role"] == "technologist" and r.json()["departments"] == ["nuclear-medicine"]
    assert c.patch("/api/users/nm1", json={"role": "god"}, headers=a).status_code == 400
    assert c.patch("/api/users/nobody", json={"disabled": True}, headers=a).status_code == 404
    r = c.post("/api/users/nm1/tokens", json={"name": "script", "days": 1}, headers=a)
    assert r.status_code == 201
    token, tid = r.json()["token"], r.json()["id"]
    assert c.get("/api/nodes", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    listed = c.get("/api/users/nm1/tokens", headers=a).json()
    assert [t["id"] for t in listed] == [tid] and "token" not in listed[0] and not listed[0]["revoked"]
    assert c.post("/api/users/nm1/tokens", json={"days": "soon"}, headers=a).status_code == 400
    assert c.post("/api/users/nobody/tokens", json={}, headers=a).status_code == 404
    assert c.patch("/api/users/nm1", json={"disabled": True}, headers=a).json()["disabled"] is True
    assert c.get("/api/nodes", headers={"Authorization": f"Bearer {token}"}).status_code == 401
    c.patch("/api/users/nm1", json={"disabled": False}, headers=a)
    r = c.post("/api/users/nm1/password", json={}, headers=a)
    assert r.status_code == 200 and ctx.auth.authenticate("nm1", r.json()["password"]) is not None
    assert c.post("/api/users/nm1/password", json={"password": "short"}, headers=a).status_code == 400
    assert c.delete(f"/api/tokens/{tid}", headers=a).status_code == 204
    assert c.delete(f"/api/tokens/{tid}", headers=a).status_code == 404
    for bad in ("x", "0", "99999999999999999999999"):
        assert c.delete(f"/api/tokens/{bad}", headers=a).status_code == 400, bad
    ctx.audit.flush()
    details = [e.detail for e in ctx.audit.search(event="SecurityAlert", user="admin")]
    for expected in ("user 'nm1' created", "now technologist", "disabled", "password of 'nm1'", "API token",
                     "revoked"):
        assert any(expected in d for d in details), expected


def test_departments_and_rules(env) -> None:
    ctx, c, heads = env
    a = heads["admin"]
    assert c.post("/api/departments", json={"code": "dental", "name": "Dental"}, headers=a).status_code == 201
    assert c.post("/api/departments", json={"code": "dental"}, headers=a).status_code == 409
    assert c.post("/api/departments", json={"code": "a,b"}, headers=a).status_code == 400
    assert any(d["code"] == "dental" for d in c.get("/api/departments", headers=a).json()["departments"])
    r = c.post("/api/departments/rules", json={"department": "dental", "modality": "IO,PX", "priority": 5}, headers=a)
    assert r.status_code == 201
    rid = r.json()["id"]
    assert any(x["id"] == rid and x["modality"] == "IO,PX" for x in c.get("/api/departments/rules", headers=a).json())
    for bad in ({"department": "nowhere", "modality": "CT"}, {"department": "dental"},
                {"department": "dental", "modality": "CT", "priority": "high"},
                {"department": "dental", "modality": "CT", "priority": 2**40}):
        assert c.post("/api/departments/rules", json=bad, headers=a).status_code == 400, bad
    assert c.post("/api/departments/reapply", headers=a).json() == {"changed": 0}
    assert c.delete(f"/api/departments/rules/{rid}", headers=a).status_code == 204
    assert c.delete(f"/api/departments/rules/{rid}", headers=a).status_code == 404
    assert c.delete("/api/departments/rules/abc", headers=a).status_code == 400
    # the old /admin/api stays an alias over the same services
    assert any(d["code"] == "dental" for d in c.get("/admin/api/departments", headers=a).json()["departments"])
    assert any(u["username"] == "viewer" for u in c.get("/admin/api/users", headers=a).json())


def test_audit_search_pagination_and_export(env) -> None:
    ctx, c, heads = env
    for i in range(7):
        ctx.audit.record("Query", user="alice", protocol="HTTP", study_uids=[f"1.2.3.{i}"], patient_id=f"P{i % 2}",
                         outcome=0 if i % 3 else 4, detail=f"q{i}")
    ctx.audit.record("SecurityAlert", user="=cmd|' /C calc'!A0", event_type="110132", outcome=4, detail="injection")
    ctx.audit.flush()
    h = heads["auditor"]
    page = c.get("/api/audit", params={"user": "alice", "limit": 3}, headers=h).json()
    assert [e["detail"] for e in page["items"]] == ["q6", "q5", "q4"] and page["next"]
    seen = [e["detail"] for e in page["items"]]
    while page["next"]:
        page = c.get("/api/audit", params={"user": "alice", "limit": 3, "cursor": page["next"]}, headers=h).json()
        seen += [e["detail"] for e in page["items"]]
    assert seen == [f"q{i}" for i in range(6, -1, -1)]
    assert {e["patient_id"] for e in c.get("/api/audit", params={"patient": "P1"}, headers=h).json()["items"]} == {"P1"}
    assert [e["detail"] for e in c.get("/api/audit", params={"study": "1.2.3.5"}, headers=h).json()["items"]] == ["q5"]
    fails = c.get("/api/audit", params={"user": "alice", "outcome": 4}, headers=h).json()["items"]
    assert sorted(e["detail"] for e in fails) == ["q0", "q3", "q6"]
    assert c.get("/api/audit", params={"event_type": "110132"}, headers=h).json()["items"][0]["detail"] == "injection"
    assert c.get("/api/audit", params={"event": "Query", "until": "2000-01-01T00:00:00Z"}, headers=h).json()["items"] == []
    assert len(c.get("/api/audit", params={"event": "Query", "since": "2000-01-01T00:00:00Z"}, headers=h).json()["items"]) == 7
    for bad in ({"event": "Nope"}, {"outcome": 3}, {"outcome": "x"}, {"since": "yesterday"}, {"limit": 0},
                {"cursor": "!!"}):
        r = c.get("/api/audit", params=bad, headers=h)
        assert r.status_code == 400 and r.json()["detail"], bad
    r = c.get("/api/audit/export", params={"format": "csv", "user": "alice"}, headers=h)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert [x["detail"] for x in rows] == [f"q{i}" for i in range(7)] and all(x["user"] == "alice" for x in rows)
    r = c.get("/api/audit/export", params={"format": "csv", "event": "SecurityAlert", "event_type": "110132"}, headers=h)
    assert list(csv.DictReader(io.StringIO(r.text)))[0]["user"].startswith("'=")  # no spreadsheet formula
    r = c.get("/api/audit/export", params={"format": "xml", "user": "alice"}, headers=h)
    assert r.status_code == 200 and r.text.count("<AuditMessage>") + r.text.count("<AuditMessage ") == 7
    assert c.get("/api/audit/export", params={"format": "pdf"}, headers=h).status_code == 400
    ctx.audit.flush()
    assert ctx.audit.search(event="AuditLogUsed", user="auditor")  # reading the trail is itself audited


def test_rights_matrix(env) -> None:
    ctx, c, heads = env
    for role in ROLES:
        h = heads[role]
        admin = 200 if role == "admin" else 403
        audit = 200 if role in ("admin", "auditor") else 403
        assert c.get("/api/users", headers=h).status_code == admin, role
        assert c.get("/api/users/viewer", headers=h).status_code == admin, role
        assert c.get("/api/users/viewer/tokens", headers=h).status_code == admin, role
        assert c.get("/api/departments", headers=h).status_code == admin, role
        assert c.get("/api/departments/rules", headers=h).status_code == admin, role
        assert c.get("/api/audit", headers=h).status_code == audit, role
        assert c.get("/api/audit/export", headers=h).status_code == audit, role
        if role != "admin":
            assert c.post("/api/users", json={"username": "u" + role, "role": "viewer"}, headers=h).status_code == 403
            assert c.patch("/api/users/viewer", json={"disabled": True}, headers=h).status_code == 403
            assert c.post("/api/users/viewer/password", json={}, headers=h).status_code == 403
            assert c.post("/api/users/viewer/tokens", json={}, headers=h).status_code == 403
            assert c.delete("/api/tokens/1", headers=h).status_code == 403
            assert c.post("/api/departments", json={"code": "x" + role}, headers=h).status_code == 403
            assert c.post("/api/departments/reapply", headers=h).status_code == 403
            assert c.delete("/api/departments/rules/1", headers=h).status_code == 403
    for path in ("/api/users", "/api/audit", "/api/departments"):
        assert c.get(path).status_code == 401
    ctx.audit.flush()
    assert any("denied" in e.detail for e in ctx.audit.search(event="SecurityAlert", user="viewer"))


def test_session_needs_csrf(env) -> None:
    ctx, c, heads = env
    p = ctx.auth.authenticate("admin", "pw-admin-0123456789")
    cookie, csrf = ctx.auth.create_session(p)
    c.cookies.set("openpacs_session", cookie)
    assert c.get("/api/users").status_code == 200
    assert c.post("/api/users", json={"username": "s1", "role": "viewer"}).status_code == 403
    assert c.post("/api/users", json={"username": "s1", "role": "viewer"}, headers={"X-CSRF-Token": csrf}).status_code == 201
