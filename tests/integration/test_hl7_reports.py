"""ORU^R01 reports end to end on a real `openpacs serve`: python-hl7's MLLP client sends reports (escapes,
repetitions, UTF-8, a Z-segment); each is stored with its study as a Basic Text SR through ingest, visible in QIDO-RS
(ModalitiesInStudy), DCMTK findscu and WADO-RS, and its text in /api/reports. A report for an accession with no
study yet is kept and attached when the images arrive (C-STORE)."""

from __future__ import annotations

import time

import pytest
from helpers import dcmtk
from helpers.dicomdata import small_image, write_part10
from helpers.server import OpenPACSServer, stop_cleanly
from pydicom.uid import generate_uid
from test_hl7_listener import api, qido, send, wado_instances

BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"


@pytest.fixture(scope="module")
def srv(request, backend, require_dcmtk, tmp_path_factory):
    base = tmp_path_factory.mktemp(f"oru-{backend}")
    index_url = request.getfixturevalue("pg_cluster").create_database() if backend == "postgresql" else None
    server = OpenPACSServer(base / "data", index_url=index_url)
    server.start()
    yield server
    stop_cleanly(server)


def store(srv: OpenPACSServer, tmp, accession: str, pid: str) -> str:
    study = generate_uid()
    series = generate_uid()
    files = []
    for i in range(2):
        ds = small_image(fill=i)
        ds.PatientID, ds.PatientName, ds.AccessionNumber = pid, "Report^Rita", accession
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = study, series, "CT"
        ds.StudyDate = "20250101"
        ds.SOPInstanceUID = generate_uid()
        files.append(write_part10(ds, tmp / f"st-{accession}" / f"{i}.dcm"))
    dcmtk.store(srv.dicom_port, files).check()
    return study


def oru(cid: str, accession: str, obx: list[str], status: str = "F") -> str:
    obr = ["OBR", "1", f"P{accession}", f"F{accession}", "CTHEAD^CT head^LOCAL", "", "", "20250102101500"] + [""] * 10
    obr += [accession] + [""] * 6 + [status] + [""] * 6 + ["1234&Reader&Ruth"]
    segs = [f"MSH|^~\\&|RIS|HOSP|OPENPACS|RAD|20250102||ORU^R01^ORU_R01|{cid}|P|2.5|||||||UNICODE UTF-8",
            "PID|1||RP1^^^HOSP^MR||Report^Rita||19700101|F", "|".join(obr), *obx, "ZDS|1.2.3^RIS^Application^DICOM"]
    return "\r".join(segs) + "\r"


def sr_of(srv: OpenPACSServer, study: str):
    return [ds for ds in wado_instances(srv, study) if ds.SOPClassUID == BASIC_TEXT_SR]


def wait_for(fn, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if got or time.monotonic() > deadline:
            return got
        time.sleep(0.2)


def test_report_for_an_existing_study(srv, tmp_path) -> None:
    tag = srv.backend[:2].upper()
    acc = f"{tag}R1"
    study = store(srv, tmp_path, acc, "RP1")
    ack = send(srv, oru(f"{tag}oru1", acc, [
        "OBX|1|TX|GDT^Findings^LOCAL||No acute findings.~Ventricles normal \\T\\ symmetric.||||||F",
        "OBX|2|FT|IMP^Impression^LOCAL||Impression: normal\\.br\\Größe 3 cm \\S\\ stable||||||F",
        "NTE|1||a comment not in the report"]))
    assert str(ack.segment("MSA")[1]) == "AA"
    (sr,) = wait_for(lambda: sr_of(srv, study))
    assert sr.Modality == "SR" and sr.AccessionNumber == acc and sr.PatientID == "RP1"
    assert sr.CompletionFlag == "COMPLETE" and sr.VerificationFlag == "VERIFIED"
    assert str(sr.VerifyingObserverSequence[0].VerifyingObserverName) == "Reader^Ruth"
    text = [i for i in sr.ContentSequence if i.ValueType == "TEXT"][0].TextValue
    assert text == "No acute findings.\nVentricles normal & symmetric.\nImpression: normal\nGröße 3 cm ^ stable"
    (row,) = qido(srv, StudyInstanceUID=study, includefield="00080061")
    assert "SR" in row["00080061"]["Value"]
    found = dcmtk.find(srv.dicom_port, "study", "SERIES", {"StudyInstanceUID": study, "Modality": "SR",
                                                          "SeriesInstanceUID": ""}, tmp_path / "f")
    assert len(found) == 1
    (rep,) = api(srv, "/reports", accession=acc)["items"]
    assert rep["stored"] and rep["sop_instance_uid"] == sr.SOPInstanceUID and rep["study_instance_uid"] == study
    assert rep["text"] == text and rep["observer"] == "Reader^Ruth"


def test_report_waits_for_its_study(srv, tmp_path) -> None:
    tag = srv.backend[:2].upper()
    acc = f"{tag}R2"
    ack = send(srv, oru(f"{tag}oru2", acc, ["OBX|1|TX|GDT^Findings^LOCAL||Preliminary: see later.||||||P"],
                        status="P"))
    assert str(ack.segment("MSA")[1]) == "AA"
    (rep,) = api(srv, "/reports", accession=acc)["items"]
    assert not rep["stored"] and rep["study_instance_uid"] is None and rep["status"] == "P"
    study = store(srv, tmp_path, acc, "RP1")
    (sr,) = wait_for(lambda: sr_of(srv, study))
    assert sr.CompletionFlag == "PARTIAL" and sr.VerificationFlag == "UNVERIFIED"
    assert [i for i in sr.ContentSequence if i.ValueType == "TEXT"][0].TextValue == "Preliminary: see later."
    assert wait_for(lambda: api(srv, "/reports", accession=acc)["items"][0]["stored"])
    # more images of the study do not store the report again
    store_more = store(srv, tmp_path / "more", acc, "RP1")
    time.sleep(1.0)
    assert len(sr_of(srv, study)) == 1 and sr_of(srv, store_more) == []


def test_report_without_accession_or_text(srv) -> None:
    no_accession = oru("orubad", "", ["OBX|1|TX|GDT||text||||||F"]).replace("OBR|1|P|F|", "OBR|1|||")
    ack = send(srv, no_accession)
    assert str(ack.segment("MSA")[1]) == "AE" and "OBR^1^18" in str(ack.segment("ERR"))
    ack = send(srv, oru("orubad2", "NOTEXT", ["OBX|1|NM|SIZE||42||||||F"]))
    assert str(ack.segment("MSA")[1]) == "AE" and "OBX^1^5" in str(ack.segment("ERR"))
