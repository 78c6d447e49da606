"""/api/hl7/messages through the real app with authentication on: filters, keyset pages, one message, the admin
right (every other role is refused), bad parameters."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from openpacs.config import Settings
from openpacs.context import Context, build_context
from openpacs.hl7.server import build_dispatcher
from openpacs.web.app import build_app

ROLES = ("admin", "radiologist", "physician", "technologist", "viewer", "auditor")


@pytest.fixture
def env(tmp_path: Path) -> Iterator[tuple[Context, TestClient, dict[str, dict[str, str]]]]:
    ctx = build_context(Settings(data_dir=tmp_path / "data", auth="on"))
    assert ctx.auth is not None
    heads = {}
    for role in ROLES:
        ctx.auth.add_user(role, f"pw-{role}-0123456789", role)
        heads[role] = {"Authorization": f"Bearer {ctx.auth.create_token(role)[1]}"}
    d = build_dispatcher(ctx)
    for i in range(7):
        trig = "A08" if i % 2 else "A04"
        d.handle_sync(f"MSH|^~\\&|RIS|HOSP|PACS|RAD|2025||ADT^{trig}|m{i}|P|2.5\rPID|1||P{i % 3}^^^H||N^{i}".encode())
    d.handle_sync(b"MSH|^~\\&|RIS|HOSP|PACS|RAD|2025||ADT^A04|bad1|P|2.5\rPID|1||||NoId")
    d.handle_sync(b"garbage")
    with TestClient(build_app(ctx)) as client:
        yield ctx, client, heads
    ctx.close()


def test_search_filters_and_pages(env) -> None:
    _, c, heads = env
    admin = heads["admin"]
    everything = c.get("/api/hl7/messages", headers=admin).json()
    assert len(everything["items"]) == 9 and everything["next"] is None
    ids = [m["id"] for m in everything["items"]]
    assert ids == sorted(ids, reverse=True)
    seen = []
    cursor = None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = c.get("/api/hl7/messages", params=params, headers=admin).json()
        seen += [m["id"] for m in page["items"]]
        cursor = page["next"]
        if cursor is None:
            break
    assert seen == ids
    assert {m["control_id"] for m in c.get("/api/hl7/messages", params={"type": "ADT^A08"},
                                           headers=admin).json()["items"]} == {"m1", "m3", "m5"}
    assert len(c.get("/api/hl7/messages", params={"type": "adt"}, headers=admin).json()["items"]) == 8
    [ae] = c.get("/api/hl7/messages", params={"result": "AE"}, headers=admin).json()["items"]
    assert ae["control_id"] == "bad1" and ae["error_location"] == "PID^1^3"
    [ar] = c.get("/api/hl7/messages", params={"result": "ar"}, headers=admin).json()["items"]
    assert ar["message_type"] == "" and ar["result"] == "AR"
    assert {m["control_id"] for m in c.get("/api/hl7/messages", params={"patient": "P1"},
                                           headers=admin).json()["items"]} == {"m1", "m4"}
    [one] = c.get("/api/hl7/messages", params={"control_id": "m2"}, headers=admin).json()["items"]
    detail = c.get(f"/api/hl7/messages/{one['id']}", headers=admin).json()
    assert detail["raw"].startswith("MSH|^~\\&|RIS") and "MSA|AA|m2" in detail["ack"]
    assert c.get("/api/hl7/messages", params={"since": "2999-01-01T00:00:00Z"}, headers=admin).json()["items"] == []
    assert len(c.get("/api/hl7/messages", params={"until": "2999-01-01T00:00:00Z"},
                     headers=admin).json()["items"]) == 9


def test_bad_parameters_and_unknown_message(env) -> None:
    _, c, heads = env
    admin = heads["admin"]
    for params in ({"result": "XX"}, {"cursor": "!!"}, {"limit": 0}, {"since": "yesterday"}):
        r = c.get("/api/hl7/messages", params=params, headers=admin)
        assert r.status_code == 400 and r.json()["detail"], params
    assert c.get("/api/hl7/messages/999999", headers=admin).status_code == 404
    assert c.get("/api/hl7/messages/abc", headers=admin).status_code == 400


def test_only_administrators_read_the_log(env) -> None:
    _, c, heads = env
    for role in ROLES:
        expected = 200 if role == "admin" else 403
        assert c.get("/api/hl7/messages", headers=heads[role]).status_code == expected, role
        assert c.get("/api/hl7/messages/1", headers=heads[role]).status_code == expected, role
    assert c.get("/api/hl7/messages").status_code == 401
    doc = c.get("/api/openapi.json", headers=heads["viewer"]).json()
    assert "/api/hl7/messages" in doc["paths"] or "/hl7/messages" in doc["paths"]
