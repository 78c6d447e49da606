"""Video and documents end to end on a real `openpacs serve`: an H.264 video (Video Endoscopic Image, MPEG-4 AVC/H.264
High Profile, the MP4 in several fragments), an Encapsulated PDF and two structured reports (pydicom's test-SR.dcm and
reportsi.dcm), stored with DCMTK storescu and retrieved byte-exact with getscu and dicomweb-client; the video streamed
as WADO-RS rendered video/mp4 with byte ranges and played by headless Chromium (the moving square is located in
screenshots taken at two times and matched to the frame the player reports); the PDF as application/pdf and as its
first page in PNG (pixels); the reports as HTML and text (content items present, screenshot).
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import requests
from helpers import dcmtk
from helpers.browser import missing, ohif_browser, ohif_page
from helpers.dicomdata import dataset_bytes, write_part10
from helpers.dicomdata import testdata_file as _testdata_file
from helpers.mediadata import SQUARE, make_pdf, pdf_dataset, square_x, write_video
from helpers.server import OpenPACSServer, stop_cleanly
from PIL import Image

W, H, FRAMES, FPS = 160, 120, 100, 25
BROWSER_TIMEOUT_MS = 90_000


class Inst:
    def __init__(self, path: Path) -> None:
        self.path = path
        ds = pydicom.dcmread(path)
        self.ds = ds
        self.study, self.series, self.sop = ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
        self.ts = str(ds.file_meta.TransferSyntaxUID)
        self.wire = b""  # the data set as storescu sends it (srv fixture)

    def url(self, base: str) -> str:
        return f"{base}/studies/{self.study}/series/{self.series}/instances/{self.sop}"


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, object]:
    pytest.importorskip("av", reason="PyAV (pip install av) makes the test video")
    d = tmp_path_factory.mktemp("media")
    path, mp4, _ = write_video(d / "video.dcm", width=W, height=H, frames=FRAMES, fps=FPS, fragment=1000)
    pdf = make_pdf()
    write_part10(pdf_dataset(pdf), d / "doc.dcm")
    sr = {}
    for name in ("test-SR.dcm", "reportsi.dcm"):
        dest = d / name
        dest.write_bytes(Path(_testdata_file(name)).read_bytes())
        sr[name] = Inst(dest)
    return {"video": Inst(path), "mp4": mp4, "pdf": pdf, "doc": Inst(d / "doc.dcm"), "sr": sr, "dir": d}


@pytest.fixture(scope="module")
def srv(media, require_dcmtk, tmp_path_factory):
    from openpacs.web.viewer import OhifInstallError, default_ohif_dir, install_ohif

    ohif = Path(os.environ.get("OPENPACS_OHIF_DIR") or default_ohif_dir())
    try:
        os.environ["OPENPACS_OHIF_DIR"] = str(install_ohif(ohif))  # the server subprocess inherits it
    except (OhifInstallError, OSError) as exc:
        missing(f"cannot install the OHIF viewer into {ohif}: {exc}")
    server = OpenPACSServer(tmp_path_factory.mktemp("openpacs-media") / "data").start()
    video = media["video"]
    res = dcmtk.store(server.dicom_port, [video.path], "-R", "-xn")  # the class of the file, in H.264 HP L4.1
    assert res.returncode == 0 and dcmtk.parse_store_log(res.output) == {str(video.path): "Success"}, res.output
    others = [media["doc"].path] + [i.path for i in media["sr"].values()]
    res = dcmtk.store(server.dicom_port, others)
    assert res.returncode == 0 and set(dcmtk.parse_store_log(res.output).values()) == {"Success"}, res.output
    # what storescu put on the wire (it re-encodes some data sets, e.g. sequence lengths), captured by DCMTK's
    # bit-preserving storescp: the reference of every byte-exact comparison
    scp = dcmtk.StoreSCP(tmp_path_factory.mktemp("reference") / "rx", aet="REFSCP").start()
    try:
        for inst in [video, media["doc"], *media["sr"].values()]:
            scp.clear()
            args = ["-R", "-xn"] if inst is video else ["-R"]
            res = dcmtk.store(scp.port, [inst.path], *args, aet="REFSCP")
            assert dcmtk.parse_store_log(res.output).get(str(inst.path)) == "Success", res.output
            (received,) = scp.files()
            inst.wire = dataset_bytes(received)
    finally:
        scp.stop()
    yield server
    stop_cleanly(server)


@pytest.fixture(scope="module")
def base(srv) -> str:
    return f"http://127.0.0.1:{srv.http_port}/dicom-web"


def _stream(media) -> bytes:
    """The bitstream as a player gets it: the fragments concatenated (the MP4 and the even-length pad, if any)."""
    mp4 = media["mp4"]
    return mp4 + (b"\0" if len(mp4) % 2 else b"")


# ------------------------------------------------------------------------------------------- round trips


def test_dcmtk_getscu_round_trip_byte_exact(srv, media, tmp_path) -> None:
    items = [(media["video"], "+xn"), (media["doc"], None)] + [(i, None) for i in media["sr"].values()]
    for inst, prefer in items:
        out = tmp_path / inst.sop
        res = dcmtk.get(srv.dicom_port, "study", "IMAGE", {"StudyInstanceUID": inst.study,
                        "SOPInstanceUID": inst.sop}, out, prefer=prefer)
        assert len(res.files) == 1, res.output
        got = pydicom.dcmread(res.files[0])
        assert str(got.file_meta.TransferSyntaxUID) == inst.ts
        assert dataset_bytes(res.files[0]) == inst.wire, inst.path.name


def test_dicomweb_client_round_trip_byte_exact(base, media) -> None:
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(url=base)
    items = [media["video"], media["doc"], *media["sr"].values()]
    for inst in items:
        ds = client.retrieve_instance(inst.study, inst.series, inst.sop, media_types=(("application/dicom", "*"),))
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        assert str(ds.file_meta.TransferSyntaxUID) == inst.ts
        assert dataset_bytes(_tmp_write(media["dir"], inst.sop, buf.getvalue())) == inst.wire, inst.path.name
    # STOW-RS of the PDF and a report under new UIDs, read back through WADO-RS
    for inst in (media["doc"], media["sr"]["test-SR.dcm"]):
        ds = pydicom.dcmread(inst.path)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        client.store_instances([ds])
        back = client.retrieve_instance(inst.study, inst.series, ds.SOPInstanceUID)
        assert back == ds


def _tmp_write(d: Path, name: str, data: bytes) -> Path:
    p = d / f"back-{name}.dcm"
    p.write_bytes(data)
    return p


# ------------------------------------------------------------------------------------------- video over HTTP


def test_rendered_video_whole_and_ranges(base, media) -> None:
    url = media["video"].url(base) + "/rendered"
    stream = _stream(media)
    size = len(stream)
    r = requests.get(url, headers={"Accept": "video/mp4"}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("video/mp4")
    assert r.headers["accept-ranges"] == "bytes"
    assert int(r.headers["content-length"]) == size
    assert r.content == stream
    assert r.content[4:8] == b"ftyp"
    # the query form OHIF's getBulkdataValue appends, and what a <video> element sends (*/*)
    assert requests.get(url + "?accept=video/mp4", timeout=60).content == stream
    assert requests.get(url, headers={"Accept": "*/*"}, timeout=60).content == stream
    cases = {
        "bytes=0-99": (0, 99),  # the first bytes
        "bytes=990-2010": (990, 2010),  # across fragment boundaries (1000-byte fragments)
        f"bytes={size // 2}-": (size // 2, size - 1),  # the middle to the end
        "bytes=-100": (size - 100, size - 1),  # a suffix
        f"bytes=10-{size * 2}": (10, size - 1),  # an end past the stream: cut to it
    }
    for header, (start, end) in cases.items():
        r = requests.get(url, headers={"Accept": "video/mp4", "Range": header}, timeout=60)
        assert r.status_code == 206, (header, r.status_code)
        assert r.headers["content-range"] == f"bytes {start}-{end}/{size}", header
        assert r.content == stream[start : end + 1], header
    r = requests.get(url, headers={"Accept": "video/mp4", "Range": f"bytes={size}-"}, timeout=60)
    assert r.status_code == 416 and r.headers["content-range"] == f"bytes */{size}"
    # the Pixel Data bulk data asked for as video: the same stream and ranges
    bulk = media["video"].url(base) + "/bulkdata/7FE00010"
    r = requests.get(bulk, headers={"Accept": "video/mp4", "Range": "bytes=1000-1999"}, timeout=60)
    assert r.status_code == 206 and r.content == stream[1000:2000]
    # an image type for a video: not this branch (no decoder for H.264 here): a clear error, not a crash
    r = requests.get(url, headers={"Accept": "text/html"}, timeout=60)
    assert r.status_code == 406


def _square_left(img: np.ndarray) -> int | None:
    """Left edge (pixels) of the bright square in a grey screenshot of the video area, None when there is none."""
    bright = img > 128
    cols = np.flatnonzero(bright.sum(axis=0) > bright.shape[0] // 6)
    return int(cols[0]) if cols.size else None


def test_chromium_plays_the_video(base, media, chromium_path, artifacts) -> None:
    from helpers.browser import CHROMIUM_ARGS
    from playwright.sync_api import sync_playwright

    url = media["video"].url(base) + "/rendered"
    page_html = (f"<html><body style='margin:0;background:#404040'>"
                 f"<video id=v src='{url}' muted preload=auto width={W} height={H}></video></body></html>")
    shots = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
        try:
            page = ohif_page(browser, viewport={"width": 400, "height": 300})
            page.set_content(page_html)
            page.wait_for_function("document.getElementById('v').readyState >= 3", timeout=BROWSER_TIMEOUT_MS)
            for target in (0.6, 2.6):  # play up to a time, pause, locate the square at the frame shown
                page.evaluate("document.getElementById('v').play()")
                page.wait_for_function(f"document.getElementById('v').currentTime >= {target}",
                                       timeout=BROWSER_TIMEOUT_MS, polling=20)
                page.evaluate("document.getElementById('v').pause()")
                page.wait_for_function("document.getElementById('v').paused", timeout=BROWSER_TIMEOUT_MS)
                page.wait_for_timeout(300)  # let the paused frame be painted
                t = page.evaluate("document.getElementById('v').currentTime")
                png = page.locator("#v").screenshot()
                (artifacts / f"video-{target}.png").write_bytes(png)
                shots.append((t, np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.int16)))
            error = page.evaluate("document.getElementById('v').error && document.getElementById('v').error.message")
            assert error is None
        finally:
            browser.close()
    (t1, a), (t2, b) = shots
    assert t2 > t1
    assert np.abs(a - b).mean() > 2, "the picture did not change between the two times"
    scale = a.shape[1] / W  # device pixels per video pixel
    for t, img in shots:
        x = _square_left(img)
        assert x is not None, f"no square in the frame at {t:.2f}s"
        frame = min(FRAMES - 1, int(t * FPS))
        expected = square_x(frame, W, FRAMES) * scale
        # the decoded frame may lag the reported time by a frame or two (and lossy edges blur by a pixel)
        assert abs(x - expected) <= 4 * scale + 2 * (W - SQUARE) / FRAMES * scale, (t, x, expected)
        assert abs(img[:, :].max() - 255) < 40  # white square, not a grey error frame


# ------------------------------------------------------------------------------------------- documents


def test_pdf_rendered(base, media, chromium_path, artifacts) -> None:
    url = media["doc"].url(base) + "/rendered"
    r = requests.get(url, headers={"Accept": "application/pdf"}, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/pdf")
    assert r.content == media["pdf"]  # the even-length pad byte is gone (Encapsulated Document Length)
    assert len(media["pdf"]) % 2 == 1  # (the fixture's PDF is odd, so a pad byte was stored)
    r = requests.get(url, headers={"Accept": "application/pdf", "Range": "bytes=0-7"}, timeout=60)
    assert r.status_code == 206 and r.content == b"%PDF-1.4"
    # the bulk data OHIF's dicom-pdf extension fetches (the stored value, as multipart or single part)
    meta = requests.get(media["doc"].url(base) + "/metadata", timeout=60).json()[0]
    bulk_uri = meta["00420011"]["BulkDataURI"]
    r = requests.get(bulk_uri, headers={"Accept": "application/octet-stream"}, timeout=60)
    assert r.status_code == 200 and r.content.rstrip(b"\0") == media["pdf"]
    # the first page as PNG: black rectangle on the left, text on the right, white elsewhere
    r = requests.get(url, headers={"Accept": "image/png"}, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    _check_pdf_page(np.asarray(Image.open(io.BytesIO(r.content)).convert("L")))
    # and in Chromium: an <img> of that rendered URL, screenshotted
    from helpers.browser import CHROMIUM_ARGS
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
        try:
            page = ohif_page(browser, viewport={"width": 800, "height": 600})
            page.set_content(f"<html><body style='margin:0;background:#888'>"
                             f"<img id=i src='{url}?accept=image/png'></body></html>")
            page.wait_for_function("document.getElementById('i').complete && "
                                   "document.getElementById('i').naturalWidth > 0", timeout=BROWSER_TIMEOUT_MS)
            png = page.locator("#i").screenshot()
            (artifacts / "pdf-page.png").write_bytes(png)
        finally:
            browser.close()
    _check_pdf_page(np.asarray(Image.open(io.BytesIO(png)).convert("L")))


def _check_pdf_page(img: np.ndarray) -> None:
    """The fixture page (300 x 200 pt): rectangle x 20-150, y 20-180 pt (from the bottom); text from x 160 pt."""
    h, w = img.shape
    sx, sy = w / 300, h / 200
    rect = img[int(40 * sy) : int(160 * sy), int(30 * sx) : int(140 * sx)]
    assert rect.mean() < 20, "the black rectangle is missing"
    margin = img[:, int(290 * sx) :]
    assert margin.mean() > 235, "the page is not white outside the drawing"
    text = img[int(80 * sy) : int(105 * sy), int(160 * sx) : int(290 * sx)]
    assert (text < 100).mean() > 0.03, "no text on the right of the rectangle"
    top = img[: int(15 * sy), :]
    assert top.mean() > 235


def test_sr_rendered_html_and_text(base, media, chromium_path, artifacts) -> None:
    inst = media["sr"]["test-SR.dcm"]
    url = inst.url(base) + "/rendered"
    r = requests.get(url, headers={"Accept": "text/plain"}, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    for needle in ("Diagnosis", "Diameter: 3 cm", "Sample Code 1", "CT Image Storage 1.2.3.4.5.0 frame 5, 2",
                   "Date: 2000-12-06", "Some UID: 1.2.3.4.5", "Completion: COMPLETE"):
        assert needle in r.text, needle
    r = requests.get(url, headers={"Accept": "text/html"}, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "&lt;&gt;" in r.text and "<>{}" not in r.text  # a TEXT value with markup characters, escaped
    r2 = requests.get(media["sr"]["reportsi.dcm"].url(base) + "/rendered?accept=text/html", timeout=60)
    assert r2.status_code == 200 and "Section Heading" in r2.text and "Report Text" in r2.text
    from helpers.browser import CHROMIUM_ARGS
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
        try:
            page = ohif_page(browser, viewport={"width": 900, "height": 700})
            page.goto(url, timeout=BROWSER_TIMEOUT_MS)  # a browser's own Accept (text/html first)
            text = page.inner_text("body")
            png = page.screenshot(full_page=True)
            (artifacts / "sr-report.png").write_bytes(png)
        finally:
            browser.close()
    for needle in ("Diagnosis", "Diameter: 3 cm", "Sample Code 2", "&%$§\"!()<>{}/;"):
        assert needle in text, needle
    img = np.asarray(Image.open(io.BytesIO(png)).convert("L"))
    assert (img < 100).mean() > 0.005, "the page shows no text"


def _sr_text_items(items, out: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """(concept name, text) of every TEXT content item of an SR tree, depth first."""
    for item in items:
        if item.get("ValueType") == "TEXT" and "ConceptNameCodeSequence" in item:
            out.append((str(item.ConceptNameCodeSequence[0].CodeMeaning), str(item.TextValue)))
        _sr_text_items(item.get("ContentSequence", []), out)
    return out


@contextmanager
def _ohif_viewer(srv, chromium_path: str, study: str) -> Iterator[Any]:
    """A Chromium page on OHIF's viewer for ``study`` (the browser closed on exit)."""
    with ohif_browser(chromium_path, viewport={"width": 1400, "height": 900}) as page:
        page.goto(f"http://127.0.0.1:{srv.http_port}/ohif/viewer?StudyInstanceUIDs={study}")
        yield page


