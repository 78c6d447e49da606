"""Nuclear medicine: a PET/CT study (PET with SUV attributes) in OHIF's TMTV mode, through a real `openpacs serve`,
stored with DCMTK storescu and read back byte-exact with getscu and dicomweb-client, then looked at in headless
Chromium. The checks are on pixels:

- the PET viewport is displayed in SUV: its body background (SUV ~1.5) is mid-grey in the default SUV window (W 5, L 3,
  inverted), where unscaled activity (5,000 Bq/ml) would saturate it: OHIF found the SUV attributes in our metadata;
- after scrolling to the hot sphere's slice the PET viewport is dark exactly where the sphere is, and not before;
- the fusion viewport is CT with a PET colour map: coloured pixels, hot (red) at the sphere, cool elsewhere;
- the MIP shows the sphere at its left-right position.
"""

from __future__ import annotations

import io
import math
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from helpers import dcmtk, petct
from helpers.browser import ARTIFACTS, ohif_browser
from helpers.browser import ohif_dir as browser_ohif_dir
from helpers.server import OpenPACSServer

RENDER_TIMEOUT = 120.0
FOV = petct.PT_SIZE * petct.PT_SPACING  # both volumes span the same 384 mm


@pytest.fixture(scope="module")
def ohif_dir() -> Path:
    return browser_ohif_dir()


@pytest.fixture(scope="module")
def petct_server(require_dcmtk, ohif_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("petct")
    ct, pt, study = petct.write_study(base / "files")
    srv = OpenPACSServer(base / "data").start()
    result = dcmtk.store(srv.dicom_port, [*ct, *pt])
    statuses = dcmtk.parse_store_log(result.output)
    assert result.returncode == 0 and len(statuses) == len(ct) + len(pt), result.output[-2000:]
    assert all(s.startswith("Success") for s in statuses.values())
    yield srv, ct, pt, study
    srv.stop()


def test_pet_ct_round_trip_byte_exact(petct_server, tmp_path) -> None:
    srv, ct, pt, study = petct_server
    got = dcmtk.get(srv.dicom_port, "study", "STUDY", {"StudyInstanceUID": study}, tmp_path / "get")
    assert got.result.returncode == 0, got.result.output[-2000:]
    sent = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p) for p in [*ct, *pt]}
    assert len(got.files) == len(sent)
    for f in got.files:
        back = pydicom.dcmread(f)
        orig = sent[back.SOPInstanceUID]
        assert back.PixelData == orig.PixelData and back.Units == orig.Units if "Units" in orig else True
        assert back == orig  # every element of the data set
    client = DICOMwebClient(f"http://127.0.0.1:{srv.http_port}/dicom-web")
    first_pet = pydicom.dcmread(pt[petct.HOT_SLICE])
    ds = client.retrieve_instance(study, first_pet.SeriesInstanceUID, first_pet.SOPInstanceUID)
    assert ds == first_pet and ds.RadiopharmaceuticalInformationSequence[0].RadionuclideTotalDose == petct.DOSE_BQ


def _expected_suv_background() -> float:
    # decay-corrected to the series start (DecayCorrection START), 1 h after injection
    decay = 2 ** (-3600.0 / petct.HALF_LIFE_S)
    return 5000.0 * petct.WEIGHT_KG * 1000.0 / (petct.DOSE_BQ * decay)


def _shot(canvas) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(canvas.screenshot())).convert("RGB"), dtype=np.float64)


def _at(img: np.ndarray, x_mm: float, y_mm: float, r: int = 3) -> np.ndarray:
    """Mean RGB around a patient position in an axial viewport that fits the 384 mm field of view."""
    h, w, _ = img.shape
    scale = min(w, h) / FOV
    cx, cy = w / 2 + x_mm * scale, h / 2 + y_mm * scale
    return img[int(cy) - r:int(cy) + r + 1, int(cx) - r:int(cx) + r + 1].reshape(-1, 3).mean(axis=0)


