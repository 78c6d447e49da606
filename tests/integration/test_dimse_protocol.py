"""The DICOM upper layer against real DCMTK peers and raw sockets: negotiation, role selection, limits, aborts,
timeouts, cancel. The server runs in-process (``serve_dimse`` in its own event loop thread) on a real Context."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import dcmtk
from helpers.ports import free_port
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from openpacs.config import RemoteAE, Settings
from openpacs.context import build_context
from openpacs.dimse import pdu
from openpacs.dimse.negotiation import IMPLICIT_VR_LE, VERIFICATION
from openpacs.dimse.server import serve_dimse

pytestmark = pytest.mark.usefixtures("require_dcmtk")


class InProcessServer:
    def __init__(self, data_dir: Path, **overrides: Any) -> None:
        self.settings = Settings(data_dir=data_dir, dicom_port=free_port(), dicom_workers=1, **overrides)
        self.ctx = build_context(self.settings)
        self.loop = asyncio.new_event_loop()
        self.stop: asyncio.Event | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self._ready = threading.Event()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def main() -> None:
            self.stop = asyncio.Event()
            ready = asyncio.Event()
            task = asyncio.create_task(serve_dimse(self.settings, self.ctx, self.stop, ready))
            await ready.wait()
            self._ready.set()
            await task

        self.loop.run_until_complete(main())

    def __enter__(self) -> InProcessServer:
        self.thread.start()
        assert self._ready.wait(30)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.stop is not None
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(60)
        self.ctx.close()

    @property
    def port(self) -> int:
        return self.settings.dicom_port

    def count(self) -> int:
        from sqlalchemy import text

        with self.ctx.index.engine.connect() as conn:
            return int(conn.execute(text("select count(*) from instances")).scalar_one())


def make_files(directory: Path, n: int, rows: int = 64, series: int = 1) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    study = generate_uid()
    series_uids = [generate_uid() for _ in range(series)]
    pixels = (np.arange(rows * rows, dtype=np.uint16) % 4096).reshape(rows, rows)
    out = []
    for i in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series_uids[i % series]
        ds.PatientName, ds.PatientID = "PROTO^TEST", "PROTO1"
        ds.StudyDate, ds.Modality, ds.InstanceNumber = "20260101", "CT", i + 1
        ds.Rows = ds.Columns = rows
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = pixels.tobytes()
        path = directory / f"f{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append(path)
    return out


def associate_raw(port: int, max_length: int = 16384, calling: str = "RAWSCU") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    user = pdu.UserInformation(max_length=max_length, implementation_class_uid="1.2.3.4")
    rq = pdu.encode_associate_rq(
        "OPENPACS", calling, [pdu.PresentationContextRQ(1, VERIFICATION, [IMPLICIT_VR_LE])], user
    )
    sock.sendall(rq)
    ptype, _ = read_pdu(sock)
    assert ptype == pdu.A_ASSOCIATE_AC
    return sock


def read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    header = recv_exact(sock, 6)
    if len(header) < 6:
        return -1, b""
    ptype, length = struct.unpack(">BxI", header)
    return ptype, recv_exact(sock, length)


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def expect_abort_then_close(sock: socket.socket, reason: int | None = None) -> None:
    ptype, body = read_pdu(sock)
    assert ptype == pdu.A_ABORT, (ptype, body)
    assert body[2] == pdu.ABORT_SOURCE_PROVIDER
    if reason is not None:
        assert body[3] == reason
    assert sock.recv(10) == b""


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return make_files(tmp_path_factory.mktemp("protofiles"), 12, series=2)


@pytest.fixture(scope="module")
def storescp(tmp_path_factory: pytest.TempPathFactory) -> dcmtk.StoreSCP:
    scp = dcmtk.StoreSCP(tmp_path_factory.mktemp("dimse-dest") / "received", aet="PROTODEST").start()
    yield scp
    scp.proc.terminate()
    scp.proc.wait(10)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, storescp: dcmtk.StoreSCP, files: list[Path]) -> InProcessServer:
    srv = InProcessServer(tmp_path_factory.mktemp("dimse-srv"), max_pdu=65536, artim_timeout=1.0)
    srv.settings.remote_aes = {"DEST": RemoteAE("PROTODEST", "127.0.0.1", storescp.port)}
    with srv:
        dcmtk.store(srv.port, files).check()
        yield srv


def test_echo_and_store(server: InProcessServer) -> None:
    dcmtk.echo(server.port).check()
    assert server.count() == 12


def test_get_uses_role_selection_and_returns_identical_bytes(
    server: InProcessServer, files: list[Path], tmp_path: Path
) -> None:
    from openpacs.dicom.header import dataset_offset

    out = tmp_path / "get"
    out.mkdir()
    study = Dataset()
    import pydicom

    study = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    res = dcmtk.run(
        "getscu",
        "-v",
        "-S",
        "-aec",
        "OPENPACS",
        "-od",
        str(out),
        "127.0.0.1",
        str(server.port),
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        f"StudyInstanceUID={study}",
    ).check()
    got = sorted(out.iterdir())
    assert len(got) == 12, res.output
    originals = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID: f.read_bytes() for f in files}
    for f in got:
        data = f.read_bytes()
        uid = pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID
        o = originals[uid]
        assert data[dataset_offset(data) :] == o[dataset_offset(o) :]


def test_get_without_storage_role_fails_suboperations(server: InProcessServer, files: list[Path]) -> None:
    """No storage context with the SCP role for the peer: every sub-operation fails, final status A702."""
    import pydicom
    from pynetdicom import AE
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet

    ae = AE(ae_title="NOROLE")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    assoc = ae.associate("127.0.0.1", server.port, ae_title="OPENPACS")
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    responses = list(assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet))
    assoc.release()
    final, identifier = responses[-1]
    assert final.Status == 0xA702
    assert final.NumberOfFailedSuboperations == 12 and final.NumberOfCompletedSuboperations == 0
    assert len(identifier.FailedSOPInstanceUIDList) == 12


def test_move_to_storescp(server: InProcessServer, storescp: dcmtk.StoreSCP, files: list[Path]) -> None:
    import pydicom

    storescp.clear()
    series = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
    res = dcmtk.run(
        "movescu",
        "-v",
        "-S",
        "-aec",
        "OPENPACS",
        "-aem",
        "PROTODEST",
        "127.0.0.1",
        str(server.port),
        "-k",
        "QueryRetrieveLevel=SERIES",
        "-k",
        f"StudyInstanceUID={pydicom.dcmread(files[0]).StudyInstanceUID}",
        "-k",
        f"SeriesInstanceUID={series}",
    ).check()
    assert len(storescp.files()) == 6, res.output
    bad = dcmtk.run(
        "movescu",
        "-S",
        "-aec",
        "OPENPACS",
        "-aem",
        "NOBODY",
        "127.0.0.1",
        str(server.port),
        "-k",
        "QueryRetrieveLevel=SERIES",
        "-k",
        f"SeriesInstanceUID={series}",
    )
    assert "MoveDestinationUnknown" in bad.output or "a801" in bad.output.lower(), bad.output


def test_find_cancel(server: InProcessServer, tmp_path: Path) -> None:
    res = dcmtk.run(
        "findscu",
        "-v",
        "-S",
        "--cancel",
        "1",
        "-aec",
        "OPENPACS",
        "127.0.0.1",
        str(server.port),
        "-k",
        "QueryRetrieveLevel=IMAGE",
        "-k",
        "StudyInstanceUID=*",
        "-k",
        "SeriesInstanceUID=*",
        "-k",
        "SOPInstanceUID",
    )
    assert "Cancel" in res.output, res.output
    dcmtk.echo(server.port).check()


def test_store_with_small_pdu_and_bigger_instances(server: InProcessServer, tmp_path: Path) -> None:
    big = make_files(tmp_path / "big", 2, rows=256)  # 128 KB each: many PDUs of our 64 KB maximum
    dcmtk.store(server.port, big, "--max-pdu", "8192").check()
    assert server.count() == 14


def test_hostile_pdus_keep_server_alive(server: InProcessServer) -> None:
    # P-DATA-TF declaring more than our maximum PDU: A-ABORT at once, nothing buffered
    s = associate_raw(server.port)
    s.sendall(struct.pack(">BBI", pdu.P_DATA_TF, 0, 65537))
    expect_abort_then_close(s, pdu.ABORT_INVALID_PARAMETER)
    # a second A-ASSOCIATE-RQ on an established association
    s = associate_raw(server.port)
    s.sendall(
        pdu.encode_associate_rq(
            "OPENPACS",
            "X",
            [pdu.PresentationContextRQ(1, VERIFICATION, [IMPLICIT_VR_LE])],
            pdu.UserInformation(16384, "1.2"),
        )
    )
    expect_abort_then_close(s, pdu.ABORT_UNEXPECTED_PDU)
    # unknown PDU type before any association
    s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    s.sendall(b"\x42\x00\x00\x00\x00\x04abcd")
    expect_abort_then_close(s, pdu.ABORT_UNRECOGNIZED_PDU)
    # huge declared A-ASSOCIATE-RQ
    s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    s.sendall(struct.pack(">BBI", pdu.A_ASSOCIATE_RQ, 0, 0x7FFFFFFF))
    expect_abort_then_close(s)
    # truncated A-ASSOCIATE-RQ items
    raw = bytearray(
        pdu.encode_associate_rq(
            "OPENPACS",
            "X",
            [pdu.PresentationContextRQ(1, VERIFICATION, [IMPLICIT_VR_LE])],
            pdu.UserInformation(16384, "1.2"),
        )
    )
    struct.pack_into(">H", raw, 6 + 68 + 2, 4000)
    s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    s.sendall(bytes(raw))
    expect_abort_then_close(s)
    dcmtk.echo(server.port).check()


def test_artim_closes_idle_connection(server: InProcessServer) -> None:
    s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    t = time.monotonic()
    assert s.recv(10) == b""
    assert 0.5 < time.monotonic() - t < 5


def test_release_then_peer_close(server: InProcessServer) -> None:
    s = associate_raw(server.port)
    s.sendall(pdu.encode_release_rq())
    assert read_pdu(s) == (pdu.A_RELEASE_RP, b"\0\0\0\0")
    s.close()
    dcmtk.echo(server.port).check()


def test_max_associations_and_called_ae(tmp_path: Path) -> None:
    with InProcessServer(tmp_path / "d", max_associations=1, check_called_aet=True) as srv:
        held = associate_raw(srv.port)
        res = dcmtk.echo(srv.port)
        assert res.returncode != 0 and "Local Limit Exceeded" in res.output.replace(
            "local-limit-exceeded", "Local Limit Exceeded"
        ), res.output
        held.sendall(pdu.encode_release_rq())
        assert read_pdu(held)[0] == pdu.A_RELEASE_RP
        held.close()
        time.sleep(0.2)
        dcmtk.echo(srv.port).check()
        res = dcmtk.echo(srv.port, aet="WRONGAE")
        assert res.returncode != 0 and "Called AE" in res.output.replace("called-AE", "Called AE"), res.output


def test_unknown_calling_ae_and_operation_permissions(tmp_path: Path, files: list[Path]) -> None:
    with InProcessServer(tmp_path / "d", dicom_accept_unknown=False) as srv:
        srv.settings.remote_aes = {"ECHOONLY": RemoteAE("ECHOONLY", "127.0.0.1", 104, allow=("echo",))}
        res = dcmtk.echo(srv.port)  # calling AE ECHOSCU is not configured
        assert res.returncode != 0, res.output
        dcmtk.run("echoscu", "-aet", "ECHOONLY", "-aec", "OPENPACS", "127.0.0.1", str(srv.port)).check()
        res = dcmtk.store(srv.port, files[:1], calling="ECHOONLY")
        assert "0x124" in res.output, res.output
        assert srv.count() == 0


def test_worker_processes_share_the_port(tmp_path: Path, files: list[Path]) -> None:
    srv = InProcessServer(tmp_path / "d")
    srv.settings.dicom_workers = 2
    with srv:
        time.sleep(3)  # let the worker build its context and report ready
        procs = [
            dcmtk.spawn("storescu", "-aec", "OPENPACS", "127.0.0.1", str(srv.port), *map(str, files[i::4]))
            for i in range(4)
        ]
        for p in procs:
            out, _ = p.communicate(timeout=120)
            assert p.returncode == 0, out
        assert srv.count() == 12


def test_get_cancel_stops_suboperations(server: InProcessServer, files: list[Path]) -> None:
    """C-CANCEL-RQ after the first pending C-GET response: final status Cancel (FE00), not every instance sent."""
    import pydicom
    from pynetdicom import AE, build_role
    from pynetdicom.sop_class import CTImageStorage as CT
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as GET

    received: list[str] = []

    def on_store(event: Any) -> int:
        received.append(event.request.AffectedSOPInstanceUID)
        time.sleep(0.05)
        return 0x0000

    from pynetdicom import evt

    ae = AE(ae_title="CANCELGET")
    ae.add_requested_context(GET)
    ae.add_requested_context(CT, [ExplicitVRLittleEndian])
    assoc = ae.associate(
        "127.0.0.1",
        server.port,
        ae_title="OPENPACS",
        ext_neg=[build_role(CT, scp_role=True)],
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    context_id = next(c.context_id for c in assoc.accepted_contexts if c.abstract_syntax == GET)
    statuses = []
    for status, _ in assoc.send_c_get(query, GET, msg_id=77):
        statuses.append(status.Status)
        if status.Status == 0xFF00 and len(statuses) == 1:
            assoc.send_c_cancel(77, context_id)
    assoc.release()
    assert statuses[-1] == 0xFE00, [hex(s) for s in statuses]
    assert 1 <= len(received) < 12


def test_dimse_timeout_on_unanswered_get_suboperation(tmp_path: Path, files: list[Path]) -> None:
    """A C-GET peer that never answers our C-STORE-RQ: the association is aborted after dimse_timeout."""
    import pydicom
    from pynetdicom import AE, build_role, evt
    from pynetdicom.sop_class import CTImageStorage as CT
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as GET

    with InProcessServer(tmp_path / "d", dimse_timeout=1.0) as srv:
        dcmtk.store(srv.port, files[:2]).check()
        aborted = threading.Event()

        def on_store(event: Any) -> int:
            time.sleep(4)
            return 0x0000

        ae = AE(ae_title="SLOWGET")
        ae.add_requested_context(GET)
        ae.add_requested_context(CT, [ExplicitVRLittleEndian])
        assoc = ae.associate(
            "127.0.0.1",
            srv.port,
            ae_title="OPENPACS",
            ext_neg=[build_role(CT, scp_role=True)],
            evt_handlers=[(evt.EVT_C_STORE, on_store), (evt.EVT_ABORTED, lambda e: aborted.set())],
        )
        assert assoc.is_established
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
        t = time.monotonic()
        list(assoc.send_c_get(query, GET))
        assert aborted.wait(10)
        assert time.monotonic() - t < 8
        dcmtk.echo(srv.port).check()
