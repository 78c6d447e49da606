"""/api/studies, series, instances, patients through the real app with authentication on: search filters, keyset
paging across ties, detail, tags, zip + DICOMDIR, delete rights, department scope, 400/404."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from starlette.testclient import TestClient

from openpacs.config import Settings
from openpacs.context import Context, build_context
from openpacs.services.types import Source
from openpacs.web.app import build_app


def part10(study: str, series: str, name: str, pid: str, date: str, modality: str = "CT", acc: str = "A1",
           desc: str = "CT HEAD") -> bytes:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.PatientName, ds.PatientID, ds.StudyDate, ds.Modality = name, pid, date, modality
    ds.AccessionNumber, ds.StudyDescription, ds.SeriesNumber, ds.InstanceNumber = acc, desc, 1, 1
    ds.ReferringPhysicianName = "WHO^DOCTOR"
    item = Dataset()
    item.CodeValue = "X1"
    ds.ProcedureCodeSequence = [item]
    ds.Rows = ds.Columns = 2
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = b"\0\1\2\3"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.fixture
def env(tmp_path: Path) -> Iterator[tuple[Context, TestClient, dict[str, dict[str, str]], list[str]]]:
    ctx = build_context(Settings(data_dir=tmp_path / "data", auth="on"))
    assert ctx.auth is not None
    heads = {}
    for role in ("admin", "viewer"):
        ctx.auth.add_user(role, f"pw-{role}-0123456789", role)
        heads[role] = {"Authorization": f"Bearer {ctx.auth.create_token(role)[1]}"}
    uids = []
    src = Source("IMPORT")
    for i in range(7):  # dates with ties: paging must neither skip nor repeat
        st = f"1.2.826.0.1.{i + 1}"
        uids.append(st)
        out = ctx.ingest.store_file(part10(st, st + ".1", f"DOE^JOHN{i % 2}", f"P{i}", f"2024010{1 + i // 3}",
                                           "MR" if i == 3 else "CT", acc=f"ACC{i}"), src)
        assert out.ok, out.message
    with TestClient(build_app(ctx)) as client:
        yield ctx, client, heads, uids
    ctx.close()


def test_search_filters_and_keyset_paging(env) -> None:
    ctx, c, h, uids = env
    a = h["admin"]
    r = c.get("/api/studies", headers=a)
    assert r.status_code == 200 and len(r.json()["items"]) == 7
    seen: list[str] = []
    cursor = None
    while True:
        r = c.get("/api/studies", params={"limit": 2, "sort": "date", **({"cursor": cursor} if cursor else {})}, headers=a)
        assert r.status_code == 200
        seen += [s["uid"] for s in r.json()["items"]]
        cursor = r.json()["next"]
        if not cursor:
            break
    assert sorted(seen) == sorted(uids) and len(seen) == 7
    dates = [x["date"] for x in c.get("/api/studies", params={"sort": "date"}, headers=a).json()["items"]]
    assert dates == sorted(dates)
    desc: list[str] = []
    cursor = None
    while True:
        r = c.get("/api/studies", params={"limit": 3, "sort": "-patient", **({"cursor": cursor} if cursor else {})},
                  headers=a).json()
        desc += [s["uid"] for s in r["items"]]
        cursor = r["next"]
        if not cursor:
            break
    assert sorted(desc) == sorted(uids) and len(desc) == 7
    assert len(c.get("/api/studies", params={"patient_name": "doe^john1"}, headers=a).json()["items"]) == 3
    assert len(c.get("/api/studies", params={"patient_name": "do*"}, headers=a).json()["items"]) == 7
    assert [s["uid"] for s in c.get("/api/studies", params={"modality": "MR"}, headers=a).json()["items"]] == [uids[3]]
    assert len(c.get("/api/studies", params={"date_from": "20240102", "date_to": "20240102"},
                     headers=a).json()["items"]) == 3
    assert len(c.get("/api/studies", params={"accession": "ACC1"}, headers=a).json()["items"]) == 1
    assert len(c.get("/api/studies", params={"patient_id": "P2"}, headers=a).json()["items"]) == 1
    assert len(c.get("/api/studies", params={"referring_physician": "who*"}, headers=a).json()["items"]) == 7
    assert len(c.get("/api/studies", params={"description": "CT*"}, headers=a).json()["items"]) == 7
    for bad in ({"sort": "nope"}, {"limit": 0}, {"limit": "x"}, {"cursor": "!!"}, {"date_from": "2024"},
                {"cursor": "WzFd"}):
        r = c.get("/api/studies", params=bad, headers=a)
        assert r.status_code == 400 and r.json()["detail"], bad


def test_detail_tags_patients_download(env) -> None:
    ctx, c, h, uids = env
    v = h["viewer"]
    d = c.get(f"/api/studies/{uids[0]}", headers=v).json()
    assert d["patient"]["id"] == "P0" and d["series"][0]["num_instances"] == 1
    assert d["series"][0]["thumbnail"].endswith("/thumbnail") and "StudyInstanceUIDs=" in d["viewer"]
    assert c.get("/api/studies/1.2.3.999", headers=v).status_code == 404
    assert c.get(f"/api/studies/{uids[0]}/series", headers=v).json()["items"][0]["uid"] == uids[0] + ".1"
    inst = c.get(f"/api/series/{uids[0]}.1/instances", headers=v).json()["items"]
    assert len(inst) == 1
    assert c.get("/api/series/9.9/instances", headers=v).status_code == 404
    t = c.get(f"/api/instances/{inst[0]['uid']}/tags", headers=v).json()
    byname = {e["keyword"]: e for e in t["elements"]}
    assert byname["PatientID"]["value"] == "P0" and byname["PatientName"]["value"] == "DOE^JOHN0"
    assert byname["ProcedureCodeSequence"]["items"][0][0]["value"] == "X1"
    assert byname["PixelData"]["bulk"] and "bytes" in byname["PixelData"]["value"]
    assert c.get("/api/instances/9.9/tags", headers=v).status_code == 404
    pl = c.get("/api/patients", params={"limit": 2}, headers=v).json()
    assert len(pl["items"]) == 2 and pl["next"]
    assert c.get("/api/patients/P1", headers=v).json()["studies"][0]["uid"] == uids[1]
    assert c.get("/api/patients/NOPE", headers=v).status_code == 404
    assert c.get(f"/api/studies/{uids[0]}/download", headers=v).status_code == 403  # viewer lacks export
    r = c.get(f"/api/studies/{uids[0]}/download", headers=h["admin"])
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    z = zipfile.ZipFile(io.BytesIO(r.content))
    dicomdir = dcmread(io.BytesIO(z.read("DICOMDIR")))
    images = [rec for rec in dicomdir.DirectoryRecordSequence if rec.DirectoryRecordType == "IMAGE"]
    assert len(images) == 1
    path = "/".join(images[0].ReferencedFileID)
    assert dcmread(io.BytesIO(z.read(path))).StudyInstanceUID == uids[0]


def test_delete_rights(env) -> None:
    ctx, c, h, uids = env
    assert c.delete(f"/api/studies/{uids[0]}", headers=h["viewer"]).status_code == 403
    assert c.delete(f"/api/studies/{uids[0]}", headers=h["admin"]).status_code == 204
    assert c.get(f"/api/studies/{uids[0]}", headers=h["admin"]).status_code == 404
    assert c.delete(f"/api/studies/{uids[0]}", headers=h["admin"]).status_code == 404
    assert c.delete(f"/api/series/{uids[1]}.1", headers=h["admin"]).status_code == 204
    assert c.get(f"/api/studies/{uids[1]}", headers=h["admin"]).status_code == 404


def test_department_scope(env) -> None:
    ctx, c, h, uids = env
    from sqlalchemy import update

    from openpacs.index.schema import studies
    with ctx.index.write_engine.begin() as conn:
        conn.execute(update(studies).values(department="radiology"))
        conn.execute(update(studies).where(studies.c.study_instance_uid == uids[2]).values(department="cardiology"))
    assert ctx.auth is not None
    ctx.auth.add_user("cardio", "pw-cardio-0123456789", "viewer", departments=["cardiology"])
    hc = {"Authorization": f"Bearer {ctx.auth.create_token('cardio')[1]}"}
    items = c.get("/api/studies", headers=hc).json()["items"]
    assert [s["uid"] for s in items] == [uids[2]]
    assert c.get(f"/api/studies/{uids[0]}", headers=hc).status_code == 404
    assert c.get(f"/api/series/{uids[0]}.1/instances", headers=hc).status_code == 404
    assert len(c.get("/api/studies", params={"department": "radiology"}, headers=h["admin"]).json()["items"]) == 6


def test_patient_data_access_is_audited(env) -> None:
    """Every access to patient data through the API leaves an audit event naming the user and the study."""
    ctx, c, h, uids = env
    assert ctx.audit is not None
    v, a = h["viewer"], h["admin"]
    assert c.get("/api/studies", params={"patient_id": "P1"}, headers=v).status_code == 200
    assert c.get(f"/api/studies/{uids[1]}", headers=v).status_code == 200
    assert c.get(f"/api/studies/{uids[2]}/download", headers=a).status_code == 200
    assert c.delete(f"/api/studies/{uids[3]}", headers=a).status_code == 204
    ctx.audit.flush()
    queries = ctx.audit.search(event="Query", user="viewer")
    assert queries, "a study search is a Query event"
    accessed = ctx.audit.search(event="InstancesAccessed", user="viewer", study_uid=uids[1])
    assert accessed, "opening a study is an Instances Accessed event for that study"
    assert ctx.audit.search(event="InstancesTransferred", user="admin", study_uid=uids[2])
    assert ctx.audit.search(event="StudyDeleted", user="admin", study_uid=uids[3])
    # a refused access is recorded too, with its outcome
    assert c.delete(f"/api/studies/{uids[4]}", headers=v).status_code == 403
    ctx.audit.flush()
    refused = [e for e in ctx.audit.search(user="viewer") if e.outcome != 0]
    assert refused, "a 403 leaves an audit event with a failure outcome"
