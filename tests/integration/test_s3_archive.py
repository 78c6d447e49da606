"""The archive on S3-compatible object storage (storage_url = "s3://bucket/prefix", moto's server on loopback over
real HTTP): DCMTK storescu of pydicom's conformance files, byte-exact C-GET and WADO-RS retrieval and frames (ranged
GETs), nothing on the local disk; kill -9 during a multi-association ingest: every acknowledged instance is there after
the restart, every indexed instance has its object, orphan objects are swept."""

from __future__ import annotations

import os
import random
import time
import uuid

import pydicom
import pytest
import requests
from helpers import dcmtk
from helpers.dicomdata import dataset_bytes, split_meta
from helpers.s3 import MotoS3
from helpers.server import OpenPACSServer, stop_cleanly
from pydicom.encaps import generate_frames
from test_archive_dcmtk import FILE_IDS, IMPLICIT_VR_LE, conformance, wire_bytes  # noqa: F401 - fixtures
from test_crash_durability import ingest_and_kill, make_batches, total_indexed, verify_batches

pytestmark = pytest.mark.usefixtures("require_dcmtk")

PREFIX = "site-a/blobs"


@pytest.fixture(scope="module")
def moto():
    with MotoS3() as m:
        yield m


def s3_keys(moto: MotoS3, bucket: str) -> list[str]:
    out: list[str] = []
    for page in moto.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=PREFIX + "/"):
        out += [o["Key"] for o in page.get("Contents", ())]
    return out


@pytest.fixture(scope="module")
def s3_server(moto, tmp_path_factory):
    bucket = moto.bucket()
    srv = OpenPACSServer(tmp_path_factory.mktemp("s3srv") / "data",
                         settings={"storage_url": f"s3://{bucket}/{PREFIX}", **moto.settings()})
    srv.bucket = bucket  # type: ignore[attr-defined]
    srv.start()
    yield srv
    stop_cleanly(srv)


@pytest.fixture(scope="module")
def stored(s3_server, conformance):  # noqa: F811
    statuses: dict[str, str] = {}
    for c in conformance.values():
        res = dcmtk.store(s3_server.dicom_port, [c.path], "-R", dcmtk.STORESCU_PROPOSE[c.transfer_syntax])
        statuses[c.name] = dcmtk.parse_store_log(res.output).get(str(c.path), res.output[-2000:])
    return statuses


def test_store_puts_every_instance_in_the_bucket_and_nothing_on_disk(s3_server, stored, moto):
    assert set(stored.values()) == {"Success"}, stored
    keys = s3_keys(moto, s3_server.bucket)
    assert len(keys) == len(FILE_IDS)
    assert s3_server.blob_files() == []  # no local blob store at all
    r = requests.get(f"http://127.0.0.1:{s3_server.http_port}/readyz", timeout=30)
    assert r.status_code == 200, r.text  # the probe writes, reads and removes an object in the bucket


@pytest.mark.parametrize("name", FILE_IDS)
def test_get_and_wado_are_byte_exact(name, s3_server, stored, conformance, wire_bytes, tmp_path):  # noqa: F811
    c = conformance[name]
    got = dcmtk.get(s3_server.dicom_port, "study", "IMAGE",
                    {"StudyInstanceUID": c.study_uid, "SeriesInstanceUID": c.series_uid,
                     "SOPInstanceUID": c.sop_instance_uid},
                    tmp_path / "get", prefer=dcmtk.RETRIEVE_PREFER[c.transfer_syntax])
    assert len(got.files) == 1, got.output[-4000:]
    if c.transfer_syntax == IMPLICIT_VR_LE:  # getscu cannot offer Implicit VR alone (test_archive_dcmtk)
        assert pydicom.dcmread(got.files[0]) == pydicom.dcmread(c.path)
    else:
        assert dataset_bytes(got.files[0]) == wire_bytes[name]
    assert got.final_status() == 0x0000
    url = (f"http://127.0.0.1:{s3_server.http_port}/dicom-web/studies/{c.study_uid}/series/{c.series_uid}"
           f"/instances/{c.sop_instance_uid}")
    r = requests.get(url, headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
                     timeout=60)
    assert r.status_code == 200, r.text[:500]
    from openpacs.dicomweb.multipart import MultipartParser, parse_media_type

    _, params = parse_media_type(r.headers["content-type"])
    parser = MultipartParser(params["boundary"])
    [part] = parser.feed(r.content)
    assert split_meta(part.content)[1] == wire_bytes[name]


def test_frames_come_from_ranged_reads(s3_server, stored, conformance):  # noqa: F811
    """A multi-frame instance's frames over WADO-RS, read from the object store by ranged GETs."""
    from dicomweb_client.api import DICOMwebClient

    c = next(c for c in conformance.values()
             if int(pydicom.dcmread(c.path, stop_before_pixels=True).get("NumberOfFrames", 1) or 1) > 2
             and pydicom.dcmread(c.path, stop_before_pixels=True).file_meta.TransferSyntaxUID.is_encapsulated)
    ds = pydicom.dcmread(c.path)
    n = int(ds.NumberOfFrames)
    expected = list(generate_frames(ds.PixelData, number_of_frames=n))
    client = DICOMwebClient(url=f"http://127.0.0.1:{s3_server.http_port}/dicom-web")
    frames = client.retrieve_instance_frames(c.study_uid, c.series_uid, c.sop_instance_uid, frame_numbers=[1, n],
                                             media_types=(("application/octet-stream", "*"), ("image/*", "*")))
    assert frames == [expected[0], expected[n - 1]]


def plant_orphan(moto: MotoS3, bucket: str) -> str:
    """While the server is down: an object no index row names (a crash between the PUT and the commit)."""
    key = f"{PREFIX}/{time.strftime('%Y%m%d%H', time.gmtime())}{uuid.uuid4().hex}"
    moto.client().put_object(Bucket=bucket, Key=key, Body=b"orphan")
    return key


def test_kill9_during_ingest_on_s3(moto, tmp_path):
    seed = int(os.environ.get("OPENPACS_TEST_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    print(f"OPENPACS_TEST_SEED={seed}")
    bucket = moto.bucket()
    srv = OpenPACSServer(tmp_path / "srv", settings={"storage_url": f"s3://{bucket}/{PREFIX}", **moto.settings()})
    srv.start()
    history = []
    try:
        for cycle in range(int(os.environ.get("OPENPACS_TEST_S3_CRASH_CYCLES", "3"))):
            batches = make_batches(tmp_path / "src", cycle, rng)
            work = tmp_path / f"cycle{cycle}"
            work.mkdir()
            what = ingest_and_kill(srv, batches, work, rng)
            history.extend(batches)
            print(f"cycle {cycle}: {what}")
            time.sleep(1.1)  # LastModified has a one-second resolution: the orphan is older than the next start
            orphan = plant_orphan(moto, bucket)
            time.sleep(1.1)
            context = f"seed {seed}, cycle {cycle} ({what}), S3"
            srv.start()
            verify_batches(srv, batches, work, context)
            deadline = time.monotonic() + 120
            while True:  # the start-up sweep: objects == indexed instances, the orphan gone
                objects, indexed = s3_keys(moto, bucket), total_indexed(srv, work)
                if len(objects) == indexed and orphan not in objects:
                    break
                assert time.monotonic() < deadline, f"{context}: {len(objects)} objects for {indexed} instances"
                time.sleep(0.5)
        final = tmp_path / "final"
        final.mkdir()
        verify_batches(srv, history, final, f"seed {seed}, final check, S3")
        assert sum(len(b.acked) for b in history) > 0
    finally:
        stop_cleanly(srv)
