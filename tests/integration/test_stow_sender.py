"""STOW-RS send jobs to Orthanc's DICOMweb (Debian orthanc + orthanc-dicomweb) as a ``[remote_dicomweb.NAME]`` peer,
through ``POST /api/studies/{uid}/send``: the instances arrive byte-identical (data set as stored) in batches of
``max_instances_per_request``, with HTTP basic auth checked against Orthanc's RegisteredUsers; a wrong password fails
the job at once (401, no retry); a peer that is down is retried until it comes up."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import requests
from helpers import dcmtk
from helpers.dicomdata import dataset_bytes, small_image, split_meta, write_part10
from helpers.orthanc import Orthanc, find_dicomweb_plugin, find_orthanc
from helpers.server import OpenPACSServer, make_server, stop_cleanly
from pydicom.uid import generate_uid

pytestmark = pytest.mark.usefixtures("require_dcmtk")

REQUIRE_ALL = os.environ.get("OPENPACS_TEST_REQUIRE_ALL", "") not in ("", "0", "false")
FINAL = ("done", "failed", "cancelled")
USER, PASSWORD = "stowuser", "s3cret-pw"


def _missing(what: str) -> None:
    if REQUIRE_ALL:
        pytest.fail(f"{what} (OPENPACS_TEST_REQUIRE_ALL is set)", pytrace=False)
    pytest.skip(what)


@pytest.fixture(scope="module")
def orthancs(tmp_path_factory):
    if find_orthanc() is None:
        _missing("Orthanc not found (apt-get install orthanc; or set OPENPACS_TEST_ORTHANC)")
    plugin = find_dicomweb_plugin()
    if plugin is None:
        _missing("Orthanc DICOMweb plugin not found (apt-get install orthanc-dicomweb)")
    root = tmp_path_factory.mktemp("stow-orthanc")
    secured = Orthanc(root / "secured", aet="SECURED", dicomweb_plugin=plugin,
                      extra={"AuthenticationEnabled": True, "RegisteredUsers": {USER: PASSWORD}})
    secured.session.auth = (USER, PASSWORD)
    secured.start()
    yield {"secured": secured, "root": root, "plugin": plugin}
    secured.stop()


@pytest.fixture(scope="module")
def late(orthancs, backend):
    """An Orthanc whose ports are chosen now but which a test starts later (one per backend)."""
    peer = Orthanc(orthancs["root"] / f"late-{backend}", aet="LATE", dicomweb_plugin=orthancs["plugin"])
    yield peer
    peer.stop()


@pytest.fixture(scope="module")
def server(request, backend, orthancs, late, tmp_path_factory) -> OpenPACSServer:
    secured = orthancs["secured"]
    web = f"{secured.url}/dicom-web"
    toml = f"""
[remote_dicomweb.ORTHANCWEB]
url = "{web}"
username = "{USER}"
password = "{PASSWORD}"
max_instances_per_request = 2

[remote_dicomweb.BADPASS]
url = "{web}"
username = "{USER}"
password = "wrong"

