"""/api/worklist through the real app with authentication on: create by hand (store right), list with filters and
keyset pages, one entry, cancel, bad bodies 400, a second active entry for an accession 409, the audit record."""

from __future__ import annotations

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
    assert ctx.auth is not None
    heads = {}
    for role in ROLES:
        ctx.auth.add_user(role, f"pw-{role}-0123456789", role)
        heads[role] = {"Authorization": f"Bearer {ctx.auth.create_token(role)[1]}"}
    with TestClient(build_app(ctx)) as client:
        yield ctx, client, heads
    ctx.close()


def body(acc: str, **kw: str) -> dict[str, str]:
    return {"PatientID": "P1", "PatientName": "Doe^Jane", "AccessionNumber": acc, "Modality": "CT",
            "ScheduledProcedureStepStartDate": "20250401", "ScheduledProcedureStepStartTime": "0930",
            "ScheduledStationAETitle": "CT01", **kw}


def test_create_list_cancel(env) -> None:
    ctx, c, heads = env
    tech = heads["technologist"]
    r = c.post("/api/worklist", json=body("ACC1"), headers=tech)
    assert r.status_code == 201, r.text
    entry = r.json()
    assert entry["status"] == "SCHEDULED" and entry["source"] == "api"
    assert entry["scheduled_procedure_step_start_time"] == "093000"
    assert entry["scheduled_procedure_step_id"]
    for i in range(2, 6):
        assert c.post("/api/worklist", json=body(f"ACC{i}", Modality="MR" if i % 2 else "CT"),
                      headers=tech).status_code == 201
    assert c.post("/api/worklist", json=body("ACC1"), headers=tech).status_code == 409
    everything = c.get("/api/worklist", headers=heads["viewer"]).json()
    assert [e["accession_number"] for e in everything["items"]] == ["ACC5", "ACC4", "ACC3", "ACC2", "ACC1"]
    seen, cursor = [], None
    while True:
        page = c.get("/api/worklist", params={"limit": 2, **({"cursor": cursor} if cursor else {})},
                     headers=tech).json()
        seen += [e["accession_number"] for e in page["items"]]
        cursor = page["next"]
        if cursor is None:
            break
    assert seen == ["ACC5", "ACC4", "ACC3", "ACC2", "ACC1"]
    mr = c.get("/api/worklist", params={"modality": "MR"}, headers=tech).json()["items"]
    assert {e["accession_number"] for e in mr} == {"ACC3", "ACC5"}
    assert c.get("/api/worklist", params={"accession": "ACC2"}, headers=tech).json()["items"][0]["modality"] == "CT"
    assert c.get("/api/worklist", params={"date_from": "20250402"}, headers=tech).json()["items"] == []
    assert c.get(f"/api/worklist/{entry['id']}", headers=tech).json()["accession_number"] == "ACC1"
    assert c.get("/api/worklist/99999", headers=tech).status_code == 404
    r = c.delete(f"/api/worklist/{entry['id']}", headers=tech)
    assert r.status_code == 200 and r.json()["status"] == "CANCELLED"
    assert c.delete(f"/api/worklist/{entry['id']}", headers=tech).status_code == 409
    assert c.delete("/api/worklist/99999", headers=tech).status_code == 404
    active = [e["accession_number"] for e in c.get("/api/worklist", headers=tech).json()["items"]]
    assert "ACC1" not in active
    cancelled = c.get("/api/worklist", params={"status": "CANCELLED"}, headers=tech).json()["items"]
    assert [e["accession_number"] for e in cancelled] == ["ACC1"]
    # the accession may be scheduled again once cancelled
    assert c.post("/api/worklist", json=body("ACC1"), headers=tech).status_code == 201
    assert ctx.audit is not None
    ctx.audit.flush()
    events = ctx.audit.search(event="OrderRecord")
    assert [(e.action, e.user) for e in events][:2] == [("C", "technologist")] * 2
    assert any(e.action == "D" and "ACC1 " not in e.detail and e.detail.endswith("ACC1") for e in events)
    assert all(e.patient_id == "P1" for e in events)


@pytest.mark.parametrize("bad", [
    {"PatientID": "", },
    {"ScheduledProcedureStepStartDate": "2025-04-01"},
    {"ScheduledProcedureStepStartTime": "9:30"},
    {"RequestedProcedurePriority": "URGENT"},
    {"StudyInstanceUID": "not-a-uid"},
    {"PatientSex": "X"},
    {"AccessionNumber": "A" * 17},
])
def test_bad_bodies(env, bad) -> None:
    _, c, heads = env
    r = c.post("/api/worklist", json=body("ACCB", **bad), headers=heads["admin"])
    assert r.status_code == 400, r.text
    assert r.json()["detail"]


def test_rights(env) -> None:
    _, c, heads = env
    for role in ROLES:
        post = c.post("/api/worklist", json=body(f"R{role[:10]}"), headers=heads[role]).status_code
        get = c.get("/api/worklist", headers=heads[role]).status_code
        assert post == (201 if role in ("admin", "radiologist", "technologist") else 403), role
        assert get == (403 if role == "auditor" else 200), role
    assert c.get("/api/worklist").status_code == 401
