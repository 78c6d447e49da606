"""Storage commitment asked by send jobs (``commit: true``): OpenPACS A sends a study to OpenPACS B, a Storage
Commitment SCP configured to report on a new association to A (``commit_new_association``): A's DICOM listener
receives the N-EVENT-REPORT and hands it to the waiting job, which ends done with the result in its payload. Then a
pynetdicom SCP that acknowledges every C-STORE but reports one instance as failed (0x0112), on the N-ACTION's own
association: the job is retried and fails with that instance named and its Failure Reason."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import requests
from helpers import dcmtk
from helpers.dicomdata import small_image, write_part10
from helpers.ports import free_port
from helpers.server import OpenPACSServer, make_server, stop_cleanly
from pydicom import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, StorageCommitmentPushModel

pytestmark = pytest.mark.usefixtures("require_dcmtk")

WELL_KNOWN = "1.2.840.10008.1.20.1.1"
FINAL = ("done", "failed", "cancelled")
NO_SUCH_OBJECT_INSTANCE = 0x0112


class FakeSCP:
    """Acknowledges every C-STORE, answers N-ACTION with success, then reports on the same association: every
    instance committed except those in ``fail``."""

    def __init__(self) -> None:
        self.port = free_port()
        self.fail: set[str] = set()
        self.stored: list[str] = []
        self.actions: list[str] = []
        ae = AE(ae_title="FAKESCP")
        ae.add_supported_context(CTImageStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
        ae.add_supported_context(StorageCommitmentPushModel)
        self.ae = ae
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[
            (evt.EVT_C_STORE, self._store), (evt.EVT_N_ACTION, self._action)])

    def _store(self, event: evt.Event) -> int:
        self.stored.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    def _action(self, event: evt.Event) -> tuple[int, None]:
        info = event.action_information
        self.actions.append(str(info.TransactionUID))
        report = Dataset()
        report.TransactionUID = info.TransactionUID
        ok, bad = [], []
        for item in info.ReferencedSOPSequence:
            ref = Dataset()
            ref.ReferencedSOPClassUID = item.ReferencedSOPClassUID
            ref.ReferencedSOPInstanceUID = item.ReferencedSOPInstanceUID
            if str(item.ReferencedSOPInstanceUID) in self.fail:
                ref.FailureReason = NO_SUCH_OBJECT_INSTANCE
                bad.append(ref)
            else:
                ok.append(ref)
        if ok:
            report.ReferencedSOPSequence = Sequence(ok)
        if bad:
            report.FailedSOPSequence = Sequence(bad)
        assoc = event.assoc

        def send() -> None:
            time.sleep(0.3)  # after the N-ACTION-RSP has gone out
            assoc.send_n_event_report(report, 2 if bad else 1, StorageCommitmentPushModel, WELL_KNOWN)

        threading.Thread(target=send, daemon=True).start()
        return 0x0000, None

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture(scope="module")
def fake():
    scp = FakeSCP()
    yield scp
    scp.stop()


@pytest.fixture(scope="module")
def pair(request, backend, fake, tmp_path_factory):
    base = tmp_path_factory.mktemp(f"commit-scu-{backend}")
    a = make_server(request, base / "a", backend, aet="OPA",
                    settings={"job_backoff_seconds": 1.0, "job_backoff_max": 2.0, "job_max_attempts": 2,
                              "commit_timeout": 30.0})
    b = OpenPACSServer(base / "b" / "data", aet="OPB")
    a.remote_aes = {"OPB": ("OPB", "127.0.0.1", b.dicom_port), "FAKESCP": ("FAKESCP", "127.0.0.1", fake.port)}
    b.extra_toml = (f'[remote_aes.OPA]\naet = "OPA"\nhost = "127.0.0.1"\nport = {a.dicom_port}\n'
                    'allow = ["echo", "store", "commit"]\ncommit_new_association = true\n')
    b.start()
    try:
        a.start()
    except BaseException:
        stop_cleanly(b)
        raise
    yield a, b
    try:
        stop_cleanly(a)
    finally:
        stop_cleanly(b)


def api(srv: OpenPACSServer) -> str:
    return f"http://127.0.0.1:{srv.http_port}/api"


def wait_job(srv: OpenPACSServer, job_id: int, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        j = requests.get(f"{api(srv)}/jobs/{job_id}", timeout=30).json()
        if j["state"] in FINAL:
            return j
        assert time.monotonic() < deadline, f"job {job_id} still {j['state']} after {timeout}s: {j}"
        time.sleep(0.2)


def stored_study(srv: OpenPACSServer, directory: Path, count: int) -> tuple[str, list[str]]:
    study, series = generate_uid(), generate_uid()
    paths, uids = [], []
    for i in range(count):
        ds = small_image(rows=16, cols=16, fill=i + 1)
        ds.Modality = "CT"
        ds.PatientID = "COMMIT-" + study[-6:]
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.InstanceNumber = i + 1
        uids.append(str(ds.SOPInstanceUID))
        paths.append(write_part10(ds, directory / f"ct{i}.dcm"))
    res = dcmtk.store(srv.dicom_port, paths, aet=srv.aet)
    statuses = dcmtk.parse_store_log(res.output)
    assert all(statuses.get(str(p)) == "Success" for p in paths), res.output[-3000:]
    return study, uids


def send_study(srv: OpenPACSServer, study: str, destination: str, **extra) -> dict:
    r = requests.post(f"{api(srv)}/studies/{study}/send", json={"destination": destination, **extra}, timeout=60)
    assert r.status_code == 202, r.text
    return r.json()


def test_commitment_reported_on_a_new_association(pair, tmp_path):
    a, b = pair
    study, uids = stored_study(a, tmp_path, 3)
    job = send_study(a, study, "OPB", commit=True)
    assert job["kind"] == "send" and job["payload"]["commit"] is True
    j = wait_job(a, job["id"])
    assert j["state"] == "done", (j, a.log_tail(4000), b.log_tail(4000))
    assert j["done"] == 3 and j["failed_items"] == []
    result = j["payload"]["commit_result"]
    assert result["state"] == "committed" and result["committed"] == 3 and result["failed"] == 0, result
    assert result["aet"] == "OPB" and result["transaction"] == j["payload"]["commit_transaction"]
    got = requests.get(f"http://127.0.0.1:{b.http_port}/dicom-web/studies/{study}/instances", timeout=30).json()
    assert sorted(x["00080018"]["Value"][0] for x in got) == sorted(uids)
    assert "on a new association" in b.log_tail(20000)


def test_commitment_failure_names_the_instance(pair, fake, tmp_path):
    a, _ = pair
    study, uids = stored_study(a, tmp_path, 3)
    fake.fail = {uids[1]}
    fake.actions.clear()
    fake.stored.clear()
    j = wait_job(a, send_study(a, study, "FAKESCP", commit=True)["id"])
    assert j["state"] == "failed", j
    assert j["attempts"] == 2
    assert uids[1] in j["error"] and "0x0112" in j["error"], j["error"]
    assert [(i["sop_instance_uid"], i["status"]) for i in j["failed_items"]] == [(uids[1], NO_SUCH_OBJECT_INSTANCE)]
    assert j["done"] == 2
    assert j["payload"]["commit_result"]["state"] == "failures"
    assert len(fake.actions) == 2
    # the second attempt sent again only the instance the peer did not commit
    assert sorted(fake.stored) == sorted([*uids, uids[1]])


def test_commit_to_an_unknown_peer_is_refused(pair):
    a, _ = pair
    r = requests.post(f"{api(a)}/studies/1.2.3/send", json={"destination": "NOPE", "commit": True}, timeout=30)
    assert r.status_code == 404
