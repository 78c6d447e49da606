"""Pathology: a VL Whole Slide Microscopy pyramid (tests/helpers/wsi.py: 4 TILED_FULL levels, each its own colour,
plus a TILED_SPARSE instance) through a real `openpacs serve`. Stored with DCMTK storescu, retrieved byte-exact tile by
tile with dicomweb-client (WADO-RS frames) and whole with getscu, then opened in OHIF's microscopy mode in headless
Chromium. The checks are on pixels: the viewport shows tiles of one pyramid level (its colour), a zoom brings in the
tiles of a finer level, and no blank tiles are left in the viewport."""

from __future__ import annotations

import io
import time

import numpy as np
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from helpers import dcmtk, wsi
from helpers.browser import ARTIFACTS, ohif_browser, ohif_dir
from helpers.server import OpenPACSServer
from PIL import Image

TIMEOUT = 120.0


@pytest.fixture(scope="module")
def slide_server(require_dcmtk, tmp_path_factory):
    ohif_dir()
    base = tmp_path_factory.mktemp("wsi")
    slide = wsi.Slide()
    files = slide.write(base / "files")
    srv = OpenPACSServer(base / "data").start()
    # -R: propose only what the files need (WSI is not in storescu's default list); -xy: offer JPEG baseline as is
    result = dcmtk.store(srv.dicom_port, files, "-R", "-xy")
    statuses = dcmtk.parse_store_log(result.output)
    assert result.returncode == 0 and len(statuses) == len(files), result.output[-2000:]
    assert all(s.startswith("Success") for s in statuses.values())
    yield srv, slide, files
    srv.stop()


def test_tiles_round_trip_byte_exact(slide_server, tmp_path) -> None:
    srv, slide, files = slide_server
    client = DICOMwebClient(f"http://127.0.0.1:{srv.http_port}/dicom-web")
    rng = np.random.default_rng(7)
    for level in slide.levels():
        n = level.n_tiles
        picks = sorted({int(i) for i in rng.integers(1, n + 1, size=min(n, 12))})
        frames = client.retrieve_instance_frames(slide.study_uid, slide.series_uid, slide.sop_uid(level.level),
                                                 frame_numbers=picks, media_types=(("image/jpeg", "1.2.840.10008.1.2.4.50"),))
        for number, data in zip(picks, frames, strict=True):
            col, row = (number - 1) % level.tiles_across, (number - 1) // level.tiles_across
            assert data.rstrip(b"\0") == slide.tile(level.level, col, row).rstrip(b"\0"), (level.level, number)
    got = dcmtk.get(srv.dicom_port, "study", "STUDY", {"StudyInstanceUID": slide.study_uid}, tmp_path / "get",
                    prefer="+xy")  # accept JPEG baseline: the tiles as stored
    assert got.result.returncode == 0, got.result.output[-2000:]
    sent = {pydicom.dcmread(f).SOPInstanceUID: pydicom.dcmread(f) for f in files}
    assert len(got.files) == len(sent)
    for f in got.files:
        back = pydicom.dcmread(f)
        assert back == sent[back.SOPInstanceUID] and back.PixelData == sent[back.SOPInstanceUID].PixelData


def test_microscopy_viewer_shows_levels_and_zooms(slide_server) -> None:
    srv, slide, _ = slide_server
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    log: list[str] = []
    with ohif_browser(viewport={"width": 1400, "height": 900}) as page:
        page.on("console", lambda m: log.append(f"{m.type}: {m.text[:300]}"))
        page.goto(f"http://127.0.0.1:{srv.http_port}/ohif/microscopy?StudyInstanceUIDs={slide.study_uid}")
        viewport = page.locator(".ol-viewport").first
        viewport.wait_for(state="visible", timeout=TIMEOUT * 1000)

        def centre() -> np.ndarray:
            img = np.asarray(Image.open(io.BytesIO(viewport.screenshot())).convert("RGB"), dtype=np.float64)
            h, w, _ = img.shape
            return img[h // 4: 3 * h // 4, w // 3: 2 * w // 3]  # clear of the overview map and scale bar

        deadline = time.monotonic() + TIMEOUT
        first: dict[int | None, float] = {}
        while time.monotonic() < deadline:
            first = wsi.levels_in(centre())
            if max((v for k, v in first.items() if k is not None), default=0) > 0.8:
                break
            time.sleep(1.0)
        page.screenshot(path=str(ARTIFACTS / "wsi-opened.png"))
        shown = max((k for k in first if k is not None), key=lambda k: first[k], default=None)
        assert shown is not None and first[shown] > 0.8, f"no level's tiles in the viewport: {first}\n" + \
            "\n".join(log[-30:])
        assert shown > 0, "the slide opened at full resolution: nothing to zoom into"

        box = viewport.bounding_box()
        assert box is not None
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        deadline = time.monotonic() + TIMEOUT
        after: dict[int | None, float] = {}
        for _ in range(12):  # zoom in until a finer level is drawn
            page.mouse.wheel(0, -300)
            time.sleep(1.0)
            after = wsi.levels_in(centre())
            if any(k is not None and k < shown and v > 0.8 for k, v in after.items()):
                break
        while time.monotonic() < deadline:  # the tiles of the new level arrive
            after = wsi.levels_in(centre())
            finer = [k for k, v in after.items() if k is not None and k < shown and v > 0.8]
            if finer and after.get(None, 0) < 0.05:
                break
            time.sleep(0.5)
        page.screenshot(path=str(ARTIFACTS / "wsi-zoomed.png"))
        finer = [k for k, v in after.items() if k is not None and k < shown and v > 0.8]
        assert finer, f"zooming in did not bring tiles of a finer level than {shown}: {after}"
        assert after.get(None, 0) < 0.05, f"blank tiles left in the viewport after zooming: {after}"

        # pan: the tiles of the same level fill the viewport again
        page.mouse.down()
        page.mouse.move(box["x"] + box["width"] / 2 - 250, box["y"] + box["height"] / 2 - 150, steps=10)
        page.mouse.up()
        deadline = time.monotonic() + TIMEOUT
        panned: dict[int | None, float] = {}
        while time.monotonic() < deadline:
            panned = wsi.levels_in(centre())
            if panned.get(finer[0], 0) > 0.8 and panned.get(None, 0) < 0.05:
                break
            time.sleep(0.5)
        page.screenshot(path=str(ARTIFACTS / "wsi-panned.png"))
        assert panned.get(finer[0], 0) > 0.8 and panned.get(None, 0) < 0.05, f"after panning: {panned}"
