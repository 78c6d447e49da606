"""/admin/api: administrators manage users, tokens, departments and rules over HTTP; every change is audited."""

from __future__ import annotations

from starlette.testclient import TestClient

from openpacs.web.app import build_app

from .conftest import bearer


def test_admin_api_flow(world) -> None:
    client = TestClient(build_app(world.ctx))
    admin = bearer(world.tokens["admin"])
    assert client.get("/admin/api/users", headers=bearer(world.tokens["radiologist"])).status_code == 403
    assert client.get("/admin/api/users").status_code == 401
    r = client.post(
        "/admin/api/users",
        headers=admin,
        json={"username": "nm1", "role": "viewer", "departments": ["nuclear-medicine"]},
    )
    assert r.status_code == 201 and len(r.json()["password"]) >= 16
    assert client.post("/admin/api/users", headers=admin, json={"username": "x", "role": "god"}).status_code == 400
    r = client.post("/admin/api/users/nm1/tokens", headers=admin, json={"name": "script", "days": 1})
    assert r.status_code == 201
    token, tid = r.json()["token"], r.json()["id"]
    assert client.get("/dicom-web/studies", headers=bearer(token)).status_code in (200, 204)
    users = {u["username"]: u for u in client.get("/admin/api/users", headers=admin).json()}
    assert users["nm1"]["departments"] == ["nuclear-medicine"] and users["nm1"]["role"] == "viewer"
    r = client.post(
        "/admin/api/departments/rules",
        headers=admin,
        json={"department": "nuclear-medicine", "modality": "NM,PT", "priority": 5},
    )
    assert r.status_code == 201
    deps = client.get("/admin/api/departments", headers=admin).json()
    assert any(x["department"] == "nuclear-medicine" and x["modality"] == "NM,PT" for x in deps["rules"])
    assert client.post("/admin/api/users/nm1", headers=admin, json={"role": "technologist"}).status_code == 200
    assert client.delete(f"/admin/api/tokens/{tid}", headers=admin).status_code == 204
    for path in ("tokens", "departments/rules"):  # ids beyond a 64-bit row id: 400, not 500
        for bad in ("99999999999999999999999", "0", "x"):
            assert client.delete(f"/admin/api/{path}/{bad}", headers=admin).status_code == 400, (path, bad)
    assert client.get("/dicom-web/studies", headers=bearer(token)).status_code == 401
    assert client.post("/admin/api/departments/reapply", headers=admin).json()["changed"] == 0
    world.ctx.audit.flush()
    details = [e.detail for e in world.ctx.audit.search(event="SecurityAlert", user="admin")]
    for expected in ("user 'nm1' created", "API token", "department rule", "now technologist", "revoked"):
        assert any(expected in d for d in details), expected


def test_admin_api_needs_csrf_with_a_session(world) -> None:
    client = TestClient(build_app(world.ctx))
    p = world.ctx.auth.authenticate("admin", world.passwords["admin"])
    cookie, csrf = world.ctx.auth.create_session(p)
    client.cookies.set("openpacs_session", cookie)
    assert client.get("/admin/api/users").status_code == 200
    assert client.post("/admin/api/users", json={"username": "y1", "role": "viewer"}).status_code == 403
    r = client.post("/admin/api/users", json={"username": "y1", "role": "viewer"}, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 201
