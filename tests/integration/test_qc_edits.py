"""QC edits end to end on a real `openpacs serve`: DCMTK storescu a study; edit StudyDescription and PatientName through
the API; DCMTK findscu and QIDO-RS show the new values, a getscu-fetched file and a WADO-RS instance carry them; split
a series off into a new study: findscu/QIDO counts of both studies right and the moved instances served (getscu,
WADO-RS, metadata) with the new StudyInstanceUID; merge it back; undo everything, back to the stored values; the
Patient Record audit events; the console's QC panel and history (headless Chromium screenshots)."""

from __future__ import annotations

import time
from pathlib import Path

import pydicom
import pytest
import requests
from helpers import dcmtk
from helpers.browser import CHROMIUM_ARGS
from helpers.dicomdata import small_image, write_part10
from helpers.server import OpenPACSServer, stop_cleanly
from pydicom.uid import generate_uid

pytestmark = pytest.mark.usefixtures("require_dcmtk")

CT = "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = OpenPACSServer(tmp_path_factory.mktemp("qc-edits") / "data")
    srv.start()
    yield srv
    stop_cleanly(srv)


@pytest.fixture(scope="module")
def study(server, tmp_path_factory):
    """One study of two series of two instances, sent with storescu."""
    d = tmp_path_factory.mktemp("qc-files")
    st, ses = generate_uid(), [generate_uid(), generate_uid()]
    files, sops = [], {}
    for k, se in enumerate(ses):
        for n in range(2):
            ds = small_image(CT, fill=k * 2 + n)
            ds.PatientID, ds.PatientName, ds.PatientBirthDate = "QC1", "Wrong^Name", "19700101"
            ds.StudyInstanceUID, ds.SeriesInstanceUID = st, se
            ds.StudyDate, ds.StudyDescription, ds.AccessionNumber = "20261207", "Chest", "QCACC1"
            ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", k + 1, n + 1
            files.append(write_part10(ds, d / f"{ds.SOPInstanceUID}.dcm"))
            sops.setdefault(se, []).append(str(ds.SOPInstanceUID))
    dcmtk.store(server.dicom_port, files).check()
    return {"study": st, "series": ses, "sops": sops}


def api(srv, method: str, path: str, **kw):
    return requests.request(method, f"http://127.0.0.1:{srv.http_port}/api{path}", timeout=30, **kw)


def qido(srv, path: str, **params) -> list[dict]:
    r = requests.get(f"http://127.0.0.1:{srv.http_port}/dicom-web{path}", params=params, timeout=30,
                     headers={"Accept": "application/dicom+json"})
    assert r.status_code in (200, 204), r.text
    return r.json() if r.status_code == 200 else []


def val(obj: dict, tag: str):
    v = obj.get(tag, {}).get("Value", [None])[0]
    return v.get("Alphabetic") if isinstance(v, dict) else v


def cfind(srv, tmp: Path, level: str, keys: dict[str, str]) -> list[pydicom.Dataset]:
    return dcmtk.find(srv.dicom_port, "study", level, keys, tmp / f"find-{time.monotonic_ns()}")


def cget(srv, tmp: Path, study_uid: str) -> list[pydicom.Dataset]:
    got = dcmtk.get(srv.dicom_port, "study", "STUDY", {"StudyInstanceUID": study_uid}, tmp / f"get-{time.monotonic_ns()}")
    assert got.final_status() == 0, got.output[-3000:]
    return [pydicom.dcmread(f) for f in got.files]


def wado(srv, study_uid: str) -> list[pydicom.Dataset]:
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(url=f"http://127.0.0.1:{srv.http_port}/dicom-web")
    return list(client.retrieve_study(study_uid))


