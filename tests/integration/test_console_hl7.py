"""The HL7 console page end to end: a real `openpacs serve` (authentication on), messages sent with python-hl7's
MLLP client, Debian's Chromium driven by Playwright: the log lists them, filters by result and control ID, and a
message opens with its raw segments and the ACK sent."""

from __future__ import annotations

import re

import hl7.client
from helpers.browser import CHROMIUM_ARGS
from helpers.server import OpenPACSServer, stop_cleanly


def test_message_log_page(tmp_path, chromium_path) -> None:
    from playwright.sync_api import expect, sync_playwright

    server = OpenPACSServer(tmp_path / "data", settings={"auth": "on"})
    server.start()
    try:
        password = re.search(r"created user 'admin' with password\s+(\S+)", server.log_text()).group(1)
        with hl7.client.MLLPClient("127.0.0.1", server.hl7_port) as c:
            for cid, body in (("UI-1", "PID|1||UI100^^^HOSP||Console^Visible||19800101|F"),
                              ("UI-2", "PID|1||||No^Identifier")):
                c.send_message(f"MSH|^~\\&|RIS|HOSP|PACS|RAD|2025||ADT^A08|{cid}|P|2.5\rEVN|A08\r{body}\r")
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.set_default_timeout(60000)
            base = f"http://127.0.0.1:{server.http_port}"
            page.goto(f"{base}/login?next=/ui/%23/hl7")
            page.fill("#u", "admin")
            page.fill("#p", password)
            page.press("#p", "Enter")
            page.wait_for_url(re.compile(r"/ui/"))
            page.goto(f"{base}/ui/#/hl7")
            expect(page.get_by_role("heading", name="HL7 messages")).to_be_visible()
            expect(page.get_by_role("cell", name="UI-1", exact=True)).to_be_visible()
            expect(page.get_by_role("cell", name="UI-2", exact=True)).to_be_visible()
            page.locator("#hl7-filters select[name=result]").select_option("AE")
            page.locator("#hl7-filters").get_by_role("button", name="Search").click()
            expect(page.get_by_role("cell", name="UI-1", exact=True)).to_have_count(0)
            row = page.get_by_role("row").filter(has=page.get_by_role("cell", name="UI-2", exact=True))
            expect(row).to_contain_text("PID^1^3")
            row.get_by_role("link").click()
            expect(page.get_by_role("heading", name=re.compile(r"HL7 message #\d+"))).to_be_visible()
            expect(page.locator("#hl7-raw")).to_contain_text("PID|1||||No^Identifier")
            expect(page.locator("#hl7-ack")).to_contain_text("MSA|AE|UI-2")
            browser.close()
    finally:
        stop_cleanly(server)
