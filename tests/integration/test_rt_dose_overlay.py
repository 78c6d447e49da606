"""Radiation therapy: an RT Dose grid over its CT, through a real `openpacs serve`. Stored with DCMTK storescu, read
back byte-exact with getscu and dicomweb-client, drawn by the API as a colour wash with isodose lines over the CT slice,
and shown in the console's study view in headless Chromium. Checks are on pixels: hot colours where the dose cloud is
(patient position → pixel), the plain CT grey where there is no dose."""

from __future__ import annotations

import io
import re
import time

import numpy as np
import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from helpers import dcmtk, petct
from helpers.browser import ARTIFACTS, ohif_browser, ohif_dir
from helpers.server import OpenPACSServer
from PIL import Image
from pydicom.data import get_testdata_file


@pytest.fixture(scope="module")
def rt_server(require_dcmtk, tmp_path_factory):
    base = tmp_path_factory.mktemp("rtdose")
    ct, dose, study = petct.write_ct_with_dose(base / "files")
    other_ct, _pt, other_study = petct.write_study(base / "other")  # another frame of reference
    plan = base / "files" / "rtplan.dcm"  # pydicom's RT Plan, put into this study
    ds = pydicom.dcmread(get_testdata_file("rtplan.dcm"))
    ds.StudyInstanceUID, ds.PatientID = study, pydicom.dcmread(ct[0]).PatientID
    ds.save_as(plan, enforce_file_format=True)
    ohif_dir()  # the OHIF build (installed once per machine) for the viewer test; the server finds it
    srv = OpenPACSServer(base / "data").start()
    result = dcmtk.store(srv.dicom_port, [*ct, dose, other_ct[0], plan], "-R")
    statuses = dcmtk.parse_store_log(result.output)
    assert result.returncode == 0 and len(statuses) == len(ct) + 3, result.output[-2000:]
    assert all(s.startswith("Success") for s in statuses.values())
    srv.plan = plan  # type: ignore[attr-defined]
    yield srv, ct, dose, study, pydicom.dcmread(other_ct[0]).SOPInstanceUID
    srv.stop()


def _pixel(x_mm: float, y_mm: float) -> tuple[int, int]:
    """(row, col) of a patient position in the CT matrix (axial, origin at the first pixel)."""
    origin = -(petct.CT_SIZE - 1) * petct.CT_SPACING / 2
    return round((y_mm - origin) / petct.CT_SPACING), round((x_mm - origin) / petct.CT_SPACING)


def test_rt_dose_round_trip_byte_exact(rt_server, tmp_path) -> None:
    srv, _ct, dose, study, _ = rt_server
    sent = pydicom.dcmread(dose)
    got = dcmtk.get(srv.dicom_port, "study", "IMAGE", {"StudyInstanceUID": study, "SeriesInstanceUID":
                    sent.SeriesInstanceUID, "SOPInstanceUID": sent.SOPInstanceUID}, tmp_path / "get")
    assert got.result.returncode == 0 and len(got.files) == 1, got.result.output[-2000:]
    back = pydicom.dcmread(got.files[0])
    assert back == sent and back.PixelData == sent.PixelData
    ds = DICOMwebClient(f"http://127.0.0.1:{srv.http_port}/dicom-web").retrieve_instance(
        study, sent.SeriesInstanceUID, sent.SOPInstanceUID)
    assert ds == sent and list(ds.GridFrameOffsetVector) == list(sent.GridFrameOffsetVector)
    # the RT Plan too (no pixels: every element, beams and fraction groups included)
    plan = pydicom.dcmread(srv.plan)
    got = dcmtk.get(srv.dicom_port, "study", "IMAGE", {"StudyInstanceUID": study, "SeriesInstanceUID":
                    plan.SeriesInstanceUID, "SOPInstanceUID": plan.SOPInstanceUID}, tmp_path / "plan")
    assert got.result.returncode == 0 and len(got.files) == 1, got.result.output[-2000:]
    assert pydicom.dcmread(got.files[0]) == plan
    back = DICOMwebClient(f"http://127.0.0.1:{srv.http_port}/dicom-web").retrieve_instance(
        study, plan.SeriesInstanceUID, plan.SOPInstanceUID)
    assert back == plan and back.BeamSequence[0].BeamName == "Field 1"


