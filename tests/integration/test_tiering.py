"""Cold tier on S3 (moto's server on loopback, real HTTP) behind a filesystem primary: a study moved to the tier by the
API leaves the primary store, and C-GET, WADO-RS and frames still return it byte-identical; moved back, the same; the
"older than N days" job moves what is due; a tier-side cache serves repeated reads."""

from __future__ import annotations

import io
import os
import random
import time

import pydicom
import pytest
import requests
from helpers import dcmtk
from helpers.dicomdata import dataset_bytes, small_image, split_meta, write_part10
from helpers.s3 import MotoS3
from helpers.server import OpenPACSServer, stop_cleanly
from pydicom.uid import generate_uid

pytestmark = pytest.mark.usefixtures("require_dcmtk")


@pytest.fixture(scope="module")
def moto():
    with MotoS3() as m:
        yield m


@pytest.fixture(scope="module")
def tier_server(moto, tmp_path_factory):
    bucket = moto.bucket()
    base = tmp_path_factory.mktemp("tiersrv")
    srv = OpenPACSServer(base / "data", settings={"tier_url": f"s3://{bucket}/cold", **moto.settings(),
                                                  "tier_cache_dir": str(base / "tier-cache")})
    srv.bucket = bucket  # type: ignore[attr-defined]
    srv.cache = base / "tier-cache"  # type: ignore[attr-defined]
    srv.start()
    yield srv
    stop_cleanly(srv)


def make_study(directory, n: int, seed: int) -> tuple[str, dict[str, bytes], list]:
    rng = random.Random(seed)
    study, series = generate_uid(), generate_uid()
    files, sent = [], {}
    for k in range(n):
        side = rng.choice([16, 64, 256])
        ds = small_image(rows=side, cols=side)
        ds.PixelData = rng.randbytes(side * side * 2)
        ds.PatientID, ds.PatientName, ds.Modality = f"TIER{seed}", "Tier^Test", "CT"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.InstanceNumber = study, series, k + 1
        if k == 0:  # one multi-frame instance for the frame path
            ds.NumberOfFrames = 3
            ds.PixelData = rng.randbytes(side * side * 2 * 3)
        p = write_part10(ds, directory / f"{seed}-{k}.dcm")
        files.append(p)
        sent[str(ds.SOPInstanceUID)] = dataset_bytes(p)
    return study, sent, files


def api(srv, method: str, path: str, **kw):
    return requests.request(method, f"http://127.0.0.1:{srv.http_port}/api{path}", timeout=60, **kw)


def run_job(srv, body: dict) -> dict:
    r = api(srv, "POST", "/storage/tier", json=body)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    deadline = time.monotonic() + 120
    while True:
        job = api(srv, "GET", f"/jobs/{job_id}").json()
        if job["state"] in ("done", "failed", "cancelled"):
            assert job["state"] == "done", job
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.3)


def tier_objects(moto, bucket) -> list[str]:
    return [o["Key"] for o in moto.client().list_objects_v2(Bucket=bucket, Prefix="cold/").get("Contents", ())]


