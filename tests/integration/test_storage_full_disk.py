"""A real full disk: the blob store on a 20 MB tmpfs, four storescu associations at once sending more than fits.

Every C-STORE is answered Success or 0xA700 (Out of Resources) — ENOSPC arrives in the middle of writes, no
threshold is set — nothing partial is left on the file system, every acknowledged instance is retrievable
byte-identical, and once space returns (a filler file removed) the refused instances are stored without a restart.
Needs root for ``mount -t tmpfs`` (the tests run as root here and in CI); skipped with the reason otherwise."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from helpers import dcmtk
from helpers.dicomdata import small_image, split_meta, write_part10
from helpers.server import OpenPACSServer, stop_cleanly
from pydicom.uid import generate_uid

pytestmark = pytest.mark.skipif(not dcmtk.which_all_present(), reason="DCMTK not installed")

ASSOCIATIONS, PER_ASSOCIATION = 4, 8  # 32 x 512 KB = 16.8 MB for the ~10 MB left beside the filler
FILLER = 10 << 20


@pytest.fixture
def small_fs(tmp_path):
    mnt = tmp_path / "blobs-fs"
    mnt.mkdir()
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mnt)], capture_output=True,
                           text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"cannot mount a tmpfs: {e}")
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root): {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=60)


def _files(directory: Path) -> list[list[Path]]:
    rng = np.random.default_rng(7)
    out = []
    for a in range(ASSOCIATIONS):
        batch = []
        study = generate_uid()
        for i in range(PER_ASSOCIATION):
            ds = small_image(rows=512, cols=512)
            ds.PixelData = rng.integers(0, 4096, 512 * 512, dtype=np.uint16).tobytes()  # incompressible-ish
            ds.PatientID, ds.PatientName, ds.Modality = f"FULL{a}", f"FULL^{a}", "CT"
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, generate_uid()
            ds.InstanceNumber = i + 1
            batch.append(write_part10(ds, directory / f"a{a}" / f"{i:02d}.dcm"))
        out.append(batch)
    return out


def _store_concurrently(port: int, batches: list[list[Path]]) -> dict[str, str]:
    results: dict[str, str] = {}
    lock = threading.Lock()

    def one(batch: list[Path]) -> None:
        res = dcmtk.store(port, batch)
        statuses = dcmtk.parse_store_log(res.output)
        with lock:
            results.update(statuses)

    threads = [threading.Thread(target=one, args=(b,)) for b in batches]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    return results


def _blob_files(mnt: Path) -> list[Path]:
    return [p for p in mnt.rglob("*") if p.is_file() and p.parent.parent.parent == mnt]


def _wado(srv: OpenPACSServer, path: Path) -> bytes | None:
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    r = requests.get(f"http://127.0.0.1:{srv.http_port}/dicom-web/studies/{ds.StudyInstanceUID}/series/"
                     f"{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}",
                     headers={"Accept": "application/dicom; transfer-syntax=*"}, timeout=60)
    return r.content if r.status_code == 200 else None


def test_real_full_disk_during_a_four_association_ingest(small_fs, tmp_path):
    filler = small_fs / "filler"
    filler.write_bytes(os.urandom(FILLER))
    batches = _files(tmp_path / "in")
    srv = OpenPACSServer(tmp_path / "data", settings={"storage_url": f"file://{small_fs}"})
    srv.start()
    try:
        statuses = _store_concurrently(srv.dicom_port, batches)
        every = [f for b in batches for f in b]
        assert len(statuses) == len(every), srv.log_tail(3000)  # each request answered, no association dropped
        ok = [f for f in every if statuses[str(f)].startswith("Success")]
        refused = [f for f in every if f not in ok]
        assert ok and refused, statuses  # the disk filled up in the middle of the ingest
        for f in refused:
            assert "OutOfResources" in statuses[str(f)] or "A700" in statuses[str(f)].upper(), statuses[str(f)]
        assert "No space left on device" in srv.log_text()  # a real ENOSPC, not a threshold

        # nothing partial: no temp file left, one blob file per acknowledged instance, nothing else
        assert [p for p in (small_fs / ".tmp").iterdir() if p.is_file()] == []
        assert len(_blob_files(small_fs)) == len(ok)
        # every acknowledged instance retrievable byte-identical (the data set as sent; the server adds the meta)
        for f in ok:
            got = _wado(srv, f)
            assert got is not None and split_meta(got)[1] == split_meta(f.read_bytes())[1], f
        for f in refused:
            assert _wado(srv, f) is None
        qido = requests.get(f"http://127.0.0.1:{srv.http_port}/dicom-web/instances", params={"limit": 1000},
                            timeout=60).json()
        assert len(qido) == len(ok)

        # space comes back: the refused instances go in, no restart
        filler.unlink()
        statuses = _store_concurrently(srv.dicom_port, [refused[i::ASSOCIATIONS] for i in range(ASSOCIATIONS)])
        assert all(statuses[str(f)].startswith("Success") for f in refused), statuses
        for f in every:
            got = _wado(srv, f)
            assert got is not None and split_meta(got)[1] == split_meta(f.read_bytes())[1], f
        assert len(_blob_files(small_fs)) == len(every)
    finally:
        stop_cleanly(srv)


def _metric(srv: OpenPACSServer, name: str) -> float:
    text = requests.get(f"http://127.0.0.1:{srv.http_port}/metrics", timeout=30).text
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name) and " " in line]
    return sum(values)


def test_min_free_threshold_alerts_on_dashboard_and_metrics(small_fs, tmp_path, chromium_path, artifacts):
    """storage_min_free close to the free space of the tmpfs: the same answers before the disk is really full, the
    alert on the dashboard and in /metrics, and ingest back by itself when space returns."""
    from helpers.browser import CHROMIUM_ARGS
    from playwright.sync_api import expect, sync_playwright

    filler = small_fs / "filler"
    filler.write_bytes(os.urandom(8 << 20))
    batches = [b[:4] for b in _files(tmp_path / "in")]  # 16 x 512 KB
    srv = OpenPACSServer(tmp_path / "data", settings={"storage_url": f"file://{small_fs}",
                                                      "storage_min_free": "8MB"})
    srv.start()
    try:
        statuses = _store_concurrently(srv.dicom_port, batches)
        every = [f for b in batches for f in b]
        ok = [f for f in every if statuses[str(f)].startswith("Success")]
        refused = [f for f in every if f not in ok]
        assert ok and refused and len(statuses) == len(every), statuses
        assert all("OutOfResources" in statuses[str(f)] or "A700" in statuses[str(f)].upper() for f in refused)
        assert "storage almost full" in srv.log_text() and "No space left" not in srv.log_text()
        assert [p for p in (small_fs / ".tmp").iterdir() if p.is_file()] == []
        assert len(_blob_files(small_fs)) == len(ok)
        stats = requests.get(f"http://127.0.0.1:{srv.http_port}/api/stats", timeout=30).json()
        assert "storage_min_free is 8000000" in (stats["storage_refusing"] or ""), stats
        assert _metric(srv, "openpacs_storage_refusing") == 1
        assert _metric(srv, "openpacs_storage_min_free_bytes") == 8_000_000
        assert _metric(srv, "openpacs_storage_refusals_total") >= len(refused)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(f"http://127.0.0.1:{srv.http_port}/ui/#/dashboard")
            expect(page.get_by_text("New data refused", exact=False)).to_be_visible(timeout=30000)
            page.screenshot(path=str(artifacts / "dashboard-storage-refusing.png"), full_page=True)
            browser.close()

        filler.unlink()  # space returns: no restart, no setting changed
        time.sleep(1.2)  # the guard reads the free space at most once a second
        statuses = _store_concurrently(srv.dicom_port, [refused[i::ASSOCIATIONS] for i in range(ASSOCIATIONS)])
        assert all(statuses[str(f)].startswith("Success") for f in refused), statuses
        for f in every:
            got = _wado(srv, f)
            assert got is not None and split_meta(got)[1] == split_meta(f.read_bytes())[1], f
        deadline = time.monotonic() + 30
        while _metric(srv, "openpacs_storage_refusing") != 0:  # figures cached a few seconds
            assert time.monotonic() < deadline
            time.sleep(0.5)
    finally:
        stop_cleanly(srv)