def _ohif_sr_viewport(srv, inst, chromium_path, artifacts, wait_for: str, name: str) -> tuple[str, np.ndarray]:
    """The text of OHIF's SR viewport once ``wait_for`` shows, and a screenshot of it (gray)."""
    with _ohif_viewer(srv, chromium_path, inst.study) as page:
        viewport = page.locator('[data-cy="viewport-pane"]').first
        viewport.get_by_text(wait_for, exact=False).first.wait_for(state="visible", timeout=BROWSER_TIMEOUT_MS)
        text = viewport.inner_text()
        box = viewport.bounding_box()
        assert box is not None
        shot = np.asarray(Image.open(io.BytesIO(page.screenshot(clip=box))).convert("L"), dtype=np.float64)
        page.screenshot(path=str(artifacts / f"ohif-sr-{name}.png"))
    return text, shot


def _text_lines(shot: np.ndarray) -> int:
    """Lines of light text drawn on the dark viewport (runs of rows with bright glyph pixels)."""
    bright_rows = (shot > 150).sum(axis=1) > 3
    return int(np.count_nonzero(bright_rows[1:] & ~bright_rows[:-1]))


def test_sr_in_the_ohif_viewer(srv, media, chromium_path, artifacts) -> None:
    """OHIF's SR viewport (cornerstone-dicom-sr) shows the Basic Text SR as a document: its title, section headings
    and every TEXT item ("name: value", taken from the stored data set), in light text on the dark viewport."""
    sr = media["sr"]["reportsi.dcm"]
    expected = _sr_text_items(sr.ds.ContentSequence, [])
    assert expected, "reportsi.dcm has TEXT items"
    headings = [str(sr.ds.ConceptNameCodeSequence[0].CodeMeaning)] + [
        str(i.ConceptNameCodeSequence[0].CodeMeaning) for i in sr.ds.ContentSequence if i.ValueType == "CONTAINER"]
    text, shot = _ohif_sr_viewport(srv, sr, chromium_path, artifacts, headings[-1], "basic-text")
    for heading in headings:
        assert heading in text, f"{heading!r} not in the SR viewport: {text[:500]!r}"
    for name, value in expected:
        assert f"{name}: {value}" in text, f"{name}: {value} not in the SR viewport: {text[:500]!r}"
    # drawn, not only in the DOM: a line of glyphs per content item
    assert _text_lines(shot) >= len(expected) + len(headings), f"only {_text_lines(shot)} lines drawn"


