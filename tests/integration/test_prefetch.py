"""Prefetch of prior studies (services/prefetch.py) with Orthanc as the other archive: a new CT study arriving over
DCMTK storescu makes OpenPACS fetch the patient's newest prior CT (not the older CT, not the MR, not a study it already
holds); a new order placed through the worklist API fetches the prior of the ordered modality. Needs Orthanc."""

from __future__ import annotations

import os
import time
import warnings

import pytest
import requests
from helpers import dcmtk, dicomdata
from helpers.orthanc import Orthanc, find_orthanc
from helpers.server import OpenPACSServer, stop_cleanly
from pydicom.uid import generate_uid

warnings.filterwarnings("ignore", module="pydicom")
pytestmark = pytest.mark.usefixtures("require_dcmtk")

REQUIRE_ALL = os.environ.get("OPENPACS_TEST_REQUIRE_ALL", "") not in ("", "0", "false")
PID = "PRIOR001"


def study_files(date: str, modality: str, n: int = 2, study: str | None = None, body_part: str = "CHEST"):
    study = study or generate_uid()
    series = generate_uid()
    out = []
    for i in range(n):
        ds = dicomdata.small_image(fill=i + 1)
        for k, v in dict(PatientID=PID, PatientName="PRIOR^PATIENT", StudyDate=date, StudyTime="080000",
                         StudyInstanceUID=study, SeriesInstanceUID=series, Modality=modality, SeriesNumber=1,
                         InstanceNumber=i + 1, AccessionNumber=f"A{date}", BodyPartExamined=body_part,
                         StudyDescription=f"{modality} {date}").items():
            setattr(ds, k, v)
        out.append(dicomdata.part10_bytes(ds))
    return study, out


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    if find_orthanc() is None:
        if REQUIRE_ALL:
            pytest.fail("Orthanc not found (OPENPACS_TEST_REQUIRE_ALL is set)", pytrace=False)
        pytest.skip("Orthanc not found")
    base = tmp_path_factory.mktemp("prefetch")
    srv = OpenPACSServer(base / "data", settings={"job_backoff_seconds": 1.0})
    orthanc = Orthanc(base / "orthanc", aet="ORTHANC", modalities={"openpacs": (srv.aet, "127.0.0.1", srv.dicom_port)})
    srv.remote_aes = {"ORTHANC": (orthanc.aet, "127.0.0.1", orthanc.dicom_port)}
    srv.extra_toml = """
[[routes]]
name = "ct-priors"
kind = "prefetch"
on = ["study"]
sources = ["ORTHANC"]
prior_modalities = "same"
max_priors = 1
max_age_days = 3650
[routes.match]
Modality = "CT"
CallingAETitle = "CTSCANNER"

[[routes]]
name = "order-priors"
kind = "prefetch"
on = ["order"]
sources = ["ORTHANC"]
prior_modalities = "same"
max_priors = 2
[routes.match]
Modality = "MR"
"""
    orthanc.start()
    try:
        srv.start()
    except BaseException:
        orthanc.stop()
        raise
    today = time.strftime("%Y%m%d")
    priors = {}
    for key, date, mod in (("ct_new", "20250601", "CT"), ("ct_old", "20230101", "CT"), ("mr", "20240301", "MR"),
                           ("mr_old", "20200301", "MR")):
        uid, files = study_files(date, mod)
        for f in files:
            orthanc.upload(f)
        priors[key] = uid
    # a prior OpenPACS already holds (also on Orthanc): never fetched again
    held_uid, held = study_files("20251010", "CT")
    for f in held:
        orthanc.upload(f)
    files = []
    for i, data in enumerate(held):
        p = base / f"held{i}.dcm"
        p.write_bytes(data)
        files.append(p)
    assert dcmtk.store(srv.dicom_port, files).returncode == 0
    priors["held"] = held_uid
    yield srv, orthanc, priors, base, today
    try:
        stop_cleanly(srv)
    finally:
        orthanc.stop()


def api(srv, method, path, **kw):
    return requests.request(method, f"http://127.0.0.1:{srv.http_port}/api{path}", timeout=60, **kw)


def local_studies(srv) -> set[str]:
    r = requests.get(f"http://127.0.0.1:{srv.http_port}/dicom-web/studies", params={"PatientID": PID}, timeout=30)
    return {s["0020000D"]["Value"][0] for s in (r.json() if r.status_code == 200 else [])}


def wait_for(cond, what, srv, timeout=90.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            jobs = api(srv, "GET", "/jobs").json()["items"]
            raise AssertionError(f"{what}; jobs: {jobs}\n{srv.log_tail(5000)}")
        time.sleep(0.3)


def test_new_study_prefetches_the_newest_prior_of_its_modality(env):
    srv, orthanc, priors, base, today = env
    wait_for(lambda: api(srv, "GET", "/routes").json()["cursor"]["seq"] is not None, "router started", srv)
    new_uid, new = study_files(today, "CT")
    paths = []
    for i, data in enumerate(new):
        p = base / f"new{i}.dcm"
        p.write_bytes(data)
        paths.append(p)
    assert dcmtk.store(srv.dicom_port, paths, calling="CTSCANNER").returncode == 0
    # the held CT (20251010) is the newest CT prior but is already here: the next newest, ct_new, is fetched
    wait_for(lambda: priors["ct_new"] in local_studies(srv), "newest CT prior fetched", srv)
    pre = [j for j in api(srv, "GET", "/jobs", params={"kind": "prefetch"}).json()["items"]]
    assert len(pre) == 1 and pre[0]["payload"]["rule"] == "ct-priors"
    wait_for(lambda: api(srv, "GET", f"/jobs/{pre[0]['id']}").json()["state"] == "done", "prefetch done", srv)
    result = api(srv, "GET", f"/jobs/{pre[0]['id']}").json()["payload"]["result"]["ORTHANC"]
    assert result["chosen"] == [priors["ct_new"]] and result["already_here"] == 1
    retrieve = api(srv, "GET", f"/jobs/{result['retrieve_job']}").json()
    wait_for(lambda: api(srv, "GET", f"/jobs/{result['retrieve_job']}").json()["state"] == "done", "retrieved",
             srv)
    assert retrieve["kind"] == "retrieve"
    time.sleep(1.5)
    here = local_studies(srv)
    assert priors["ct_old"] not in here and priors["mr"] not in here and new_uid in here
    # the prior that arrived is itself a new study here: it matches the rule but must not start a chain of
    # prefetches that fetch everything (its priors are the same patient's other CTs: already here or older)
    assert len(api(srv, "GET", "/jobs", params={"kind": "retrieve"}).json()["items"]) <= 2


def test_new_order_prefetches_priors_of_the_ordered_modality(env):
    srv, orthanc, priors, base, today = env
    r = api(srv, "POST", "/worklist", json={"PatientID": PID, "PatientName": "PRIOR^PATIENT", "AccessionNumber": "ORD1",
                                            "Modality": "MR", "ScheduledProcedureStepStartDate": today})
    assert r.status_code in (200, 201), r.text
    wait_for(lambda: {priors["mr"], priors["mr_old"]} <= local_studies(srv), "MR priors fetched on order", srv)
    jobs = [j for j in api(srv, "GET", "/jobs", params={"kind": "prefetch"}).json()["items"]
            if j["payload"]["rule"] == "order-priors"]
    assert len(jobs) == 1 and jobs[0]["payload"]["prior_modalities"] == ["MR"]
    assert "order ORD1" in jobs[0]["payload"]["why"]
