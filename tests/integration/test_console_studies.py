"""The studies pages end to end: a real `openpacs serve` with authentication on, Debian's Chromium via Playwright.
Log in, upload a file through the file input (STOW-RS) and see it appear, search, open detail and tags, download
the zip (DICOMDIR read by pydicom), delete as admin; a viewer sees no delete button and gets 403 from the API."""

from __future__ import annotations

import io
import re
import sys
import zipfile
from pathlib import Path

import httpx
import pytest
from helpers.browser import CHROMIUM_ARGS
from helpers.server import OpenPACSServer, stop_cleanly
from pydicom import dcmread

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit" / "web"))
from test_api_studies import part10  # noqa: E402

ART = Path(__file__).resolve().parents[2] / "test-artifacts"


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    base = tmp_path_factory.mktemp("console-studies")
    server = OpenPACSServer(base / "data", settings={"auth": "on"})
    server.start()
    m = re.search(r"created user 'admin' with password\s+(\S+)", server.log_text())
    assert m, server.log_tail()
    yield server, m.group(1), base
    stop_cleanly(server)


def login(page, url: str, user: str, pw: str) -> None:
    page.goto(f"{url}/login?next=/ui/%23/studies")
    page.fill("#u", user)
    page.fill("#p", pw)
    page.press("#p", "Enter")
    page.wait_for_selector("#who span")


def test_studies_console(live) -> None:
    from playwright.sync_api import expect, sync_playwright

    server, password, base = live
    ART.mkdir(exist_ok=True)
    url = f"http://127.0.0.1:{server.http_port}"
    f = base / "upload.dcm"
    f.write_bytes(part10("1.2.826.0.77.1", "1.2.826.0.77.1.1", "UPLOAD^PATIENT", "UP1", "20240301"))
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.set_default_timeout(60000)
        login(page, url, "admin", password)
        page.goto(f"{url}/ui/#/studies")
        page.set_input_files("#upload-files", str(f))
        expect(page.get_by_role("link", name="UPLOAD, PATIENT")).to_be_visible()
        page.fill("input[name=patient_name]", "upload*")
        page.get_by_role("button", name="Search").click()  # not the header's "Sign out" submit
        expect(page.get_by_role("link", name="UPLOAD, PATIENT")).to_be_visible()
        page.screenshot(path=str(ART / "console-studies-list.png"), full_page=True)
        page.get_by_role("link", name="UPLOAD, PATIENT").click()
        expect(page.locator(".thumbs figure")).to_have_count(1)
        page.click(".thumbs button")
        page.click("text=#1 tags")
        expect(page.locator(".tags")).to_contain_text("UPLOAD^PATIENT")
        page.screenshot(path=str(ART / "console-study-detail.png"), full_page=True)
        cookies = {c["name"]: c["value"] for c in page.context.cookies()}
        z = httpx.get(f"{url}/api/studies/1.2.826.0.77.1/download", cookies=cookies)
        assert z.status_code == 200
        zf = zipfile.ZipFile(io.BytesIO(z.content))
        dd = dcmread(io.BytesIO(zf.read("DICOMDIR")))
        assert [r.DirectoryRecordType for r in dd.DirectoryRecordSequence].count("IMAGE") == 1
        csrf = page.evaluate("OP.state.me.csrf_token")
        r = httpx.post(f"{url}/api/users", json={"username": "v1", "role": "viewer"}, cookies=cookies,
                       headers={"X-CSRF-Token": csrf})
        assert r.status_code == 201, r.text
        vpw = r.json()["password"]
        page.once("dialog", lambda d: d.accept())
        page.click("#delete-study")
        page.get_by_role("button", name="Delete").last.click()
        expect(page.get_by_role("heading", name="Studies")).to_be_visible()
        assert httpx.get(f"{url}/api/studies/1.2.826.0.77.1", cookies=cookies).status_code == 404
        # a viewer: no delete button, and the API refuses
        assert httpx.post(f"{url}/dicom-web/studies", cookies=cookies, headers={
            "X-CSRF-Token": csrf, "Content-Type": 'multipart/related; type="application/dicom"; boundary=b'},
            content=b"--b\r\nContent-Type: application/dicom\r\n\r\n" + f.read_bytes() + b"\r\n--b--\r\n").status_code == 200
        vpage = browser.new_context().new_page()
        login(vpage, url, "v1", vpw)
        vpage.goto(f"{url}/ui/#/study/1.2.826.0.77.1")
        expect(vpage.get_by_role("link", name="Open in viewer")).to_be_visible()
        assert vpage.locator("#delete-study").count() == 0
        vpage.screenshot(path=str(ART / "console-study-viewer.png"), full_page=True)
        vc = {c["name"]: c["value"] for c in vpage.context.cookies()}
        vcsrf = vpage.evaluate("OP.state.me.csrf_token")
        assert httpx.delete(f"{url}/api/studies/1.2.826.0.77.1", cookies=vc,
                            headers={"X-CSRF-Token": vcsrf}).status_code == 403
        browser.close()


def test_hostile_dicom_values_are_shown_as_text(live) -> None:
    """Every DICOM value is escaped: markup in a patient name and a description shows as text and never runs."""
    from playwright.sync_api import expect, sync_playwright

    server, password, base = live
    url = f"http://127.0.0.1:{server.http_port}"
    name = "<i>EVIL</i>^<u>X</u>"  # no '=': in a PN it separates the ideographic and phonetic groups
    desc = "<script>window.__pwned=2</script>"
    body = part10("1.2.826.0.77.9", "1.2.826.0.77.9.1", name, "XSS1", "20240302", desc=desc)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.set_default_timeout(60000)
        login(page, url, "admin", password)
        cookies = {c["name"]: c["value"] for c in page.context.cookies()}
        csrf = page.evaluate("OP.state.me.csrf_token")
        r = httpx.post(f"{url}/dicom-web/studies", cookies=cookies, headers={
            "X-CSRF-Token": csrf, "Content-Type": 'multipart/related; type="application/dicom"; boundary=b'},
            content=b"--b\r\nContent-Type: application/dicom\r\n\r\n" + body + b"\r\n--b--\r\n")
        assert r.status_code == 200, r.text
        page.goto(f"{url}/ui/#/studies?patient_id=XSS1")
        expect(page.locator("table")).to_contain_text("<i>EVIL</i>")
        page.goto(f"{url}/ui/#/study/1.2.826.0.77.9")
        expect(page.get_by_role("heading", level=1)).to_contain_text("<script>window.__pwned=2</script>")
        expect(page.get_by_role("heading", level=1)).to_contain_text("<i>EVIL</i>")
        assert page.locator("main i, main u, main script").count() == 0
        assert page.evaluate("window.__pwned") is None
        browser.close()
