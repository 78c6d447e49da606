"""Storage Commitment Push Model SCP on a real `openpacs serve`, with pynetdicom as the SCU: N-ACTION, then the
N-EVENT-REPORT with the committed and failed instances, on the N-ACTION's association or, for a node configured with
``commit_new_association``, on a new association to a pynetdicom AE listening as SCU of the SOP class. Failures:
an unknown instance (0x0112), a blob deleted or corrupted behind the index's back (0x0110), a SOP class that differs
from the stored one (0x0119) or is not a storage class (0x0122)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
import pytest
from helpers.dicomdata import CT_IMAGE, MR_IMAGE, small_image
from helpers.ports import free_port
from helpers.server import OpenPACSServer, stop_cleanly
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, StorageCommitmentPushModel

WELL_KNOWN = "1.2.840.10008.1.20.1.1"
VERIFICATION = "1.2.840.10008.1.1"
REPORT_TIMEOUT = 30.0


class CommitServer(OpenPACSServer):
    """Remote AEs: NEWASSOC (reports on a new association, to ``listener_port``) and NOCOMMIT (no commit right)."""

    listener_port = 0

    def write_config(self) -> None:
        super().write_config()
        with open(self.config_path, "a") as fh:
            fh.write(f'\n[remote_aes.NEWASSOC]\naet = "NEWASSOC"\nhost = "127.0.0.1"\nport = {self.listener_port}\n'
                     'allow = ["echo", "store", "commit"]\ncommit_new_association = true\n'
                     '\n[remote_aes.NOCOMMIT]\naet = "NOCOMMIT"\nhost = "127.0.0.1"\nport = 104\n'
                     'allow = ["echo", "store"]\n')


@pytest.fixture(scope="module")
def srv(request, backend, tmp_path_factory):
    base = tmp_path_factory.mktemp(f"commit-{backend}")
    index_url = request.getfixturevalue("pg_cluster").create_database() if backend == "postgresql" else None
    server = CommitServer(base / "data", index_url=index_url)
    server.listener_port = free_port()
    server.start()
    yield server
    stop_cleanly(server)


class Reports:
    """N-EVENT-REPORT-RQs received by a pynetdicom AE, waited for by transaction UID. One counts once its
    N-EVENT-REPORT-RSP has gone out, so that the test's release or shutdown never overtakes the response."""

    def __init__(self) -> None:
        self.got: dict[str, tuple[int, Dataset, str]] = {}
        self._answering: list[tuple[str, tuple[int, Dataset, str]]] = []
        self.cond = threading.Condition()

    def handler(self, event) -> tuple[int, None]:
        ds = event.event_information
        with self.cond:
            self._answering.append((str(ds.TransactionUID),
                                    (event.event_type, ds, str(event.assoc.requestor.ae_title))))
        return 0x0000, None

    def sent(self, event) -> None:
        if type(event.message).__name__ == "N_EVENT_REPORT_RSP":
            with self.cond:
                if self._answering:
                    uid, report = self._answering.pop(0)
                    self.got[uid] = report
                    self.cond.notify_all()

    @property
    def handlers(self) -> list:
        return [(evt.EVT_N_EVENT_REPORT, self.handler), (evt.EVT_DIMSE_SENT, self.sent)]

    def wait(self, transaction: str, timeout: float = REPORT_TIMEOUT) -> tuple[int, Dataset, str]:
        deadline = time.monotonic() + timeout
        with self.cond:
            while transaction not in self.got:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no N-EVENT-REPORT for {transaction} within {timeout}s")
                self.cond.wait(left)
            return self.got[transaction]


def _instance(sop_class: str = CT_IMAGE, fill: int = 7) -> Dataset:
    ds = small_image(sop_class, rows=64, cols=64, fill=fill)
    ds.PatientID = "COMMIT1"
    ds.PatientName = "Commit^Test"
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CT" if sop_class == CT_IMAGE else "MR"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    return ds


