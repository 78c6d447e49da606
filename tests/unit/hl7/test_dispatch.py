"""hl7/dispatch.py + hl7/adt.py + services/patients.py in process on a real SQLite index: ADT effects, no half
application, duplicates, the registry for later message types, and the coercion of stored files."""

from __future__ import annotations

import io
import json
import types
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from openpacs.config import Settings
from openpacs.hl7 import message as m
from openpacs.hl7.dispatch import Apply, Outcome
from openpacs.hl7.server import build_dispatcher
from openpacs.index.db import Index
from openpacs.index.hl7_schema import hl7_messages, patient_demographics
from openpacs.index.schema import patients, studies
from openpacs.services.patients import coerce_patient_module


@pytest.fixture
def env(tmp_path: Path):
    idx = Index(f"sqlite:///{tmp_path}/index.sqlite")
    idx.migrate()
    ctx = types.SimpleNamespace(settings=Settings(data_dir=tmp_path), index=idx, audit=None)
    yield ctx, build_dispatcher(ctx)
    idx.close()


def adt(cid: str, trigger: str, body: str, version: str = "2.5") -> bytes:
    return (f"MSH|^~\\&|RIS|HOSP|PACS|RAD|20250101||ADT^{trigger}|{cid}|P|{version}\rEVN|{trigger}\r{body}").encode()


def code(data: bytes) -> str:
    return m.ack_code_of(b"\r" + data.split(b"\r", 1)[1])


def patient(ctx, pid: str):
    with ctx.index.engine.connect() as c:
        return c.execute(select(patients).where(patients.c.patient_id == pid)).first()


def test_a01_a04_a05_a08_create_and_update(env) -> None:
    ctx, d = env
    for i, trig in enumerate(("A01", "A04", "A05", "A08")):
        ack = d.handle_sync(adt(f"c{i}", trig, f"PID|1||P1^^^HOSP||Name{i}^Given||1980010{i + 1}|F"))
        assert code(ack) == "AA"
    p = patient(ctx, "P1")
    assert p.patient_name == "Name3^Given" and p.patient_name_norm == "NAME3^GIVEN"
    assert p.patient_birth_date == "19800104" and p.issuer_of_patient_id == "HOSP"
    # a field left empty keeps its value; "" deletes it
    assert code(d.handle_sync(adt("c9", "A08", "PID|1||P1^^^HOSP||||"))) == "AA"
    assert patient(ctx, "P1").patient_birth_date == "19800104"
    assert code(d.handle_sync(adt("c10", "A08", 'PID|1||P1^^^HOSP||||""|'))) == "AA"
    assert patient(ctx, "P1").patient_birth_date is None


def test_other_ids_are_kept_for_the_overlay(env) -> None:
    ctx, d = env
    assert code(d.handle_sync(adt("o1", "A04", "PID|1||P2^^^HOSP^MR~NHS9^^^NHS^NH~X7^^^&1.2.3&ISO||A^B"))) == "AA"
    p = patient(ctx, "P2")
    with ctx.index.engine.connect() as c:
        row = c.execute(select(patient_demographics).where(patient_demographics.c.patient_fk == p.id)).one()
    assert json.loads(row.other_patient_ids) == [{"id": "NHS9", "issuer": "NHS", "type": "NH"},
                                                 {"id": "X7", "issuer": "1.2.3", "type": ""}]


def test_a_failing_group_member_does_not_half_apply(env) -> None:
    ctx, d = env
    calls = []

    def half(job: Apply) -> Outcome:  # writes, then fails: the savepoint must take the write back
        from sqlalchemy import insert

        job.conn.execute(insert(patients).values(patient_id="HALF", issuer_of_patient_id="", num_studies=0,
                                                 num_series=0, num_instances=0))
        calls.append(1)
        raise m.error(m.INTERNAL_ERROR, "refused after writing")

    d.register("ZZZ", ["Z01"], half)
    ack = d.handle_sync(b"MSH|^~\\&|RIS|HOSP|PACS|RAD|2025||ZZZ^Z01|h1|P|2.5\rPID|1||HALF")
    assert code(ack) == "AE" and calls == [1]
    assert patient(ctx, "HALF") is None
    with ctx.index.engine.connect() as c:
        assert c.execute(select(hl7_messages.c.result).where(hl7_messages.c.control_id == "h1")).scalar() == "AE"