def test_overlay_api_draws_the_dose_where_it_is(rt_server) -> None:
    srv, ct, dose, study, other_uid = rt_server
    base = f"http://127.0.0.1:{srv.http_port}/api/studies/{study}/rt-dose"
    dose_uid = pydicom.dcmread(dose).SOPInstanceUID
    r = requests.get(f"{base}/{dose_uid}/images", timeout=60)
    assert r.status_code == 200, r.text
    items = r.json()["items"]
    ct_uids = [pydicom.dcmread(p).SOPInstanceUID for p in ct]
    assert [i["uid"] for i in items] == ct_uids  # the CT, by position (written in ascending z), not the other study
    assert [i["position"] for i in items] == [i * petct.SLICE_GAP for i in range(petct.SLICES)]

    r = requests.get(f"{base}/{dose_uid}/overlay", params={"image": ct_uids[5]}, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    img = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"), dtype=np.int32)
    assert img.shape == (petct.CT_SIZE, petct.CT_SIZE, 3)
    hot = img[_pixel(*petct.DOSE_CENTRE)]
    assert hot[0] > hot[1] + 40 and hot[0] > hot[2] + 40, f"no hot dose colour at the dose centre: {hot}"
    # 3.5 sigma away the dose is < 10 % of the maximum: the plain windowed CT (grey: R == G == B)
    far = img[_pixel(petct.DOSE_CENTRE[0] - 3.5 * petct.DOSE_SIGMA, petct.DOSE_CENTRE[1] - 3.5 * petct.DOSE_SIGMA)]
    assert far[0] == far[1] == far[2], far
    # an isodose line of 50 % crosses the line from the centre outwards where exp(-d²/2σ²) = 0.5
    d50 = petct.DOSE_SIGMA * np.sqrt(2 * np.log(2))
    row, col = _pixel(*petct.DOSE_CENTRE)
    line = img[row, col:]
    yellow = [i for i, p in enumerate(line) if p[0] > 200 and p[1] > 200 and p[2] < 80]
    assert yellow and abs(yellow[0] * petct.CT_SPACING - d50) <= 2 * petct.CT_SPACING, (yellow, d50)

    # wrong inputs: clean 4xx
    assert requests.get(f"{base}/{dose_uid}/overlay", params={"image": other_uid}, timeout=30).status_code == 404
    assert requests.get(f"{base}/{ct_uids[0]}/overlay", params={"image": ct_uids[1]}, timeout=30).status_code == 404
    assert requests.get(f"{base}/{dose_uid}/overlay", timeout=30).status_code == 400
    assert requests.get(f"{base}/1.2.3/images", timeout=30).status_code == 404


def test_console_study_view_shows_dose_over_ct(rt_server) -> None:
    srv, ct, _dose, study, _ = rt_server
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with ohif_browser(viewport={"width": 1280, "height": 1400}) as page:
        page.goto(f"http://127.0.0.1:{srv.http_port}/ui/#/study/{study}")
        img = page.locator("img.rt-dose-overlay")
        img.wait_for(state="visible", timeout=60_000)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not page.evaluate(
                "() => { const i = document.querySelector('img.rt-dose-overlay'); return i && i.complete && "
                "i.naturalWidth > 0; }"):
            time.sleep(0.3)
        page.screenshot(path=str(ARTIFACTS / "console-rt-dose.png"), full_page=True)
        shot = np.asarray(Image.open(io.BytesIO(img.screenshot())).convert("RGB"), dtype=np.int32)
        h, w, _ = shot.shape
        row, col = _pixel(*petct.DOSE_CENTRE)
        hot = shot[int((row + 0.5) * h / petct.CT_SIZE), int((col + 0.5) * w / petct.CT_SIZE)]
        assert hot[0] > hot[1] + 40 and hot[0] > hot[2] + 40, f"the console does not show the dose cloud: {hot}"
        # the mirror position (about the centre) is plain CT: the wash is where the dose is, not everywhere
        mrow, mcol = petct.CT_SIZE - 1 - row, petct.CT_SIZE - 1 - col
        cold = shot[int((mrow + 0.5) * h / petct.CT_SIZE), int((mcol + 0.5) * w / petct.CT_SIZE)]
        assert abs(cold[0] - cold[2]) < 8, cold
        assert "null" not in page.locator("main").inner_text().split()  # no stray empty section
        label = page.locator(".rt-dose .muted").inner_text()
        assert f"({petct.SLICES // 2}/{petct.SLICES})" in label or f"/{petct.SLICES})" in label


def _image_pixel(shot: np.ndarray, x_mm: float, y_mm: float) -> np.ndarray:
    """The colour a viewport canvas screenshot shows at a patient position of the CT's plane (OHIF fits the square
    image into the canvas, centred)."""
    h, w, _ = shot.shape
    side = min(h, w)
    row, col = _pixel(x_mm, y_mm)
    return shot[int((h - side) / 2 + (row + 0.5) * side / petct.CT_SIZE),
                int((w - side) / 2 + (col + 0.5) * side / petct.CT_SIZE)]


def test_ohif_shows_the_dose_as_a_foreground_over_its_ct(rt_server) -> None:
    """OHIF's data overlay menu: the RT Dose added as a foreground of the CT viewport (the fusion a planner looks at).
    The grid's frames stand where its Grid Frame Offset Vector puts them (OHIF's own code does not do this as built, and
    the viewport crashed: web/viewer.py fixes it at install), the viewport becomes one fusion of both volumes without an
    error, and its pixels show OHIF's isodose colour map over the CT: the high-dose colour at the dose cloud's patient
    position, the low-dose colour 3.5 sigma away, the plain grey CT before the dose was added."""

    srv, _ct, dose, study, _ = rt_server
    dose_ds = pydicom.dcmread(dose)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    errors: list[str] = []
    with ohif_browser(viewport={"width": 1280, "height": 900}) as page:
        page.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
        # the crash this test guards against ("Invalid typed array length: Infinity") and any other uncaught
        # error; other console errors (e.g. a request cancelled by the viewer) are not failures
        page.on("console", lambda m: errors.append(f"console: {m.text[:300]}")
                if m.type == "error" and ("RangeError" in m.text or "TypeError" in m.text) else None)
        page.goto(f"http://127.0.0.1:{srv.http_port}/ohif/viewer?StudyInstanceUIDs={study}")
        canvas = page.locator("canvas.cornerstone-canvas").first
        canvas.wait_for(state="visible", timeout=90_000)
        pane = page.locator('[data-cy="viewport-pane"]').first

        def shot() -> np.ndarray:
            return np.asarray(Image.open(io.BytesIO(canvas.screenshot())).convert("RGB"), dtype=np.int32)

        deadline = time.monotonic() + 90
        while (before := shot()).std() < 10 and time.monotonic() < deadline:  # the CT drawn
            time.sleep(0.5)
        # the user opens the viewport's data overlay menu (its second icon, top left) and picks the dose
        box = pane.bounding_box()
        assert box is not None
        page.mouse.click(box["x"] + 40, box["y"] + 15)
        page.get_by_text("Foreground", exact=False).first.click()
        page.get_by_text("SELECT A FOREGROUND", exact=False).first.click()
        page.get_by_role("option", name=re.compile(dose_ds.SeriesDescription, re.I)).first.click()
        page.keyboard.press("Escape")
        page.mouse.click(box["x"] + box["width"] - 60, box["y"] + box["height"] - 60)  # the menu closed

        def fusion() -> dict:
            return page.evaluate("""(uid) => {
              const cs = window.cornerstone;
              const vp = cs.getRenderingEngines()[0].getViewports()[0];
              const actors = vp.getActors().map(a => a.referencedId);
              const dose = cs.cache.getVolumes().find(v => actors.includes(v.volumeId)
                  && v.imageIds[0].includes(uid));
              return {type: vp.type, actors: actors.length, dose: dose && {dims: dose.dimensions,
                  spacing: dose.spacing, origin: dose.origin, id: dose.volumeId,
                  ipp: [1, 2, dose.imageIds.length].map(f => cs.metaData.get('imagePlaneModule',
                      dose.imageIds[f - 1]).imagePositionPatient)}};
            }""", dose_ds.SOPInstanceUID)

        deadline = time.monotonic() + 90
        while (state := fusion())["dose"] is None and time.monotonic() < deadline and not errors:
            time.sleep(0.5)
        deadline = time.monotonic() + 60
        while True:  # the dose volume streams in
            fused = shot()
            hot = _image_pixel(fused, *petct.DOSE_CENTRE)
            if hot[0] > hot[1] + 30 and hot[0] > hot[2] + 30 or time.monotonic() > deadline or errors:
                break
            time.sleep(0.5)
        page.screenshot(path=str(ARTIFACTS / "ohif-rt-dose-fused.png"))
    assert not errors, errors
    assert state["type"] == "orthographic" and state["actors"] == 2, state  # CT + dose, one fused viewport
    geo = state["dose"]
    assert geo is not None, state
    origin = [float(v) for v in dose_ds.ImagePositionPatient]
    assert geo["dims"] == [petct.DOSE_SIZE, petct.DOSE_SIZE, petct.SLICES], geo
    assert geo["spacing"] == [petct.DOSE_SPACING, petct.DOSE_SPACING, petct.SLICE_GAP], geo
    offsets = [float(v) for v in dose_ds.GridFrameOffsetVector]
    assert geo["ipp"] == [[origin[0], origin[1], origin[2] + offsets[i]] for i in (0, 1, -1)], geo
    # the CT alone is grey; fused, the isodose colour map (green at low doses, red at high doses) over it
    h, w, _ = before.shape
    centre = before[h // 2 - 20: h // 2 + 20, w // 2 - 20: w // 2 + 20]
    assert np.abs(centre[..., 0] - centre[..., 1]).max() < 8, "the CT is not grey before the fusion"
    assert hot[0] > hot[1] + 30 and hot[0] > hot[2] + 30, f"no high-dose colour at the dose centre: {hot}"
    far = _image_pixel(fused, petct.DOSE_CENTRE[0] - 3.5 * petct.DOSE_SIGMA, petct.DOSE_CENTRE[1] - 3.5 * petct.DOSE_SIGMA)
    assert far[1] > far[0] + 30 and far[1] > far[2] + 30, f"3.5 sigma from the dose centre, not the low-dose colour: {far}"
    mirror = _image_pixel(fused, -petct.DOSE_CENTRE[0], -petct.DOSE_CENTRE[1])  # the wash is where the dose is
    assert mirror[1] > mirror[0] + 30, f"the high-dose colour is not only at the dose cloud: {mirror}"
