"""Orders to worklist to MPPS end to end on a real `openpacs serve`: ORM^O01 / OMI^O23 through python-hl7's MLLP
client, the Modality Worklist read back with DCMTK `findscu -W` (each matching key), a cancel removing the entry,
an entry made with POST /api/worklist, a pynetdicom MPPS SCU running N-CREATE then N-SET COMPLETED (the entry leaves
the worklist; a second N-SET is refused 0x0110 / A710), and the `worklist` / `mpps` rights of a configured AE."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import hl7
import hl7.client
import pydicom
import pytest
from helpers import dcmtk
from helpers.server import OpenPACSServer, stop_cleanly
from pydicom import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import ModalityPerformedProcedureStep, ModalityWorklistInformationFind

VT, FS = b"\x0b", b"\x1c"


class WorklistServer(OpenPACSServer):
    def write_config(self) -> None:
        super().write_config()
        with open(self.config_path, "a") as fh:  # a configured AE without the worklist and mpps rights
            fh.write('\n[remote_aes.QRONLY]\naet = "QRONLY"\nhost = "127.0.0.1"\nport = 104\n'
                     'allow = ["echo", "find"]\n')


@pytest.fixture(scope="module")
def srv(request, backend, require_dcmtk, tmp_path_factory):
    base = tmp_path_factory.mktemp(f"mwl-{backend}")
    index_url = request.getfixturevalue("pg_cluster").create_database() if backend == "postgresql" else None
    server = WorklistServer(base / "data", index_url=index_url)
    server.start()
    yield server
    stop_cleanly(server)


def send(srv: OpenPACSServer, message: str) -> tuple[str, str]:
    with hl7.client.MLLPClient("127.0.0.1", srv.hl7_port, encoding="utf-8") as client:
        data = client.send_message(message.encode("utf-8"))
        while FS not in data:
            data += client.socket.recv(65536)
    ack = hl7.parse(data[data.index(VT) + 1 : data.index(FS)].decode("utf-8"))
    err = ack.segment("ERR") if "ERR" in str(ack) else None
    return str(ack.segment("MSA")[1]), str(err) if err is not None else ""


PID = "PID|1||{pid}^^^HOSP^MR||{name}||19700203|{sex}"


def orm(cid: str, control: str, order: str, acc: str, pid: str, name: str, modality: str, station: str, start: str,
        sps: str = "", uid: str = "") -> str:
    segs = [f"MSH|^~\\&|RIS|HOSP|OPENPACS|RAD|20250101||ORM^O01|{cid}|P|2.3.1|||||||UNICODE UTF-8",
            PID.format(pid=pid, name=name, sex="F"), "PV1|1|O|RAD|||||77^Referrer^Ray",
            f"ORC|{control}|{order}|F{order}||||^^^{start}^^R",
            f"OBR|1|{order}|F{order}|{modality}PROC^{modality} procedure^LOCAL||||||||||||||{acc}|RP{acc}|"
            f"{sps or 'SPS' + acc}|{station}|||{modality}"]
    if uid:
        segs.append(f"ZDS|{uid}^OPENPACS^Application^DICOM")
    return "\r".join(segs) + "\r"


def omi(cid: str, order: str, acc: str, pid: str, name: str) -> str:
    segs = [f"MSH|^~\\&|RIS|HOSP|OPENPACS|RAD|20250101||OMI^O23^OMI_O23|{cid}|P|2.5.1|||||||UNICODE UTF-8",
            PID.format(pid=pid, name=name, sex="M"), f"ORC|NW|{order}|F{order}", "TQ1|1||||||20250305110000",
            f"OBR|1|{order}|F{order}|MRKNEE^MR knee^LOCAL||||||||||||||{acc}|RP{acc}|||||MR",
            f"IPC|{acc}|RP{acc}|1.2.826.0.1.3680043.8.498.77|SPS{acc}|MR|T1^T1 knee^LOCAL|MR1|Room 3|MRSCAN1"]
    return "\r".join(segs) + "\r"


SPS = "ScheduledProcedureStepSequence[0]."
RETURN_KEYS = ["AccessionNumber", "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
               "RequestedProcedureID", "RequestedProcedureDescription", "ReferringPhysicianName",
               f"{SPS}Modality", f"{SPS}ScheduledStationAETitle", f"{SPS}ScheduledProcedureStepStartDate",
               f"{SPS}ScheduledProcedureStepStartTime", f"{SPS}ScheduledProcedureStepID",
               f"{SPS}ScheduledProcedureStepDescription", f"{SPS}ScheduledProcedureStepStatus"]


def findscu_w(srv: OpenPACSServer, out: Path, aet: str = "FINDSCU", **keys: str) -> list[pydicom.Dataset]:
    out.mkdir(parents=True, exist_ok=True)
    for f in out.glob("rsp*.dcm"):
        f.unlink()
    argv = ["-W", "-X", "-od", str(out), "-to", "20", "-ta", "20", "-aet", aet]
    given = {k.replace("__", "."): v for k, v in keys.items()}
    for key in RETURN_KEYS:
        short = key.split(".")[-1]
        value = next((v for g, v in given.items() if g.split(".")[-1] == short), None)
        argv += ["-k", f"{key}={value}" if value is not None else key]
    res = dcmtk.run("findscu", *argv, *dcmtk.peer_args(srv.dicom_port, "OPENPACS"))
    res.check()
    if re.search(r"^E: ", res.output, re.M):
        raise AssertionError(res.output[-3000:])
    return [pydicom.dcmread(f) for f in sorted(out.glob("rsp*.dcm"))]


def accessions(results: list[pydicom.Dataset]) -> set[str]:
    return {str(r.AccessionNumber) for r in results}


def api(srv: OpenPACSServer, path: str, data: dict | None = None, method: str | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{srv.http_port}/api{path}", method=method,
                                 data=json.dumps(data).encode() if data is not None else None,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def orders(srv):
    tag = srv.backend[:2].upper()
    msgs = [
        orm(f"{tag}1", "NW", f"{tag}O1", f"{tag}A1", "WP1", "Smith^Alice", "CT", "CT01", "20250303080000"),
        orm(f"{tag}2", "NW", f"{tag}O2", f"{tag}A2", "WP2", "Smithers^Bob", "CT", "CT02", "20250303143000",
            uid="1.2.826.0.1.3680043.8.498.42"),
        orm(f"{tag}3", "NW", f"{tag}O3", f"{tag}A3", "WP3", "Ñúñez^Carmen", "US", "US01", "20250304090000"),
        omi(f"{tag}4", f"{tag}O4", f"{tag}A4", "WP4", "Okafor^Dan"),
    ]
    for msg in msgs:
        assert send(srv, msg) == ("AA", "")
    return tag


def test_findscu_worklist_matching_keys(srv, orders, tmp_path) -> None:
    t = orders
    everything = findscu_w(srv, tmp_path / "all")
    assert {f"{t}A1", f"{t}A2", f"{t}A3", f"{t}A4"} <= accessions(everything)
    ct = findscu_w(srv, tmp_path / "ct", ScheduledProcedureStepSequence__Modality="CT")
    assert accessions(ct) == {f"{t}A1", f"{t}A2"}
    station = findscu_w(srv, tmp_path / "aet", ScheduledProcedureStepSequence__ScheduledStationAETitle="CT02")
    assert accessions(station) == {f"{t}A2"}
    (r,) = station
    item = r.ScheduledProcedureStepSequence[0]
    assert (item.Modality, item.ScheduledProcedureStepStartDate, item.ScheduledProcedureStepStartTime) == (
        "CT", "20250303", "143000")
    assert item.ScheduledProcedureStepID == f"SPS{t}A2" and item.ScheduledProcedureStepStatus == "SCHEDULED"
    assert item.ScheduledProcedureStepDescription == "CT procedure"
    assert r.StudyInstanceUID == "1.2.826.0.1.3680043.8.498.42" and r.RequestedProcedureID == f"RP{t}A2"
    assert str(r.PatientName) == "Smithers^Bob" and r.PatientBirthDate == "19700203"
    assert str(r.ReferringPhysicianName) == "Referrer^Ray"
    day = findscu_w(srv, tmp_path / "day", ScheduledProcedureStepSequence__ScheduledProcedureStepStartDate="20250304-20250305")
    assert accessions(day) >= {f"{t}A3", f"{t}A4"} and not accessions(day) & {f"{t}A1", f"{t}A2"}
    morning = findscu_w(srv, tmp_path / "am", ScheduledProcedureStepSequence__ScheduledProcedureStepStartDate="20250303",
                        ScheduledProcedureStepSequence__ScheduledProcedureStepStartTime="0700-1200")
    assert accessions(morning) == {f"{t}A1"}
    names = findscu_w(srv, tmp_path / "pn", PatientName="smith*")
    assert accessions(names) >= {f"{t}A1", f"{t}A2"} and f"{t}A3" not in accessions(names)
    (u,) = findscu_w(srv, tmp_path / "utf8", PatientID="WP3")
    assert str(u.PatientName) == "Ñúñez^Carmen" and u.SpecificCharacterSet == "ISO_IR 192"
    (mr,) = findscu_w(srv, tmp_path / "acc", AccessionNumber=f"{t}A4")
    item = mr.ScheduledProcedureStepSequence[0]
    assert (item.Modality, item.ScheduledStationAETitle, item.ScheduledProcedureStepID) == ("MR", "MRSCAN1",
                                                                                           f"SPS{t}A4")
    assert mr.StudyInstanceUID == "1.2.826.0.1.3680043.8.498.77"


def test_cancel_removes_the_entry(srv, orders, tmp_path) -> None:
    t = orders
    assert send(srv, orm(f"{t}c1", "NW", f"{t}OC", f"{t}AC", "WPC", "Cancel^Me", "DX", "DX01",
                         "20250306100000")) == ("AA", "")
    assert accessions(findscu_w(srv, tmp_path / "b", AccessionNumber=f"{t}AC")) == {f"{t}AC"}
    assert send(srv, orm(f"{t}c2", "CA", f"{t}OC", f"{t}AC", "WPC", "Cancel^Me", "DX", "DX01",
                         "20250306100000"))[0] == "AA"
    assert findscu_w(srv, tmp_path / "a", AccessionNumber=f"{t}AC") == []
    code, err = send(srv, orm(f"{t}c3", "CA", f"{t}NOPE", "X", "WPC", "Cancel^Me", "DX", "DX01", "20250306"))
    assert code == "AE" and "ORC^1^3" in err


def test_api_entry_is_on_the_worklist(srv, orders, tmp_path) -> None:
    t = orders
    status, entry = api(srv, "/worklist", {"PatientID": "WPAPI", "PatientName": "Hand^Made",
                                           "AccessionNumber": f"{t}API", "Modality": "CR",
                                           "ScheduledStationAETitle": "CR01",
                                           "ScheduledProcedureStepStartDate": "20250307"})
    assert status == 201, entry
    (r,) = findscu_w(srv, tmp_path / "api", ScheduledProcedureStepSequence__ScheduledStationAETitle="CR01")
    assert r.AccessionNumber == f"{t}API" and r.ScheduledProcedureStepSequence[0].ScheduledProcedureStepID
    status, _ = api(srv, f"/worklist/{entry['id']}", method="DELETE")
    assert status == 200
    assert findscu_w(srv, tmp_path / "api2", ScheduledProcedureStepSequence__ScheduledStationAETitle="CR01") == []


def _mpps_create(acc: str, sps: str) -> Dataset:
    ds = Dataset()
    ref = Dataset()
    ref.AccessionNumber = acc
    ref.ScheduledProcedureStepID = sps
    ref.RequestedProcedureID = "RP" + acc
    ref.StudyInstanceUID = generate_uid()
    ds.ScheduledStepAttributesSequence = Sequence([ref])
    ds.PatientName = "Smith^Alice"
    ds.PatientID = "WP1"
    ds.PerformedProcedureStepID = "PPS-" + acc
    ds.PerformedStationAETitle = "CT01"
    ds.PerformedProcedureStepStartDate = "20250303"
    ds.PerformedProcedureStepStartTime = "081000"
    ds.PerformedProcedureStepEndDate = ""
    ds.PerformedProcedureStepEndTime = ""
    ds.PerformedProcedureStepStatus = "IN PROGRESS"
    ds.Modality = "CT"
    ds.PerformedSeriesSequence = Sequence([])
    return ds


def _completed() -> Dataset:
    ds = Dataset()
    ds.PerformedProcedureStepStatus = "COMPLETED"
    ds.PerformedProcedureStepEndDate = "20250303"
    ds.PerformedProcedureStepEndTime = "083000"
    series = Dataset()
    series.SeriesInstanceUID = generate_uid()
    series.RetrieveAETitle = "OPENPACS"
    series.PerformingPhysicianName = ""
    series.ProtocolName = "head"
    series.OperatorsName = ""
    series.SeriesDescription = "axial"
    series.ReferencedImageSequence = Sequence([])
    ds.PerformedSeriesSequence = Sequence([series])
    return ds


def _assoc(srv: OpenPACSServer, aet: str = "CT01"):
    ae = AE(ae_title=aet)
    ae.add_requested_context(ModalityPerformedProcedureStep)
    ae.add_requested_context(ModalityWorklistInformationFind)
    assoc = ae.associate("127.0.0.1", srv.dicom_port, ae_title="OPENPACS")
    assert assoc.is_established
    return assoc


def test_mpps_in_progress_then_completed(srv, orders, tmp_path) -> None:
    t = orders
    uid = generate_uid()
    assoc = _assoc(srv)
    try:
        status, _ = assoc.send_n_create(_mpps_create(f"{t}A1", f"SPS{t}A1"), ModalityPerformedProcedureStep, uid)
        assert status.Status == 0x0000
        (r,) = findscu_w(srv, tmp_path / "ip", AccessionNumber=f"{t}A1")
        assert r.ScheduledProcedureStepSequence[0].ScheduledProcedureStepStatus == "IN PROGRESS"
        status, _ = assoc.send_n_create(_mpps_create(f"{t}A1", f"SPS{t}A1"), ModalityPerformedProcedureStep, uid)
        assert status.Status == 0x0111  # duplicate SOP instance
        bad = _completed()
        del bad.PerformedProcedureStepEndTime
        status, _ = assoc.send_n_set(bad, ModalityPerformedProcedureStep, uid)
        assert status.Status == 0x0121  # missing attribute value for the final state
        status, _ = assoc.send_n_set(_completed(), ModalityPerformedProcedureStep, uid)
        assert status.Status == 0x0000
        assert findscu_w(srv, tmp_path / "done", AccessionNumber=f"{t}A1") == []
        status, _ = assoc.send_n_set(_completed(), ModalityPerformedProcedureStep, uid)
        assert status.Status == 0x0110 and status.ErrorID == 0xA710
        status, _ = assoc.send_n_set(_completed(), ModalityPerformedProcedureStep, generate_uid())
        assert status.Status == 0x0112  # no such object instance
        wrong = _mpps_create(f"{t}A2", f"SPS{t}A2")
        wrong.PerformedProcedureStepStatus = "COMPLETED"
        status, _ = assoc.send_n_create(wrong, ModalityPerformedProcedureStep, generate_uid())
        assert status.Status == 0x0106
        missing = _mpps_create(f"{t}A2", f"SPS{t}A2")
        del missing.PerformedStationAETitle
        status, _ = assoc.send_n_create(missing, ModalityPerformedProcedureStep, generate_uid())
        assert status.Status == 0x0120
    finally:
        assoc.release()
    # untouched by the refused requests
    assert accessions(findscu_w(srv, tmp_path / "a2", AccessionNumber=f"{t}A2")) == {f"{t}A2"}


def test_mpps_discontinued_leaves_the_worklist(srv, orders, tmp_path) -> None:
    t = orders
    uid = generate_uid()
    assoc = _assoc(srv, "US01")
    try:
        assert assoc.send_n_create(_mpps_create(f"{t}A3", f"SPS{t}A3"), ModalityPerformedProcedureStep,
                                   uid)[0].Status == 0
        stop = Dataset()
        stop.PerformedProcedureStepStatus = "DISCONTINUED"
        stop.PerformedProcedureStepEndDate = "20250304"
        stop.PerformedProcedureStepEndTime = "091500"
        assert assoc.send_n_set(stop, ModalityPerformedProcedureStep, uid)[0].Status == 0
    finally:
        assoc.release()
    assert findscu_w(srv, tmp_path / "dc", AccessionNumber=f"{t}A3") == []


def test_rights_worklist_and_mpps(srv, orders, tmp_path) -> None:
    res = dcmtk.run("findscu", "-v", "-W", "-to", "20", "-ta", "20", "-aet", "QRONLY", "-k", "AccessionNumber",
                    *dcmtk.peer_args(srv.dicom_port, "OPENPACS"))
    assert re.search(r"0x0?124|Refused: NotAuthorized|not ?authori", res.output, re.I), res.output[-2000:]
    assoc = _assoc(srv, "QRONLY")
    try:
        status, _ = assoc.send_n_create(_mpps_create("X", "Y"), ModalityPerformedProcedureStep, generate_uid())
        assert status.Status == 0x0124
    finally:
        assoc.release()
