"""docs/training.md, walked through in Debian's Chromium (Playwright) against `openpacs serve --demo`.

Tied to the document so that it cannot drift: the steps are read from its "## Step N: title" headings (a step the
test does not know, or a known step gone from the document, fails), and every label a step quotes in `backticks`
must show up in what that step displays — the console pages it visits, or the `openpacs doctor` report in the last
step. Values the tutorial has the trainee type (a patient name pattern, a node's AE title) are taken from the
document too: the test types the document's words, and asserts they are among the step's labels.

Screenshots of each step go to test-artifacts/ (or $OPENPACS_TEST_ARTIFACTS).
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from helpers import dcmtk
from helpers.browser import CHROMIUM_ARGS
from helpers.browser import missing as _missing
from helpers.dicomdata import testdata_file as sample_file
from helpers.server import OpenPACSServer, stop_cleanly

from openpacs.services import demo

DOC = Path(__file__).resolve().parents[2] / "docs" / "training.md"
TIMEOUT_MS = 60000


@dataclass
class Step:
    number: int
    title: str
    text: str
    labels: list[str]
    seen: list[str] = field(default_factory=list)  # what the step displayed (page texts, command output)
    typed: set[str] = field(default_factory=set)

    def value(self, label: str) -> str:
        """A value the document has the trainee type: it must be one of the step's quoted labels."""
        assert label in self.labels, f"step {self.number} does not quote `{label}`; labels: {self.labels}"
        self.typed.add(label)
        return label

    def missing(self) -> list[str]:
        shown = "\n".join(self.seen)
        return [lb for lb in self.labels if lb not in self.typed and lb not in shown]


def parse_steps(text: str) -> list[Step]:
    parts = re.split(r"^## Step (\d+): (.+)$", text, flags=re.M)
    steps = []
    for i in range(1, len(parts), 3):
        body = re.sub(r"```.*?```", "", parts[i + 2], flags=re.S)  # commands are in fenced blocks, not labels
        labels = list(dict.fromkeys(" ".join(lb.split()) for lb in re.findall(r"`([^`]+)`", body)))
        steps.append(Step(int(parts[i]), parts[i + 1].strip(), body, labels))
    return steps


class DemoServer(OpenPACSServer):
    """`openpacs serve --demo` on free ports, in a data dir of the test's (so that doctor can be pointed at it)."""

    def argv(self) -> list[str]:
        return [*super().argv(), "--demo"]


def test_document_steps_are_numbered_and_quote_labels() -> None:
    steps = parse_steps(DOC.read_text())
    assert [s.number for s in steps] == list(range(1, len(steps) + 1))
    assert all(s.labels for s in steps), [s.title for s in steps if not s.labels]