def test_comprehensive_sr_with_unnamed_items_in_the_ohif_viewer(srv, media, chromium_path, artifacts) -> None:
    """pydicom's test-SR.dcm (Comprehensive SR) has IMAGE and COMPOSITE items without a Concept Name (type 1C); OHIF
    3.13 as built threw on them and showed a blank page (web/viewer.py fixes it at install). The report is shown:
    its title, named items with their values, and the unnamed references listed."""
    sr = media["sr"]["test-SR.dcm"]
    title = str(sr.ds.ConceptNameCodeSequence[0].CodeMeaning)
    text, shot = _ohif_sr_viewport(srv, sr, chromium_path, artifacts, title, "comprehensive")
    for needle in (title, "Some UID: 1.2.3.4.5", "Diameter: 3 cm", "Text Code: A mass of",
                   "[IMAGE is not supported]", "[COMPOSITE is not supported]"):
        assert needle in text, f"{needle!r} not in the SR viewport: {text[:600]!r}"
    assert _text_lines(shot) >= 8, f"only {_text_lines(shot)} lines drawn"


def test_bad_requests_are_clear(base, media) -> None:
    sr = media["sr"]["test-SR.dcm"]
    r = requests.get(sr.url(base) + "/rendered", headers={"Accept": "video/mp4"}, timeout=60)
    assert r.status_code == 406
    r = requests.get(media["doc"].url(base) + "/rendered", headers={"Accept": "video/mp4"}, timeout=60)
    assert r.status_code == 406
    r = requests.get(media["video"].url(base) + "/rendered",
                     headers={"Accept": "video/mp4", "Range": "bytes=5-2"}, timeout=60)
    assert r.status_code == 200  # an invalid range is ignored (RFC 9110 14.1.1): the whole stream
    assert time.time() > 0


