"""Each department's objects in the study list and the study view: a kind badge per study and a one-line summary per
series ("12-lead ECG, 10 s, 1000 Hz", "RT Plan: 1 beam, 30 fractions", "US cine, 120 frames at 30 fps"), and
department-scoped users seeing only their own department's studies, through a real `openpacs serve` with auth on."""

from __future__ import annotations

import io
import subprocess
import uuid

import pytest
import requests
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from tests.helpers.server import OpenPACSServer, openpacs_command

# (file, patient ID, the summary the study view must show for its one series, the kind badge of the study)
OBJECTS = [
    ("waveform_ecg.dcm", "CARD-ECG", "12-lead ECG, 10 s, 1000 Hz, 2 groups", "ecg"),
    ("color3d_jpeg_baseline.dcm", "CARD-US", "US cine, 120 frames at 30 fps", "cine"),
    ("rtplan.dcm", "RT-PLAN", "RT Plan Plan1: 1 beam, 30 fractions, 30.8 Gy prescribed", "rt"),
    ("rtstruct.dcm", "RT-STRUCT", "RT Structure Set: 3 ROIs (patient, Isocenter 1, Isocenter 2)", "rt"),
    ("rtdose.dcm", "RT-DOSE", "RT Dose (beam), 15 planes, RELATIVE", "rt"),
    ("test-SR.dcm", "RAD-SR", "Structured report: Diagnosis (complete)", "sr"),
    ("CT_small.dcm", "RAD-CT", "CT, 1 image, 128×128", None),
]


def cli(server: OpenPACSServer, *args: str, stdin: str | None = None) -> str:
    argv = [*openpacs_command(), *args, "--data-dir", str(server.data_dir), *server.index_args()]
    r = subprocess.run(argv, capture_output=True, text=True, input=stdin, timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout


def part10(name: str, pid: str) -> tuple[bytes, str]:
    """A pydicom test file as its own study of its own patient (fresh UIDs, so the files never share a study)."""
    ds = dcmread(get_testdata_file(name, read=False), force=True)
    ds.PatientID = pid
    ds.PatientName = f"DEPT^{pid}"
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue(), ds.StudyInstanceUID


def stow(base: str, headers: dict[str, str], data: bytes) -> requests.Response:
    b = uuid.uuid4().hex
    body = f"--{b}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data + f"\r\n--{b}--\r\n".encode()
    return requests.post(f"{base}/dicom-web/studies", data=body, timeout=60, headers={
        **headers, "Content-Type": f'multipart/related; type="application/dicom"; boundary={b}',
        "Accept": "application/dicom+json"})


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    server = OpenPACSServer(tmp_path_factory.mktemp("departments") / "data", settings={"auth": "on"})
    cli(server, "department", "rule", "cardiology", "--modality", "US,ECG")
    cli(server, "department", "rule", "radiation-therapy", "--modality", "RTPLAN,RTSTRUCT,RTDOSE")
    cli(server, "department", "rule", "radiology", "--modality", "CT,MR,SR")
    cli(server, "user", "add", "boss", "--role", "admin", "--password-stdin", stdin="boss-password-123\n")
    cli(server, "user", "add", "cardio", "--role", "viewer", "--departments", "cardiology", "--password-stdin",
        stdin="cardio-password-123\n")
    server.start()
    admin = {"Authorization": "Bearer " + cli(server, "user", "token", "boss").strip().splitlines()[-1]}
    cardio = {"Authorization": "Bearer " + cli(server, "user", "token", "cardio").strip().splitlines()[-1]}
    base = f"http://127.0.0.1:{server.http_port}"
    uids = {}
    for name, pid, _, _ in OBJECTS:
        data, study = part10(name, pid)
        r = stow(base, admin, data)
        assert r.status_code == 200, (name, r.status_code, r.text[:300])
        uids[name] = study
    yield base, admin, cardio, uids
    server.stop()


def test_series_summaries_in_the_study_view(archive) -> None:
    base, admin, _, uids = archive
    for name, _, summary, kind in OBJECTS:
        r = requests.get(f"{base}/api/studies/{uids[name]}", headers=admin, timeout=30)
        assert r.status_code == 200, r.text
        study = r.json()
        assert [s["summary"]["text"] for s in study["series"]] == [summary], name
        assert study["kinds"] == ([kind] if kind else []), name
        assert study["series"][0]["summary"]["kind"] == (kind or "image")


def test_study_list_badges_and_department_scope(archive) -> None:
    base, admin, cardio, uids = archive
    every = requests.get(f"{base}/api/studies", params={"limit": 100}, headers=admin, timeout=30).json()["items"]
    assert {s["uid"] for s in every} == set(uids.values())
    kinds = {s["uid"]: s["kinds"] for s in every}
    assert kinds[uids["waveform_ecg.dcm"]] == ["ecg"] and kinds[uids["rtdose.dcm"]] == ["rt"]
    assert {s["uid"]: s["department"] for s in every}[uids["rtplan.dcm"]] == "radiation-therapy"

    # the cardiology viewer sees the ECG and the echo, nothing of radiology or radiotherapy, on every path
    mine = requests.get(f"{base}/api/studies", params={"limit": 100}, headers=cardio, timeout=30).json()["items"]
    assert {s["uid"] for s in mine} == {uids["waveform_ecg.dcm"], uids["color3d_jpeg_baseline.dcm"]}
    assert requests.get(f"{base}/api/studies/{uids['rtplan.dcm']}", headers=cardio, timeout=30).status_code == 404
    r = requests.get(f"{base}/dicom-web/studies", headers=cardio, timeout=30)
    assert r.status_code == 200 and uids["rtplan.dcm"] not in r.text and uids["waveform_ecg.dcm"] in r.text
    r = requests.get(f"{base}/api/studies/{uids['waveform_ecg.dcm']}", headers=cardio, timeout=30)
    assert r.status_code == 200 and r.json()["series"][0]["summary"]["kind"] == "ecg"


def test_rt_plan_table_in_the_study_view(archive) -> None:
    base, admin, _, uids = archive
    plan = requests.get(f"{base}/api/studies/{uids['rtplan.dcm']}", headers=admin,
                        timeout=30).json()["series"][0]["summary"]["rt_plan"]
    assert plan["label"] == "Plan1" and plan["fractions"] == 30
    assert [(p["description"], round(p["dose_gy"], 1)) for p in plan["prescriptions"]] == [("PTV", 30.8)]
    assert [(b["number"], b["name"], b["radiation"], b["energy"], b["gantry_angle"], round(b["meterset"], 1))
            for b in plan["beams"]] == [(1, "Field 1", "PHOTON", 6.0, 0.0, 116.0)]
    # other objects carry no plan table
    ecg = requests.get(f"{base}/api/studies/{uids['waveform_ecg.dcm']}", headers=admin, timeout=30).json()
    assert "rt_plan" not in ecg["series"][0]["summary"]