def test_edit_split_merge_undo_on_every_path(server, study, tmp_path):
    st, (se1, se2) = study["study"], study["series"]
    # -- edit the study and the patient ----------------------------------------------------------------------
    r = api(server, "PATCH", f"/studies/{st}", json={"StudyDescription": "Chest PA corrected"})
    assert r.status_code == 200, r.text
    edit_study = r.json()
    assert edit_study["old"]["values"] == {"StudyDescription": "Chest"} and edit_study["user"]
    r = api(server, "PATCH", "/patients/QC1", json={"attributes": {"PatientName": "Right^Name"}})
    assert r.status_code == 200, r.text
    edit_patient = r.json()
    assert api(server, "PATCH", f"/studies/{st}", json={"StudyDate": "2026-12-07"}).status_code == 400
    assert api(server, "PATCH", "/studies/1.2.3.4", json={"StudyDescription": "x"}).status_code == 404

    [f] = cfind(server, tmp_path, "STUDY", {"StudyInstanceUID": st, "StudyDescription": "", "PatientName": "",
                                              "NumberOfStudyRelatedInstances": ""})
    assert (f.StudyDescription, str(f.PatientName), int(f.NumberOfStudyRelatedInstances)) == (
        "Chest PA corrected", "Right^Name", 4)
    assert cfind(server, tmp_path, "STUDY", {"StudyInstanceUID": "", "PatientName": "RIGHT*"})  # matching follows
    [q] = qido(server, "/studies", StudyInstanceUID=st)
    assert (val(q, "00081030"), val(q, "00100010")) == ("Chest PA corrected", "Right^Name")
    fetched = cget(server, tmp_path, st)
    assert len(fetched) == 4
    assert {(d.StudyDescription, str(d.PatientName)) for d in fetched} == {("Chest PA corrected", "Right^Name")}
    served = wado(server, st)
    assert {(d.StudyDescription, str(d.PatientName)) for d in served} == {("Chest PA corrected", "Right^Name")}
    assert {d.AccessionNumber for d in served} == {"QCACC1"}  # the rest of the study module as stored

    # -- split series 2 off into a new study -----------------------------------------------------------------
    r = api(server, "POST", f"/studies/{st}/split", json={"series": [se2],
                                                          "attributes": {"StudyDescription": "Split off"}})
    assert r.status_code == 200, r.text
    split = r.json()
    new = split["new"]["series"][se2]
    assert new != st and set(split["study_uids"]) == {st, new}
    rows = cfind(server, tmp_path, "STUDY", {"PatientID": "QC1", "StudyInstanceUID": "", "StudyDescription": "",
                                             "NumberOfStudyRelatedSeries": "", "NumberOfStudyRelatedInstances": ""})
    assert sorted((d.StudyInstanceUID, d.StudyDescription, int(d.NumberOfStudyRelatedSeries),
                   int(d.NumberOfStudyRelatedInstances)) for d in rows) == sorted(
        [(st, "Chest PA corrected", 1, 2), (new, "Split off", 1, 2)])
    [s2] = cfind(server, tmp_path, "SERIES", {"StudyInstanceUID": new, "SeriesInstanceUID": ""})
    assert s2.SeriesInstanceUID == se2
    counts = {val(q, "0020000D"): val(q, "00201208") for q in qido(server, "/studies", PatientID="QC1")}
    assert counts == {st: 2, new: 2}
    moved = cget(server, tmp_path, new)
    assert sorted(d.SOPInstanceUID for d in moved) == sorted(study["sops"][se2])
    assert {(d.StudyInstanceUID, d.SeriesInstanceUID, d.StudyDescription) for d in moved} == {(new, se2, "Split off")}
    assert {d.StudyInstanceUID for d in wado(server, new)} == {new}
    meta = requests.get(f"http://127.0.0.1:{server.http_port}/dicom-web/studies/{new}/metadata", timeout=30).json()
    assert {val(m, "0020000D") for m in meta} == {new}
    assert sorted(d.SOPInstanceUID for d in cget(server, tmp_path, st)) == sorted(study["sops"][se1])
    base = f"http://127.0.0.1:{server.http_port}/dicom-web/studies/{new}/series/{se2}/instances/{study['sops'][se2][0]}"
    frame = requests.get(f"{base}/frames/1", headers={"Accept": "application/octet-stream"}, timeout=30)
    assert frame.status_code == 200 and len(frame.content) > 0  # the viewer's frames, from the moved instance
    assert requests.get(f"{base}/rendered", headers={"Accept": "image/png"}, timeout=30).status_code == 200
    one = requests.get(f"http://127.0.0.1:{server.http_port}/api/studies/{new}", timeout=30).json()
    assert (one["num_series"], one["num_instances"], one["description"]) == (1, 2, "Split off")

    # -- merge it back ---------------------------------------------------------------------------------------
    r = api(server, "POST", f"/studies/{new}/merge", json={"into": st})
    assert r.status_code == 200, r.text
    merge = r.json()
    assert [d.StudyInstanceUID for d in cfind(server, tmp_path, "STUDY", {"PatientID": "QC1", "StudyInstanceUID": ""})
            ] == [st]
    assert qido(server, "/studies", StudyInstanceUID=new) == []
    assert {d.StudyInstanceUID for d in cget(server, tmp_path, st)} == {st} and len(cget(server, tmp_path, st)) == 4
    assert api(server, "GET", f"/studies/{new}").status_code == 404

    # -- undo, newest first ----------------------------------------------------------------------------------
    assert api(server, "POST", f"/qc/history/{edit_study['id']}/undo").status_code == 200  # independent of the moves
    for entry in (merge, split, edit_patient):
        r = api(server, "POST", f"/qc/history/{entry['id']}/undo")
        assert r.status_code == 200, r.text
    assert api(server, "POST", f"/qc/history/{merge['id']}/undo").status_code == 409  # undone already
    [f] = cfind(server, tmp_path, "STUDY", {"PatientID": "QC1", "StudyInstanceUID": "", "StudyDescription": "",
                                            "PatientName": "", "NumberOfStudyRelatedInstances": ""})
    assert (f.StudyInstanceUID, f.StudyDescription, str(f.PatientName), int(f.NumberOfStudyRelatedInstances)) == (
        st, "Chest", "Wrong^Name", 4)
    back = cget(server, tmp_path, st)
    assert {(d.StudyInstanceUID, d.StudyDescription, str(d.PatientName)) for d in back} == {(st, "Chest", "Wrong^Name")}
    assert {d.SeriesInstanceUID for d in back} == {se1, se2}
    assert {(d.StudyDescription, str(d.PatientName)) for d in wado(server, st)} == {("Chest", "Wrong^Name")}
    [q] = qido(server, "/studies", StudyInstanceUID=st)
    assert (val(q, "00081030"), val(q, "00100010"), val(q, "00201208")) == ("Chest", "Wrong^Name", 4)

    # -- history and audit -----------------------------------------------------------------------------------
    hist = api(server, "GET", "/qc/history", params={"uid": st}).json()["items"]
    assert {h["operation"] for h in hist} >= {"edit", "split", "merge"} and all(h["undone_at"] for h in hist)
    deadline = time.monotonic() + 10
    while True:
        events = api(server, "GET", "/audit", params={"event": "PatientRecord", "study": st}).json()["items"]
        details = [e.get("detail") or "" for e in events]
        if sum("QC " in d for d in details) >= 8 or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    for word in ("edit of study", "edit of patient", "split of 1 series", f"merge of study {new}", "undo of split"):
        assert any(word in d for d in details), (word, details)