def test_handler_registry_for_later_message_types(env) -> None:
    _, d = env
    assert code(d.handle_sync(b"MSH|^~\\&|RIS|H|P|R|2025||MDM^T02|r1|P|2.3\rTXA|1")) == "AR"
    seen = []
    d.register("MDM", ["T02"], lambda job: seen.append(job.msg.control_id) or Outcome(detail="document"))
    assert code(d.handle_sync(b"MSH|^~\\&|RIS|H|P|R|2025||MDM^T02|r2|P|2.3\rTXA|1")) == "AA"
    assert seen == ["r2"]
    ack = d.handle_sync(b"MSH|^~\\&|RIS|H|P|R|2025||MDM^T04|r3|P|2.3\rTXA|1")
    assert code(ack) == "AR" and b"ERR|MSH^1^9^201&" in ack  # known type, unknown trigger (v2.3: ERR-1)
    # the orders and reports modules are registered
    assert {("ORM", "O01"), ("OMI", "O23"), ("ORU", "R01")} <= set(d.handlers)


def test_bug_in_a_handler_is_an_ae_not_a_crash(env) -> None:
    _, d = env
    d.register("ZZZ", ["Z02"], lambda job: 1 / 0)  # type: ignore[arg-type, return-value]
    ack = d.handle_sync(b"MSH|^~\\&|RIS|H|P|R|2025||ZZZ^Z02|b1|P|2.5\r")
    assert code(ack) == "AE" and b"207^" in ack
    assert code(d.handle_sync(adt("b2", "A08", "PID|1||OK^^^H||A^B"))) == "AA"


def _study(ctx, pid: str, uid: str) -> None:
    from openpacs.index.writer import NewInstance

    ctx.index.write_batch([NewInstance(
        values={"PATIENT": {"patient_id": pid, "patient_name": "Old^Name"},
                "STUDY": {"study_instance_uid": uid}, "SERIES": {"series_instance_uid": uid + ".1"},
                "IMAGE": {"sop_instance_uid": uid + ".1.1", "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2"}},
        blob_key=f"k{uid}", size=10, sha256="0" * 64, transfer_syntax_uid="1.2.840.10008.1.2.1")])


def test_merge_moves_studies_and_recounts(env) -> None:
    ctx, d = env
    _study(ctx, "OLD", "1.2.3.1")
    _study(ctx, "OLD", "1.2.3.2")
    _study(ctx, "NEW", "1.2.3.3")
    assert code(d.handle_sync(adt("m1", "A40", "PID|1||NEW||Right^Name\rMRG|OLD"))) == "AA"
    assert patient(ctx, "OLD") is None
    new = patient(ctx, "NEW")
    assert new.num_studies == 3 and new.num_instances == 3 and new.patient_name == "Right^Name"
    with ctx.index.engine.connect() as c:
        assert set(c.execute(select(studies.c.patient_fk)).scalars()) == {new.id}
    ack = d.handle_sync(adt("m2", "A40", "PID|1||NEW||Right^Name\rMRG|OLD"))
    assert code(ack) == "AE" and b"MRG^1^1" in ack


def test_a47_then_a40_in_v23_with_several_groups(env) -> None:
    ctx, d = env
    _study(ctx, "T1", "1.2.4.1")
    _study(ctx, "T2", "1.2.4.2")
    body = "PID|1||M1||A^B\rPV1|1\rMRG|T1\rPID|2||M2||C^D\rMRG|T2"
    assert code(d.handle_sync(adt("g1", "A47", body, version="2.3"))) == "AA"
    assert patient(ctx, "T1") is None and patient(ctx, "M1") is not None and patient(ctx, "M2") is not None
    ack = d.handle_sync(adt("g2", "A47", "PID|1||M9\rMRG|NONE\rPID|2||M3\rMRG|M2", version="2.3"))
    assert code(ack) == "AE" and patient(ctx, "M3") is None  # the whole message or nothing


def _file(name: str, charset: str = "ISO_IR 100") -> bytes:
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = pydicom.Dataset()
    ds.SpecificCharacterSet = charset
    ds.PatientName = name
    ds.PatientID = "OLD"
    ds.StudyDescription = "Thorax ä"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_coerce_patient_module_switches_to_utf8_only_when_needed() -> None:
    module = dict(PatientName="Müller^Hans", PatientID="NEW", IssuerOfPatientID="HOSP", PatientBirthDate="19700101",
                  PatientSex="M", OtherPatientIDs=[{"id": "X1", "issuer": "OTH", "type": "PI"}])
    out = pydicom.dcmread(io.BytesIO(coerce_patient_module(_file("Old^Name"), module)))
    assert out.SpecificCharacterSet == "ISO_IR 100" and str(out.PatientName) == "Müller^Hans"
    assert out.PatientID == "NEW" and out.IssuerOfPatientID == "HOSP"
    assert out.OtherPatientIDsSequence[0].PatientID == "X1"
    assert out.StudyDescription == "Thorax ä" and out.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    out = pydicom.dcmread(io.BytesIO(coerce_patient_module(_file("Old^Name"), {**module, "PatientName": "山田^太郎"})))
    assert out.SpecificCharacterSet == "ISO_IR 192" and str(out.PatientName) == "山田^太郎"
    assert out.StudyDescription == "Thorax ä"  # re-encoded, not misread