def check_retrieval(srv, study: str, sent: dict[str, bytes], tmp) -> None:
    got = dcmtk.get(srv.dicom_port, "study", "STUDY", {"StudyInstanceUID": study}, tmp)
    received = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): dataset_bytes(f) for f in got.files}
    assert received == sent, got.output[-3000:]
    assert got.final_status() == 0x0000
    from openpacs.dicomweb.multipart import MultipartParser, parse_media_type

    r = requests.get(f"http://127.0.0.1:{srv.http_port}/dicom-web/studies/{study}", timeout=60,
                     headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
    assert r.status_code == 200
    parser = MultipartParser(parse_media_type(r.headers["content-type"])[1]["boundary"])
    parts = parser.feed(r.content)
    by_uid = {str(pydicom.dcmread(io.BytesIO(p.content), stop_before_pixels=True).SOPInstanceUID):
              split_meta(p.content)[1] for p in parts}
    assert by_uid == sent
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(url=f"http://127.0.0.1:{srv.http_port}/dicom-web")
    multi = next(pydicom.dcmread(io.BytesIO(p.content)) for p in parts
                 if "NumberOfFrames" in pydicom.dcmread(io.BytesIO(p.content), stop_before_pixels=True))
    frame_len = len(multi.PixelData) // 3
    frames = client.retrieve_instance_frames(study, multi.SeriesInstanceUID, multi.SOPInstanceUID,
                                             frame_numbers=[2, 3])
    assert frames == [multi.PixelData[frame_len:2 * frame_len], multi.PixelData[2 * frame_len:]]


def test_tier_and_back_byte_identical(tier_server, moto, tmp_path):
    srv = tier_server
    study, sent, files = make_study(tmp_path, 6, 1)
    res = dcmtk.store(srv.dicom_port, files)
    assert set(dcmtk.parse_store_log(res.output).values()) == {"Success"}, res.output[-3000:]
    assert len(srv.blob_files()) == 6
    assert api(srv, "GET", f"/storage/tier/studies/{study}").json() == {"study_instance_uid": study, "primary": 6,
                                                                          "tier": 0}
    job = run_job(srv, {"studies": [study]})
    assert job["payload"]["result"]["instances"] == 6 and job["payload"]["result"]["studies"] == [study]
    assert srv.blob_files() == []  # the primary copies are gone
    assert len(tier_objects(moto, srv.bucket)) == 6
    assert api(srv, "GET", f"/storage/tier/studies/{study}").json()["tier"] == 6
    status = api(srv, "GET", "/storage/tier").json()
    assert status["configured"] and status["tiered_instances"] == 6
    check_retrieval(srv, study, sent, tmp_path / "get1")
    cached = [p for p in srv.cache.iterdir() if not p.name.startswith(".")]
    assert cached, "whole reads of tiered blobs fill the tier cache"
    for p in cached:  # a second retrieval without the cache: straight from S3 again
        p.unlink()
    check_retrieval(srv, study, sent, tmp_path / "get2")
    # and back
    job = run_job(srv, {"action": "back", "studies": [study]})
    assert job["payload"]["result"]["instances"] == 6
    assert len(srv.blob_files()) == 6 and tier_objects(moto, srv.bucket) == []
    assert api(srv, "GET", f"/storage/tier/studies/{study}").json()["primary"] == 6
    check_retrieval(srv, study, sent, tmp_path / "get3")


def test_older_than_days_job_and_restart(tier_server, moto, tmp_path):
    srv = tier_server
    study, sent, files = make_study(tmp_path, 3, 2)
    res = dcmtk.store(srv.dicom_port, files)
    assert set(dcmtk.parse_store_log(res.output).values()) == {"Success"}
    before = len(srv.blob_files())
    job = run_job(srv, {"older_than_days": 0})  # every study received before now
    assert study in job["payload"]["result"]["studies"]
    assert len(srv.blob_files()) <= before - 3  # this study's blobs (and any other due study's) left the primary
    assert api(srv, "GET", f"/storage/tier/studies/{study}").json()["tier"] == 3
    # the orphan sweep of a restart keeps tiered blobs (the index names them)
    srv.stop()
    srv.start()
    time.sleep(2)
    check_retrieval(srv, study, sent, tmp_path / "get")
    assert len(tier_objects(moto, srv.bucket)) >= 3


def test_tier_api_errors(tier_server):
    assert api(tier_server, "POST", "/storage/tier", json={"studies": ["1.2.3.999"]}).status_code == 404
    assert api(tier_server, "POST", "/storage/tier", json={"action": "back"}).status_code == 400
    assert api(tier_server, "POST", "/storage/tier", json={"action": "sideways", "studies": ["1"]}).status_code == 400
    assert api(tier_server, "GET", "/storage/tier/studies/1.2.3.999").status_code == 404
    assert os.path.isdir(tier_server.cache)
