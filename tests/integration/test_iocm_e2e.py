"""IOCM end to end on a real `openpacs serve`: a rejection note (Key Object Selection, 113001) built with pydicom and
sent with DCMTK storescu hides the referenced instances from DCMTK findscu (IMAGE level and the counts), QIDO-RS,
WADO-RS and getscu; restore through the API brings them back; the console's Reject action and Rejections page
(headless Chromium); an export zip whose DICOMDIR DCMTK dcmdump reads, de-identified (no patient name)."""

from __future__ import annotations

import io
import re
import time
import zipfile
from pathlib import Path

import pytest
import requests
from helpers import dcmtk
from helpers.browser import CHROMIUM_ARGS
from helpers.dicomdata import small_image, write_part10
from pydicom import Dataset, dcmread
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import generate_uid

pytestmark = pytest.mark.usefixtures("require_dcmtk")

CT = "1.2.840.10008.5.1.4.1.1.2"
KOS = "1.2.840.10008.5.1.4.1.1.88.59"


def api(srv, method: str, path: str, **kw):
    return requests.request(method, f"http://127.0.0.1:{srv.http_port}/api{path}", timeout=60, **kw)


def qido(srv, path: str, **params):
    r = requests.get(f"http://127.0.0.1:{srv.http_port}/dicom-web{path}", params=params, timeout=30,
                     headers={"Accept": "application/dicom+json"})
    assert r.status_code in (200, 204), r.text
    return r.json() if r.status_code == 200 and r.content else []


def make_study(directory: Path, name: str = "Iocm^Patient", pid: str = "IOCM-PID") -> tuple[str, list[list[Dataset]]]:
    study = generate_uid()
    out = []
    for s in range(2):
        series_uid = generate_uid()
        items = []
        for i in range(3):
            ds = small_image(CT, fill=i)
            ds.PatientID, ds.PatientName, ds.PatientBirthDate = pid, name, "19700101"
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series_uid
            ds.StudyDate, ds.StudyTime, ds.Modality = "20261207", "120000", "CT"
            ds.SeriesNumber, ds.InstanceNumber, ds.AccessionNumber = s + 1, i + 1, "IOCMACC"
            ds.StudyDescription = f"IOCM study of {name}"
            write_part10(ds, directory / f"{ds.SOPInstanceUID}.dcm")
            items.append(ds)
        out.append(items)
    return study, out


def rejection_note(study: str, refs: list[Dataset], code: str = "113001",
                   meaning: str = "Rejected for Quality Reasons") -> Dataset:
    """A modality's rejection note, written from PS3.3 A.35.4 / TID 2010 (not with the server's own code)."""
    first = refs[0]
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = KOS, generate_uid()
    ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = first.PatientID, first.PatientName, "", ""
    ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime = study, first.StudyDate, first.StudyTime
    ds.AccessionNumber, ds.ReferringPhysicianName, ds.StudyID = first.AccessionNumber, "", "1"
    ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = "KO", generate_uid(), 99
    ds.ReferencedPerformedProcedureStepSequence = DicomSequence()
    ds.Manufacturer, ds.InstanceNumber, ds.ContentDate, ds.ContentTime = "MODALITY", 1, "20261207", "130000"
    ds.ValueType, ds.ContinuityOfContent = "CONTAINER", "SEPARATE"
    title = Dataset()
    title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning = code, "DCM", meaning
    ds.ConceptNameCodeSequence = DicomSequence([title])
    tpl = Dataset()
    tpl.MappingResource, tpl.TemplateIdentifier = "DCMR", "2010"
    ds.ContentTemplateSequence = DicomSequence([tpl])
    content, sops = [], []
    for r in refs:
        ref = Dataset()
        ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = r.SOPClassUID, r.SOPInstanceUID
        sops.append(ref)
        item = Dataset()
        item.RelationshipType, item.ValueType = "CONTAINS", "IMAGE"
        item.ReferencedSOPSequence = DicomSequence([ref])
        content.append(item)
    ds.ContentSequence = DicomSequence(content)
    se = Dataset()
    se.SeriesInstanceUID = refs[0].SeriesInstanceUID
    se.ReferencedSOPSequence = DicomSequence(sops)
    st = Dataset()
    st.StudyInstanceUID = study
    st.ReferencedSeriesSequence = DicomSequence([se])
    ds.CurrentRequestedProcedureEvidenceSequence = DicomSequence([st])
    return ds


