"""Reconciliation end to end on a real `openpacs serve`: orders over MLLP (python-hl7), studies over C-STORE (DCMTK
storescu); a study whose patient disagrees with its order and a study with no order land on the QC list (API) with
the differences, a matching one does not; linking moves the study to the order's patient and accession (QIDO-RS, and
the patient module of the file fetched with WADO-RS), dismissing closes an item; both are audited."""

from __future__ import annotations

import json
import time
import urllib.request

import pytest
from helpers import dcmtk
from helpers.dicomdata import small_image, write_part10
from helpers.server import OpenPACSServer, stop_cleanly
from pydicom.uid import generate_uid
from test_hl7_listener import api, qido, wado_instances
from test_worklist_mpps import orm, send


@pytest.fixture(scope="module")
def srv(request, backend, require_dcmtk, tmp_path_factory):
    base = tmp_path_factory.mktemp(f"qc-{backend}")
    index_url = request.getfixturevalue("pg_cluster").create_database() if backend == "postgresql" else None
    server = OpenPACSServer(base / "data", index_url=index_url)
    server.start()
    yield server
    stop_cleanly(server)


def store(srv, tmp, accession: str, pid: str, name: str, birth: str = "19700203", date: str = "20250310") -> str:
    study, series = generate_uid(), generate_uid()
    ds = small_image(fill=1)
    ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.AccessionNumber = pid, name, birth, accession
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.Modality = study, series, generate_uid(), "CT"
    ds.StudyDate = date
    dcmtk.store(srv.dicom_port, [write_part10(ds, tmp / f"{accession}.dcm")]).check()
    return study


def post(srv, path: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{srv.http_port}/api{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def qc_of(srv, study: str, status: str = "all", timeout: float = 15) -> dict | None:
    deadline = time.monotonic() + timeout
    while True:
        items = [i for i in api(srv, "/qc", status=status)["items"] if i["study_instance_uid"] == study]
        if items or time.monotonic() > deadline:
            return items[0] if items else None
        time.sleep(0.2)


def test_qc_list_link_dismiss(srv, tmp_path) -> None:
    t = srv.backend[:2].upper()
    for cid, order, acc, pid, name in ((f"{t}q1", f"{t}QO1", f"{t}QA1", f"{t}QP1", "Right^Name"),
                                       (f"{t}q2", f"{t}QO2", f"{t}QA2", f"{t}QP2", "Same^Sam"),
                                       (f"{t}q3", f"{t}QO3", f"{t}QA3", f"{t}QP3", "Linked^Lara")):
        msg = orm(cid, "NW", order, acc, pid, name, "CT", "CT01", "20250310090000")
        assert send(srv, msg.replace("19700203", "19700203")) == ("AA", "")
    mismatch = store(srv, tmp_path, f"{t}QA1", f"{t}QP1", "Wrong^Name")
    matching = store(srv, tmp_path, f"{t}QA2", f"{t}QP2", "SAME^SAM")  # case differs only: a match
    orphan = store(srv, tmp_path, f"{t}QX", f"{t}QP9", "Nobody^Known", date="20240101")

    item = qc_of(srv, mismatch)
    assert item is not None and item["kind"] == "mismatch" and item["status"] == "open"
    assert item["differences"] == [{"attribute": "PatientName", "study": "Wrong^Name", "order": "Right^Name"}]
    lone = qc_of(srv, orphan)
    assert lone is not None and lone["kind"] == "no-order" and lone["differences"] == []
    assert qc_of(srv, matching, timeout=2) is None

    steps = api(srv, "/worklist", accession=f"{t}QA3")["items"]
    status, linked = post(srv, f"/qc/{lone['id']}/link", {"step_id": steps[0]["id"]})
    assert status == 200, linked
    assert linked["status"] == "linked" and linked["patient_id"] == f"{t}QP3"
    assert linked["accession_number"] == f"{t}QA3" and linked["patient_name"] == "Linked^Lara"
    (row,) = qido(srv, StudyInstanceUID=orphan, includefield="00100010")
    assert row["00100020"]["Value"] == [f"{t}QP3"] and row["00080050"]["Value"] == [f"{t}QA3"]
    (ds,) = wado_instances(srv, orphan)
    assert ds.PatientID == f"{t}QP3" and str(ds.PatientName) == "Linked^Lara"
    assert post(srv, f"/qc/{lone['id']}/link", {"step_id": steps[0]["id"]})[0] == 409
    assert post(srv, f"/qc/{item['id']}/link", {"step_id": 999999})[0] == 404

    status, gone = post(srv, f"/qc/{item['id']}/dismiss", {})
    assert status == 200 and gone["status"] == "dismissed" and gone["resolved_by"]
    assert post(srv, f"/qc/{item['id']}/dismiss", {})[0] == 409
    assert post(srv, "/qc/999999/dismiss", {})[0] == 404
    open_ids = {i["id"] for i in api(srv, "/qc")["items"]}
    assert item["id"] not in open_ids and lone["id"] not in open_ids
    time.sleep(0.6)  # the audit trail writes in batches
    events = api(srv, "/audit", event="PatientRecord", study=orphan)
    events = events["items"] if isinstance(events, dict) else events
    assert any("linked to worklist entry" in (e.get("detail") or "") for e in events)
