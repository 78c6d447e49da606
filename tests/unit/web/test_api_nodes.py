"""/api/nodes, /api/jobs, /api/docs through the real app with authentication on: every endpoint, bad parameters,
the rights matrix across roles, C-ECHO against a real SCP (pynetdicom), and the OpenAPI document validates."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from openapi_spec_validator import validate
from starlette.testclient import TestClient

from openpacs.config import RemoteAE, Settings
from openpacs.context import Context, build_context
from openpacs.dimse import access
from openpacs.web.app import build_app

ROLES = ("admin", "radiologist", "physician", "technologist", "viewer", "auditor")


@pytest.fixture
def env(tmp_path: Path) -> Iterator[tuple[Context, TestClient, dict[str, dict[str, str]]]]:
    s = Settings(data_dir=tmp_path / "data", auth="on")
    s.remote_aes = {"tomlpacs": RemoteAE(aet="TOMLPACS", host="127.0.0.1", port=104)}
    ctx = build_context(s)
    assert ctx.auth is not None
    heads = {}
    for role in ROLES:
        ctx.auth.add_user(role, f"pw-{role}-0123456789", role)
        heads[role] = {"Authorization": f"Bearer {ctx.auth.create_token(role)[1]}"}
    with TestClient(build_app(ctx)) as client:
        yield ctx, client, heads
    ctx.close()


def free_port() -> int:
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        return int(sk.getsockname()[1])


NODE = {"name": "ct1", "aet": "CT_SCANNER", "host": "127.0.0.1", "port": 11113, "kind": "modality",
        "allow": ["echo", "store"]}


def test_crud_and_validation(env) -> None:
    ctx, c, heads = env
    admin = heads["admin"]
    r = c.post("/api/nodes", json=NODE, headers=admin)
    assert r.status_code == 201, r.text
    assert r.json()["editable"] and r.json()["allow"] == ["echo", "store"]
    assert c.post("/api/nodes", json=NODE, headers=admin).status_code == 409
    names = {n["name"]: n for n in c.get("/api/nodes", headers=admin).json()}
    assert names["tomlpacs"]["source"] == "config" and not names["tomlpacs"]["editable"]
    assert names["ct1"]["source"] == "index"
    for bad in ({"aet": "A" * 17}, {"aet": "BAD\\AE"}, {"aet": "BAD\x01"}, {"port": 0}, {"port": 65536},
                {"port": "x"}, {"host": ""}, {"host": "a b"}, {"allow": ["echo", "fly"]}, {"kind": "robot"},
                {"name": "../x"}, {"tls": "yes"}, {"colour": "red"}):
        r = c.post("/api/nodes", json={**NODE, "name": "n2", **bad}, headers=admin)
        assert r.status_code == 400, (bad, r.status_code, r.text)
        assert r.json()["detail"], bad
    assert c.post("/api/nodes", content=b"{not json", headers={**admin, "Content-Type": "application/json"}).status_code == 400
    r = c.put("/api/nodes/ct1", json={"port": 2000, "description": "room 3"}, headers=admin)
    assert r.status_code == 200 and r.json()["port"] == 2000 and r.json()["aet"] == "CT_SCANNER"
    assert c.put("/api/nodes/ct1", json={"port": -1}, headers=admin).status_code == 400
    assert c.put("/api/nodes/nope", json={"port": 2000}, headers=admin).status_code == 404
    assert c.put("/api/nodes/tomlpacs", json={"port": 2000}, headers=admin).status_code == 409
    assert c.delete("/api/nodes/tomlpacs", headers=admin).status_code == 409
    assert c.post("/api/nodes", json={**NODE, "name": "tomlpacs"}, headers=admin).status_code == 409
    assert c.get("/api/nodes/ct1", headers=admin).json()["description"] == "room 3"
    assert c.get("/api/nodes/nope", headers=admin).status_code == 404
    # a running process sees the node at once (its cache is cleared), as the DIMSE access checks read it
    assert access.known_peer(ctx.settings, "CT_SCANNER", "127.0.0.1") is not None
    assert access.allowed_operations(ctx.settings, "CT_SCANNER", "127.0.0.1") == frozenset({"echo", "store"})
    assert c.delete("/api/nodes/ct1", headers=admin).status_code == 204
    assert c.delete("/api/nodes/ct1", headers=admin).status_code == 404
    assert access.known_peer(ctx.settings, "CT_SCANNER", "127.0.0.1") is None
    ctx.audit.flush()
    details = [e.detail for e in ctx.audit.search(event="SecurityAlert", user="admin")]
    assert any("remote node 'ct1' added" in d for d in details)
    assert any("remote node 'ct1' removed" in d for d in details)


def test_other_process_sees_a_node_within_the_cache_time(env, monkeypatch) -> None:
    from openpacs.services.nodes import NodesService

    ctx, c, heads = env
    other = NodesService(ctx.settings, ctx.index, ttl=0.0, bind=False)  # another worker, cache expired
    assert "ct1" not in other.remote_aes()
    assert c.post("/api/nodes", json=NODE, headers=heads["admin"]).status_code == 201
    assert other.remote_aes()["ct1"].aet == "CT_SCANNER"


def test_rights_matrix(env) -> None:
    ctx, c, heads = env
    c.post("/api/nodes", json=NODE, headers=heads["admin"])
    readers = {"admin", "radiologist", "physician", "technologist", "viewer"}
    for role in ROLES:
        h = heads[role]
        expect_read = 200 if role in readers else 403
        assert c.get("/api/nodes", headers=h).status_code == expect_read, role
        assert c.get("/api/nodes/ct1", headers=h).status_code == expect_read, role
        assert c.get("/api/jobs", headers=h).status_code == expect_read, role
        write = 403 if role != "admin" else None
        if write:
            assert c.post("/api/nodes", json={**NODE, "name": "x" + role}, headers=h).status_code == 403, role
            assert c.put("/api/nodes/ct1", json={"port": 5}, headers=h).status_code == 403, role
            assert c.delete("/api/nodes/ct1", headers=h).status_code == 403, role
            assert c.post("/api/nodes/ct1/echo", headers=h).status_code == 403, role
    for path in ("/api/nodes", "/api/jobs", "/api/nodes/ct1"):
        assert c.get(path).status_code == 401


def test_echo_success_and_failure(env) -> None:
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import Verification

    ctx, c, heads = env
    port = free_port()
    scp = AE(ae_title="ECHOSCP")
    scp.add_supported_context(Verification)
    server = scp.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_ECHO, lambda e: 0x0000)])
    try:
        c.post("/api/nodes", json={**NODE, "name": "up", "aet": "ECHOSCP", "port": port}, headers=heads["admin"])
        r = c.post("/api/nodes/up/echo", headers=heads["admin"])
        assert r.status_code == 200, r.text
        doc = r.json()
        assert doc["ok"] is True and doc["status"] == 0 and doc["ms"] is not None and doc["ms"] >= 0
    finally:
        server.shutdown()
    act = c.get("/api/nodes/up", headers=heads["admin"]).json()["activity"]
    assert act["last_echo_ok"] is True and act["last_echo_ms"] is not None and act["last_echo_at"]
    down = free_port()
    c.post("/api/nodes", json={**NODE, "name": "down", "aet": "NOBODY", "port": down}, headers=heads["admin"])
    doc = c.post("/api/nodes/down/echo", headers=heads["admin"]).json()
    assert doc["ok"] is False and doc["ms"] is None and doc["detail"]
    assert c.get("/api/nodes/down", headers=heads["admin"]).json()["activity"]["last_echo_ok"] is False
    assert c.post("/api/nodes/nope/echo", headers=heads["admin"]).status_code == 404


def test_jobs(env) -> None:
    import json
    from datetime import UTC, datetime

    from sqlalchemy import insert

    from openpacs.index.schema import jobs

    ctx, c, heads = env
    h = heads["viewer"]
    assert c.get("/api/jobs", headers=h).json() == {"items": [], "next": None}
    now = datetime.now(UTC)
    with ctx.index.write_engine.begin() as conn:
        for i in range(5):
            conn.execute(insert(jobs).values(kind="forward" if i % 2 else "retrieve", state="pending" if i < 3 else "failed",
                                             payload=json.dumps({"n": i}), progress=0.0, created_at=now, updated_at=now))
    page = c.get("/api/jobs", params={"limit": 2}, headers=h).json()
    assert [j["payload"]["n"] for j in page["items"]] == [4, 3] and page["next"]
    page2 = c.get("/api/jobs", params={"limit": 2, "cursor": page["next"]}, headers=h).json()
    assert [j["payload"]["n"] for j in page2["items"]] == [2, 1]
    assert {j["state"] for j in c.get("/api/jobs", params={"state": "failed"}, headers=h).json()["items"]} == {"failed"}
    assert {j["kind"] for j in c.get("/api/jobs", params={"kind": "forward"}, headers=h).json()["items"]} == {"forward"}
    jid = page["items"][0]["id"]
    assert c.get(f"/api/jobs/{jid}", headers=h).json()["id"] == jid
    for bad in ({"state": "sleeping"}, {"limit": 0}, {"limit": 100000}, {"cursor": "zzz"}):
        assert c.get("/api/jobs", params=bad, headers=h).status_code == 400, bad
    assert c.get("/api/jobs/999999", headers=h).status_code == 404
    for bad in ("x", "0", "99999999999999999999999"):
        assert c.get(f"/api/jobs/{bad}", headers=h).status_code == 400, bad


def test_openapi_validates_and_docs_are_local(env) -> None:
    ctx, c, heads = env
    doc = c.get("/api/openapi.json", headers=heads["viewer"]).json()
    validate(doc)
    for path in ("/nodes", "/nodes/{name}", "/nodes/{name}/echo", "/jobs", "/jobs/{job_id}", "/users", "/audit",
                 "/audit/export", "/departments/rules"):
        assert path in doc["paths"], path
    r = c.get("/api/docs", headers=heads["viewer"])
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "http" not in csp
    assert "https://" not in r.text and "cdn" not in r.text.lower()
    for asset in ("docs.js", "docs.css"):
        assert c.get(f"/api/docs/{asset}", headers=heads["viewer"]).status_code == 200
    assert c.get("/api/docs/../../etc/passwd", headers=heads["viewer"]).status_code == 404
