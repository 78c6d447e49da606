"""The Worklist console page end to end: a real `openpacs serve` (authentication on), an order sent with python-hl7's
MLLP client, Chromium driven by Playwright: the order is listed, an entry scheduled with the form shows up and is on
the DICOM worklist (DCMTK findscu -W), cancelling it takes it off both."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import hl7.client
import pytest
from helpers import dcmtk
from helpers.server import OpenPACSServer, stop_cleanly

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def chromium_path() -> str:
    path = os.environ.get("OPENPACS_TEST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).exists():
        if os.environ.get("OPENPACS_TEST_REQUIRE_ALL", "") not in ("", "0", "false"):
            pytest.fail(f"Chromium not found at {path}")
        pytest.skip(f"Chromium not found at {path}")
    return path

ORM = ("MSH|^~\\&|RIS|HOSP|OPENPACS|RAD|2025||ORM^O01|UIW-1|P|2.3.1\rPID|1||UIW1^^^HOSP||Order^Olivia||19800101|F\r"
       "ORC|NW|UIWO1|UIWF1||||^^^20250310090000\r"
       "OBR|1|UIWO1|UIWF1|CTHEAD^CT head^LOCAL||||||||||||||UIWACC1|RP1|SPS1|CT01|||CT\r")


def mwl_accessions(server: OpenPACSServer) -> set[str]:
    res = dcmtk.run("findscu", "-v", "-W", "-to", "20", "-ta", "20", "-k", "AccessionNumber", "-k", "PatientName",
                    *dcmtk.peer_args(server.dicom_port, "OPENPACS")).check()
    return {a.strip() for a in re.findall(r"\(0008,0050\) SH \[([^\]]*)\]", res.output)}


def test_worklist_page(tmp_path, chromium_path, require_dcmtk) -> None:
    from playwright.sync_api import expect, sync_playwright

    server = OpenPACSServer(tmp_path / "data", settings={"auth": "on"})
    server.start()
    try:
        password = re.search(r"created user 'admin' with password\s+(\S+)", server.log_text()).group(1)
        with hl7.client.MLLPClient("127.0.0.1", server.hl7_port) as c:
            c.send_message(ORM)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.set_default_timeout(60000)
            base = f"http://127.0.0.1:{server.http_port}"
            page.goto(f"{base}/login?next=/ui/%23/worklist")
            page.fill("#u", "admin")
            page.fill("#p", password)
            page.press("#p", "Enter")
            page.wait_for_url(re.compile(r"/ui/"))
            page.goto(f"{base}/ui/#/worklist")
            expect(page.get_by_role("heading", name="Worklist")).to_be_visible()
            expect(page.get_by_role("cell", name="UIWACC1", exact=True)).to_be_visible()
            page.get_by_role("button", name="Schedule a procedure").click()
            form = page.locator("#worklist-form")
            form.locator("[name=PatientID]").fill("UIW2")
            form.locator("[name=PatientName]").fill("Hand^Harriet")
            form.locator("[name=AccessionNumber]").fill("UIWACC2")
            form.locator("[name=Modality]").fill("mr")
            form.locator("[name=ScheduledStationAETitle]").fill("MR01")
            form.locator("[name=ScheduledProcedureStepStartDate]").fill("2025-03-11")
            form.locator("[name=ScheduledProcedureStepStartTime]").fill("14:30")
            form.get_by_role("button", name="Schedule").click()
            row = page.get_by_role("row").filter(has=page.get_by_role("cell", name="UIWACC2", exact=True))
            expect(row).to_contain_text("2025-03-11 14:30")
            expect(row).to_contain_text("MR01")
            expect(row).to_contain_text("Hand, Harriet")
            assert mwl_accessions(server) == {"UIWACC1", "UIWACC2"}
            # a duplicate accession is refused with the reason
            page.get_by_role("button", name="Schedule a procedure").click()
            form.locator("[name=PatientID]").fill("UIW2")
            form.locator("[name=AccessionNumber]").fill("UIWACC2")
            form.locator("[name=Modality]").fill("MR")
            form.locator("[name=ScheduledProcedureStepStartDate]").fill("2025-03-11")
            form.get_by_role("button", name="Schedule").click()
            expect(form.locator(".err")).to_contain_text("already on the worklist")
            page.once("dialog", lambda d: d.accept())
            row.get_by_role("button", name="Cancel UIWACC2").click()
            expect(row).to_have_count(0)
            assert mwl_accessions(server) == {"UIWACC1"}
            page.locator("#worklist-filters select[name=status]").select_option("CANCELLED")
            page.locator("#worklist-filters").get_by_role("button", name="Search").click()
            expect(row).to_contain_text("CANCELLED")  # its step ID is the accession number: two cells
            expect(page.get_by_role("cell", name="UIWACC1", exact=True)).to_have_count(0)
            browser.close()
    finally:
        stop_cleanly(server)


def test_qc_page(tmp_path, chromium_path, require_dcmtk) -> None:
    from helpers.dicomdata import small_image, write_part10
    from playwright.sync_api import expect, sync_playwright
    from pydicom.uid import generate_uid

    server = OpenPACSServer(tmp_path / "data", settings={"auth": "on"})
    server.start()
    try:
        password = re.search(r"created user 'admin' with password\s+(\S+)", server.log_text()).group(1)
        with hl7.client.MLLPClient("127.0.0.1", server.hl7_port) as c:
            c.send_message(ORM)
        ds = small_image(fill=1)
        ds.PatientID, ds.PatientName, ds.AccessionNumber, ds.PatientBirthDate = "UIW1", "Other^Olga", "UIWACC1", ""
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
        dcmtk.store(server.dicom_port, [write_part10(ds, tmp_path / "qc.dcm")]).check()
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.set_default_timeout(60000)
            base = f"http://127.0.0.1:{server.http_port}"
            page.goto(f"{base}/login?next=/ui/%23/qc")
            page.fill("#u", "admin")
            page.fill("#p", password)
            page.press("#p", "Enter")
            page.wait_for_url(re.compile(r"/ui/"))
            for _ in range(50):  # the study is reconciled in the background, just after it is stored
                page.goto(f"{base}/ui/#/qc")
                page.reload()
                if page.get_by_role("cell", name="UIWACC1", exact=True).count():
                    break
                page.wait_for_timeout(200)
            row = page.get_by_role("row").filter(has=page.get_by_role("cell", name="UIWACC1", exact=True))
            expect(row).to_contain_text("PatientName: study “Other^Olga” · order “Order^Olivia”")
            row.get_by_role("button", name="Dismiss").click()
            expect(page.get_by_text("Nothing to reconcile.")).to_be_visible()
            page.locator("select[name=status]").select_option("dismissed")
            expect(page.get_by_role("row").filter(has=page.get_by_role("cell", name="UIWACC1", exact=True))
                   ).to_contain_text("by admin")
            browser.close()
    finally:
        stop_cleanly(server)
