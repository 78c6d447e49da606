"""The OHIF viewer end to end: a real `openpacs serve`, studies stored over DIMSE with DCMTK storescu, and headless
Chromium (Debian's, driven by Playwright) opening the viewer and the study list.

The check is on rendered pixels, not the DOM: the viewport canvas is screenshotted, the image area is located from the
canvas size and the image matrix (OHIF fits the image to the viewport), scaled back to the matrix and correlated with
the stored pixel data. A blank, uniform, garbled or error page cannot pass.

Needs: /usr/bin/chromium (or OPENPACS_TEST_CHROMIUM), the OHIF build (installed once into $OPENPACS_OHIF_DIR or the user
cache by ``openpacs.web.viewer.install_ohif``), DCMTK. Screenshots land in $OPENPACS_TEST_ARTIFACTS (default: tmp).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pydicom
import pytest
from helpers import dcmtk
from helpers.browser import ohif_page
from helpers.dicomdata import testdata_file as _testdata_file
from helpers.dicomdata import write_part10
from helpers.server import OpenPACSServer
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, JPEG2000Lossless, JPEGLSLossless, RLELossless, generate_uid

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
RENDER_TIMEOUT = 90.0
MIN_CORRELATION = 0.9
HOSTILE_NAME = "<script>alert(1)</script>^<img src=x onerror=alert(2)>"
HOSTILE_DESCRIPTION = "\"'><b id=injected>bold</b>&amp;"


def _missing(what: str) -> None:
    """As tests/conftest.py's ``missing``: skip locally, fail in CI (OPENPACS_TEST_REQUIRE_ALL)."""
    if os.environ.get("OPENPACS_TEST_REQUIRE_ALL", "") not in ("", "0", "false"):
        pytest.fail(f"{what} (OPENPACS_TEST_REQUIRE_ALL is set)", pytrace=False)
    pytest.skip(what)


