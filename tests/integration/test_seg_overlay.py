"""A DICOM SEG (highdicom-built, binary, one green "Lesion" segment on slices 7-18) over its CT in OHIF, through a real
`openpacs serve`: stored with DCMTK storescu, read back byte-exact with getscu and dicomweb-client, then in headless
Chromium the viewer loads the segmentation and the check is on pixels: green exactly where the segment lies on a
slice it covers, the plain CT at the same place on a slice it does not cover, and nowhere else."""

from __future__ import annotations

import io
import re
import time

import numpy as np
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from helpers import dcmtk, petct
from helpers.browser import ARTIFACTS, ohif_browser, ohif_dir
from helpers.server import OpenPACSServer
from PIL import Image

TIMEOUT = 120.0


@pytest.fixture(scope="module")
def seg_server(require_dcmtk, tmp_path_factory):
    ohif_dir()
    base = tmp_path_factory.mktemp("seg")
    ct, seg, study = petct.write_ct_with_seg(base / "files")
    srv = OpenPACSServer(base / "data").start()
    result = dcmtk.store(srv.dicom_port, [*ct, seg], "-R")  # -R: propose what the files need (SEG is not a default)
    statuses = dcmtk.parse_store_log(result.output)
    assert result.returncode == 0 and len(statuses) == len(ct) + 1, result.output[-2000:]
    assert all(s.startswith("Success") for s in statuses.values())
    yield srv, ct, seg, study
    srv.stop()


def test_seg_round_trip_byte_exact(seg_server, tmp_path) -> None:
    srv, _ct, seg, study = seg_server
    sent = pydicom.dcmread(seg)
    got = dcmtk.get(srv.dicom_port, "study", "SERIES", {"StudyInstanceUID": study,
                                                        "SeriesInstanceUID": sent.SeriesInstanceUID}, tmp_path / "g")
    assert got.result.returncode == 0 and len(got.files) == 1, got.result.output[-2000:]
    back = pydicom.dcmread(got.files[0])
    assert back == sent and back.PixelData == sent.PixelData
    ds = DICOMwebClient(f"http://127.0.0.1:{srv.http_port}/dicom-web").retrieve_instance(
        study, sent.SeriesInstanceUID, sent.SOPInstanceUID)
    assert ds == sent and ds.SegmentSequence[0].SegmentLabel == "Lesion"


def _green(rgb: np.ndarray) -> bool:
    return bool(rgb[1] > rgb[0] + 40 and rgb[1] > rgb[2] + 40)


def _at(img: np.ndarray, x_mm: float, y_mm: float, r: int = 4) -> np.ndarray:
    h, w, _ = img.shape
    scale = min(w, h) / (petct.CT_SIZE * petct.CT_SPACING)
    cx, cy = w / 2 + x_mm * scale, h / 2 + y_mm * scale
    return img[int(cy) - r:int(cy) + r + 1, int(cx) - r:int(cx) + r + 1].reshape(-1, 3).mean(axis=0)


def test_viewer_draws_the_segment_on_its_slices(seg_server) -> None:
    srv, _ct, _seg, study = seg_server
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    log: list[str] = []
    with ohif_browser(viewport={"width": 1400, "height": 900}) as page:
        page.on("console", lambda m: log.append(f"{m.type}: {m.text[:300]}"))
        page.goto(f"http://127.0.0.1:{srv.http_port}/ohif/viewer?StudyInstanceUIDs={study}")
        canvas = page.locator("canvas.cornerstone-canvas:visible").first
        canvas.wait_for(state="visible", timeout=TIMEOUT * 1000)
        deadline = time.monotonic() + TIMEOUT
        # the user double-clicks the SEG in the study browser; OHIF asks "Do you want to open this Segmentation?"
        thumb = page.get_by_text("Lesion segmentation", exact=False)
        yes = page.get_by_role("button", name="Yes")
        while time.monotonic() < deadline and not yes.count():
            if thumb.count():
                thumb.first.dblclick()
                time.sleep(1.0)
            time.sleep(0.5)
        assert yes.count(), "OHIF did not offer the segmentation\n" + "\n".join(log[-40:])
        yes.first.click()

        overlay = page.locator('[data-cy="viewport-overlay-bottom-right"]').first

        def instance_shown() -> int | None:
            m = re.search(r"I:\s*(\d+)", overlay.inner_text())
            return int(m.group(1)) if m else None

        def go_to(instance: int) -> np.ndarray:
            canvas.wait_for(state="visible", timeout=TIMEOUT * 1000)  # loading the SEG re-creates the viewport
            box = canvas.bounding_box()
            assert box is not None
            page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
            for _ in range(3 * petct.SLICES):
                shown = instance_shown()
                if shown == instance:
                    break
                # the stack runs from the highest z (instance 24) down; wheel down = next in the stack
                page.mouse.wheel(0, 100 if shown is None or shown > instance else -100)
                time.sleep(0.25)
            assert instance_shown() == instance, f"could not reach instance {instance}: {overlay.inner_text()}"
            time.sleep(1.5)  # the labelmap of the new slice
            return np.asarray(Image.open(io.BytesIO(canvas.screenshot())).convert("RGB"), dtype=np.float64)

        inside = petct.SEG_SLICES[len(petct.SEG_SLICES) // 2]  # index; InstanceNumber = index + 1
        deadline = time.monotonic() + TIMEOUT
        while True:
            img = go_to(inside + 1)
            if _green(_at(img, *petct.SEG_CENTRE)) or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        page.screenshot(path=str(ARTIFACTS / "seg-overlay.png"))
        assert _green(_at(img, *petct.SEG_CENTRE)), (
            f"no segment colour at the lesion: {_at(img, *petct.SEG_CENTRE)}\n" + "\n".join(log[-40:]))
        mirror = _at(img, -petct.SEG_CENTRE[0], -petct.SEG_CENTRE[1])
        assert not _green(mirror) and np.ptp(mirror) < 8, f"segment colour where there is no segment: {mirror}"

        outside = max(petct.SEG_SLICES) + 3
        img = go_to(outside + 1)
        page.screenshot(path=str(ARTIFACTS / "seg-overlay-outside.png"))
        here = _at(img, *petct.SEG_CENTRE)
        assert not _green(here) and np.ptp(here) < 8, f"slice {outside + 1} has no segment, yet: {here}"
