"""Auto-routing end to end: a real `openpacs serve` with a TOML [[routes]] rule and rules added through the API,
DCMTK storescu as the modality, DCMTK storescp as the destinations, a pynetdicom SCP that refuses every C-STORE.

Covers: a rule on Modality fires for CT and not for MR, the routed file byte-identical to what was stored; a rule
on the calling AE; a "stable study" rule added through the API sends the whole study once, after it has been quiet;
the dry run; invalid rules (400) and TOML rules (409); a rule on a tag with hostile content leaves the stores and
the router unharmed; a destination that refuses every instance ends its job with the peer's status; the console's
Routing page (headless Chromium screenshot)."""

from __future__ import annotations

import time
from pathlib import Path

import pydicom
import pytest
import requests
from helpers import dcmtk
from helpers.browser import CHROMIUM_ARGS
from helpers.dicomdata import dataset_bytes, small_image, write_part10
from helpers.ports import free_port
from helpers.server import OpenPACSServer, stop_cleanly
from pydicom.uid import generate_uid

pytestmark = pytest.mark.usefixtures("require_dcmtk")

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"


def image(directory: Path, modality: str, study: str, series: str | None = None, **attrs) -> Path:
    ds = small_image(CT if modality == "CT" else MR, fill=len(attrs))
    ds.PatientID, ds.PatientName = "ROUTE1", "Route^Test"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series or generate_uid()
    ds.StudyDate, ds.Modality, ds.InstanceNumber = "20261207", modality, 1
    for k, v in attrs.items():
        setattr(ds, k, v)
    return write_part10(ds, directory / f"{ds.SOPInstanceUID}.dcm")


class RefusingSCP:
    """A storage SCP (pynetdicom) that answers every C-STORE with 0xA700 Out of Resources."""

    def __init__(self) -> None:
        from pynetdicom import AE, evt
        from pynetdicom.presentation import AllStoragePresentationContexts

        self.port = free_port()
        self.calls = 0
        ae = AE(ae_title="REFUSER")
        ae.supported_contexts = AllStoragePresentationContexts

        def handle(event):
            self.calls += 1
            return 0xA700

        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, handle)])

    def stop(self) -> None:
        self.server.shutdown()


class EchoOnlySCP:
    """A peer (pynetdicom) that accepts only Verification: no storage presentation context is ever accepted."""

    def __init__(self) -> None:
        from pynetdicom import AE
        from pynetdicom.sop_class import Verification

        self.port = free_port()
        ae = AE(ae_title="ECHOONLY")
        ae.add_supported_context(Verification)
        self.server = ae.start_server(("127.0.0.1", self.port), block=False)

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture(scope="module")
def peers(tmp_path_factory):
    base = tmp_path_factory.mktemp("routing-peers")
    ct = dcmtk.StoreSCP(base / "ct", aet="CTDEST").start()
    study = dcmtk.StoreSCP(base / "study", aet="STUDYDEST").start()
    refuser = RefusingSCP()
    echo_only = EchoOnlySCP()
    yield {"ct": ct, "study": study, "refuser": refuser, "echo_only": echo_only, "base": base}
    ct.stop()
    study.stop()
    refuser.stop()
    echo_only.stop()


@pytest.fixture(scope="module")
def server(peers, tmp_path_factory):
    base = tmp_path_factory.mktemp("routing")
    toml = """
[[routes]]
name = "ct-to-reading"
destinations = ["CTDEST"]
description = "CT to the reading workstation"
[routes.match]
Modality = "CT"
"""
    srv = OpenPACSServer(base / "data", remote_aes={
        "CTDEST": ("CTDEST", "127.0.0.1", peers["ct"].port),
        "STUDYDEST": ("STUDYDEST", "127.0.0.1", peers["study"].port),
        "REFUSER": ("REFUSER", "127.0.0.1", peers["refuser"].port),
        "ECHOONLY": ("ECHOONLY", "127.0.0.1", peers["echo_only"].port),
    }, settings={"job_backoff_seconds": 1.0, "job_max_attempts": 2}, extra_toml=toml)
    srv.start()
    yield srv
    stop_cleanly(srv)


def api(srv, method: str, path: str, **kw):
    return requests.request(method, f"http://127.0.0.1:{srv.http_port}/api{path}", timeout=30, **kw)