def image_uids(server, study: str, out: Path) -> set[str]:
    found = dcmtk.find(server.dicom_port, "study", "IMAGE", {"StudyInstanceUID": study, "SeriesInstanceUID": "",
                                                            "SOPInstanceUID": ""}, out)
    return {str(d.SOPInstanceUID) for d in found}


def study_counts(server, study: str, out: Path) -> tuple[int, int]:
    (st,) = dcmtk.find(server.dicom_port, "study", "STUDY", {"StudyInstanceUID": study,
                                                             "NumberOfStudyRelatedInstances": "",
                                                             "NumberOfStudyRelatedSeries": ""}, out)
    return int(st.NumberOfStudyRelatedInstances), int(st.NumberOfStudyRelatedSeries)


def test_rejection_note_over_cstore_hides_and_restore_brings_back(server, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    study, series = make_study(src)
    dcmtk.store(server.dicom_port, sorted(src.glob("*.dcm"))).check()
    rejected = series[0][:2]
    gone = {str(d.SOPInstanceUID) for d in rejected}
    assert len(image_uids(server, study, tmp_path / "f0")) == 6
    note = write_part10(rejection_note(study, rejected), tmp_path / "note.dcm")
    res = dcmtk.store(server.dicom_port, [note], calling="MODALITY1")
    res.check()
    assert list(dcmtk.parse_store_log(res.output).values()) == ["Success"]

    # findscu: IMAGE level and the counts (the note itself is an ordinary KO instance)
    uids = image_uids(server, study, tmp_path / "f1")
    assert not uids & gone and len(uids) == 6 - 2 + 1
    assert study_counts(server, study, tmp_path / "f2") == (5, 3)
    ser = dcmtk.find(server.dicom_port, "study", "SERIES", {"StudyInstanceUID": study, "SeriesInstanceUID": "",
                                                            "NumberOfSeriesRelatedInstances": ""}, tmp_path / "f3")
    counts = {str(s.SeriesInstanceUID): int(s.NumberOfSeriesRelatedInstances) for s in ser}
    assert counts[str(series[0][0].SeriesInstanceUID)] == 1 and counts[str(series[1][0].SeriesInstanceUID)] == 3

    # QIDO-RS
    q = qido(server, f"/studies/{study}/instances")
    assert {i["00080018"]["Value"][0] for i in q} == uids
    (qs,) = qido(server, "/studies", StudyInstanceUID=study, includefield="NumberOfStudyRelatedInstances")
    assert qs["00201208"]["Value"][0] == 5
    # WADO-RS: the rejected instance is not served
    r0 = rejected[0]
    base = f"http://127.0.0.1:{server.http_port}/dicom-web/studies/{study}/series/{r0.SeriesInstanceUID}"
    r = requests.get(f"{base}/instances/{r0.SOPInstanceUID}", headers={"Accept": "multipart/related; "
                     "type=\"application/dicom\""}, timeout=30)
    assert r.status_code == 404, r.status_code
    r = requests.get(f"{base}/metadata", timeout=30)
    assert r.status_code == 200 and len(r.json()) == 1
    # getscu: the rejected instance is not there, its series gives the one left
    g = dcmtk.get(server.dicom_port, "study", "IMAGE", {"StudyInstanceUID": study,
                                                      "SeriesInstanceUID": str(r0.SeriesInstanceUID),
                                                      "SOPInstanceUID": str(r0.SOPInstanceUID)}, tmp_path / "g1")
    assert g.files == []
    g = dcmtk.get(server.dicom_port, "study", "SERIES", {"StudyInstanceUID": study,
                                                       "SeriesInstanceUID": str(r0.SeriesInstanceUID)}, tmp_path / "g2")
    assert [str(dcmread(f).SOPInstanceUID) for f in g.files] == [str(series[0][2].SOPInstanceUID)]

    # the rejection, as the API lists it; restore
    items = api(server, "GET", "/rejections", params={"study": study}).json()["items"]
    assert len(items) == 1
    rej = items[0]
    assert rej["reason"] == "113001" and rej["source"] == "network" and rej["actor"] == "MODALITY1"
    assert rej["num_instances"] == 2 and rej["state"] == "rejected"
    r = api(server, "POST", f"/rejections/{rej['id']}/restore")
    assert r.status_code == 200 and r.json()["state"] == "restored", r.text
    assert image_uids(server, study, tmp_path / "f4") == {str(d.SOPInstanceUID) for s in series for d in s}
    assert study_counts(server, study, tmp_path / "f5") == (6, 2)  # the note went with the restore
    assert api(server, "POST", f"/rejections/{rej['id']}/restore").status_code == 409
    g = dcmtk.get(server.dicom_port, "study", "SERIES", {"StudyInstanceUID": study,
                                                       "SeriesInstanceUID": str(r0.SeriesInstanceUID)}, tmp_path / "g3")
    assert len(g.files) == 3


def test_api_reject_validates(server, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    study, series = make_study(src, pid="IOCM-API")
    dcmtk.store(server.dicom_port, sorted(src.glob("*.dcm"))).check()
    assert api(server, "POST", f"/studies/{study}/reject", json={"reason": "12345"}).status_code == 400
    assert api(server, "POST", f"/studies/{generate_uid()}/reject", json={"reason": "113001"}).status_code == 404
    r = api(server, "POST", f"/studies/{study}/reject",
            json={"reason": "113039", "instances": [str(series[1][0].SOPInstanceUID)]})
    assert r.status_code == 200 and r.json()["num_instances"] == 1, r.text
    assert str(series[1][0].SOPInstanceUID) not in image_uids(server, study, tmp_path / "f")
    r = api(server, "POST", "/rejections/purge", json={"older_than_days": 0})
    assert r.status_code == 202
    job = r.json()["job"]
    for _ in range(120):
        j = api(server, "GET", f"/jobs/{job}").json()
        if j["state"] in ("done", "failed"):
            break
        time.sleep(0.5)
    assert j["state"] == "done", j
    assert j["payload"]["result"]["deleted"] == 1
    (rej,) = api(server, "GET", "/rejections", params={"study": study}).json()["items"]
    assert rej["state"] == "purged"
    events = api(server, "GET", "/audit", params={"study": study}).json()["items"]
    details = {(e["event"], e["detail"]) for e in events}
    assert any(ev == "StudyDeleted" and "IOCM purge: 1 rejected" in d for ev, d in details), details
    assert any(ev == "PatientRecord" and "113039" in d for ev, d in details), details
    assert len(image_uids(server, study, tmp_path / "f2")) == 6  # 5 left + the note


def test_console_reject_and_restore(server, tmp_path, chromium_path, artifacts):
    from playwright.sync_api import expect, sync_playwright

    src = tmp_path / "src"
    src.mkdir()
    study, series = make_study(src, name="Console^Reject", pid="IOCM-UI")
    dcmtk.store(server.dicom_port, sorted(src.glob("*.dcm"))).check()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1500, "height": 1000})
        page.goto(f"http://127.0.0.1:{server.http_port}/ui/#/study/{study}")
        expect(page.locator("#reject-study")).to_be_visible(timeout=30000)
        page.select_option("#reject-reason", "113037")
        page.screenshot(path=str(artifacts / "console-study-reject.png"), full_page=True)
        page.click("#reject-study")
        page.locator("dialog.confirm button.danger").click()
        expect(page.get_by_role("heading", name="Rejections")).to_be_visible(timeout=30000)
        row = page.locator("tr", has_text=study)
        expect(row).to_contain_text("113037")
        expect(row).to_contain_text("Console, Reject (IOCM-UI)")
        page.screenshot(path=str(artifacts / "console-rejections.png"), full_page=True)
        assert study_counts(server, study, tmp_path / "f1") == (1, 1)  # only the note is left
        row.locator("button.restore").click()
        expect(page.locator("tr", has_text=study)).to_contain_text("restored", timeout=30000)
        page.screenshot(path=str(artifacts / "console-rejections-restored.png"), full_page=True)
        browser.close()
    assert study_counts(server, study, tmp_path / "f2") == (6, 2)