def _runs(mask: np.ndarray) -> tuple[int, int]:
    """(start, end) of the longest run of True in a 1-D mask."""
    best, start = (0, 0), None
    for i, v in enumerate([*mask, False]):
        if v and start is None:
            start = i
        elif not v and start is not None:
            if i - start > best[1] - best[0]:
                best = (start, i)
            start = None
    return best


def test_pdf_in_the_ohif_viewer(srv, media, chromium_path, artifacts) -> None:
    """OHIF's dicom-pdf viewport: the page is found on screen (the white sheet) and its drawing checked by pixels."""
    doc = media["doc"]
    with _ohif_viewer(srv, chromium_path, doc.study) as page:
        obj = page.locator("object[type='application/pdf'], object").first
        obj.wait_for(state="visible", timeout=BROWSER_TIMEOUT_MS)
        deadline = time.monotonic() + BROWSER_TIMEOUT_MS / 1000
        while True:
            box = obj.bounding_box()
            assert box is not None
            shot = np.asarray(Image.open(io.BytesIO(page.screenshot(clip=box))).convert("L"), dtype=np.float64)
            h, w = shot.shape
            main = shot[:, int(0.3 * w):]  # the page, right of the PDF viewer's thumbnail strip
            white = main > 240
            c0, c1 = _runs(white.sum(axis=0) > 20)
            r0, r1 = _runs(white[:, c0:c1].sum(axis=1) > 0.3 * max(c1 - c0, 1)) if c1 > c0 else (0, 0)
            if c1 - c0 > 150 and r1 - r0 > 100 or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        page.screenshot(path=str(artifacts / "ohif-pdf-page.png"))
        assert c1 - c0 > 150 and r1 - r0 > 100, f"no PDF page on screen (white area {c1 - c0} x {r1 - r0})"
        sheet = main[r0:r1, c0:c1]
        assert abs((c1 - c0) / (r1 - r0) - 1.5) < 0.1, (c1 - c0, r1 - r0)  # the 300 x 200 pt page
        _check_pdf_page(sheet)