[remote_dicomweb.LATEWEB]
url = "{late.url}/dicom-web/"
timeout = 10
"""
    srv = make_server(request, tmp_path_factory.mktemp(f"stow-{backend}"), backend, extra_toml=toml,
                      settings={"job_backoff_seconds": 1.0, "job_backoff_max": 2.0, "job_max_attempts": 30})
    srv.start()
    yield srv
    stop_cleanly(srv)


def api(srv: OpenPACSServer) -> str:
    return f"http://127.0.0.1:{srv.http_port}/api"


def get_job(srv: OpenPACSServer, job_id: int) -> dict:
    return requests.get(f"{api(srv)}/jobs/{job_id}", timeout=30).json()


def wait_job(srv: OpenPACSServer, job_id: int, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        j = get_job(srv, job_id)
        if j["state"] in FINAL:
            return j
        assert time.monotonic() < deadline, f"job {job_id} still {j['state']} after {timeout}s: {j}"
        time.sleep(0.2)


def stored_study(srv: OpenPACSServer, directory: Path, count: int) -> tuple[str, dict[str, bytes]]:
    """A CT study stored into OpenPACS by storescu; SOP Instance UID -> the data set bytes OpenPACS keeps."""
    study, series = generate_uid(), generate_uid()
    paths = []
    for i in range(count):
        ds = small_image(rows=32, cols=32, fill=i + 1)
        ds.Modality = "CT"
        ds.PatientID = "STOW-" + study[-6:]
        ds.PatientName = "STOW^TEST"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.InstanceNumber = i + 1
        paths.append(write_part10(ds, directory / f"ct{i}.dcm"))
    res = dcmtk.store(srv.dicom_port, paths)
    statuses = dcmtk.parse_store_log(res.output)
    assert all(statuses.get(str(p)) == "Success" for p in paths), res.output[-3000:]
    import pydicom

    kept = {}
    for p in srv.blob_files():
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
        except Exception:  # noqa: BLE001
            continue
        if str(ds.get("StudyInstanceUID", "")) == study:
            kept[str(ds.SOPInstanceUID)] = dataset_bytes(p)
    assert len(kept) == count
    return study, kept


def send_study(srv: OpenPACSServer, study: str, destination: str) -> dict:
    r = requests.post(f"{api(srv)}/studies/{study}/send", json={"destination": destination}, timeout=60)
    assert r.status_code == 202, r.text
    return r.json()


def test_stow_to_orthanc_with_basic_auth_is_byte_identical(server, orthancs, tmp_path):
    orthanc = orthancs["secured"]
    study, kept = stored_study(server, tmp_path, 5)
    job = send_study(server, study, "ORTHANCWEB")
    assert job["kind"] == "stow" and job["total"] == 5 and job["destination"] == "ORTHANCWEB"
    j = wait_job(server, job["id"])
    assert j["state"] == "done", j
    assert j["done"] == 5 and j["failed"] == 0 and j["failed_items"] == [] and j["attempts"] == 1
    assert j["bytes"] > 0
    listed = requests.get(f"{api(server)}/jobs", params={"kind": "stow"}, timeout=30).json()["items"]
    assert job["id"] in [x["id"] for x in listed]
    for uid, data in kept.items():
        oid = orthanc.find_instance(uid)
        assert oid is not None, f"{uid} not in Orthanc"
        assert split_meta(orthanc.instance_file(oid))[1] == data, f"{uid}: data set differs from the stored one"
    assert len(orthanc.get(f"/studies/{orthanc.find_study(study)}/instances")) == 5


def test_wrong_password_fails_at_once_with_401(server, tmp_path):
    study, _ = stored_study(server, tmp_path, 1)
    j = wait_job(server, send_study(server, study, "BADPASS")["id"])
    assert j["state"] == "failed", j
    assert j["attempts"] == 1, j
    assert "401" in j["error"] and "unauthorized" in j["error"].lower(), j["error"]


def test_unknown_destination_is_refused_at_submit(server, tmp_path):
    study, _ = stored_study(server, tmp_path, 1)
    r = requests.post(f"{api(server)}/studies/{study}/send", json={"destination": "NOWHERE"}, timeout=60)
    assert r.status_code == 404 and "NOWHERE" in r.text
    r = requests.post(f"{api(server)}/studies/{study}/send", json={"destination": "ORTHANCWEB", "commit": True},
                      timeout=60)
    assert r.status_code == 400 and "DICOMweb" in r.text


def test_peer_down_is_retried_until_it_comes_up(server, late, tmp_path):
    study, kept = stored_study(server, tmp_path, 3)
    job = send_study(server, study, "LATEWEB")
    deadline = time.monotonic() + 60
    while True:
        j = get_job(server, job["id"])
        if j["attempts"] >= 2 and j["state"] in ("pending", "running") and j["error"]:
            break
        assert j["state"] not in FINAL, j
        assert time.monotonic() < deadline, j
        time.sleep(0.2)
    assert "unreachable" in j["error"], j["error"]
    late.start()
    j = wait_job(server, job["id"])
    assert j["state"] == "done" and j["done"] == 3, j
    for uid, data in kept.items():
        oid = late.find_instance(uid)
        assert oid is not None
        assert split_meta(late.instance_file(oid))[1] == data