def store(srv: OpenPACSServer, datasets: list[Dataset]) -> None:
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(MRImageStorage)
    assoc = ae.associate("127.0.0.1", srv.dicom_port, ae_title="OPENPACS")
    assert assoc.is_established
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            assert status.Status == 0x0000
    finally:
        assoc.release()


def request(refs: list[tuple[str, str]]) -> tuple[str, Dataset]:
    transaction = generate_uid()
    ds = Dataset()
    ds.TransactionUID = transaction
    items = []
    for sop_class, sop_instance in refs:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        items.append(item)
    ds.ReferencedSOPSequence = Sequence(items)
    return transaction, ds


@contextmanager
def commitment_association(srv: OpenPACSServer, aet: str, reports: Reports | None = None) -> Iterator:
    """A Storage Commitment Push association from ``aet`` to OpenPACS (reports on it go to ``reports``), released
    on exit."""
    ae = AE(ae_title=aet)
    ae.add_requested_context(StorageCommitmentPushModel)
    assoc = ae.associate("127.0.0.1", srv.dicom_port, ae_title="OPENPACS",
                         evt_handlers=reports.handlers if reports is not None else None)
    assert assoc.is_established
    try:
        yield assoc
    finally:
        assoc.release()


def commit_same_association(srv: OpenPACSServer, refs: list[tuple[str, str]], aet: str = "COMMITSCU"
                            ) -> tuple[int, Dataset, str]:
    """N-ACTION, then wait for the report on the same association; (event type, event information, requestor)."""
    reports = Reports()
    with commitment_association(srv, aet, reports) as assoc:
        transaction, ds = request(refs)
        status, _ = assoc.send_n_action(ds, 1, StorageCommitmentPushModel, WELL_KNOWN)
        assert status.Status == 0x0000
        return reports.wait(transaction)


def committed(info: Dataset) -> set[str]:
    return {str(i.ReferencedSOPInstanceUID) for i in info.get("ReferencedSOPSequence", [])}


def failed(info: Dataset) -> dict[str, int]:
    return {str(i.ReferencedSOPInstanceUID): int(i.FailureReason) for i in info.get("FailedSOPSequence", [])}


def blob_of(srv: OpenPACSServer, sop_instance_uid: str) -> Path:
    for path in srv.blob_files():
        if str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID) == sop_instance_uid:
            return path
    raise AssertionError(f"no blob holds {sop_instance_uid}")


@pytest.fixture(scope="module")
def stored(srv) -> list[Dataset]:
    datasets = [_instance(CT_IMAGE, 1), _instance(CT_IMAGE, 2), _instance(MR_IMAGE, 3)]
    store(srv, datasets)
    return datasets


def test_stored_instances_committed_on_the_same_association(srv, stored) -> None:
    refs = [(str(d.SOPClassUID), str(d.SOPInstanceUID)) for d in stored]
    event_type, info, requestor = commit_same_association(srv, refs)
    assert event_type == 1  # every instance committed
    assert requestor == "COMMITSCU"  # we got it as the association's requestor: the N-ACTION association
    assert committed(info) == {uid for _, uid in refs}
    assert "FailedSOPSequence" not in info
    assert {str(i.ReferencedSOPClassUID) for i in info.ReferencedSOPSequence} == {CT_IMAGE, MR_IMAGE}
    assert info.RetrieveAETitle == "OPENPACS"


def test_unknown_instance_and_wrong_sop_class_fail(srv, stored) -> None:
    unknown = generate_uid()
    ct, mr = stored[0], stored[2]
    refs = [(CT_IMAGE, str(ct.SOPInstanceUID)), (CT_IMAGE, unknown), (CT_IMAGE, str(mr.SOPInstanceUID)),
            (VERIFICATION, generate_uid())]
    event_type, info, _ = commit_same_association(srv, refs)
    assert event_type == 2  # some failures
    assert committed(info) == {str(ct.SOPInstanceUID)}
    assert failed(info) == {unknown: 0x0112, str(mr.SOPInstanceUID): 0x0119, refs[3][1]: 0x0122}