def test_video_in_the_ohif_viewer(srv, media, chromium_path, artifacts) -> None:
    """OHIF's dicom-video viewport (Cornerstone's VideoViewport) decodes the stream it fetches from /rendered and shows
    its first frame: the square at its frame-0 place (pixels of the viewport canvas, the video fitted into it).
    Playback itself is checked on a plain <video> above (test_chromium_plays_the_video): the viewport's own player
    could not be driven from the test (its wheel does not step video frames)."""
    from helpers.browser import CHROMIUM_ARGS
    from playwright.sync_api import sync_playwright

    video = media["video"]
    positions: list[float] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
        try:
            page = ohif_page(browser, viewport={"width": 1400, "height": 900})
            rendered: list[str] = []
            page.on("response", lambda r: rendered.append(f"{r.status} {r.url}") if "/rendered" in r.url else None)
            page.goto(f"http://127.0.0.1:{srv.http_port}/ohif/viewer?StudyInstanceUIDs={video.study}")
            canvas = page.locator("canvas.cornerstone-canvas:visible").first
            canvas.wait_for(state="visible", timeout=BROWSER_TIMEOUT_MS)

            def square() -> float | None:
                img = np.asarray(Image.open(io.BytesIO(canvas.screenshot())).convert("L"), dtype=np.int16)
                h, w = img.shape
                scale = min(w / W, h / H)
                x = _square_left(img)
                return None if x is None else (x - (w - W * scale) / 2) / scale  # in video pixels

            deadline = time.monotonic() + BROWSER_TIMEOUT_MS / 1000
            while (x := square()) is None and time.monotonic() < deadline:
                time.sleep(0.5)
            assert x is not None, "the video viewport shows no frame"
            positions.append(x)
            page.screenshot(path=str(artifacts / "ohif-video-page.png"))
        finally:
            browser.close()
    assert any(r.startswith(("200 ", "206 ")) for r in rendered), f"the viewer did not fetch /rendered: {rendered}"
    assert abs(positions[0] - square_x(0, W, FRAMES)) <= 3, f"not the first frame: square at {positions[0]:.1f}"
