"""The dashboard and the System page in Chromium (Playwright, Debian's /usr/bin/chromium) on a real server with auth:
after stores by DCMTK storescu, queries by findscu and a WADO retrieval, the cards show the counts and each chart's
canvas holds drawn data above its baseline (pixels read back from the canvas, not the DOM); the System page shows
the version, the redacted configuration and live log lines. Screenshots go to test-artifacts/."""

from __future__ import annotations

import re
import time

import requests
from helpers import dcmtk
from helpers.browser import CHROMIUM_ARGS
from helpers.dicomdata import small_image, write_part10
from helpers.server import OpenPACSServer, stop_cleanly
from pydicom.uid import generate_uid

# Colored pixels in the top 85 % of the plot area (above the zero baseline): drawn only when a bucket is > 0.
PIXELS_ABOVE_BASELINE = """(canvas) => {
  const g = canvas.getContext("2d"); const w = canvas.width, hgt = canvas.height;
  const dpr = window.devicePixelRatio || 1;
  const top = Math.round(8 * dpr), bottom = Math.round(hgt - 22 * dpr - 3 * dpr), left = Math.round(46 * dpr);
  const data = g.getImageData(left, top, w - left, Math.max(1, bottom - top)).data;
  let n = 0;
  for (let i = 0; i < data.length; i += 4) {
    const [r, gr, b, a] = [data[i], data[i + 1], data[i + 2], data[i + 3]];
    if (a > 40 && (Math.max(r, gr, b) - Math.min(r, gr, b)) > 40) n++;  // a saturated color, not grid grey
  }
  return n;
}"""


def test_dashboard_charts_hold_data_and_system_page(require_dcmtk, chromium_path, artifacts, tmp_path) -> None:
    from playwright.sync_api import expect, sync_playwright

    server = OpenPACSServer(tmp_path / "data", settings={"auth": "on", "metrics_token": "dash-metrics-secret"})
    server.start()
    try:
        m = re.search(r"created user 'admin' with password\s+(\S+)", server.log_text())
        assert m, server.log_tail()
        files = []
        study, series = generate_uid(), generate_uid()
        for i in range(6):
            ds = small_image(fill=i)
            ds.PatientID, ds.PatientName, ds.Modality = "DASH1", "Dash^Board", "CT"
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.InstanceNumber = study, series, i + 1
            files.append(write_part10(ds, tmp_path / f"d{i}.dcm"))
        dcmtk.store(server.dicom_port, files).check()
        for _ in range(3):
            dcmtk.find(server.dicom_port, "study", "STUDY", {"PatientID": "DASH1", "StudyInstanceUID": ""},
                       tmp_path / "find")
        got = dcmtk.get(server.dicom_port, "study", "STUDY", {"StudyInstanceUID": study}, tmp_path / "get")
        assert len(got.files) == 6
        base = f"http://127.0.0.1:{server.http_port}"

        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.set_default_timeout(60000)
            page.goto(f"{base}/login?next=/ui/%23/dashboard")
            page.fill("#u", "admin")
            page.fill("#p", m.group(1))
            page.press("#p", "Enter")
            page.wait_for_url(re.compile(r"/ui/"))
            deadline = time.monotonic() + 30  # the processes add their counts to the index every few seconds
            while True:
                s = page.request.get(f"{base}/api/stats").json()
                if s["last_24h"]["store"] >= 6 and s["last_24h"]["query"] >= 3 and s["last_24h"]["retrieve"] >= 6:
                    break
                assert time.monotonic() < deadline, s
                page.wait_for_timeout(500)
            page.goto(f"{base}/ui/#/dashboard")
            page.reload()
            dash = page.locator("#dashboard")
            expect(dash).to_be_visible()
            cards = dash.locator(".cards")
            expect(cards.locator(".card", has_text="Instances").locator(".v")).to_have_text("6")
            expect(cards.locator(".card", has_text="Studies").locator(".v")).to_have_text("1")
            expect(cards.locator(".card", has_text="Storage free")).to_contain_text("full in")
            canvases = dash.locator("canvas.chart")
            expect(canvases).to_have_count(3)
            for i in range(3):
                assert canvases.nth(i).evaluate(PIXELS_ABOVE_BASELINE) > 20, f"chart {i} draws no data"
            expect(canvases.nth(0)).to_have_attribute("aria-label", re.compile(r"instances stored: peak [1-9]"))
            page.screenshot(path=str(artifacts / "console-dashboard.png"), full_page=True)

            page.locator("#nav").get_by_role("link", name="System", exact=True).click()
            expect(page.locator("#main h1")).to_have_text("System")
            expect(page.locator("dl.kv")).to_contain_text("SQLite")
            config = page.locator("table.grid", has_text="metrics_token")
            expect(config.locator("tr", has_text="metrics_token")).to_contain_text("***")
            assert "dash-metrics-secret" not in page.content()
            requests.get(f"{base}/dicom-web/studies", timeout=30)  # a 401 from outside: logged as a warning
            expect(page.locator("#server-log")).not_to_be_empty(timeout=30000)
            page.screenshot(path=str(artifacts / "console-system.png"), full_page=True)
            browser.close()
    finally:
        stop_cleanly(server)


def test_empty_dashboard_draws_no_data(chromium_path, tmp_path) -> None:
    """An empty archive: the same pixel check finds nothing above the baseline (so it can fail)."""
    from playwright.sync_api import expect, sync_playwright

    server = OpenPACSServer(tmp_path / "data")  # loopback, no auth: development mode
    server.start()
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"http://127.0.0.1:{server.http_port}/ui/#/dashboard")
            canvases = page.locator("#dashboard canvas.chart")
            expect(canvases).to_have_count(3)
            for i in range(3):
                assert canvases.nth(i).evaluate(PIXELS_ABOVE_BASELINE) == 0
            expect(page.locator(".card", has_text="Instances").locator(".v")).to_have_text("0")
            browser.close()
    finally:
        stop_cleanly(server)
