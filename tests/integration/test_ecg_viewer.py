"""12-lead ECG end to end: a real `openpacs serve` (development mode: loopback, no authentication), pydicom's
waveform_ecg.dcm stored with DCMTK storescu, retrieved byte-exact with DCMTK getscu and dicomweb-client, rendered on ECG
paper by WADO-RS (PNG and SVG), and shown in the console's study page, where headless Chromium's screenshot must show
twelve lead traces at the rows the paper layout puts them (25 mm/s, 10 mm/mV, 4 px/mm) and 10 s of trace 250 mm long.
Bad requests (a multiplex group that does not exist, a media type a waveform is not drawn in) get clean 4xx."""

from __future__ import annotations

import io
import xml.etree.ElementTree as ET
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from helpers import dcmtk
from helpers.browser import CHROMIUM_ARGS
from helpers.dicomdata import dataset_bytes, split_meta
from helpers.server import OpenPACSServer, stop_cleanly
from PIL import Image
from pydicom.data import get_testdata_file

ECG_FILE = Path(get_testdata_file("waveform_ecg.dcm"))
PPM = 4.0  # px per mm, the default
# the paper layout (openpacs.dicom.waveform's docstring), restated here: header 24 mm, 25 mm rows, traces from 22 mm
BASELINES = [(24 + 25 * (i + 0.5)) * PPM for i in range(12)]
X0 = 22 * PPM
X1 = X0 + 10.0 * 25 * PPM  # 10 s at 25 mm/s
WIDTH, HEIGHT = int(X1 + 4 * PPM), int((24 + 12 * 25 + 4) * PPM)


@pytest.fixture(scope="module")
def live(require_dcmtk, tmp_path_factory):
    base = tmp_path_factory.mktemp("ecg-viewer")
    server = OpenPACSServer(base / "data")
    server.start()
    res = dcmtk.store(server.dicom_port, [ECG_FILE])
    assert res.returncode == 0, res.output
    assert dcmtk.parse_store_log(res.output) == {str(ECG_FILE): "Success"}, res.output
    yield server, base
    stop_cleanly(server)


@pytest.fixture(scope="module")
def wire(require_dcmtk, tmp_path_factory) -> bytes:
    """What storescu puts on the wire for the file (it re-encodes the data set: sequence lengths), captured by a
    bit-preserving DCMTK storescp: the reference a byte-exact retrieve is compared with."""
    scp = dcmtk.StoreSCP(tmp_path_factory.mktemp("ecg-reference") / "rx", aet="REFSCP").start()
    try:
        res = dcmtk.store(scp.port, [ECG_FILE], aet="REFSCP")
        assert dcmtk.parse_store_log(res.output) == {str(ECG_FILE): "Success"}, res.output
        (received,) = scp.files()
        return dataset_bytes(received)
    finally:
        scp.stop()


@pytest.fixture(scope="module")
def uids() -> tuple[str, str, str]:
    ds = pydicom.dcmread(ECG_FILE, stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)


def _url(server: OpenPACSServer) -> str:
    return f"http://127.0.0.1:{server.http_port}"


def _dark(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB")).astype(int).max(axis=2) < 60


def trace_rows(img: Image.Image) -> list[float]:
    """Centres of the pixel-row clusters that the trace ink covers for at least a fifth of the trace width: each
    lead's baseline (the trace runs along it between beats)."""
    dark = _dark(img)[:, int(X0) + 1:int(X1) - 1]
    share = dark.sum(axis=1) / dark.shape[1]
    idx = np.flatnonzero(share > 0.2)
    if not len(idx):
        return []
    return [float(g.mean()) for g in np.split(idx, np.flatnonzero(np.diff(idx) > 1) + 1)]


def check_paper(img: Image.Image) -> None:
    assert img.size == (WIDTH, HEIGHT)
    rows = trace_rows(img)
    assert len(rows) == 12, rows
    for i, (got, want) in enumerate(zip(rows, BASELINES, strict=True)):
        assert abs(got - want) <= 1.5 * PPM, f"lead {i + 1}: trace row at y={got:.1f}, expected {want:.1f}"
    dark = _dark(img)
    for want in BASELINES:  # every trace spans 10 s: from the trace origin to 250 mm right of it
        cols = np.flatnonzero(dark[int(want - 12.5 * PPM):int(want + 12.5 * PPM), int(X0) - 1:].any(axis=0))
        first, last = cols[0] + int(X0) - 1, cols[-1] + int(X0) - 1
        assert abs(first - X0) <= 2 and abs(last - X1) <= 2, (first, last, X0, X1)


def test_dicom_round_trip_byte_exact(live, uids, wire, tmp_path) -> None:
    server, _ = live
    study, series, sop = uids
    got = dcmtk.get(server.dicom_port, "study", "IMAGE",
                    {"StudyInstanceUID": study, "SeriesInstanceUID": series, "SOPInstanceUID": sop}, tmp_path / "get")
    assert len(got.files) == 1, got.output[-3000:]
    assert dataset_bytes(got.files[0]) == wire

    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(url=f"{_url(server)}/dicom-web")
    ds = client.retrieve_instance(study, series, sop, media_types=(("application/dicom", "*"),))
    original = pydicom.dcmread(ECG_FILE)
    assert ds == original
    assert ds.WaveformSequence[0].WaveformData == original.WaveformSequence[0].WaveformData
    raw = httpx.get(f"{_url(server)}/dicom-web/studies/{study}/series/{series}/instances/{sop}",
                    headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}, timeout=60)
    assert raw.status_code == 200
    from openpacs.dicomweb.multipart import MultipartParser, parse_media_type

    parser = MultipartParser(parse_media_type(raw.headers["content-type"])[1]["boundary"])
    parts = parser.feed(raw.content)
    parser.close()
    assert len(parts) == 1 and split_meta(parts[0].content)[1] == wire
    # the rendered waveform through the same client
    png = client.retrieve_instance_rendered(study, series, sop, media_types=("image/png",))
    check_paper(Image.open(io.BytesIO(png)))


