"""The nodes, audit and admin pages end to end: a real `openpacs serve` with authentication on, Debian's Chromium
driven by Playwright, DCMTK storescp as the remote node, DCMTK storescu/movescu against the server.

Covers: log in; add a node in the console and C-ECHO it (success with a round-trip time); a node that is down
shows a failure; a C-MOVE to the node added through the console works without restarting the server; the audit
viewer filters and its CSV export. Screenshots go to test-artifacts/ (or $OPENPACS_TEST_ARTIFACTS).
"""

from __future__ import annotations

import re

import pytest
from helpers import dcmtk
from helpers.browser import CHROMIUM_ARGS
from helpers.dicomdata import testdata_file as _testdata_file
from helpers.ports import free_port
from helpers.server import OpenPACSServer, stop_cleanly

TIMEOUT_MS = 60000


@pytest.fixture(scope="module")
def live(require_dcmtk, tmp_path_factory):
    base = tmp_path_factory.mktemp("console-nodes")
    server = OpenPACSServer(base / "data", settings={"auth": "on"})
    server.start()
    m = re.search(r"created user 'admin' with password\s+(\S+)", server.log_text())
    assert m, server.log_tail()
    yield server, m.group(1), base
    stop_cleanly(server)


def test_nodes_echo_move_and_audit(live, chromium_path, artifacts) -> None:
    from playwright.sync_api import expect, sync_playwright

    server, password, base = live
    scp = dcmtk.StoreSCP(base / "received", aet="NODESCP").start()
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1500, "height": 900})
            page.set_default_timeout(TIMEOUT_MS)
            base_url = f"http://127.0.0.1:{server.http_port}"
            page.goto(f"{base_url}/login?next=/ui/%23/nodes")
            page.fill("#u", "admin")
            page.fill("#p", password)
            page.press("#p", "Enter")
            page.wait_for_url(re.compile(r"/ui/"))
            page.goto(f"{base_url}/ui/#/nodes")
            expect(page.get_by_role("heading", name="Remote nodes")).to_be_visible()

            def add(name: str, aet: str, port: int) -> None:
                page.click("#add-node")
                page.get_by_label("Name", exact=True).fill(name)
                page.get_by_label("AE title").fill(aet)
                page.get_by_label("Host").fill("127.0.0.1")
                page.get_by_label("Port").fill(str(port))
                page.get_by_role("button", name="Add node").last.click()
                expect(page.get_by_role("cell", name=name, exact=True)).to_be_visible()

            add("storescp", "NODESCP", scp.port)
            page.get_by_role("button", name="Echo storescp").click()
            ok = page.locator("[data-echo=ok]")
            expect(ok).to_be_visible()
            assert re.search(r"OK · \d+(\.\d+)? ms", ok.inner_text()), ok.inner_text()
            add("downnode", "DOWNNODE", free_port())
            page.get_by_role("button", name="Echo downnode").click()
            expect(page.locator("[data-echo=failed]")).to_be_visible()
            page.screenshot(path=str(artifacts / "console-nodes.png"), full_page=True)

            # C-MOVE to the node just added, with the server never restarted
            dcmtk.store(server.dicom_port, [_testdata_file("CT_small.dcm")]).check()
            import pydicom

            study = str(pydicom.dcmread(_testdata_file("CT_small.dcm")).StudyInstanceUID)
            res = dcmtk.move(server.dicom_port, "study", "STUDY", {"StudyInstanceUID": study}, "NODESCP")
            assert res.final_counts().get("completed", 0) >= 1 or scp.files(), res.output
            assert len(scp.files()) == 1, res.output

            # the audit viewer: the node changes are Security Alerts by admin
            page.goto(f"{base_url}/ui/#/audit")
            page.get_by_label("User").fill("admin")
            page.get_by_label("Event").select_option("SecurityAlert")
            page.get_by_role("button", name="Search").click()
            expect(page.get_by_text("remote node 'storescp' added").first).to_be_visible()
            rows = page.locator("table.grid tbody tr")
            for i in range(rows.count()):
                assert "SecurityAlert" in rows.nth(i).inner_text()
            page.screenshot(path=str(artifacts / "console-audit.png"), full_page=True)
            href = page.locator("#export-csv").get_attribute("href")
            assert href and "format=csv" in href and "event=SecurityAlert" in href
            r = page.request.get(base_url + href)
            assert r.status == 200 and r.headers["content-type"].startswith("text/csv")
            text = r.text()
            assert text.splitlines()[0].startswith("id,at,event") and "remote node 'storescp' added" in text
            assert all(",SecurityAlert," in line for line in text.splitlines()[1:] if line.strip())
            xml = page.request.get(base_url + page.locator("#export-xml").get_attribute("href"))
            assert xml.status == 200 and "<AuditMessages>" in xml.text()

            for pid in ("users", "departments", "jobs"):
                page.goto(f"{base_url}/ui/#/{pid}")
                page.wait_for_selector("table.grid")
                page.screenshot(path=str(artifacts / f"console-{pid}.png"), full_page=True)
            page.goto(f"{base_url}/api/docs")
            expect(page.get_by_text("/api/nodes/{name}/echo").first).to_be_visible()
            page.screenshot(path=str(artifacts / "console-api-docs.png"))
            browser.close()
    finally:
        scp.stop()


