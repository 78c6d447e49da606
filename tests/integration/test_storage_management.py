"""Storage management on a real server: compression at rest over files stored with DCMTK, then retrieval with getscu
in several transfer syntaxes and WADO-RS ``transfer-syntax=*``; the usage API against what was stored; the integrity
scrub finding a blob corrupted on disk behind the index's back (API, /metrics, dashboard figures, doctor); retention
preview and run with a protected study kept; the console Storage page."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
from helpers import dcmtk
from helpers.browser import CHROMIUM_ARGS
from helpers.dicomdata import prepare_conformance_files, small_image, write_part10
from helpers.server import OpenPACSServer, stop_cleanly
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

pytestmark = pytest.mark.skipif(not dcmtk.which_all_present(), reason="DCMTK not installed")

NATIVE_NAMES = ("CT_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "693_UNCI.dcm", "emri_small.dcm")
RETENTION = """
[[retention]]
name = "old XA"
older_than_years = 5
modalities = ["XA"]
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("storage-mgmt")
    srv = OpenPACSServer(base / "data", settings={"compress": "jpeg-ls-lossless", "compress_after_days": 0,
                                                  "storage_check_seconds": 1, "scrub_interval_hours": 0, "retention_interval_hours": 0,
                                                  "job_backoff_seconds": 1.0}, extra_toml=RETENTION)
    srv.start()
    yield srv
    stop_cleanly(srv)


@pytest.fixture(scope="module")
def stored(server, tmp_path_factory):
    """The conformance files stored with storescu: {name: ConformanceFile}; the natively encoded ones compressed."""
    files = {f.name: f for f in prepare_conformance_files(tmp_path_factory.mktemp("conf"))}
    chosen = [files[n] for n in NATIVE_NAMES] + [files["rtdose.dcm"]]
    jls = files["MR_small_jpeg_ls_lossless.dcm"]  # already compressed: left as it is
    for batch, opts in ((chosen, ()), ([jls], ("-xt",))):
        res = dcmtk.store(server.dicom_port, [f.path for f in batch], *opts)
        res.check()
        statuses = dcmtk.parse_store_log(res.output)
        assert len(statuses) == len(batch) and all(s.startswith("Success") for s in statuses.values()), res.output
    chosen.append(jls)
    return {f.name: f for f in chosen}


def api(srv, method: str, path: str, **kw):
    r = requests.request(method, f"http://127.0.0.1:{srv.http_port}/api{path}", timeout=60, **kw)
    return r