def wait_jobs(srv, rule: str, *, states=("done",), count: int = 1, timeout: float = 60.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        jobs = [j for j in api(srv, "GET", "/jobs").json()["items"] if (j.get("payload") or {}).get("rule") == rule
                or j.get("rule") == rule]
        if len(jobs) >= count and all(j["state"] in states for j in jobs):
            return jobs
        if time.monotonic() > deadline:
            raise AssertionError(f"jobs of rule {rule}: {jobs}\n{srv.log_tail(4000)}")
        time.sleep(0.3)


def wait_files(scp, n: int, timeout: float = 60.0) -> list[Path]:
    deadline = time.monotonic() + timeout
    while len(scp.files()) < n:
        if time.monotonic() > deadline:
            raise AssertionError(f"{scp.aet} received {len(scp.files())} of {n}")
        time.sleep(0.2)
    return scp.files()


def stored_ok(srv, files, calling: str = "STORESCU") -> None:
    res = dcmtk.store(srv.dicom_port, files, calling=calling)
    statuses = dcmtk.parse_store_log(res.output)
    assert all(statuses.get(str(f)) == "Success" for f in files), res.output[-3000:]


def test_toml_rule_routes_ct_and_not_mr_byte_identical(server, peers, tmp_path):
    peers["ct"].clear()
    st = generate_uid()
    ct = image(tmp_path, "CT", st)
    mr = image(tmp_path, "MR", st)
    stored_ok(server, [ct, mr])
    (job,) = wait_jobs(server, "ct-to-reading")
    assert job["total"] == 1 and job["done"] == 1 and job["destination"] == "CTDEST"
    (received,) = wait_files(peers["ct"], 1)
    assert pydicom.dcmread(received).Modality == "CT"
    assert dataset_bytes(received) == dataset_bytes(ct)  # sent as stored: the data set unchanged
    time.sleep(1.5)
    assert len(peers["ct"].files()) == 1  # the MR went nowhere


def test_rules_api_stable_study_and_dry_run(server, peers, tmp_path):
    peers["study"].clear()
    bad = api(server, "POST", "/routes", json={"name": "broken", "destinations": ["STUDYDEST"],
                                               "conditions": [{"attribute": "Modality", "op": "regex", "value": "("}]})
    assert bad.status_code == 400 and "regular expression" in bad.json()["detail"]
    assert api(server, "POST", "/routes", json={"name": "x", "destinations": ["NOWHERE"]}).status_code == 400
    assert api(server, "PUT", "/routes/ct-to-reading", json={"enabled": False}).status_code == 409
    r = api(server, "POST", "/routes", json={
        "name": "mr-study", "destinations": ["STUDYDEST"], "trigger": "stable", "stable_seconds": 3,
        "conditions": [{"attribute": "Modality", "value": "MR"},
                       {"attribute": "CallingAETitle", "op": "wildcard", "value": "MRI*"}]})
    assert r.status_code == 201, r.text
    assert api(server, "POST", "/routes", json={"name": "mr-study", "destinations": ["STUDYDEST"]}).status_code == 409
    st, se = generate_uid(), generate_uid()
    first = [image(tmp_path, "MR", st, se) for _ in range(2)]
    stored_ok(server, first, calling="MRI_3T")
    other = image(tmp_path, "MR", generate_uid())
    stored_ok(server, [other], calling="STORESCU")  # MR, but not from an MRI* modality: not routed
    time.sleep(1.5)
    later = image(tmp_path, "MR", st, se)
    stored_ok(server, [later], calling="MRI_3T")  # keeps the study from being stable
    listing = api(server, "GET", "/routes").json()
    assert {w["study_instance_uid"] for w in listing["waiting"]} == {st}
    assert [r["name"] for r in listing["rules"]] == ["ct-to-reading", "mr-study"]
    assert listing["rules"][0]["source"] == "config" and not listing["rules"][0]["editable"]
    (job,) = wait_jobs(server, "mr-study", timeout=30)
    assert job["total"] == 3 and job["done"] == 3
    files = wait_files(peers["study"], 3)
    assert {pydicom.dcmread(f).StudyInstanceUID for f in files} == {st}
    time.sleep(4)
    assert len(wait_jobs(server, "mr-study")) == 1 and len(peers["study"].files()) == 3  # sent once

    dry = api(server, "GET", "/routes/dry-run", params={"study": st}).json()["results"]
    by = {d["rule"]: d for d in dry}
    assert by["mr-study"]["instances"] == 3 and by["mr-study"]["would_send"]
    assert by["ct-to-reading"]["instances"] == 0 and not by["ct-to-reading"]["would_send"]
    assert api(server, "GET", "/routes/dry-run", params={"study": "1.2.3.999"}).status_code == 404
    assert api(server, "DELETE", "/routes/mr-study").status_code == 204
    assert api(server, "GET", "/routes/mr-study").status_code == 404


def test_rule_transfer_syntax_transcodes(server, peers, tmp_path):
    """A rule that names a transfer syntax: an instance stored in Implicit VR goes out in Explicit VR Little Endian."""
    r = api(server, "POST", "/routes", json={"name": "explicit", "destinations": ["CTDEST"],
                                             "transfer_syntax": "1.2.840.10008.1.2.1",
                                             "conditions": [{"attribute": "StationName", "value": "TSTEST"}]})
    assert r.status_code == 201 and r.json()["transfer_syntax"] == "1.2.840.10008.1.2.1"
    peers["ct"].clear()
    ds_path = image(tmp_path, "OT", generate_uid(), StationName="TSTEST")
    ds = pydicom.dcmread(ds_path)
    implicit = write_part10(ds, tmp_path / "implicit.dcm", "1.2.840.10008.1.2")
    stored_ok(server, [implicit])
    (job,) = wait_jobs(server, "explicit")
    assert job["payload"]["transfer_syntax"] == "1.2.840.10008.1.2.1"
    (received,) = wait_files(peers["ct"], 1)
    got = pydicom.dcmread(received)
    assert got.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert got.SOPInstanceUID == ds.SOPInstanceUID and got.PixelData == ds.PixelData
    assert api(server, "DELETE", "/routes/explicit").status_code == 204


def test_hostile_tag_content_and_a_refusing_destination(server, peers, tmp_path):
    r = api(server, "POST", "/routes", json={
        "name": "hostile", "destinations": ["REFUSER"], "match": "any",
        "conditions": [  # the regex never matches this value: Python's re would backtrack ~2^60 steps{"attribute": "InstitutionName", "op": "regex", "value": "(a+)+$"},
                       {"attribute": "ImageComments", "op": "wildcard", "value": "*DROP*"}]})
    assert r.status_code == 201, r.text
    st = generate_uid()
    hostile = image(tmp_path, "CT", st, InstitutionName="a" * 60 + "'; DROP TABLE instances;--\x07",
                    ImageComments="'); DROP TABLE jobs; -- " + "\u00e9" * 3000)
    stored_ok(server, [hostile])  # the store is never affected by the rules
    (job,) = wait_jobs(server, "hostile", states=("failed",), timeout=60)
    assert "0xA700" in (job["error"] or ""), job
    assert peers["refuser"].calls >= 1
    detail = api(server, "GET", f"/jobs/{job['id']}").json()
    failed = [i for i in detail.get("failed_items", [])]
    assert failed and failed[0]["status"] == 0xA700
    # the router and the server carry on: the CT rule still routes the next CT
    peers["ct"].clear()
    after = image(tmp_path, "CT", generate_uid())
    stored_ok(server, [after])
    wait_files(peers["ct"], 1)
    assert dcmtk.echo(server.dicom_port).returncode == 0
    assert api(server, "DELETE", "/routes/hostile").status_code == 204


def test_a_peer_that_accepts_no_presentation_context(server, peers, tmp_path):
    r = api(server, "POST", "/routes", json={"name": "to-echo-only", "destinations": ["ECHOONLY"],
                                             "conditions": [{"attribute": "StationName", "value": "NOCTX"}]})
    assert r.status_code == 201, r.text
    stored_ok(server, [image(tmp_path, "CT", generate_uid(), StationName="NOCTX")])
    (job,) = wait_jobs(server, "to-echo-only", states=("failed",), timeout=60)
    assert "accepted no presentation context" in job["error"], job
    assert job["attempts"] == 1  # the same on every attempt: not retried
    assert dcmtk.echo(server.dicom_port).returncode == 0
    assert api(server, "DELETE", "/routes/to-echo-only").status_code == 204


def test_routing_console_page(server, chromium_path, artifacts):
    from playwright.sync_api import expect, sync_playwright

    api(server, "POST", "/routes", json={"name": "night-archive", "destinations": ["STUDYDEST"], "trigger": "stable",
                                         "stable_seconds": 600, "schedule": ["22:00-06:00"],
                                         "description": "everything to the long-term archive at night"})
    r = api(server, "POST", "/routes", json={"name": "mr-priors", "kind": "prefetch", "sources": ["STUDYDEST"],
                                             "on": ["study", "order"], "max_priors": 2,
                                             "conditions": [{"attribute": "Modality", "value": "MR"}]})
    assert r.status_code == 201, r.text
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1500, "height": 1000})
        page.goto(f"http://127.0.0.1:{server.http_port}/ui/#/routes")
        expect(page.get_by_role("heading", name="Routing")).to_be_visible(timeout=30000)
        expect(page.get_by_text("ct-to-reading")).to_be_visible()
        expect(page.get_by_text("Modality = CT")).to_be_visible()
        expect(page.get_by_text("22:00-06:00", exact=False)).to_be_visible()
        expect(page.get_by_text("from STUDYDEST")).to_be_visible()
        page.click("#add-rule")
        expect(page.locator("#route-form")).to_be_visible()
        page.screenshot(path=str(artifacts / "console-routing.png"), full_page=True)
        page.click("#add-prefetch")
        expect(page.locator("#prefetch-form")).to_be_visible()
        page.screenshot(path=str(artifacts / "console-prefetch.png"), full_page=True)
        browser.close()
    assert api(server, "DELETE", "/routes/night-archive").status_code == 204
    assert api(server, "DELETE", "/routes/mr-priors").status_code == 204


def test_bad_toml_rule_refuses_to_start(tmp_path):
    srv = OpenPACSServer(tmp_path / "data", extra_toml='[[routes]]\nname = "bad"\ndestinations = []\n',
                         startup_timeout=30)
    with pytest.raises(Exception):  # noqa: B017 - ServerDied or a timeout: it must not serve
        srv.start()
    try:
        assert "[[routes]] bad: destinations" in srv.log_text(), srv.log_tail()
    finally:
        if srv.running:
            srv.kill()