def test_tmtv_mode_shows_suv_fusion_and_mip(petct_server) -> None:
    srv, _ct, _pt, study = petct_server
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    log: list[str] = []
    with ohif_browser(viewport={"width": 1400, "height": 900}) as page:
        page.on("console", lambda m: log.append(f"{m.type}: {m.text[:300]}"))
        page.goto(f"http://127.0.0.1:{srv.http_port}/ohif/tmtv?StudyInstanceUIDs={study}")
        canvases = page.locator("canvas.cornerstone-canvas")
        # TMTV's layout: CT, PET and fusion rows (axial, coronal, sagittal) and a PET MIP: 10 viewports
        deadline = time.monotonic() + RENDER_TIMEOUT
        suv_bg = _expected_suv_background()
        pet_bg = None
        while time.monotonic() < deadline:
            if canvases.count() >= 10:
                pet = _shot(canvases.nth(3))
                pet_bg = _at(pet, 60.0, 60.0)
                if pet_bg.std() < 3 and 60 < pet_bg.mean() < 235:
                    break
            time.sleep(1.0)
        page.screenshot(path=str(ARTIFACTS / "tmtv-first-slice.png"))
        assert canvases.count() >= 10, f"TMTV layout not shown: {canvases.count()} viewports\n" + "\n".join(log[-40:])
        # unscaled (Bq/ml, ~5000) the whole body would saturate the SUV window; in SUV (~1.5) it is mid-grey
        assert pet_bg is not None and 60 < pet_bg.mean() < 235, (
            f"PET background {pet_bg} is not inside the SUV window (SUV {suv_bg:.2f} expected)\n"
            + "\n".join(log[-40:]))
        background = pet_bg.mean()
        # first slice (z = 0): no sphere there
        assert abs(_at(pet, *petct.HOT_CENTRE).mean() - background) < 10

        # scroll the CT axial viewport to the sphere's slice: TMTV keeps CT, PET and fusion on the same slice
        box = canvases.nth(0).bounding_box()
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        for _ in range(petct.HOT_SLICE):
            page.mouse.wheel(0, 100)
            time.sleep(0.25)
        hot = None
        deadline = time.monotonic() + RENDER_TIMEOUT / 2
        while time.monotonic() < deadline:
            pet = _shot(canvases.nth(3))
            hot = _at(pet, *petct.HOT_CENTRE)
            if hot.mean() < 60:
                break
            time.sleep(0.5)
        page.screenshot(path=str(ARTIFACTS / "tmtv-hot-slice.png"))
        assert hot is not None and hot.mean() < 60, f"the hot sphere is not dark in the PET viewport: {hot}"
        # mirrored about the centre, the same place is background: the sphere is where it belongs, not anywhere
        assert abs(_at(pet, -petct.HOT_CENTRE[0], -petct.HOT_CENTRE[1]).mean() - background) < 10

        fusion = _shot(canvases.nth(6))
        f_hot, f_body = _at(fusion, *petct.HOT_CENTRE), _at(fusion, 60.0, 60.0)
        assert np.ptp(f_body) > 20 and np.ptp(f_hot) > 20, f"fusion is not coloured: {f_hot} {f_body}"
        assert f_hot[0] > f_hot[2] and f_body[2] > f_body[0], f"fusion colours: sphere {f_hot}, body {f_body}"

        mip = _shot(canvases.nth(9))
        dark_cols = np.where((mip.mean(axis=2) < 60).sum(axis=0) >= 3)[0]
        assert dark_cols.size, "the MIP shows no hot sphere"
        # the body (grey, SUV ~1.5) spans x = -170..170 mm: place the sphere relative to it, whatever the zoom
        body_cols = np.where((mip.mean(axis=2) < 235).sum(axis=0) >= 3)[0]
        left, right = body_cols.min(), body_cols.max()
        sphere_x = -170.0 + (dark_cols.mean() - left) / (right - left) * 340.0
        assert math.isclose(sphere_x, petct.HOT_CENTRE[0], abs_tol=25.0), (sphere_x, left, right)