# ----------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def chromium_path() -> str:
    path = os.environ.get("OPENPACS_TEST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).exists():
        _missing(f"Chromium not found at {path} (apt-get install chromium, or set OPENPACS_TEST_CHROMIUM)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _missing("the playwright Python package is not installed")
    return path


@pytest.fixture(scope="module")
def ohif_dir() -> Path:
    """The OHIF build, installed once per machine (idempotent: a marker check when already there)."""
    from openpacs.web.viewer import OhifInstallError, default_ohif_dir, install_ohif

    dest = Path(os.environ.get("OPENPACS_OHIF_DIR") or default_ohif_dir())
    try:
        return install_ohif(dest)
    except (OhifInstallError, OSError) as exc:
        _missing(f"cannot install the OHIF viewer into {dest}: {exc}")
        raise


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    d = Path(os.environ.get("OPENPACS_TEST_ARTIFACTS") or tmp_path_factory.mktemp("viewer-artifacts"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def _phantom_series(directory: Path, slices: int = 4, size: int = 256) -> list[Path]:
    """A CT series with structure (body disc, bright 'bone' ring, gradient) that differs from slice to slice."""
    study, series = generate_uid(), generate_uid()
    yy, xx = np.mgrid[0:size, 0:size]
    r = np.hypot(yy - size / 2, xx - size / 2)
    paths = []
    for i in range(slices):
        img = np.full((size, size), 0, np.int16)  # air: -1024 HU after rescale
        img[r < size * 0.42] = 1024 + 40 + (xx[r < size * 0.42] // 8).astype(np.int16)  # soft tissue with a gradient
        img[(r > size * 0.18 + 4 * i) & (r < size * 0.24 + 4 * i)] = 1024 + 700  # a 'bone' ring moving per slice
        ds = Dataset()
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[study])
        ds.PatientName = "PHANTOM^VIEWER"
        ds.PatientID = "VIEWERPHANTOM"
        ds.PatientBirthDate = "19800101"
        ds.PatientSex = "O"
        ds.StudyDate = "20250102"
        ds.StudyTime = "101500"
        ds.AccessionNumber = "VWRPHANTOM"
        ds.StudyID = "1"
        ds.StudyDescription = "Viewer phantom"
        ds.Modality = "CT"
        ds.SeriesNumber = 1
        ds.SeriesDescription = "Phantom axial"
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [0.0, 0.0, float(i) * 2.0]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [0.8, 0.8]
        ds.SliceThickness = 2.0
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ds.Columns = size
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.WindowCenter = 100
        ds.WindowWidth = 1000
        ds.PixelData = img.astype(np.uint16).tobytes()
        paths.append(write_part10(ds, directory / f"phantom{i}.dcm"))
    return paths


# Compressed variants of CT_small, each its own study: the viewer gets the stored bytes (transfer-syntax=*) and decodes
# them with OHIF's wasm codecs in web workers.
COMPRESSED = {"ct_jpegls": JPEGLSLossless, "ct_j2k": JPEG2000Lossless, "ct_rle": RLELossless}


def _compressed_copy(directory: Path, name: str, transfer_syntax: str) -> Path:
    ds = pydicom.dcmread(_testdata_file("CT_small.dcm"))
    ds.compress(transfer_syntax)
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyDescription = f"CT_small as {transfer_syntax.name}"
    path = directory / f"{name}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _hostile_instance(directory: Path) -> Path:
    ds = pydicom.dcmread(_testdata_file("CT_small.dcm"))
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientName = HOSTILE_NAME
    ds.PatientID = "HOSTILE<1>"
    ds.StudyDescription = HOSTILE_DESCRIPTION
    path = directory / "hostile.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def viewer_server(require_dcmtk, ohif_dir, tmp_path_factory):
    """A running server (SQLite index: the viewer does not depend on the backend) holding the studies of the tests."""
    base = tmp_path_factory.mktemp("viewer")
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
    files_dir = base / "files"
    files_dir.mkdir()
    ct_small = _testdata_file("CT_small.dcm")
    phantom = _phantom_series(files_dir)
    hostile = _hostile_instance(files_dir)
    result = dcmtk.store(srv.dicom_port, [ct_small, *phantom, hostile])
    statuses = dcmtk.parse_store_log(result.output)
    assert result.returncode == 0 and len(statuses) == 6 and all(s.startswith("Success") for s in statuses.values()), (
        f"storescu failed: {result.output[-3000:]}"
    )
    srv.studies = {  # type: ignore[attr-defined]
        "ct_small": [pydicom.dcmread(ct_small)],
        "phantom": [pydicom.dcmread(p) for p in phantom],
        "hostile": [pydicom.dcmread(hostile)],
    }
    for name, ts in COMPRESSED.items():
        path = _compressed_copy(files_dir, name, ts)
        result = dcmtk.store(srv.dicom_port, [path], dcmtk.STORESCU_PROPOSE[ts])
        status = dcmtk.parse_store_log(result.output).get(str(path), "")
        assert result.returncode == 0 and status.startswith("Success"), f"storescu {name}: {result.output[-3000:]}"
        srv.studies[name] = [pydicom.dcmread(path)]  # type: ignore[attr-defined]
    yield srv
    if srv.running:
        code = srv.stop()
        assert code == 0, f"openpacs serve exited with {code} on SIGTERM:\n{srv.log_tail()}"


@pytest.fixture(scope="module")
def browser(chromium_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
        yield b
        b.close()


class PageLog:
    """Console errors, uncaught exceptions and failed requests of a page, for assertions and failure messages."""

    def __init__(self, page) -> None:
        self.lines: list[str] = []
        self.http_errors: list[str] = []
        page.on("console", lambda m: self.lines.append(f"console.{m.type}: {m.text[:500]}"))
        page.on("pageerror", lambda e: self.lines.append(f"pageerror: {e}"))
        page.on("requestfailed", lambda r: self.lines.append(f"requestfailed: {r.url} {r.failure}"))
        page.on("response", self._response)

    def _response(self, r) -> None:
        if r.status >= 400:
            self.http_errors.append(f"HTTP {r.status} {r.request.method} {r.url}")
            self.lines.append(self.http_errors[-1])

    def text(self, last: int = 80) -> str:
        return "\n".join(self.lines[-last:])


@pytest.fixture
def page(browser):
    p = ohif_page(browser, viewport={"width": 1280, "height": 900})
    context = p.context
    p.log = PageLog(p)  # type: ignore[attr-defined]
    yield p
    context.close()


# ------------------------------------------------------------------------------------------------------ helpers


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def _require_viewer_mounted(base: str) -> None:
    status, _h, body = _get(f"{base}/ohif/app-config.js")
    assert status == 200, (
        f"GET /ohif/app-config.js answered {status}: the viewer is not mounted in web/app.py "
        f"(add `routes += viewer_routes(ctx)`, see notes/viewer-requests.md): {body[:300]!r}"
    )


def _require_dicomweb(base: str, study_uid: str) -> None:
    """Clear failure messages while the DICOMweb endpoints the viewer needs are missing."""
    checks = [
        f"/dicom-web/studies?StudyInstanceUID={study_uid}&includefield=all",
        f"/dicom-web/studies/{study_uid}/series",
    ]
    for path in checks:
        status, _h, body = _get(base + path, {"Accept": "application/dicom+json"})
        assert status == 200, f"viewer needs QIDO-RS {path}: got HTTP {status} {body[:300]!r}"
    _s, _h, body = _get(base + checks[1], {"Accept": "application/dicom+json"})
    series_uid = json.loads(body)[0]["0020000E"]["Value"][0]
    meta = f"/dicom-web/studies/{study_uid}/series/{series_uid}/metadata"
    status, _h, body = _get(base + meta, {"Accept": "application/dicom+json"})
    assert status == 200, f"viewer needs WADO-RS {meta}: got HTTP {status} {body[:300]!r}"


def _canvas_gray(page) -> np.ndarray:
    from PIL import Image

    png = page.locator("canvas.cornerstone-canvas").first.screenshot()
    return np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float64)


def _image_region(shot: np.ndarray, rows: int, cols: int, row_spacing: float = 1.0, col_spacing: float = 1.0):
    """The displayed image resampled to the stored matrix: OHIF fits the image (physical aspect) to the viewport."""
    from PIL import Image

    h, w = shot.shape
    phys_h, phys_w = rows * row_spacing, cols * col_spacing
    scale = min(w / phys_w, h / phys_h)
    dw, dh = phys_w * scale, phys_h * scale
    x0, y0 = (w - dw) / 2, (h - dh) / 2
    box = (round(x0), round(y0), round(x0 + dw), round(y0 + dh))
    crop = Image.fromarray(shot.astype(np.uint8)).crop(box).resize((cols, rows), Image.Resampling.BOX)
    return np.asarray(crop, dtype=np.float64)


def wait_for_rendered_image(page, datasets: list[pydicom.Dataset], artifacts: Path, name: str) -> dict[str, float]:
    """Wait until the viewport shows one of ``datasets`` (the viewer picks which slice of a series comes first): its
    pixels correlate with that instance's stored data. Returns the pixel statistics and the matched InstanceNumber."""
    page.locator("canvas.cornerstone-canvas").first.wait_for(state="visible", timeout=RENDER_TIMEOUT * 1000)
    first = datasets[0]
    spacing = [float(v) for v in first.get("PixelSpacing", [1.0, 1.0])]
    expected = [ds.pixel_array.astype(np.float64).ravel() for ds in datasets]
    deadline = time.monotonic() + RENDER_TIMEOUT
    stats: dict[str, float] = {}
    while True:
        shot = _canvas_gray(page)
        region = _image_region(shot, int(first.Rows), int(first.Columns), spacing[0], spacing[1]).ravel()
        corrs = [float(np.corrcoef(region, e)[0, 1]) if region.std() > 0 and e.std() > 0 else 0.0 for e in expected]
        best = int(np.argmax(corrs))
        stats = {
            "canvas_w": shot.shape[1],
            "canvas_h": shot.shape[0],
            "mean": float(shot.mean()),
            "std": float(shot.std()),
            "gray_levels": float(len(np.unique(shot))),
            "image_std": float(region.std()),
            "correlation": corrs[best],
            "instance_number": float(datasets[best].get("InstanceNumber", 0) or 0),
            "correlation_next_best": sorted(corrs)[-2] if len(corrs) > 1 else 0.0,
        }
        if corrs[best] >= MIN_CORRELATION:
            break
        if time.monotonic() > deadline:
            page.screenshot(path=str(artifacts / f"{name}-FAILED-page.png"))
            body = page.locator("body").inner_text()[:1500]
            raise AssertionError(
                f"viewer never showed the image of {name} within {RENDER_TIMEOUT}s: {stats}\n"
                f"page text: {body}\nbrowser log:\n{page.log.text()}"
            )
        time.sleep(0.5)
    time.sleep(0.5)  # let overlays settle, then keep the evidence
    page.screenshot(path=str(artifacts / f"{name}-page.png"))
    page.locator("canvas.cornerstone-canvas").first.screenshot(path=str(artifacts / f"{name}-canvas.png"))
    print(f"{name}: {stats} screenshots in {artifacts}")
    return stats


def assert_no_error_page(page) -> None:
    text = page.locator("body").inner_text()
    for marker in ("Something went wrong", "No matching results", "Data source not found", "Error:"):
        assert marker not in text, f"viewer shows an error ({marker!r}): {text[:1500]}\nbrowser log:\n{page.log.text()}"
    bad = [e for e in page.log.http_errors if "/dicom-web/" in e or "/ohif/" in e]
    assert not bad, "failed requests:\n" + "\n".join(bad)


# -------------------------------------------------------------------------------------------------------- tests


def test_static_serving(viewer_server, ohif_dir):
    base = f"http://127.0.0.1:{viewer_server.http_port}"
    _require_viewer_mounted(base)
    status, h, body = _get(f"{base}/ohif/app-config.js")
    assert "javascript" in h["content-type"] and b"/dicom-web" in body and b"window.config" in body
    assert h["cache-control"] == "no-cache"
    # SPA client route -> index.html with the prefix baked in, cross-origin isolated (SharedArrayBuffer)
    status, h, body = _get(f"{base}/ohif/viewer?StudyInstanceUIDs=1.2.3")
    assert status == 200 and h["content-type"].startswith("text/html")
    assert b'window.PUBLIC_URL="/ohif/"' in body and b'src="/ohif/app-config.js"' in body
    assert h["cross-origin-opener-policy"] == "same-origin" and h["cross-origin-embedder-policy"] == "require-corp"
    # the app bundle, rewritten at install (prefix, bundle fixes): revalidated (ETag), gzip when accepted
    bundle = body.split(b'src="/ohif/app.bundle.')[1].split(b'"')[0].decode()
    status, h, js = _get(f"{base}/ohif/app.bundle.{bundle}", {"Accept-Encoding": "gzip"})
    assert status == 200 and "javascript" in h["content-type"] and h["cache-control"] == "no-cache"
    assert h.get("content-encoding") == "gzip" and h.get("etag")
    # a hashed chunk left as built: immutable
    rewritten = {k.split(":", 1)[-1] for k in json.loads((ohif_dir / ".openpacs-ohif.json").read_text())["patched"]}
    chunk = next(p.name for p in sorted(ohif_dir.glob("*.bundle.*.js")) if p.name not in rewritten)
    status, h, _ = _get(f"{base}/ohif/{chunk}")
    assert status == 200 and "immutable" in h["cache-control"], (chunk, h.get("cache-control"))
    status, h, _ = _get(f"{base}/ohif/manifest.json")
    assert status == 200 and h["content-type"].startswith("application/json")
    # not found / hidden / traversal
    for path in (
        "/ohif/nope.bundle.js",
        "/ohif/sw.js",
        "/ohif/_headers",
        "/ohif/.openpacs-ohif.json",
        "/ohif/%2e%2e/%2e%2e/etc/passwd.js",
    ):
        status, _h, _b = _get(base + path)
        assert status == 404, f"{path} answered {status}"
    # /viewer shortcut keeps the query string
    req = urllib.request.Request(f"{base}/viewer?StudyInstanceUIDs=1.2.3")
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        opener.open(req, timeout=10)
        raise AssertionError("/viewer did not redirect")
    except urllib.error.HTTPError as e:
        assert e.code in (302, 307) and e.headers["location"].endswith("/ohif/viewer?StudyInstanceUIDs=1.2.3")


def test_wasm_media_type(viewer_server, ohif_dir):
    base = f"http://127.0.0.1:{viewer_server.http_port}"
    _require_viewer_mounted(base)
    wasm = sorted(p.name for p in Path(ohif_dir).glob("*.wasm"))[0]
    status, h, body = _get(f"{base}/ohif/{wasm}")
    assert status == 200 and h["content-type"] == "application/wasm" and body[:4] == b"\0asm"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


@pytest.mark.parametrize("study", ["ct_small", "phantom", *COMPRESSED])
def test_viewer_renders_stored_ct(viewer_server, page, artifacts, study):
    base = f"http://127.0.0.1:{viewer_server.http_port}"
    datasets = viewer_server.studies[study]
    uid = datasets[0].StudyInstanceUID
    _require_viewer_mounted(base)
    _require_dicomweb(base, uid)
    page.goto(f"{base}/ohif/viewer?StudyInstanceUIDs={uid}", wait_until="domcontentloaded")
    stats = wait_for_rendered_image(page, datasets, artifacts, study)
    assert stats["std"] > 15 and stats["gray_levels"] > 16, stats
    if len(datasets) > 1:  # a slice is told from its neighbours, and the stack holds every slice of the series
        assert stats["correlation"] - stats["correlation_next_best"] > 0.02, stats
        assert page.get_by_text(f"(1/{len(datasets)})").count() or page.get_by_text(f"1/{len(datasets)}").count()
    assert_no_error_page(page)


def test_study_list_links_to_viewer(viewer_server, page, artifacts):
    base = f"http://127.0.0.1:{viewer_server.http_port}"
    ds = viewer_server.studies["ct_small"][0]
    response = page.goto(f"{base}/ui/studies", wait_until="domcontentloaded")
    assert response is not None and response.status == 200, f"/ui/studies: {response and response.status}"
    csp = response.headers.get("content-security-policy", "")
    assert "default-src 'none'" in csp and "script-src" not in csp
    assert page.locator("#studies tbody tr").count() == len(viewer_server.studies)
    link = page.locator(f'a[data-study-uid="{ds.StudyInstanceUID}"]')
    assert link.count() == 1
    assert link.get_attribute("href") == f"/ohif/viewer?StudyInstanceUIDs={ds.StudyInstanceUID}"
    _require_viewer_mounted(base)
    _require_dicomweb(base, ds.StudyInstanceUID)
    link.click()
    page.wait_for_url(f"**/ohif/viewer?StudyInstanceUIDs={ds.StudyInstanceUID}*", timeout=30000)
    wait_for_rendered_image(page, [ds], artifacts, "studylist-click")
    assert_no_error_page(page)


def test_study_list_escapes_dicom_values(viewer_server, page):
    base = f"http://127.0.0.1:{viewer_server.http_port}"
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    response = page.goto(f"{base}/ui/studies?PatientID=HOSTILE*", wait_until="load")
    assert response is not None and response.status == 200
    rows = page.locator("#studies tbody tr")
    assert rows.count() == 1
    text = rows.first.inner_text()
    assert "<script>alert(1)</script>" in text  # shown as text...
    assert HOSTILE_DESCRIPTION in text
    assert page.locator("script").count() == 0  # ...never as markup
    assert page.locator("#injected").count() == 0 and page.locator("img").count() == 0
    assert page.title() == "OpenPACS studies" and not dialogs
    # a search value is echoed back into the form, escaped too
    response = page.goto(f"{base}/ui/studies?PatientName=%22%3E%3Cscript%3Ealert(2)%3C/script%3E", wait_until="load")
    assert response is not None and response.status in (200, 400)
    assert page.locator("script").count() == 0 and not dialogs
