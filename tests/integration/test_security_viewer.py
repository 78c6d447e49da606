"""The OHIF viewer behind authentication, in headless Chromium: an anonymous visit lands on the login page, signing
in returns to the viewer, which loads the study through DICOMweb with the session cookie and renders it."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import requests

from tests.helpers.browser import ohif_page
from tests.helpers.server import OpenPACSServer, openpacs_command


@pytest.fixture(scope="module")
def chromium() -> str:
    path = os.environ.get("OPENPACS_TEST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).exists():
        pytest.skip("Chromium not found")
    pytest.importorskip("playwright.sync_api")
    from openpacs.web.viewer import default_ohif_dir, install_ohif

    try:
        install_ohif(Path(os.environ.get("OPENPACS_OHIF_DIR") or default_ohif_dir()))
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"OHIF not installable here: {exc}")
    return path


def test_viewer_login_then_render(chromium: str, tmp_path: Path) -> None:
    from PIL import Image
    from playwright.sync_api import sync_playwright
    from pydicom.data import get_testdata_file

    server = OpenPACSServer(tmp_path / "data", settings={"auth": "on"})

    def cli(*args: str, stdin: str | None = None) -> str:
        r = subprocess.run([*openpacs_command(), *args, "--data-dir", str(server.data_dir)], capture_output=True,
                           text=True, input=stdin, timeout=300)
        assert r.returncode == 0, r.stderr
        return r.stdout

    cli("user", "add", "reader", "--role", "radiologist", "--password-stdin", stdin="reader-password-1\n")
    token = cli("user", "token", "reader").strip().splitlines()[-1]
    server.start()
    try:
        base = f"http://127.0.0.1:{server.http_port}"
        data = Path(get_testdata_file("CT_small.dcm")).read_bytes()
        b = uuid.uuid4().hex
        r = requests.post(f"{base}/dicom-web/studies", timeout=60, headers={
            "Authorization": f"Bearer {token}",
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={b}'},
            data=f"--{b}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data + f"\r\n--{b}--\r\n".encode())
        assert r.status_code == 200, r.text
        import pydicom

        uid = pydicom.dcmread(io.BytesIO(data)).StudyInstanceUID
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--use-gl=swiftshader",
                                                                          "--enable-unsafe-swiftshader"])
            page = ohif_page(browser, viewport={"width": 1280, "height": 900})
            denied: list[str] = []
            page.on("response", lambda resp: denied.append(resp.url) if resp.status in (401, 403) else None)
            page.goto(f"{base}/ohif/viewer?StudyInstanceUIDs={uid}", wait_until="domcontentloaded")
            assert "/login" in page.url
            page.fill("#u", "reader")
            page.fill("#p", "reader-password-1")
            page.click("button[type=submit]")
            page.wait_for_url(re.compile(r".*/ohif/viewer.*"), timeout=60000)
            canvas = page.locator("canvas.cornerstone-canvas").first
            canvas.wait_for(timeout=120000)
            deadline = time.time() + 120
            std = 0.0
            while time.time() < deadline:
                png = canvas.screenshot()
                std = float(np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float64).std())
                if std > 15:
                    break
                time.sleep(1)
            browser.close()
        assert std > 15, "the viewer did not render the study after login"
        assert not [u for u in denied if "/dicom-web/" in u], denied
    finally:
        server.stop()