def test_training_tutorial_in_the_browser(require_dcmtk, tmp_path) -> None:
    from playwright.sync_api import expect, sync_playwright

    chromium = os.environ.get("OPENPACS_TEST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(chromium).exists():
        _missing(f"Chromium not found at {chromium}")
    artifacts = Path(os.environ.get("OPENPACS_TEST_ARTIFACTS") or DOC.parents[1] / "test-artifacts")
    artifacts.mkdir(parents=True, exist_ok=True)
    steps = parse_steps(DOC.read_text())
    doc = DOC.read_text()
    assert demo.PASSWORD in doc

    server = DemoServer(tmp_path / "training")
    server.start()
    scp: dcmtk.StoreSCP | None = None
    try:
        base = f"http://127.0.0.1:{server.http_port}"
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1500, "height": 1000})
            page.set_default_timeout(TIMEOUT_MS)

            def seen(step: Step) -> None:
                page.wait_for_load_state()
                step.seen.append(page.locator("body").inner_text())

            def nav(label: str) -> None:
                page.locator("#nav").get_by_role("link", name=label, exact=True).click()

            def sign_in(step: Step) -> None:
                page.goto(f"{base}/ui/")
                page.wait_for_url(re.compile(r"/login"))
                seen(step)
                page.get_by_label("User name").fill(step.value("admin"))
                page.get_by_label("Password").fill(step.value(demo.PASSWORD))
                page.get_by_role("button", name="Sign in").click()
                page.wait_for_url(re.compile(r"/ui/"))
                expect(page.locator("#who")).to_contain_text("admin")
                seen(step)

            def find_study(step: Step) -> None:
                nav("Studies")
                expect(page.get_by_role("heading", name="Studies", exact=True)).to_be_visible()
                page.get_by_label("Patient name").fill(step.value("NORDIN*"))
                page.get_by_role("button", name="Search", exact=True).click()
                expect(page.get_by_role("link", name="NORDIN, ANNA").first).to_be_visible()
                rows = page.locator("table.grid tbody tr")
                # the unfiltered list may still be on screen for a moment: wait for the search's rows
                expect(rows).to_have_count(sum(1 for s in demo.STUDIES if s.patient_id == "DEMO-0001"))
                seen(step)
                page.get_by_role("button", name="Date").click()
                expect(page.locator("th[aria-sort]")).to_contain_text("Date")
                for label, value, expected in (("Modality", "CT", "CT"), ("Department", "cardiology", "cardiology")):
                    page.get_by_label("Patient name").fill("")
                    page.get_by_label(step.value(label)).fill(step.value(value))
                    page.get_by_role("button", name="Search", exact=True).click()
                    expect(page.locator("table.grid tbody tr").first).to_contain_text(expected)
                    seen(step)
                    page.get_by_label(label).fill("")
                page.get_by_label("Patient name").fill("NORDIN*")
                page.get_by_role("button", name="Search", exact=True).click()
                expect(page.get_by_role("link", name="NORDIN, ANNA").first).to_be_visible()

            study_uid = {}

            def open_study(step: Step) -> None:
                row = page.locator("table.grid tbody tr", has_text=step.value("CT CHEST WITHOUT CONTRAST"))
                row.get_by_role("link", name=step.value("NORDIN, ANNA")).click()
                expect(page.get_by_role("heading", name="Series")).to_be_visible()
                uid = page.locator("dd code").first.inner_text().strip()
                study_uid["uid"] = uid
                href = page.get_by_role("link", name="Open in viewer").get_attribute("href")
                assert href and uid in href
                expect(page.locator(".thumbs img").first).to_be_visible()
                page.get_by_role("button", name="Instances").first.click()
                page.get_by_role("button", name=re.compile(r"^#\d+ tags$")).first.click()
                expect(page.locator("#tags")).to_contain_text("Tags of instance")
                expect(page.locator("#tags")).to_contain_text("PatientName")
                seen(step)

            def audit(step: Step) -> None:
                nav("Audit")
                expect(page.get_by_role("heading", name="Audit trail")).to_be_visible()
                page.get_by_label("Event").select_option(step.value("InstancesAccessed"))
                page.get_by_label("Study UID").fill(study_uid["uid"])
                page.get_by_role("button", name="Search", exact=True).click()
                rows = page.locator("table.grid tbody tr")
                # the unfiltered list may still be on screen for a moment: wait until only this study's rows remain
                expect(rows.filter(has_not_text=study_uid["uid"])).to_have_count(0)
                expect(rows.first).to_contain_text("InstancesAccessed")
                expect(rows.filter(has_not_text="admin")).to_have_count(0)
                seen(step)

            def add_node(step: Step) -> None:
                nonlocal scp
                aet = step.value("TRAINMOD")
                scp = dcmtk.StoreSCP(tmp_path / "trainmod", aet=aet).start()
                nav("Nodes")
                expect(page.get_by_role("heading", name="Remote nodes")).to_be_visible()
                page.get_by_role("button", name="Add node").click()
                page.get_by_label("Name", exact=True).fill(step.value("trainmod"))
                page.get_by_label("AE title").fill(aet)
                page.get_by_label("Host").fill(step.value("127.0.0.1"))
                step.value("11113")  # the document's port; the test's storescp listens on a free one
                page.get_by_label("Port").fill(str(scp.port))
                page.get_by_label("Kind").select_option(step.value("modality"))
                seen(step)
                page.get_by_role("button", name="Add node").last.click()
                expect(page.get_by_role("cell", name="trainmod", exact=True)).to_be_visible()
                page.get_by_role("button", name="Echo trainmod").click()
                ok = page.locator("[data-echo=ok]")
                expect(ok).to_be_visible()
                assert re.search(r"OK · \d+(\.\d+)? ms", ok.inner_text()), ok.inner_text()
                seen(step)

            def upload(step: Step) -> None:
                nav("Studies")
                expect(page.locator("#dropzone")).to_be_visible()
                seen(step)
                page.set_input_files("#upload-files", sample_file("MR_small.dcm"))
                toast = page.locator("#toasts .toast", has_text=step.value("Upload stored"))
                expect(toast).to_be_visible()
                page.get_by_label("Patient name").fill(step.value("COMPRESSED*"))
                page.get_by_role("button", name="Search", exact=True).click()
                expect(page.locator("table.grid tbody tr").first).to_contain_text("CompressedSamples")
                seen(step)

            def dashboard(step: Step) -> None:
                deadline = time.monotonic() + 30  # each process adds its counts to the index every few seconds
                while page.request.get(f"{base}/api/stats").json()["last_24h"]["store"] < 1:
                    assert time.monotonic() < deadline, "the upload of step 6 never reached the activity figures"
                    page.wait_for_timeout(500)
                nav("Dashboard")
                expect(page.locator("#dashboard canvas.chart").first).to_be_visible()
                # the upload of step 6 is in the chart's text summary (drawn from the index's per-minute activity)
                expect(page.locator("#dashboard canvas.chart").first).to_have_attribute(
                    "aria-label", re.compile(r"instances stored: peak [1-9]"), timeout=TIMEOUT_MS)
                seen(step)

            def doctor(step: Step) -> None:
                assert scp is not None
                scp.stop()
                ports = ["--dicom-port", str(server.dicom_port), "--http-port", str(server.http_port),
                         "--hl7-port", str(server.hl7_port)]
                r = server.run_cli("doctor", *ports)
                (artifacts / "training-doctor-1.txt").write_text(r.stdout + r.stderr)
                assert r.returncode == 1, r.stdout + r.stderr
                assert re.search(r"FAIL\s+Remote nodes \(C-ECHO\).*trainmod", r.stdout), r.stdout
                step.seen.append(r.stdout)
                nav("Nodes")
                page.get_by_role("button", name="Remove trainmod").click()
                expect(page.locator("dialog.confirm")).to_be_visible()
                seen(step)
                page.locator("dialog.confirm").get_by_role("button", name="Remove").click()
                expect(page.get_by_role("cell", name="trainmod", exact=True)).to_have_count(0)
                seen(step)
                r = server.run_cli("doctor", *ports)
                (artifacts / "training-doctor-2.txt").write_text(r.stdout + r.stderr)
                assert r.returncode == 0, r.stdout + r.stderr
                step.seen.append(r.stdout)

            handlers: dict[str, Callable[[Step], None]] = {
                "Sign in": sign_in, "Find a study": find_study, "Open a study and view it": open_study,
                "Check who looked at it": audit, "Add a modality and echo it": add_node, "Upload a study": upload,
                "Read the dashboard": dashboard, "Run the doctor and fix what it reports": doctor,
            }
            assert [s.title for s in steps] == list(handlers), "docs/training.md steps and this test differ"
            for step in steps:
                handlers[step.title](step)
                page.screenshot(path=str(artifacts / f"training-step-{step.number}.png"), full_page=True)
                assert not step.missing(), (f"step {step.number} ({step.title}) quotes labels the console did not "
                                            f"show: {step.missing()}")
            browser.close()
    finally:
        if scp is not None:
            scp.stop()
        stop_cleanly(server)