def test_node_activity_shows_last_connected_after_a_store(live, chromium_path) -> None:
    """A node that stores to us shows when it last connected and what it sent (read from node_activity)."""
    import time

    from playwright.sync_api import sync_playwright

    server, password, base = live
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
        page = browser.new_page()
        base_url = f"http://127.0.0.1:{server.http_port}"
        page.goto(f"{base_url}/login?next=/ui/%23/nodes")
        page.fill("#u", "admin")
        page.fill("#p", password)
        page.press("#p", "Enter")
        page.wait_for_url(re.compile(r"/ui/"))
        csrf = page.request.get(base_url + "/api/me").json()["csrf_token"]
        r = page.request.post(base_url + "/api/nodes", headers={"X-CSRF-Token": csrf},
                              data={"name": "sender", "aet": "SENDER1", "host": "127.0.0.1", "port": 104})
        assert r.status == 201, r.text()
        dcmtk.store(server.dicom_port, [_testdata_file("CT_small.dcm")], calling="SENDER1").check()
        deadline = time.monotonic() + 30  # activity is flushed by the server every few seconds
        act: dict = {}
        while time.monotonic() < deadline:
            act = page.request.get(base_url + "/api/nodes/sender").json()["activity"]
            if act.get("last_connected_at") and act.get("instances_received"):
                break
            time.sleep(0.5)
        assert act.get("last_connected_at") and act.get("instances_received", 0) >= 1, act
        assert act.get("bytes_received", 0) > 0 and act.get("last_address") in ("127.0.0.1", "::1", "::ffff:127.0.0.1")
        browser.close()


def test_strict_server_accepts_a_node_added_through_the_api_without_restart(require_dcmtk, tmp_path) -> None:
    """dicom_accept_unknown = false: an unknown caller is rejected; once added through the API (and after the few
    seconds of the nodes cache) the same caller is accepted by the running DICOM listener; removed, rejected again."""
    import time

    import requests

    server = OpenPACSServer(tmp_path / "data", settings={"auth": "on", "dicom_accept_unknown": False})
    server.start()
    try:
        m = re.search(r"created user 'admin' with password\s+(\S+)", server.log_text())
        assert m
        base_url = f"http://127.0.0.1:{server.http_port}"
        s = requests.Session()
        s.get(base_url + "/login")
        form = s.get(base_url + "/login").text
        csrf_form = re.search(r'name="csrf_token" value="([^"]*)"', form)
        data = {"username": "admin", "password": m.group(1), "next": "/ui/"}
        if csrf_form:
            data["csrf_token"] = csrf_form.group(1)
        assert s.post(base_url + "/login", data=data, allow_redirects=False).status_code in (302, 303)
        csrf = s.get(base_url + "/api/me").json()["csrf_token"]

        def echo() -> int:
            return dcmtk.run("echoscu", "-to", "20", "-ta", "20", "-aet", "LATECOMER", "-aec", "OPENPACS",
                             "127.0.0.1", str(server.dicom_port)).returncode

        def until(expected_ok: bool) -> bool:
            deadline = time.monotonic() + 30  # the nodes cache of the DICOM process (a few seconds)
            while time.monotonic() < deadline:
                if (echo() == 0) == expected_ok:
                    return True
                time.sleep(0.5)
            return False

        assert echo() != 0  # unknown caller: rejected
        r = s.post(base_url + "/api/nodes", headers={"X-CSRF-Token": csrf},
                   json={"name": "late", "aet": "LATECOMER", "host": "127.0.0.1", "port": 104, "allow": ["echo"]})
        assert r.status_code == 201, r.text
        assert until(True), server.log_tail()
        assert s.delete(base_url + "/api/nodes/late", headers={"X-CSRF-Token": csrf}).status_code == 204
        assert until(False), server.log_tail()
    finally:
        stop_cleanly(server)
