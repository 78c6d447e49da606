"""Cardiology cine (and, further down, other multi-frame objects) in the OHIF viewer, end to end.

A real `openpacs serve`, the objects stored with DCMTK storescu, headless Chromium (Debian's, driven by Playwright)
opening /ohif/viewer?StudyInstanceUIDs=... Every viewer check is on rendered pixels of the viewport canvas:

- an ultrasound multi-frame cine (synthetic: a bright bar that moves one step per frame, FrameTime 250 ms = 4 fps)
  plays when the cine player's play button is pressed (OHIF opens the cine player by itself for US); the frame shown
  is identified from the pixels of timed screenshots, and the frames seen advance in order and never faster than the
  recorded rate allows (a loaded machine can only make playback slower, so the bound holds on any machine; OHIF's
  default of 24 fps, used when the frame rate is not read from the metadata, breaks it);
- pydicom-data's 120-frame JPEG baseline echo (color3d_jpeg_baseline.dcm, FrameTime 33.333 ms) plays as well, its
  frames fetched one by one with WADO-RS .../frames/N as stored (image/jpeg) and decoded in the browser;
- both come back byte-exact through DCMTK getscu and dicomweb-client.

Screenshots land in test-artifacts/ (or $OPENPACS_TEST_ARTIFACTS).
"""

from __future__ import annotations

import io
import json
import os
import time
import urllib.request
from pathlib import Path

import numpy as np
import pydicom
import pytest
from helpers import dcmtk
from helpers.browser import CHROMIUM_ARGS, ohif_page
from helpers.dicomdata import dataset_bytes, write_part10
from helpers.dicomdata import testdata_file as _testdata_file
from helpers.server import OpenPACSServer, stop_cleanly
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.uid import JPEGBaseline8Bit, generate_uid

RENDER_TIMEOUT = 120.0
US_MULTIFRAME = "1.2.840.10008.5.1.4.1.1.3.1"

# the synthetic cine: FRAMES frames, a vertical bar BAR_W wide at column X0 + STEP * k in frame k
FRAMES, ROWS, COLS = 30, 120, 160
X0, STEP, BAR_W = 10, 4, 6
FRAME_TIME_MS = 250.0  # 4 frames per second