def test_rendered_png_svg_and_bad_requests(live, uids) -> None:
    server, _ = live
    study, series, sop = uids
    inst = f"{_url(server)}/dicom-web/studies/{study}/series/{series}/instances/{sop}"
    r = httpx.get(f"{inst}/rendered", headers={"Accept": "image/png"}, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    check_paper(Image.open(io.BytesIO(r.content)))
    r = httpx.get(f"{inst}/rendered", headers={"Accept": "image/svg+xml"}, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("image/svg+xml")
    root = ET.fromstring(r.content)
    ns = "{http://www.w3.org/2000/svg}"
    leads = root.findall(f"{ns}g[@class='lead']")
    assert len(leads) == 12 and leads[1].get("data-lead") == "Lead II"
    assert [float(g.get("data-baseline")) for g in leads] == pytest.approx(BASELINES)
    header = " ".join(t.text or "" for t in root.findall(f"{ns}text[@class='header']"))
    assert "QT 368 ms" in header and "PR 161 ms" in header and "10 s, 1000 Hz" in header
    # frame 2 = the second multiplex group (median beat, 1.2 s); px_per_mm scales deterministically
    r = httpx.get(f"{inst}/frames/2/rendered?px_per_mm=2", headers={"Accept": "image/png"}, timeout=60)
    assert r.status_code == 200
    assert Image.open(io.BytesIO(r.content)).size == (200 * 2, int((24 + 12 * 25 + 4) * 2))
    # bad input: clean 4xx with a reason
    for path, accept, status in [
        ("/frames/3/rendered", "image/png", 404),  # two multiplex groups only
        ("/frames/0/rendered", "image/png", 400),
        ("/frames/1,2/rendered", "image/png", 406),
        ("/rendered", "image/jpeg", 406),
        ("/rendered", "application/pdf", 406),
        ("/rendered?px_per_mm=500", "image/png", 400),
        ("/rendered?viewport=abc", "image/png", 400),
    ]:
        r = httpx.get(inst + path, headers={"Accept": accept}, timeout=60)
        assert r.status_code == status, (path, accept, r.status_code, r.text)
        assert r.text.strip(), path
    missing = f"{_url(server)}/dicom-web/studies/{study}/series/{series}/instances/1.2.3.4/rendered"
    assert httpx.get(missing, headers={"Accept": "image/png"}, timeout=60).status_code == 404


def test_console_api_summary(live, uids) -> None:
    server, _ = live
    study, series, sop = uids
    r = httpx.get(f"{_url(server)}/api/studies/{study}", timeout=60)  # development mode: no credentials
    assert r.status_code == 200, r.text
    (se,) = r.json()["series"]
    (w,) = se["waveforms"]
    assert w["uid"] == sop and w["rendered"] == f"/dicom-web/studies/{study}/series/{series}/instances/{sop}/rendered"
    s = w["summary"]
    assert s["text"] == "12-lead ECG, 10 s, 1000 Hz"
    assert [g["label"] for g in s["groups"]] == ["RHYTHM", "MEDIAN BEAT"]
    assert {m["short"]: m["value"] for m in s["measurements"]}["QT"] == 368
    assert s["statements"] == ["RITMO SINUSALE", "ECG NORMALE"]


def test_console_study_page_shows_the_ecg(live, uids, chromium_path, artifacts) -> None:
    from playwright.sync_api import expect, sync_playwright

    server, _ = live
    study, _, _ = uids
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1800, "height": 1000}, device_scale_factor=1)
        page.set_default_timeout(90000)
        page.goto(f"{_url(server)}/ui/#/study/{study}")
        expect(page.locator("#waveforms figcaption")).to_contain_text("12-lead ECG, 10 s, 1000 Hz")
        expect(page.locator("#waveforms figcaption")).to_contain_text("QT 368 ms")
        img = page.locator("#waveforms img.ecg")
        page.wait_for_function("() => { const i = document.querySelector('#waveforms img.ecg');"
                               " return i && i.complete && i.naturalWidth > 0; }")
        box = img.evaluate("i => { const r = i.getBoundingClientRect();"
                           " return {x: r.left + scrollX, y: r.top + scrollY, width: r.width, height: r.height}; }")
        assert (box["width"], box["height"]) == (WIDTH, HEIGHT), box  # drawn 1:1, not scaled
        img_src = img.get_attribute("src")
        full = page.screenshot(path=str(artifacts / "console-ecg-study.png"), full_page=True)
        browser.close()
    # the image's pixels in the page's screenshot (Chromium snaps an unscaled image to whole device pixels)
    x, y = round(box["x"]), round(box["y"])
    paper = Image.open(io.BytesIO(full)).convert("RGB").crop((x, y, x + WIDTH, y + HEIGHT))
    paper.save(artifacts / "console-ecg-paper.png")
    check_paper(paper)
    # and it is the served PNG, pixel for pixel (the crop is where the image is, the browser did not rescale it)
    served = httpx.get(f"{_url(server)}{img_src}", timeout=60)
    same = (np.asarray(paper) == np.asarray(Image.open(io.BytesIO(served.content)).convert("RGB"))).all(axis=2)
    assert same.mean() > 0.99, same.mean()
