"""services/worklist.py on a real SQLite index: PS3.4 K matching of MWL identifiers (the Scheduled Procedure Step
Sequence keys, date/time ranges combined, patient name and ID, accession), the return keys, the API rules, and the
MPPS state a step follows."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import Dataset
from pydicom.sequence import Sequence

from openpacs.index.db import Index
from openpacs.services.worklist import MppsRefusal, OrderRef, WorklistError, WorklistService


@pytest.fixture
def svc(tmp_path: Path):
    idx = Index(f"sqlite:///{tmp_path}/index.sqlite")
    idx.migrate()
    s = WorklistService(idx)
    rows = [
        ("A1", "P1", "Smith^John", "CT", "CT01", "20250301", "080000"),
        ("A2", "P2", "smithers^Jane", "CT", "CT02", "20250301", "143000"),
        ("A3", "P3", "Doe^Ann", "MR", "MR01", "20250302", "090000"),
        ("A4", "P4", "Müller^Zoë", "US", "US01", "20250303", "235900"),
    ]
    with idx.write_engine.begin() as conn:
        for acc, pid, name, mod, aet, date, time in rows:
            s.schedule(conn, OrderRef(placer="O" + acc), [{
                "AccessionNumber": acc, "PatientID": pid, "PatientName": name, "Modality": mod,
                "ScheduledStationAETitle": aet, "ScheduledProcedureStepStartDate": date,
                "ScheduledProcedureStepStartTime": time, "ScheduledProcedureStepID": "S" + acc,
                "RequestedProcedureID": "R" + acc, "RequestedProcedureCodeSequence": ["C1", "LOCAL", "Proc " + acc]}])
    yield s
    idx.close()


def q(top: dict | None = None, **step) -> Dataset:
    ds = Dataset()
    for k, v in {"PatientName": "", "PatientID": "", "AccessionNumber": "", **(top or {})}.items():
        setattr(ds, k, v)
    item = Dataset()
    for k, v in {"Modality": "", "ScheduledStationAETitle": "", "ScheduledProcedureStepStartDate": "",
                 "ScheduledProcedureStepStartTime": "", **step}.items():
        setattr(item, k, v)
    ds.ScheduledProcedureStepSequence = Sequence([item])
    return ds


def accessions(results: list[Dataset]) -> list[str]:
    return sorted(str(r.AccessionNumber) for r in results)


@pytest.mark.parametrize("step, top, expected", [
    ({}, None, ["A1", "A2", "A3", "A4"]),
    ({"Modality": "CT"}, None, ["A1", "A2"]),
    ({"ScheduledStationAETitle": "MR01"}, None, ["A3"]),
    ({"ScheduledStationAETitle": "CT*"}, None, ["A1", "A2"]),
    ({"ScheduledProcedureStepStartDate": "20250301"}, None, ["A1", "A2"]),
    ({"ScheduledProcedureStepStartDate": "20250302-"}, None, ["A3", "A4"]),
    ({"ScheduledProcedureStepStartDate": "-20250301"}, None, ["A1", "A2"]),
    ({"ScheduledProcedureStepStartTime": "0700-1000"}, None, ["A1", "A3"]),
    # combined date-time range: from 1 March 12:00 to 2 March 09:30
    ({"ScheduledProcedureStepStartDate": "20250301-20250302", "ScheduledProcedureStepStartTime": "1200-0930"},
     None, ["A2", "A3"]),
    ({"ScheduledProcedureStepStartDate": "20250301", "ScheduledProcedureStepStartTime": "1400-"}, None, ["A2"]),
    ({"Modality": "CT", "ScheduledProcedureStepStartTime": "-1200"}, None, ["A1"]),
    ({}, {"PatientName": "SMITH*"}, ["A1", "A2"]),
    ({}, {"PatientName": "smith^john"}, ["A1"]),
    ({}, {"PatientName": "müller*"}, ["A4"]),
    ({}, {"PatientID": "P3"}, ["A3"]),
    ({}, {"AccessionNumber": "A2"}, ["A2"]),
    ({}, {"AccessionNumber": "A2\\A4"}, ["A2", "A4"]),
    ({"ScheduledProcedureStepID": "SA3"}, None, ["A3"]),
    ({"Modality": "XA"}, None, []),
])
def test_matching(svc, step, top, expected) -> None:
    assert accessions(svc.find(q(top, **step))) == expected


def test_return_keys_and_sequence(svc) -> None:
    ident = q({"PatientName": "", "AccessionNumber": "A4", "RequestedProcedureCodeSequence": [],
               "PatientWeight": "", "StudyInstanceUID": ""}, ScheduledProcedureStepID="", ScheduledStationName="")
    (r,) = svc.find(ident)
    assert str(r.PatientName) == "Müller^Zoë" and r.SpecificCharacterSet == "ISO_IR 192"
    assert "AdmissionID" not in r  # only what was asked
    assert r["PatientWeight"].is_empty and r.StudyInstanceUID == ""
    code = r.RequestedProcedureCodeSequence[0]
    assert (code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning) == ("C1", "LOCAL", "Proc A4")
    item = r.ScheduledProcedureStepSequence[0]
    assert (item.Modality, item.ScheduledStationAETitle, item.ScheduledProcedureStepID) == ("US", "US01", "SA4")
    assert (item.ScheduledProcedureStepStartDate, item.ScheduledProcedureStepStartTime) == ("20250303", "235900")
    assert item.ScheduledStationName == ""


def test_empty_item_returns_every_step_attribute(svc) -> None:
    ds = Dataset()
    ds.AccessionNumber = "A1"
    ds.ScheduledProcedureStepSequence = Sequence([Dataset()])
    (r,) = svc.find(ds)
    item = r.ScheduledProcedureStepSequence[0]
    assert item.Modality == "CT" and item.ScheduledProcedureStepStatus == "SCHEDULED"
    assert "ScheduledProtocolCodeSequence" in item


def test_cancelled_and_completed_leave_the_worklist(svc) -> None:
    with svc.index.write_engine.begin() as conn:
        svc.set_order_status(conn, OrderRef(placer="OA1"), "CANCELLED")
        svc.set_order_status(conn, OrderRef(placer="OA2"), "COMPLETED")
    assert accessions(svc.find(q())) == ["A3", "A4"]
    assert accessions(svc.find(q(ScheduledProcedureStepStatus="CANCELLED"))) == ["A1"]


def test_bad_keys_are_refused(svc) -> None:
    with pytest.raises(WorklistError):
        svc.find(q(ScheduledProcedureStepStartDate="2025-03"))
    with pytest.raises(WorklistError):
        svc.find(q({"StudyInstanceUID": "1.2.*"}))
    two = q()
    two.ScheduledProcedureStepSequence.append(Dataset())
    with pytest.raises(WorklistError):
        svc.find(two)


def test_api_create_cancel(svc) -> None:
    entry = svc.create({"PatientID": "PX", "PatientName": "New^Pat", "AccessionNumber": "AX", "Modality": "DX",
                        "ScheduledProcedureStepStartDate": "20250310", "ScheduledProcedureStepStartTime": "1015"})
    assert entry["status"] == "SCHEDULED" and entry["source"] == "api"
    assert entry["scheduled_procedure_step_start_time"] == "101500" and entry["scheduled_procedure_step_id"]
    assert accessions(svc.find(q({"AccessionNumber": "AX"}))) == ["AX"]
    with pytest.raises(WorklistError) as e:
        svc.create({"PatientID": "PX", "AccessionNumber": "AX", "Modality": "DX",
                    "ScheduledProcedureStepStartDate": "20250310"})
    assert e.value.kind == "conflict"
    for bad in ({"AccessionNumber": "AY", "Modality": "DX", "ScheduledProcedureStepStartDate": "20250310"},
                {"PatientID": "P", "AccessionNumber": "AY", "Modality": "DX",
                 "ScheduledProcedureStepStartDate": "10.3.2025"},
                {"PatientID": "P", "AccessionNumber": "AY", "Modality": "DX",
                 "ScheduledProcedureStepStartDate": "20250310", "RequestedProcedurePriority": "URGENT"}):
        with pytest.raises(WorklistError):
            svc.create(bad)
    assert svc.cancel(entry["id"])["status"] == "CANCELLED"
    assert svc.find(q({"AccessionNumber": "AX"})) == []
    with pytest.raises(WorklistError):
        svc.cancel(entry["id"])


def _mpps(**extra) -> Dataset:
    ds = Dataset()
    ref = Dataset()
    ref.AccessionNumber = "A3"
    ref.ScheduledProcedureStepID = "SA3"
    ds.ScheduledStepAttributesSequence = Sequence([ref])
    ds.PerformedProcedureStepID = "PPS1"
    ds.PerformedStationAETitle = "MR01"
    ds.PerformedProcedureStepStartDate = "20250302"
    ds.PerformedProcedureStepStartTime = "091000"
    ds.PerformedProcedureStepStatus = "IN PROGRESS"
    ds.Modality = "MR"
    for k, v in extra.items():
        setattr(ds, k, v)
    return ds


def _final(status: str = "COMPLETED", series: bool = True) -> Dataset:
    ds = Dataset()
    ds.PerformedProcedureStepStatus = status
    ds.PerformedProcedureStepEndDate = "20250302"
    ds.PerformedProcedureStepEndTime = "093000"
    item = Dataset()
    item.SeriesInstanceUID = "1.2.3.4"
    item.ReferencedImageSequence = Sequence([])
    ds.PerformedSeriesSequence = Sequence([item] if series else [])
    return ds


def test_mpps_moves_its_step(svc) -> None:
    svc.mpps_create("1.2.3.9", _mpps(), "MR01")
    (r,) = svc.find(q({"AccessionNumber": "A3"}, ScheduledProcedureStepStatus=""))
    assert r.ScheduledProcedureStepSequence[0].ScheduledProcedureStepStatus == "IN PROGRESS"
    assert svc.mpps_set("1.2.3.9", _final()) == "COMPLETED"
    assert svc.find(q({"AccessionNumber": "A3"})) == []
    status, stored = svc.mpps_get("1.2.3.9")
    assert status == "COMPLETED" and stored.PerformedProcedureStepEndTime == "093000"
    assert stored.PerformedProcedureStepID == "PPS1"


@pytest.mark.parametrize("ds, status", [
    (_mpps(PerformedProcedureStepStatus="COMPLETED"), 0x0106),
    (_mpps(PerformedProcedureStepID=""), 0x0121),
])
def test_mpps_create_refusals(svc, ds, status) -> None:
    with pytest.raises(MppsRefusal) as e:
        svc.mpps_create("1.2.3.10", ds, "MR01")
    assert e.value.status == status
    assert svc.mpps_get("1.2.3.10") is None


def test_mpps_create_missing_attribute_and_duplicate(svc) -> None:
    ds = _mpps()
    del ds.Modality
    with pytest.raises(MppsRefusal) as e:
        svc.mpps_create("1.2.3.11", ds, "MR01")
    assert (e.value.status, e.value.offending) == (0x0120, ["Modality"])
    svc.mpps_create("1.2.3.11", _mpps(), "MR01")
    with pytest.raises(MppsRefusal) as e:
        svc.mpps_create("1.2.3.11", _mpps(), "MR01")
    assert e.value.status == 0x0111


def test_mpps_set_rules(svc) -> None:
    with pytest.raises(MppsRefusal) as e:
        svc.mpps_set("9.9.9", _final())
    assert e.value.status == 0x0112
    svc.mpps_create("1.2.3.12", _mpps(), "MR01")
    no_end = _final()
    del no_end.PerformedProcedureStepEndTime
    for bad, status in ((no_end, 0x0121), (_final(series=False), 0x0121), (_final("DONE"), 0x0106)):
        with pytest.raises(MppsRefusal) as e:
            svc.mpps_set("1.2.3.12", bad)
        assert e.value.status == status
    change = Dataset()
    change.Modality = "CT"
    with pytest.raises(MppsRefusal) as e:
        svc.mpps_set("1.2.3.12", change)
    assert e.value.status == 0x0106 and e.value.offending == ["Modality"]
    # still IN PROGRESS: an intermediate N-SET is fine
    progress = Dataset()
    progress.PerformedProcedureStepDescription = "knee"
    assert svc.mpps_set("1.2.3.12", progress) == "IN PROGRESS"
    assert svc.mpps_set("1.2.3.12", _final("DISCONTINUED", series=False)) == "DISCONTINUED"
    with pytest.raises(MppsRefusal) as e:
        svc.mpps_set("1.2.3.12", _final())
    assert (e.value.status, e.value.error_id) == (0x0110, 0xA710)
    assert svc.find(q({"AccessionNumber": "A3"})) == []
    assert accessions(svc.find(q({"AccessionNumber": "A3"}, ScheduledProcedureStepStatus="DISCONTINUED"))) == ["A3"]


@pytest.mark.parametrize("implicit", [True, False])
def test_wire_encoding_equals_the_pydicom_response(svc, implicit) -> None:
    """find_encoded (the SCP's path) gives the very data sets find (pydicom) builds, UTF-8 included."""
    import io

    from pynetdicom.dsutils import decode

    idents = [q(), q({"AccessionNumber": "A4", "RequestedProcedureCodeSequence": [], "PatientWeight": "",
                      "PregnancyStatus": None, "ReferencedStudySequence": [], "StudyInstanceUID": ""},
                     ScheduledProcedureStepID="", ScheduledStationName="", ScheduledProtocolCodeSequence=[]),
              Dataset()]
    empty_item = Dataset()
    empty_item.PatientID = ""
    empty_item.ScheduledProcedureStepSequence = Sequence([Dataset()])
    idents.append(empty_item)
    for ident in idents:
        wire = svc.find_encoded(ident, implicit)
        expected = svc.find(ident)
        assert len(wire) == len(expected) > 0
        for raw, ds in zip(wire, expected, strict=True):
            got = decode(io.BytesIO(raw), implicit, True)
            assert got.to_json_dict() == ds.to_json_dict()
            assert [e.tag for e in got] == sorted(e.tag for e in got)