def _us_cine_pixels() -> np.ndarray:
    yy = np.mgrid[0:ROWS, 0:COLS][0]
    frames = np.empty((FRAMES, ROWS, COLS), np.uint8)
    for k in range(FRAMES):
        img = (20 + yy // 4).astype(np.uint8)  # a faint vertical ramp, the same in every frame
        img[:, X0 + STEP * k : X0 + STEP * k + BAR_W] = 235
        frames[k] = img
    return frames


def _us_cine(directory: Path) -> Path:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = US_MULTIFRAME
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "CINE^SYNTHETIC"
    ds.PatientID = "CINESYNTH"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyDate = "20250301"
    ds.StudyTime = "090000"
    ds.AccessionNumber = "CINE1"
    ds.StudyID = "1"
    ds.StudyDescription = "Synthetic echo cine"
    ds.Modality = "US"
    ds.SeriesNumber = 1
    ds.SeriesDescription = "Moving bar cine"
    ds.InstanceNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = ROWS, COLS
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.NumberOfFrames = FRAMES
    ds.FrameIncrementPointer = pydicom.tag.Tag(0x0018, 0x1063)  # FrameTime
    ds.FrameTime = FRAME_TIME_MS
    ds.CineRate = round(1000 / FRAME_TIME_MS)
    ds.RecommendedDisplayFrameRate = round(1000 / FRAME_TIME_MS)
    ds.ActualFrameDuration = int(FRAME_TIME_MS)
    ds.PixelData = _us_cine_pixels().tobytes()
    return write_part10(ds, directory / "us_cine.dcm")


def _echo_jpeg(directory: Path) -> Path:
    """pydicom-data's 120-frame JPEG baseline echo, in a study of its own (new UIDs, same pixel bytes)."""
    ds = pydicom.dcmread(_testdata_file("color3d_jpeg_baseline.dcm"))
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientID = ds.get("PatientID") or "ECHOJPEG"
    for elem in ds.iterall():  # DCMTK (storescu) sends an all-blank text value as empty: start with it empty
        if isinstance(elem.value, str) and elem.value and not elem.value.strip():
            elem.value = ""
    path = directory / "echo_jpeg.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


# the CT under the structure set: CT_SLICES slices of CT_SIZE^2 pixels at CT_SPACING mm, slice i at z = 2 i mm
CT_SLICES, CT_SIZE, CT_SPACING = 4, 256, 0.8
RT_SLICE = 2  # the one slice the contour lies on
# the contour: a square in patient coordinates (mm), columns 50..150 and rows 75..175 of slice RT_SLICE
RT_X, RT_Y = (40.0, 120.0), (60.0, 140.0)
RT_COLOR = [0, 255, 0]


def _ct_pixels(i: int) -> np.ndarray:
    size = CT_SIZE
    yy, xx = np.mgrid[0:size, 0:size]
    r = np.hypot(yy - size / 2, xx - size / 2)
    img = np.zeros((size, size), np.uint16)  # air: -1024 HU
    img[r < size * 0.42] = 1024 + 40 + (xx[r < size * 0.42] // 8)  # soft tissue with a gradient
    img[(r > size * 0.18 + 6 * i) & (r < size * 0.24 + 6 * i)] = 1024 + 700  # a 'bone' ring moving per slice
    return img


def _ct_series(directory: Path) -> list[Path]:
    study, series, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    paths = []
    for i in range(CT_SLICES):
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.FrameOfReferenceUID = frame_of_reference
        ds.PatientName = "RT^PHANTOM"
        ds.PatientID = "RTPHANTOM"
        ds.PatientBirthDate = "19600101"
        ds.PatientSex = "O"
        ds.StudyDate = "20250401"
        ds.StudyTime = "080000"
        ds.AccessionNumber = "RT1"
        ds.StudyID = "1"
        ds.StudyDescription = "RT planning phantom"
        ds.Modality = "CT"
        ds.SeriesNumber = 1
        ds.SeriesDescription = "Planning CT"
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [0.0, 0.0, 2.0 * i]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.SliceLocation = 2.0 * i
        ds.PixelSpacing = [CT_SPACING, CT_SPACING]
        ds.SliceThickness = 2.0
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ds.Columns = CT_SIZE
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.WindowCenter = 100
        ds.WindowWidth = 1000
        ds.PixelData = _ct_pixels(i).tobytes()
        paths.append(write_part10(ds, directory / f"ct{i}.dcm"))
    return paths


def _rtstruct(directory: Path, ct_paths: list[Path]) -> Path:
    """An RT Structure Set with one ROI: a closed planar square on slice RT_SLICE of the CT, drawn pure green."""
    cts = [pydicom.dcmread(p, stop_before_pixels=True) for p in ct_paths]
    ct = cts[RT_SLICE]
    z = float(ct.ImagePositionPatient[2])
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.481.3"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = ct.StudyInstanceUID
    ds.SeriesInstanceUID = generate_uid()
    for kw in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
               "AccessionNumber", "StudyID", "StudyDescription"):
        setattr(ds, kw, getattr(ct, kw))
    ds.Modality = "RTSTRUCT"
    ds.SeriesNumber = 2
    ds.SeriesDescription = "RT structures"
    ds.InstanceNumber = 1
    ds.StructureSetLabel = "PHANTOM"
    ds.StructureSetDate = "20250401"
    ds.StructureSetTime = "081000"
    images = []
    for c in cts:
        item = Dataset()
        item.ReferencedSOPClassUID = c.SOPClassUID
        item.ReferencedSOPInstanceUID = c.SOPInstanceUID
        images.append(item)
    ref_series = Dataset()
    ref_series.SeriesInstanceUID = ct.SeriesInstanceUID
    ref_series.ContourImageSequence = images
    ref_study = Dataset()
    ref_study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    ref_study.ReferencedSOPInstanceUID = ct.StudyInstanceUID
    ref_study.RTReferencedSeriesSequence = [ref_series]
    ref_for = Dataset()
    ref_for.FrameOfReferenceUID = ct.FrameOfReferenceUID
    ref_for.RTReferencedStudySequence = [ref_study]
    ds.ReferencedFrameOfReferenceSequence = [ref_for]
    roi = Dataset()
    roi.ROINumber = 1
    roi.ReferencedFrameOfReferenceUID = ct.FrameOfReferenceUID
    roi.ROIName = "GTV"
    roi.ROIGenerationAlgorithm = "MANUAL"
    ds.StructureSetROISequence = [roi]
    contour = Dataset()
    image = Dataset()
    image.ReferencedSOPClassUID = ct.SOPClassUID
    image.ReferencedSOPInstanceUID = ct.SOPInstanceUID
    contour.ContourImageSequence = [image]
    contour.ContourGeometricType = "CLOSED_PLANAR"
    (x0, x1), (y0, y1) = RT_X, RT_Y
    points = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    contour.NumberOfContourPoints = len(points)
    contour.ContourData = [v for x, y in points for v in (x, y, z)]
    roi_contour = Dataset()
    roi_contour.ReferencedROINumber = 1
    roi_contour.ROIDisplayColor = RT_COLOR
    roi_contour.ContourSequence = [contour]
    ds.ROIContourSequence = [roi_contour]
    observation = Dataset()
    observation.ObservationNumber = 1
    observation.ReferencedROINumber = 1
    observation.RTROIInterpretedType = "GTV"
    observation.ROIInterpreter = ""
    ds.RTROIObservationsSequence = [observation]
    return write_part10(ds, directory / "rtstruct.dcm")


# NM multi-frame: 2 energy windows x 2 detectors x 2 views = 8 frames, a bright disc at a different place in each
NM_FRAMES, NM_SIZE = 8, 64
# XA angiography run: 20 frames at 15 fps, a contrast "vessel" filling from the top, a little further each frame
XA_FRAMES, XA_SIZE, XA_FRAME_TIME_MS = 20, 128, 66.667


def _nm_pixels() -> np.ndarray:
    yy, xx = np.mgrid[0:NM_SIZE, 0:NM_SIZE]
    frames = np.empty((NM_FRAMES, NM_SIZE, NM_SIZE), np.uint16)
    for k in range(NM_FRAMES):
        cy, cx = 12 + 5 * k, 10 + 6 * k
        img = (40 + (xx // 8) * 4).astype(np.uint16)
        img[np.hypot(yy - cy, xx - cx) < 7] = 900
        frames[k] = img
    return frames


def _xa_pixels() -> np.ndarray:
    yy, xx = np.mgrid[0:XA_SIZE, 0:XA_SIZE]
    frames = np.empty((XA_FRAMES, XA_SIZE, XA_SIZE), np.uint8)
    for k in range(XA_FRAMES):
        img = (200 - yy // 4).astype(np.uint8)
        vessel = (np.abs(xx - (40 + yy // 3)) < 4) & (yy < 8 + 6 * k)  # contrast fills the vessel downwards
        img[vessel] = 20
        frames[k] = img
    return frames


def _patient(ds: Dataset, name: str, pid: str, description: str) -> None:
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName, ds.PatientID = name, pid
    ds.PatientBirthDate, ds.PatientSex = "19650101", "O"
    ds.StudyDate, ds.StudyTime = "20250501", "100000"
    ds.AccessionNumber, ds.StudyID, ds.StudyDescription = pid, "1", description
    ds.SeriesNumber = ds.InstanceNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"


def _nm_multiframe(directory: Path) -> Path:
    ds = Dataset()
    _patient(ds, "NM^MULTIFRAME", "NMMULTI", "Planar NM, two windows, two heads")
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.20"
    ds.Modality = "NM"
    ds.SeriesDescription = "Static planar"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "STATIC", "EMISSION"]
    ds.Rows = ds.Columns = NM_SIZE
    ds.PixelSpacing = [4.0, 4.0]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.NumberOfFrames = NM_FRAMES
    ds.FrameIncrementPointer = [pydicom.tag.Tag(0x0054, 0x0010), pydicom.tag.Tag(0x0054, 0x0020),
                                pydicom.tag.Tag(0x0054, 0x0050)]
    ds.EnergyWindowVector = [1, 1, 1, 1, 2, 2, 2, 2]
    ds.DetectorVector = [1, 1, 2, 2, 1, 1, 2, 2]
    ds.RotationVector = [1, 2, 1, 2, 1, 2, 1, 2]
    ds.NumberOfEnergyWindows = 2
    windows = []
    for lo, hi, name in ((126.0, 154.0, "PEAK"), (108.0, 126.0, "SCATTER")):
        w = Dataset()
        r = Dataset()
        r.EnergyWindowLowerLimit, r.EnergyWindowUpperLimit = lo, hi
        w.EnergyWindowRangeSequence = [r]
        w.EnergyWindowName = name
        windows.append(w)
    ds.EnergyWindowInformationSequence = windows
    ds.NumberOfDetectors = 2
    ds.DetectorInformationSequence = [Dataset(), Dataset()]
    ds.NumberOfRotations = 2
    ds.RotationInformationSequence = [Dataset(), Dataset()]
    ds.WindowCenter, ds.WindowWidth = 450, 900
    ds.PixelData = _nm_pixels().tobytes()
    return write_part10(ds, directory / "nm_multiframe.dcm")


def _xa_run(directory: Path) -> Path:
    ds = Dataset()
    _patient(ds, "XA^RUN", "XARUN", "Coronary angiography")
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.12.1"
    ds.Modality = "XA"
    ds.SeriesDescription = "LAO 30 run"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "SINGLE PLANE"]
    ds.Rows = ds.Columns = XA_SIZE
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.NumberOfFrames = XA_FRAMES
    ds.FrameIncrementPointer = pydicom.tag.Tag(0x0018, 0x1063)
    ds.FrameTime = XA_FRAME_TIME_MS
    ds.CineRate = 15
    ds.PositionerPrimaryAngle, ds.PositionerSecondaryAngle = 30.0, 0.0
    ds.PixelIntensityRelationship = "LIN"
    ds.PixelData = _xa_pixels().tobytes()
    return write_part10(ds, directory / "xa_run.dcm")


# ------------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def ohif_dir() -> Path:
    from helpers.browser import ohif_dir as install

    return install()


@pytest.fixture(scope="module")
def objects(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cine-files")
    ct = _ct_series(d)
    objs = {"us_cine": _us_cine(d), "echo_jpeg": _echo_jpeg(d)}
    objs.update({f"ct{i}": p for i, p in enumerate(ct)})
    objs["rtstruct"] = _rtstruct(d, ct)
    objs["nm_multiframe"] = _nm_multiframe(d)
    objs["xa_run"] = _xa_run(d)
    return objs


@pytest.fixture(scope="module")
def cine_server(require_dcmtk, ohif_dir, objects, tmp_path_factory):
    base = tmp_path_factory.mktemp("cine-server")
    old_env = os.environ.get("OPENPACS_OHIF_DIR")
    os.environ["OPENPACS_OHIF_DIR"] = str(ohif_dir)  # the server subprocess inherits it
    srv = OpenPACSServer(base / "data")
    try:
        srv.start()
    finally:
        if old_env is None:
            os.environ.pop("OPENPACS_OHIF_DIR", None)
        else:
            os.environ["OPENPACS_OHIF_DIR"] = old_env
    try:
        for _name, path in objects.items():
            ts = str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
            result = dcmtk.store(srv.dicom_port, [path], dcmtk.STORESCU_PROPOSE[ts])
            status = dcmtk.parse_store_log(result.output).get(str(path), "")
            assert result.returncode == 0 and status.startswith("Success"), f"storescu: {result.output[-3000:]}"
        yield srv
    finally:
        stop_cleanly(srv)


@pytest.fixture(scope="module")
def browser(chromium_path):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        from helpers.browser import missing

        missing("the playwright Python package is not installed")
        raise
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    p = ohif_page(browser, viewport={"width": 1280, "height": 900})
    context = p.context
    p.log = []  # type: ignore[attr-defined]
    p.frame_urls = []  # type: ignore[attr-defined]
    p.on("console", lambda m: p.log.append(f"console.{m.type}: {m.text[:300]}") if m.type == "error" else None)
    p.on("pageerror", lambda e: p.log.append(f"pageerror: {e}"))
    p.on("response", lambda r: p.log.append(f"HTTP {r.status} {r.url}") if r.status >= 400 else None)
    p.on("request", lambda r: p.frame_urls.append(r.url) if "/frames/" in r.url else None)
    yield p
    context.close()


# ------------------------------------------------------------------------------------------------------ helpers


def _http(url: str, accept: str) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, headers={"Accept": accept})
    with urllib.request.urlopen(req, timeout=60) as r:
        return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()


def _uids(path: Path) -> tuple[str, str, str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)


def _canvas_gray(page) -> np.ndarray:
    from PIL import Image

    png = page.locator("canvas.cornerstone-canvas").first.screenshot()
    return np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float64)


def _image_region(shot: np.ndarray, rows: int, cols: int, out_rows: int, out_cols: int) -> np.ndarray:
    """The displayed image (fitted to the viewport, square pixels) resampled to out_rows x out_cols."""
    from PIL import Image

    h, w = shot.shape
    scale = min(w / cols, h / rows)
    dw, dh = cols * scale, rows * scale
    x0, y0 = (w - dw) / 2, (h - dh) / 2
    box = (round(x0), round(y0), round(x0 + dw), round(y0 + dh))
    crop = Image.fromarray(shot.astype(np.uint8)).crop(box).resize((out_cols, out_rows), Image.Resampling.BOX)
    return np.asarray(crop, dtype=np.float64)


class FrameMatcher:
    """Which stored frame a canvas screenshot shows: the best correlation with every frame (gray, downsampled)."""

    def __init__(self, frames: np.ndarray, out_rows: int, out_cols: int) -> None:
        from PIL import Image

        self.rows, self.cols = frames.shape[1], frames.shape[2]
        self.out = (out_rows, out_cols)
        ref = []
        for f in frames:
            img = Image.fromarray(f).convert("L").resize((out_cols, out_rows), Image.Resampling.BOX)
            v = np.asarray(img, dtype=np.float64).ravel()
            ref.append((v - v.mean()) / (v.std() or 1.0))
        self.ref = np.stack(ref)

    def match(self, shot: np.ndarray) -> tuple[int, float, float]:
        """(0-based frame index, its correlation, the margin over the next best)."""
        v = _image_region(shot, self.rows, self.cols, *self.out).ravel()
        if v.std() == 0:
            return -1, 0.0, 0.0
        v = (v - v.mean()) / v.std()
        corr = self.ref @ v / v.size
        order = np.argsort(corr)
        return int(order[-1]), float(corr[order[-1]]), float(corr[order[-1]] - corr[order[-2]])


def _wait_for_frame(page, matcher: FrameMatcher, artifacts: Path, name: str, min_corr: float = 0.9) -> int:
    page.locator("canvas.cornerstone-canvas").first.wait_for(state="visible", timeout=RENDER_TIMEOUT * 1000)
    deadline = time.monotonic() + RENDER_TIMEOUT
    while True:
        k, corr, margin = matcher.match(_canvas_gray(page))
        if corr >= min_corr:
            return k
        if time.monotonic() > deadline:
            page.screenshot(path=str(artifacts / f"{name}-FAILED-page.png"))
            raise AssertionError(
                f"{name}: the viewer never showed a stored frame (best frame {k + 1}, correlation {corr:.3f}); "
                f"page: {page.locator('body').inner_text()[:800]}\nlog:\n" + "\n".join(page.log[-40:])
            )
        time.sleep(0.5)


def _start_cine(page, artifacts: Path, name: str) -> None:
    """Press play on the cine player OHIF opens for US (unless it already plays: appConfig.autoPlayCine)."""
    button = page.locator('[data-cy="cine-player-play-pause"]')
    try:
        button.first.wait_for(state="visible", timeout=RENDER_TIMEOUT * 1000)
    except Exception:
        page.screenshot(path=str(artifacts / f"{name}-FAILED-nocine.png"))
        raise
    if button.first.locator("svg").count() and "pause" in (button.first.inner_html() or "").lower():
        return
    button.first.click()


def _sample_playback(page, matcher: FrameMatcher, seconds: float) -> list[tuple[float, float, int, float]]:
    """(time before, time after the screenshot, frame index, correlation) for screenshots over ``seconds``."""
    samples = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = time.monotonic()
        shot = _canvas_gray(page)
        t1 = time.monotonic()
        k, corr, _margin = matcher.match(shot)
        samples.append((t0, t1, k, corr))
        time.sleep(0.15)
    return samples


# ------------------------------------------------------------------------------------------------------ tests


def test_metadata_carries_cine_timing(cine_server, objects):
    base = f"http://127.0.0.1:{cine_server.http_port}/dicom-web"
    for name, path in ((n, objects[n]) for n in ("us_cine", "echo_jpeg")):
        study, series, sop = _uids(path)
        src = pydicom.dcmread(path, stop_before_pixels=True)
        status, _h, body = _http(f"{base}/studies/{study}/series/{series}/metadata", "application/dicom+json")
        assert status == 200
        [meta] = json.loads(body)
        assert meta["00181063"]["Value"] == [float(src.FrameTime)], f"{name}: FrameTime {meta.get('00181063')}"
        assert meta["00280008"]["Value"] == [int(src.NumberOfFrames)]
        assert meta["00280009"]["Value"] == ["00181063"], f"{name}: FrameIncrementPointer {meta.get('00280009')}"
        if "CineRate" in src:
            assert meta["00180040"]["Value"] == [int(src.CineRate)]
            assert meta["00082144"]["Value"] == [int(src.RecommendedDisplayFrameRate)]
        assert "BulkDataURI" in meta["7FE00010"]


def test_jpeg_cine_frames_are_served_as_stored(cine_server, objects):
    """frames/N of the JPEG baseline echo: the stored JPEG stream of frame N (image/jpeg), for first, middle, last."""
    base = f"http://127.0.0.1:{cine_server.http_port}/dicom-web"
    study, series, sop = _uids(objects["echo_jpeg"])
    ds = pydicom.dcmread(objects["echo_jpeg"])
    n = int(ds.NumberOfFrames)
    stored = list(generate_frames(ds.PixelData, number_of_frames=n))
    for number in (1, 60, n):
        url = f"{base}/studies/{study}/series/{series}/instances/{sop}/frames/{number}"
        status, headers, body = _http(url, f"multipart/related; type=image/jpeg; transfer-syntax={JPEGBaseline8Bit}")
        assert status == 200 and "multipart/related" in headers["content-type"]
        boundary = headers["content-type"].split("boundary=")[1].split(";")[0].strip('"')
        part = body.split(b"--" + boundary.encode())[1]
        head, _, content = part.partition(b"\r\n\r\n")
        assert b"image/jpeg" in head.lower(), head
        assert content.removesuffix(b"\r\n") == stored[number - 1], f"frame {number} differs from the stored one"
    # a frame number past the end is a clear client error, not a crash
    url = f"{base}/studies/{study}/series/{series}/instances/{sop}/frames/{n + 1}"
    try:
        _http(url, "multipart/related; type=application/octet-stream; transfer-syntax=*")
        raise AssertionError("frame past the end answered 2xx")
    except urllib.error.HTTPError as e:
        assert e.code in (400, 404), e.code


def test_synthetic_cine_plays_at_recorded_rate(cine_server, objects, page, artifacts):
    base = f"http://127.0.0.1:{cine_server.http_port}"
    study, _series, sop = _uids(objects["us_cine"])
    matcher = FrameMatcher(_us_cine_pixels(), ROWS, COLS)
    page.goto(f"{base}/ohif/viewer?StudyInstanceUIDs={study}", wait_until="domcontentloaded")
    first = _wait_for_frame(page, matcher, artifacts, "us-cine")
    assert first == 0, f"the viewer opened the cine on frame {first + 1}, not frame 1"
    page.screenshot(path=str(artifacts / "us-cine-frame1-page.png"))
    _start_cine(page, artifacts, "us-cine")
    samples = _sample_playback(page, matcher, seconds=6.0)
    page.screenshot(path=str(artifacts / "us-cine-playing-page.png"))
    good = [s for s in samples if s[3] >= 0.9]
    assert len(good) >= len(samples) * 0.8, f"screenshots that show no stored frame: {samples}"
    frames_seen = [s[2] for s in good]
    assert len(set(frames_seen)) >= 3, f"cine did not advance: frames {frames_seen}\nlog:\n" + "\n".join(page.log)
    fps = 1000.0 / FRAME_TIME_MS
    for (a0, _a1, ka, _), (_b0, b1, kb, _) in zip(good, good[1:], strict=False):
        advance = (kb - ka) % FRAMES  # forward, wrapping at the end of the loop
        allowed = fps * (b1 - a0) + 1.5
        assert advance <= allowed, (
            f"frame {ka + 1} -> {kb + 1} in {b1 - a0:.2f}s: faster than the recorded {fps:g} fps "
            f"(the frame rate was not taken from FrameTime); samples {[(round(s[0], 2), s[2]) for s in good]}"
        )
    # the cine player shows the recorded rate too
    fps_inputs = page.locator('[data-cy="cine-player-play-pause"]').locator("xpath=..").locator("input")
    if fps_inputs.count():
        assert fps_inputs.first.input_value() == str(round(fps)), fps_inputs.first.input_value()
    # the frames were fetched one by one with WADO-RS frames/N
    numbers = {int(u.split("/frames/")[1].split("?")[0]) for u in page.frame_urls if f"/instances/{sop}/" in u}
    assert len(numbers) >= 3 and max(numbers) > 1, f"frames/N requests: {sorted(numbers)}"
    print(f"synthetic cine: frames seen {frames_seen} over {good[-1][1] - good[0][0]:.1f}s")


def test_jpeg_baseline_echo_plays(cine_server, objects, page, artifacts):
    base = f"http://127.0.0.1:{cine_server.http_port}"
    ds = pydicom.dcmread(objects["echo_jpeg"])
    study, _series, sop = _uids(objects["echo_jpeg"])
    matcher = FrameMatcher(ds.pixel_array, 120, 160)  # decoded to RGB by pydicom
    page.goto(f"{base}/ohif/viewer?StudyInstanceUIDs={study}", wait_until="domcontentloaded")
    first = _wait_for_frame(page, matcher, artifacts, "echo-jpeg")
    page.screenshot(path=str(artifacts / "echo-jpeg-first-page.png"))
    _start_cine(page, artifacts, "echo-jpeg")
    samples = _sample_playback(page, matcher, seconds=6.0)
    page.screenshot(path=str(artifacts / "echo-jpeg-playing-page.png"))
    good = [s for s in samples if s[3] >= 0.9]
    assert len(good) >= len(samples) * 0.8, f"screenshots that show no stored frame: {samples}"
    frames_seen = [s[2] for s in good]
    assert len(set(frames_seen)) >= 3, f"echo cine did not advance from frame {first + 1}: {frames_seen}"
    numbers = {int(u.split("/frames/")[1].split("?")[0]) for u in page.frame_urls if f"/instances/{sop}/" in u}
    assert len(numbers) >= 3, f"frames/N requests: {sorted(numbers)}"
    assert not [line for line in page.log if line.startswith("HTTP 5")], page.log
    print(f"jpeg echo: frames seen {frames_seen}")


def test_cine_round_trip_byte_exact(cine_server, objects, tmp_path):
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(url=f"http://127.0.0.1:{cine_server.http_port}/dicom-web")
    for name, path in objects.items():
        study, series, sop = _uids(path)
        ts = str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        got = dcmtk.get(cine_server.dicom_port, "study", "IMAGE",
                        {"StudyInstanceUID": study, "SeriesInstanceUID": series, "SOPInstanceUID": sop},
                        tmp_path / name, prefer=dcmtk.RETRIEVE_PREFER[ts])
        assert len(got.files) == 1, f"getscu {name}: {got.output[-3000:]}"
        assert dataset_bytes(got.files[0]) == dataset_bytes(path), f"{name}: getscu copy differs"
        ds = client.retrieve_instance(study, series, sop, media_types=(("application/dicom", "*"),))
        assert str(ds.file_meta.TransferSyntaxUID) == ts
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        assert dataset_bytes_from(buf.getvalue()) == dataset_bytes(path), f"{name}: dicomweb-client copy differs"


def dataset_bytes_from(data: bytes) -> bytes:
    from helpers.dicomdata import split_meta

    return split_meta(data)[1]


def test_rtstruct_contour_over_its_ct_slice(cine_server, objects, page, artifacts):
    """The RT Structure Set, loaded in the viewer, draws its green square on slice RT_SLICE + 1 at its patient
    coordinates, and nothing green on the other slices."""
    import re

    from PIL import Image

    study = pydicom.dcmread(objects["rtstruct"], stop_before_pixels=True).StudyInstanceUID
    page.goto(f"http://127.0.0.1:{cine_server.http_port}/ohif/viewer?StudyInstanceUIDs={study}")
    canvas = page.locator("canvas.cornerstone-canvas:visible").first
    canvas.wait_for(state="visible", timeout=120_000)
    thumb = page.get_by_text("RT structures", exact=False)
    yes = page.get_by_role("button", name="Yes")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not yes.count():
        if thumb.count():
            thumb.first.dblclick()
            time.sleep(1.0)
        time.sleep(0.5)
    assert yes.count(), "OHIF did not offer the structure set\n" + "\n".join(page.log[-40:])
    yes.first.click()
    overlay = page.locator('[data-cy="viewport-overlay-bottom-right"]').first
    fov = CT_SIZE * CT_SPACING

    def shot_at(instance: int) -> np.ndarray:
        for _ in range(4 * CT_SLICES):
            canvas.wait_for(state="visible", timeout=120_000)
            m = re.search(r"I:\s*(\d+)", overlay.inner_text())
            shown = int(m.group(1)) if m else None
            if shown == instance:
                break
            box = canvas.bounding_box()
            assert box is not None
            page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
            page.mouse.wheel(0, 100 if shown is None or shown > instance else -100)  # the stack runs down in z
            time.sleep(0.4)
        assert m and int(m.group(1)) == instance, overlay.inner_text()
        time.sleep(1.5)
        return np.asarray(Image.open(io.BytesIO(canvas.screenshot())).convert("RGB"), dtype=np.float64)

    def green_mask(img: np.ndarray) -> np.ndarray:
        return (img[..., 1] > img[..., 0] + 60) & (img[..., 1] > img[..., 2] + 60)

    def to_px(img: np.ndarray, x_mm: float, y_mm: float) -> tuple[int, int]:
        h, w, _ = img.shape
        d = min(w, h)
        return int((h - d) / 2 + y_mm / fov * d), int((w - d) / 2 + x_mm / fov * d)

    deadline = time.monotonic() + 120
    while True:
        img = shot_at(RT_SLICE + 1)
        mask = green_mask(img)
        if mask.sum() > 50 or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    page.screenshot(path=str(artifacts / "rtstruct-contour-page.png"))
    assert mask.sum() > 50, "no contour drawn on its slice\n" + "\n".join(page.log[-40:])
    rows, cols = np.nonzero(mask)
    (r0, c0), (r1, c1) = to_px(img, RT_X[0], RT_Y[0]), to_px(img, RT_X[1], RT_Y[1])
    tol = 0.03 * min(img.shape[:2])
    assert abs(rows.min() - r0) < tol and abs(rows.max() - r1) < tol, (rows.min(), rows.max(), r0, r1)
    assert abs(cols.min() - c0) < tol and abs(cols.max() - c1) < tol, (cols.min(), cols.max(), c0, c1)
    # a contour, not a blob: the square's centre is not green
    rc, cc = (r0 + r1) // 2, (c0 + c1) // 2
    assert not mask[rc - 3:rc + 4, cc - 3:cc + 4].any()
    # another slice: no contour
    other = shot_at(1)
    page.screenshot(path=str(artifacts / "rtstruct-other-slice-page.png"))
    assert green_mask(other).sum() < 10, "a contour drawn on a slice it does not lie on"


def _as_8bit(frames: np.ndarray) -> np.ndarray:
    f = frames.astype(np.float64)
    return np.round((f - f.min()) / max(float(np.ptp(f)), 1.0) * 255).astype(np.uint8)


@pytest.mark.parametrize("name", ["nm_multiframe", "xa_run"])
def test_multiframe_shown_frame_by_frame(cine_server, objects, page, artifacts, name):
    """NM multi-frame (energy windows x detectors x rotations) and an XA run: the viewer opens on frame 1 and each
    scroll step shows the next stored frame, identified from the pixels."""
    pixels = _nm_pixels() if name == "nm_multiframe" else _xa_pixels()
    n = pixels.shape[0]
    matcher = FrameMatcher(_as_8bit(pixels), pixels.shape[1], pixels.shape[2])
    study, _series, _sop = _uids(objects[name])
    page.goto(f"http://127.0.0.1:{cine_server.http_port}/ohif/viewer?StudyInstanceUIDs={study}",
              wait_until="domcontentloaded")
    first = _wait_for_frame(page, matcher, artifacts, name)
    assert first == 0, f"{name} opened on frame {first + 1}"
    play = page.locator('[data-cy="cine-player-play-pause"]')
    if play.count() and "pause" in (play.first.inner_html() or "").lower():
        play.first.click()  # a cine player that started by itself: stop it, this test steps by hand
        time.sleep(0.5)
        first = _wait_for_frame(page, matcher, artifacts, name)
    canvas = page.locator("canvas.cornerstone-canvas").first
    box = canvas.bounding_box()
    assert box is not None
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    seen = [first]
    for _ in range(min(n - 1 - first, 4)):
        page.mouse.wheel(0, 100)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            k, corr, margin = matcher.match(_canvas_gray(page))
            if corr >= 0.9 and k != seen[-1]:
                break
            time.sleep(0.3)
        seen.append(k)
    page.screenshot(path=str(artifacts / f"{name}-stepped-page.png"))
    assert seen == list(range(seen[0], seen[0] + len(seen))), f"{name}: frames shown while scrolling: {seen}"
