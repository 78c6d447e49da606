"""hl7/orders.py through the dispatcher on a real SQLite index: ORM^O01 and OMI^O23 order controls (NW, XO, CA, DC,
SC) create, update and remove scheduled procedure steps; wrong orders get AE naming the field."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
from sqlalchemy import select

from openpacs.config import Settings
from openpacs.hl7 import message as m
from openpacs.hl7.server import build_dispatcher
from openpacs.index.db import Index
from openpacs.index.worklist_schema import scheduled_steps


@pytest.fixture
def env(tmp_path: Path):
    idx = Index(f"sqlite:///{tmp_path}/index.sqlite")
    idx.migrate()
    ctx = types.SimpleNamespace(settings=Settings(data_dir=tmp_path), index=idx, audit=None)
    yield ctx, build_dispatcher(ctx)
    idx.close()


PID = "PID|1||MRN1^^^HOSP^MR||Müller^Anna^B||19800102|F"
PV1 = "PV1|1|O|RAD^R1^B1|||||1234^Referrer^Rita|||||||||||V42"


def orm(cid: str, control: str, placer: str = "P100", filler: str = "F100", accession: str = "ACC100",
        obr_extra: dict[int, str] | None = None, orc5: str = "", version: str = "2.3.1") -> bytes:
    obr = [""] * 45
    obr[1], obr[2], obr[3] = "1", placer, filler
    obr[4] = "CTHEAD^CT head without contrast^LOCAL"
    obr[16] = "555^Orderer^Olga"
    obr[18], obr[19], obr[20], obr[21] = accession, "RP100", "SPS100", "CT01"
    obr[24] = "CT"
    obr[27] = "^^^20250301093000^^S"
    obr[31] = "^Headache"
    obr[34] = "77&Tech&Tom"
    for k, v in (obr_extra or {}).items():
        obr[k] = v
    segs = [f"MSH|^~\\&|RIS|HOSP|PACS|RAD|20250101||ORM^O01|{cid}|P|{version}|||||||UNICODE UTF-8", PID, PV1,
            f"ORC|{control}|{placer}|{filler}||{orc5}", "OBR|" + "|".join(obr[1:]).rstrip("|"),
            "ZDS|1.2.3.4.5^PACS^Application^DICOM"]
    return "\r".join(segs).encode("utf-8")


def omi(cid: str, control: str = "NW") -> bytes:
    segs = ["MSH|^~\\&|RIS|HOSP|PACS|RAD|20250101||OMI^O23^OMI_O23|" + cid + "|P|2.5.1", PID, PV1,
            f"ORC|{control}|P200|F200", "TQ1|1||||||20250302140000||R",
            "OBR|1|P200|F200|MRKNEE^MR knee^LOCAL|||||||||||||ACC200|RP200|||||MR",
            "IPC|ACC200|RP200|1.2.3.200|SPS201|MR|T1^T1 sequence^LOCAL|MR1|Room 1|MRSCANNER1",
            "IPC|ACC200|RP200|1.2.3.200|SPS202|MR|T2^T2 sequence^LOCAL|MR1|Room 1|MRSCANNER1"]
    return "\r".join(segs).encode()


def ack(data: bytes) -> tuple[str, str]:
    text = data.decode("utf-8")
    seg = {s[:3]: s for s in text.split("\r")}
    err = seg.get("ERR", "")
    return m.ack_code_of(data), err


def steps(ctx):
    with ctx.index.engine.connect() as c:
        return c.execute(select(scheduled_steps).order_by(scheduled_steps.c.id)).all()


def test_orm_new_order_maps_every_field(env) -> None:
    ctx, d = env
    code, _ = ack(d.handle_sync(orm("o1", "NW")))
    assert code == "AA"
    (s,) = steps(ctx)
    assert s.status == "SCHEDULED" and s.source == "hl7" and s.control_id == "o1"
    assert (s.placer_order_number, s.filler_order_number, s.accession_number) == ("P100", "F100", "ACC100")
    assert (s.requested_procedure_id, s.scheduled_procedure_step_id) == ("RP100", "SPS100")
    assert (s.modality, s.scheduled_station_ae_title) == ("CT", "CT01")
    assert (s.scheduled_procedure_step_start_date, s.scheduled_procedure_step_start_time) == ("20250301", "093000")
    assert s.start_datetime == "20250301093000"
    assert s.requested_procedure_priority == "STAT"
    assert s.study_instance_uid == "1.2.3.4.5"
    assert s.scheduled_procedure_step_description == "CT head without contrast"
    assert s.scheduled_protocol_code == '["CTHEAD", "LOCAL", "CT head without contrast"]'
    assert s.requesting_physician == "Orderer^Olga"
    assert s.referring_physician_name == "Referrer^Rita"
    assert s.scheduled_performing_physician_name == "Tech^Tom"
    assert s.reason_for_the_requested_procedure == "Headache"
    assert (s.patient_id, s.issuer_of_patient_id, s.patient_name) == ("MRN1", "HOSP", "Müller^Anna^B")
    assert s.patient_name_norm == "MÜLLER^ANNA^B"
    assert (s.patient_birth_date, s.patient_sex, s.admission_id) == ("19800102", "F", "V42")
    assert s.current_patient_location == "RAD^R1^B1"


def test_xo_updates_ca_cancels_sc_sets_status(env) -> None:
    ctx, d = env
    assert ack(d.handle_sync(orm("o1", "NW")))[0] == "AA"
    assert ack(d.handle_sync(orm("o2", "XO", obr_extra={24: "MR", 21: "MR01"})))[0] == "AA"
    (s,) = steps(ctx)
    assert (s.modality, s.scheduled_station_ae_title, s.control_id) == ("MR", "MR01", "o2")
    assert ack(d.handle_sync(orm("o3", "CA")))[0] == "AA"
    assert steps(ctx)[0].status == "CANCELLED"
    # a new order again for the same step puts it back on the list
    assert ack(d.handle_sync(orm("o4", "NW")))[0] == "AA"
    assert [x.status for x in steps(ctx)] == ["SCHEDULED"]
    assert ack(d.handle_sync(orm("o5", "SC", orc5="IP")))[0] == "AA"
    assert steps(ctx)[0].status == "IN PROGRESS"
    assert ack(d.handle_sync(orm("o6", "SC", orc5="CM")))[0] == "AA"
    assert steps(ctx)[0].status == "COMPLETED"
    # a completed step is not cancelled by a late CA
    assert ack(d.handle_sync(orm("o7", "DC")))[0] == "AA"
    assert steps(ctx)[0].status == "COMPLETED"


def test_discontinue_and_order_matched_by_placer_number_only(env) -> None:
    ctx, d = env
    assert ack(d.handle_sync(orm("o1", "NW", placer="PX", filler="")))[0] == "AA"
    assert ack(d.handle_sync(orm("o2", "DC", placer="PX", filler="")))[0] == "AA"
    assert steps(ctx)[0].status == "DISCONTINUED"


def test_omi_one_step_per_ipc(env) -> None:
    ctx, d = env
    assert ack(d.handle_sync(omi("m1")))[0] == "AA"
    rows = steps(ctx)
    assert [r.scheduled_procedure_step_id for r in rows] == ["SPS201", "SPS202"]
    r = rows[1]
    assert (r.accession_number, r.requested_procedure_id, r.study_instance_uid) == ("ACC200", "RP200", "1.2.3.200")
    assert (r.modality, r.scheduled_station_name, r.scheduled_station_ae_title) == ("MR", "MR1", "MRSCANNER1")
    assert r.scheduled_procedure_step_location == "Room 1"
    assert r.scheduled_procedure_step_description == "T2 sequence"
    assert (r.scheduled_procedure_step_start_date, r.scheduled_procedure_step_start_time) == ("20250302", "140000")
    assert r.requested_procedure_priority == "ROUTINE"
    assert r.requested_procedure_description == "MR knee"
    assert ack(d.handle_sync(omi("m2", "CA")))[0] == "AA"
    assert {r.status for r in steps(ctx)} == {"CANCELLED"}


@pytest.mark.parametrize("message, location", [
    (orm("e1", "CA", placer="NOPE", filler="NOPE2"), "ORC^1^3"),  # unknown order
    (orm("e2", "ZZ"), "ORC^1^1"),  # unsupported order control
    (orm("e3", "NW", accession=""), "OBR^1^18"),  # no accession number
    (orm("e4", "NW", placer="", filler=""), "ORC^1^2"),  # no order number
    (orm("e5", "NW", obr_extra={27: "^^^tomorrow"}), "ORC^1^7"),  # not a date
    (orm("e6", "SC", orc5="??"), "ORC^1^5"),
])
def test_wrong_orders_are_answered_ae_and_change_nothing(env, message: bytes, location: str) -> None:
    ctx, d = env
    if b"|SC|" in message:
        assert ack(d.handle_sync(orm("pre", "NW")))[0] == "AA"
    before = [tuple(r) for r in steps(ctx)]
    code, err = ack(d.handle_sync(message))
    assert code == "AE", err
    assert location in err
    assert [tuple(r) for r in steps(ctx)] == before


def test_orm_without_pid_or_orc(env) -> None:
    ctx, d = env
    no_pid = b"MSH|^~\\&|RIS|HOSP|PACS|RAD|20250101||ORM^O01|x1|P|2.3\rORC|NW|P1|F1\rOBR|1|P1|F1"
    assert ack(d.handle_sync(no_pid))[0] == "AE"
    no_orc = b"MSH|^~\\&|RIS|HOSP|PACS|RAD|20250101||ORM^O01|x2|P|2.3\r" + PID.encode() + b"\rOBR|1|P1|F1"
    code, err = ack(d.handle_sync(no_orc))
    assert code == "AE" and "OBR" in err
    assert steps(ctx) == []