def test_export_zip_dicomdir_deidentified(server, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    study, series = make_study(src, name="Secret^Name", pid="IOCM-EXP")
    dcmtk.store(server.dicom_port, sorted(src.glob("*.dcm"))).check()
    r = api(server, "POST", "/export", json={"studies": [study], "format": "zip",
                                             "deidentify": {"retain_dates": True}})
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip", r.text
    out = tmp_path / "zip"
    zipfile.ZipFile(io.BytesIO(r.content)).extractall(out)
    dump = dcmtk.run("dcmdump", str(out / "DICOMDIR")).check().output
    assert len(re.findall(r"\(0004,1430\) CS \[IMAGE", dump)) == 6
    assert "(0004,1430) CS [PATIENT" in dump and "(0004,1430) CS [SERIES" in dump
    files = re.findall(r"\(0004,1500\) CS \[([^\]]+)\]", dump)
    assert len(files) == 6
    for f in files:
        path = out.joinpath(*f.split("\\"))
        assert path.is_file(), path
        one = dcmtk.run("dcmdump", str(path)).check().output
        assert "Secret" not in one and "IOCM-EXP" not in one
        assert "(0010,0010) PN [ANONYMOUS]" in one and "(0008,0020) DA [20261207]" in one
        assert "(0012,0062) CS [YES]" in one
    assert "Secret" not in dump
    # the original is untouched and the plain export keeps the name
    r = api(server, "POST", "/export", json={"studies": [study], "format": "zip"})
    plain = tmp_path / "plain"
    zipfile.ZipFile(io.BytesIO(r.content)).extractall(plain)
    dump = dcmtk.run("dcmdump", "+sd", "+r", str(plain)).check().output
    assert dump.count("Secret^Name") >= 6
    # a folder export on the server
    r = api(server, "POST", "/export", json={"studies": [study], "format": "folder", "folder": f"exp-{study[-8:]}"})
    assert r.status_code == 200 and r.json()["instances"] == 6, r.text
    assert (Path(r.json()["folder"]) / "DICOMDIR").is_file()
    assert api(server, "POST", "/export", json={"studies": [study], "format": "node",
                                                "destination": "NOWHERE"}).status_code == 400
    # de-identify into a new study: found by C-FIND under the pseudonym only
    r = api(server, "POST", f"/studies/{study}/deidentify", json={"patient_name": "STUDY^COPY"})
    assert r.status_code == 200, r.text
    new = r.json()["study_instance_uid"]
    (st,) = dcmtk.find(server.dicom_port, "study", "STUDY", {"StudyInstanceUID": new, "PatientName": "",
                                                             "NumberOfStudyRelatedInstances": ""}, tmp_path / "f")
    assert str(st.PatientName) == "STUDY^COPY" and int(st.NumberOfStudyRelatedInstances) == 6


def test_export_to_node(server, storescp, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    study, series = make_study(src, pid="IOCM-NODE")
    dcmtk.store(server.dicom_port, sorted(src.glob("*.dcm"))).check()
    storescp.clear()
    r = api(server, "POST", "/export", json={"studies": [study], "format": "node", "destination": "DESTSCP"})
    assert r.status_code == 200 and r.json()["job"], r.text
    deadline = time.monotonic() + 60
    while len(storescp.files()) < 6 and time.monotonic() < deadline:
        time.sleep(0.3)
    assert len(storescp.files()) == 6