def test_console_qc_panel_and_history(server, study, chromium_path, artifacts):
    from playwright.sync_api import expect, sync_playwright

    st = study["study"]
    r = api(server, "PATCH", f"/series/{study['series'][0]}", json={"SeriesDescription": "Axial 5mm"})
    assert r.status_code == 200, r.text
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1500, "height": 1400})
        page.goto(f"http://127.0.0.1:{server.http_port}/ui/#/study/{st}")
        expect(page.get_by_role("heading", name="Quality control")).to_be_visible(timeout=30000)
        page.fill("#qc-study-form input[name=StudyDescription]", "Chest from console")
        page.click("#qc-study-form button[type=submit]")
        expect(page.get_by_role("heading", name="Chest from console", exact=False)).to_be_visible(timeout=15000)
        expect(page.locator("#qc-edit").get_by_text("“Chest” → “Chest from console”", exact=False)).to_be_visible()
        page.screenshot(path=str(artifacts / "console-qc-study.png"), full_page=True)
        page.goto(f"http://127.0.0.1:{server.http_port}/ui/#/qc")
        expect(page.get_by_role("heading", name="QC history")).to_be_visible(timeout=30000)
        expect(page.locator("#qc-history").get_by_text("Axial 5mm", exact=False)).to_be_visible()
        page.locator("#qc-history").screenshot(path=str(artifacts / "console-qc-history.png"))
        browser.close()
    # the console's edit is the API's: findscu sees it
    [f] = dcmtk.find(server.dicom_port, "study", "STUDY", {"StudyInstanceUID": st, "StudyDescription": ""},
                     artifacts / "qc-find")
    assert f.StudyDescription == "Chest from console"
    hist = api(server, "GET", "/qc/history", params={"uid": st}).json()["items"]
    assert hist[0]["new"]["values"] == {"StudyDescription": "Chest from console"}