def wait(predicate, what: str, srv, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n{srv.log_tail(4000)}")
        time.sleep(0.5)


def job_done(srv, job_id: int) -> dict:
    def done():
        j = api(srv, "GET", f"/jobs/{job_id}").json()
        return j if j["state"] in ("done", "failed") else None
    return wait(done, f"job {job_id}", srv)


def pixels(data_or_path) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(data_or_path if isinstance(data_or_path, str | Path)
                             else __import__("io").BytesIO(data_or_path))
        return np.array(ds.pixel_array, copy=True)


def wado_instance(srv, f, accept: str) -> requests.Response:
    url = (f"http://127.0.0.1:{srv.http_port}/dicom-web/studies/{f.study_uid}/series/{f.series_uid}"
           f"/instances/{f.sop_instance_uid}")
    return requests.get(url, headers={"Accept": accept}, timeout=60)


def compressed(server, stored) -> dict:
    def ready():
        s = api(server, "GET", "/storage/compression").json()
        jobs = api(server, "GET", "/jobs", params={"kind": "compress"}).json()["items"]
        busy = [j for j in jobs if j["state"] in ("pending", "running")]
        return s if s["compressed"] >= len(NATIVE_NAMES) and s["eligible_now"] == 0 and not busy else None
    return wait(ready, "background compression of the stored instances", server)


def test_compression_then_retrieval_in_several_syntaxes(server, stored, tmp_path):
    summary = compressed(server, stored)
    assert summary["policy"] == "jpeg-ls-lossless"
    assert summary["bytes_saved"] == summary["bytes_before"] - summary["bytes_after"] > 0
    assert summary["skipped"] >= 1  # rtdose: 32-bit samples, JPEG-LS cannot hold them; left as it was
    jobs = api(server, "GET", "/jobs", params={"kind": "compress"}).json()["items"]
    assert jobs and all(j["state"] == "done" for j in jobs)
    payload_saved = sum(j["payload"].get("bytes_saved", 0) for j in jobs)
    assert payload_saved == summary["bytes_saved"]  # the saving is in the jobs too

    # WADO-RS transfer-syntax=*: the stored, now compressed form; pixels identical to what was sent
    for name in NATIVE_NAMES:
        f = stored[name]
        r = wado_instance(server, f, "application/dicom; transfer-syntax=*")
        assert r.status_code == 200, r.text
        assert f"transfer-syntax={JPEGLSLossless}" in r.headers["Content-Type"], (name, r.headers["Content-Type"])
        assert np.array_equal(pixels(r.content), pixels(f.path)), name
        # and still any syntax asked for, transcoded on the way out
        r = wado_instance(server, f, f"application/dicom; transfer-syntax={ExplicitVRLittleEndian}")
        assert r.status_code == 200 and pydicom.dcmread(__import__("io").BytesIO(r.content)).file_meta \
            .TransferSyntaxUID == ExplicitVRLittleEndian
        assert np.array_equal(pixels(r.content), pixels(f.path)), name

    # C-GET with DCMTK getscu in several syntaxes: what arrives is in the syntax negotiated, pixel-identical
    for prefer, want in (("+xe", ExplicitVRLittleEndian), ("+xr", RLELossless),
                         ("+xt", JPEGLSLossless), ("+xv", JPEG2000Lossless)):
        for name in ("CT_small.dcm", "693_UNCI.dcm"):
            f = stored[name]
            out = tmp_path / f"get-{prefer}-{name}"
            got = dcmtk.get(server.dicom_port, "study", "IMAGE",
                            {"StudyInstanceUID": f.study_uid, "SeriesInstanceUID": f.series_uid,
                             "SOPInstanceUID": f.sop_instance_uid}, out, prefer=prefer)
            assert got.final_status() == 0 and len(got.files) == 1, got.output[-3000:]
            ds = pydicom.dcmread(got.files[0])
            assert ds.file_meta.TransferSyntaxUID == want, (prefer, name, ds.file_meta.TransferSyntaxUID)
            assert np.array_equal(pixels(got.files[0]), pixels(f.path)), (prefer, name)


def test_usage_figures_match_what_is_stored(server, stored):
    compressed(server, stored)
    sizes = {}
    for f in stored.values():
        r = wado_instance(server, f, "application/dicom; transfer-syntax=*")
        assert r.status_code == 200
        sizes[f.name] = (len(r.content), pydicom.dcmread(__import__("io").BytesIO(r.content),
                                                         stop_before_pixels=True))
    by_mod = api(server, "GET", "/storage/usage", params={"by": "modality"}).json()
    total = sum(n for n, _ in sizes.values())
    assert by_mod["total_bytes"] == total and by_mod["total_instances"] == len(stored)
    want_mod: dict[str, int] = {}
    for n, ds in sizes.values():
        want_mod[str(ds.Modality)] = want_mod.get(str(ds.Modality), 0) + n
    assert {i["key"]: i["bytes"] for i in by_mod["items"]} == want_mod
    by_study = api(server, "GET", "/storage/usage", params={"by": "study", "limit": 100}).json()["items"]
    want_study: dict[str, int] = {}
    for n, ds in sizes.values():
        want_study[str(ds.StudyInstanceUID)] = want_study.get(str(ds.StudyInstanceUID), 0) + n
    assert {i["key"]: i["bytes"] for i in by_study} == want_study
    by_day = api(server, "GET", "/storage/usage", params={"by": "day"}).json()["items"]
    assert sum(i["bytes"] for i in by_day) == total and sum(i["instances"] for i in by_day) == len(stored)
    assert by_day[0]["key"] == time.strftime("%Y-%m-%d", time.gmtime())
    by_patient = api(server, "GET", "/storage/usage", params={"by": "patient"}).json()["items"]
    assert sum(i["bytes"] for i in by_patient) == total
    by_dep = api(server, "GET", "/storage/usage", params={"by": "department"}).json()["items"]
    assert sum(i["bytes"] for i in by_dep) == total
    assert api(server, "GET", "/storage/usage", params={"by": "colour"}).status_code == 400


def _blob_of(server, sop_uid: str) -> Path:
    import sqlite3

    con = sqlite3.connect(f"file:{server.data_dir / 'index.sqlite'}?mode=ro", uri=True)
    try:
        key = con.execute("select blob_key from instances where sop_instance_uid = ?", (sop_uid,)).fetchone()[0]
    finally:
        con.close()
    return server.data_dir / "blobs" / key[:8] / key[8:10] / key[10:]


def test_scrub_finds_a_blob_corrupted_behind_the_index(server, stored, chromium_path, artifacts):
    compressed(server, stored)
    victim = stored["CT_small.dcm"]
    path = _blob_of(server, victim.sop_instance_uid)
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # one flipped byte in the pixel data, as a failing disk would
    path.write_bytes(bytes(data))
    try:
        r = api(server, "POST", "/storage/scrub")
        assert r.status_code == 202, r.text
        job = job_done(server, r.json()["job_id"])
        assert job["state"] == "done" and job["payload"]["result"]["corrupt"] == 1, job
        assert job["payload"]["result"]["checked"] == len(stored)
        res = api(server, "GET", "/storage/scrub").json()
        assert [(f["sop_instance_uid"], f["problem"]) for f in res["failures"]] == [(victim.sop_instance_uid, "corrupt")]
        wait(lambda: "openpacs_scrub_failures 1.0" in requests.get(
            f"http://127.0.0.1:{server.http_port}/metrics", timeout=30).text, "the scrub metric", server, 30)
        stats = wait(lambda: (s := api(server, "GET", "/stats").json())["scrub_failures"] == 1 and s,
                     "dashboard figures", server, 30)
        assert stats["scrub_last_at"]
        from playwright.sync_api import expect, sync_playwright

        with sync_playwright() as pw:  # the dashboard's alert
            browser = pw.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(f"http://127.0.0.1:{server.http_port}/ui/#/dashboard")
            expect(page.get_by_text("instance(s) missing or corrupt: see Storage")).to_be_visible(timeout=30000)
            page.screenshot(path=str(artifacts / "dashboard-scrub-alert.png"), full_page=True)
            browser.close()
        doctor = server.run_cli("doctor", "--only", "scrub", "--json")
        report = json.loads(doctor.stdout)
        [check] = [c for c in report["checks"] if c["id"] == "scrub"]
        assert check["status"] == "fail" and victim.sop_instance_uid in json.dumps(check["details"])
    finally:
        path.write_bytes(bytes(data[:-100]) + bytes([data[-100] ^ 0xFF]) + bytes(data[-99:]))
    # repaired: the next scrub clears the finding
    job = job_done(server, api(server, "POST", "/storage/scrub").json()["job_id"])
    assert job["payload"]["result"]["failures"] == 0
    assert api(server, "GET", "/storage/scrub").json()["failures"] == []


def _old_xa(directory: Path, patient: str, date: str) -> tuple[str, Path]:
    study = generate_uid()
    ds = small_image(rows=64, cols=64)
    ds.Modality, ds.PatientID, ds.PatientName, ds.StudyDate = "XA", patient, f"OLD^{patient}", date
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, generate_uid()
    return study, write_part10(ds, directory / f"{patient}.dcm")


def test_retention_preview_and_run_keeps_the_protected_study(server, stored, tmp_path):
    gone, gone_file = _old_xa(tmp_path, "RET-OLD", "20010203")
    kept, kept_file = _old_xa(tmp_path, "RET-PROT", "20000101")
    recent, recent_file = _old_xa(tmp_path, "RET-NEW", time.strftime("%Y%m%d"))
    dcmtk.store(server.dicom_port, [gone_file, kept_file, recent_file]).check()
    assert api(server, "POST", f"/studies/{kept}/protect").json() == {"study_instance_uid": kept, "protected": True}
    assert api(server, "POST", f"/studies/{generate_uid()}/protect").status_code == 404
    prev = api(server, "GET", "/retention/preview").json()
    assert [r["name"] for r in prev["rules"]] == ["old XA"] and prev["rules"][0]["source"] == "toml"
    assert [s["study_instance_uid"] for s in prev["delete"]] == [gone]
    assert [s["study_instance_uid"] for s in prev["protected_kept"]] == [kept]
    assert prev["delete"][0]["rule"] == "old XA" and prev["bytes"] == prev["delete"][0]["size_bytes"] > 0
    # the dry run deleted nothing
    qido = f"http://127.0.0.1:{server.http_port}/dicom-web/studies"
    assert requests.get(qido, params={"StudyInstanceUID": gone}, timeout=30).json()

    r = api(server, "POST", "/retention/run")
    assert r.status_code == 202 and r.json()["items"] == 1
    job = job_done(server, r.json()["job_id"])
    assert job["state"] == "done" and job["payload"]["deleted"] == 1
    for uid, present in ((gone, False), (kept, True), (recent, True)):
        found = requests.get(qido, params={"StudyInstanceUID": uid}, timeout=30)
        assert bool(found.content and found.json()) == present, uid
    events = wait(lambda: [e for e in api(server, "GET", "/audit", params={"event": "StudyDeleted"}).json()["items"]
                           if gone in json.dumps(e)], "the StudyDeleted audit event", server, 30)
    assert "old XA" in json.dumps(events[0])
    # unprotected, the next preview offers it
    api(server, "POST", f"/studies/{kept}/unprotect")
    assert [s["study_instance_uid"] for s in api(server, "GET", "/retention/preview").json()["delete"]] == [kept]
    api(server, "POST", f"/studies/{kept}/protect")


def test_storage_console_page(server, stored, chromium_path, artifacts):
    from playwright.sync_api import expect, sync_playwright

    compressed(server, stored)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1500, "height": 1100})
        page.goto(f"http://127.0.0.1:{server.http_port}/ui/#/storage")
        expect(page.get_by_role("heading", name="Storage", exact=True)).to_be_visible(timeout=30000)
        expect(page.get_by_text("saved by compression", exact=False)).to_be_visible()
        expect(page.get_by_text("Policy: jpeg-ls-lossless", exact=False)).to_be_visible()
        expect(page.get_by_role("heading", name="By modality")).to_be_visible()
        expect(page.locator("canvas[data-metric=usage-by-day]")).to_have_attribute(
            "aria-label", __import__("re").compile(r"bytes stored per day"))
        expect(page.get_by_text("old XA (older than", exact=False)).to_be_visible()
        page.screenshot(path=str(artifacts / "console-storage.png"), full_page=True)
        browser.close()