def test_deleted_blob_fails(srv) -> None:
    keep, gone = _instance(fill=11), _instance(fill=12)
    store(srv, [keep, gone])
    blob_of(srv, str(gone.SOPInstanceUID)).unlink()  # behind the index's back
    refs = [(CT_IMAGE, str(keep.SOPInstanceUID)), (CT_IMAGE, str(gone.SOPInstanceUID))]
    event_type, info, _ = commit_same_association(srv, refs)
    assert event_type == 2
    assert committed(info) == {str(keep.SOPInstanceUID)}
    assert failed(info) == {str(gone.SOPInstanceUID): 0x0110}


def test_corrupted_blob_fails(srv) -> None:
    keep, bad = _instance(fill=21), _instance(fill=22)
    store(srv, [keep, bad])
    path = blob_of(srv, str(bad.SOPInstanceUID))
    data = bytearray(path.read_bytes())
    for i in range(len(data) - 64, len(data) - 32):  # pixel bytes flipped, size unchanged
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    refs = [(CT_IMAGE, str(keep.SOPInstanceUID)), (CT_IMAGE, str(bad.SOPInstanceUID))]
    event_type, info, _ = commit_same_association(srv, refs)
    assert event_type == 2
    assert committed(info) == {str(keep.SOPInstanceUID)}
    assert failed(info) == {str(bad.SOPInstanceUID): 0x0110}


def test_report_on_a_new_association(srv, stored) -> None:
    """NEWASSOC asks for the report on a new association: it releases right after the N-ACTION-RSP and receives the
    N-EVENT-REPORT as the acceptor of an association OpenPACS opens, proposing SCP role for itself."""
    reports = Reports()
    listener = AE(ae_title="NEWASSOC")
    # as acceptor: accept the requestor (OpenPACS) in the SCP role of the SOP class (PS3.7 D.3.3.4)
    listener.add_supported_context(StorageCommitmentPushModel, scu_role=False, scp_role=True)
    server = listener.start_server(("127.0.0.1", srv.listener_port), block=False,
                                   evt_handlers=reports.handlers)
    same = Reports()
    try:
        unknown = generate_uid()
        refs = [(str(d.SOPClassUID), str(d.SOPInstanceUID)) for d in stored] + [(CT_IMAGE, unknown)]
        transaction, ds = request(refs)
        with commitment_association(srv, "NEWASSOC", same) as assoc:
            status, _ = assoc.send_n_action(ds, 1, StorageCommitmentPushModel, WELL_KNOWN)
            assert status.Status == 0x0000
            event_type, info, requestor = reports.wait(transaction)
        assert requestor == "OPENPACS"  # the report came on an association OpenPACS requested
        assert event_type == 2
        assert committed(info) == {str(d.SOPInstanceUID) for d in stored}
        assert failed(info) == {unknown: 0x0112}
        assert same.got == {}  # nothing on the N-ACTION's own association
    finally:
        server.shutdown()


def test_commit_refused_without_the_right(srv, stored) -> None:
    with commitment_association(srv, "NOCOMMIT") as assoc:
        _, ds = request([(CT_IMAGE, str(stored[0].SOPInstanceUID))])
        status, _ = assoc.send_n_action(ds, 1, StorageCommitmentPushModel, WELL_KNOWN)
        assert status.Status == 0x0124


def test_bad_requests_refused(srv, stored) -> None:
    with commitment_association(srv, "COMMITSCU") as assoc:
        _, ds = request([(CT_IMAGE, str(stored[0].SOPInstanceUID))])
        status, _ = assoc.send_n_action(ds, 2, StorageCommitmentPushModel, WELL_KNOWN)
        assert status.Status == 0x0123  # no such action
        status, _ = assoc.send_n_action(ds, 1, StorageCommitmentPushModel, generate_uid())
        assert status.Status == 0x0112  # not the well-known instance
        no_transaction = Dataset()
        no_transaction.ReferencedSOPSequence = ds.ReferencedSOPSequence
        status, _ = assoc.send_n_action(no_transaction, 1, StorageCommitmentPushModel, WELL_KNOWN)
        assert status.Status == 0x0120  # missing attribute
