"""Hostile input: 200+ malformed data sets over C-STORE and mutated PDUs over raw sockets, while a concurrent echoscu
loop must keep succeeding. The server answers every bad data set with a failure status, drops bad PDUs / associations
without buffering absurd lengths, keeps running, and nothing malformed ends up in the index."""

from __future__ import annotations

import logging
import random
import socket
import struct
import threading
from pathlib import Path

import pytest
from helpers import dcmtk, hostile
from helpers.dicomdata import CT_IMAGE, MR_IMAGE, build_query_dataset
from helpers.server import make_server, stop_cleanly
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

pytestmark = pytest.mark.usefixtures("require_dcmtk")

SETTINGS = {"artim_timeout": 5.0, "network_timeout": 15.0, "dimse_timeout": 15.0, "max_pdu": 65536}


class EchoLoop:
    """echoscu in a loop on a thread; every failure is kept."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.stop = threading.Event()
        self.ok = 0
        self.failures: list[str] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            res = dcmtk.echo(self.port)
            if res.returncode == 0:
                self.ok += 1
            else:
                self.failures.append(res.output[-1500:])

    def __enter__(self) -> EchoLoop:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(120)


@pytest.fixture(scope="module")
def hostile_server(request, backend, tmp_path_factory):
    srv = make_server(request, tmp_path_factory.mktemp(f"hostile-{backend}"), backend, settings=dict(SETTINGS))
    srv.start()
    yield srv
    stop_cleanly(srv)


@pytest.fixture(scope="module")
def baseline(hostile_server, tmp_path_factory):
    """A few valid instances stored first; the index must hold exactly these at the end."""
    data = build_query_dataset(tmp_path_factory.mktemp("baseline"), prefix="BASE-")
    res = dcmtk.store(hostile_server.dicom_port, data.files)
    assert set(dcmtk.parse_store_log(res.output).values()) == {"Success"}, res.output[-4000:]
    return data


def indexed_count(srv, tmp: Path) -> int:
    studies = dcmtk.find(srv.dicom_port, "study", "STUDY", {"StudyInstanceUID": "", "NumberOfStudyRelatedInstances": ""},
                         tmp / "count")
    return sum(int(s.NumberOfStudyRelatedInstances or 0) for s in studies)


def hostile_in_index(srv, tmp: Path, patient_id: str = "HOSTILE*") -> list[str]:
    found = dcmtk.find(srv.dicom_port, "patient", "PATIENT", {"PatientID": patient_id}, tmp / "h")
    found += dcmtk.find(srv.dicom_port, "study", "STUDY",
                        {"PatientName": "Hostile*", "PatientID": patient_id, "StudyInstanceUID": ""}, tmp / "h2")
    return [str(r.get("PatientID") or r.get("StudyInstanceUID")) for r in found]


# -----------------------------------------------------------------------------------------------------------------
# malformed data sets


class _UnexpectedMessages(logging.Handler):
    """Counts pynetdicom's "Received unexpected ... service message" warnings while in use."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "Received unexpected" in record.getMessage():
            self.count += 1

    def __enter__(self) -> _UnexpectedMessages:
        logging.getLogger("pynetdicom.association").addHandler(self)
        return self

    def __exit__(self, *_exc: object) -> None:
        logging.getLogger("pynetdicom.association").removeHandler(self)


def test_malformed_datasets_get_failure_statuses(hostile_server, baseline, tmp_path):
    from pynetdicom import AE, _config
    from pynetdicom.status import code_to_category

    rng = random.Random(20240101)
    study = generate_uid()
    files = hostile.malformed_files(tmp_path / "bad", rng, study)
    assert len(files) >= 200
    before = indexed_count(hostile_server, tmp_path)

    ae = AE(ae_title="HOSTILESCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for sop in (CT_IMAGE, MR_IMAGE):
        ae.add_requested_context(sop, ExplicitVRLittleEndian)
    old_chunked = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True  # send the file's data set bytes as they are, without decoding
    results: dict[str, list[str]] = {}
    accepted: list[str] = []
    try:
        with EchoLoop(hostile_server.dicom_port) as echoes:
            assoc = None
            for m in files:
                if assoc is None or not assoc.is_established:
                    assoc = ae.associate("127.0.0.1", hostile_server.dicom_port, ae_title=hostile_server.aet)
                    assert assoc.is_established, "the server refused a new association during the hostile run"
                with _UnexpectedMessages() as unexpected:
                    status = assoc.send_c_store(m.path)
                if "Status" not in status and unexpected.count:
                    # pynetdicom's own race (pydicom/pynetdicom#875): its reactor thread took the server's response
                    # off the queue as an "unexpected" message before send_c_store waited for it, so the client
                    # waited on until the server's idle timeout closed the association. The server did answer (that
                    # is what was "unexpected"); the data set is sent again on a new association.
                    assoc = ae.associate("127.0.0.1", hostile_server.dicom_port, ae_title=hostile_server.aet)
                    assert assoc.is_established, "the server refused a new association during the hostile run"
                    status = assoc.send_c_store(m.path)
                if "Status" not in status:
                    outcome = "no status (association aborted)"
                else:
                    code = int(status.Status)
                    outcome = f"{code_to_category(code)} 0x{code:04X}"
                    if code_to_category(code) != "Failure":
                        accepted.append(f"{m.path.name}: {outcome}")
                results.setdefault(m.kind, []).append(outcome)
            if assoc is not None and assoc.is_established:
                assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old_chunked
    summary = "\n".join(f"  {k}: {sorted(set(v))}" for k, v in sorted(results.items()))
    assert not echoes.failures, f"{len(echoes.failures)} echoes failed during the run:\n{echoes.failures[0]}"
    assert echoes.ok > 0
    assert not accepted, f"{len(accepted)} malformed data sets were not refused:\n" + "\n".join(accepted[:40]) + \
        f"\nper kind:\n{summary}"
    aborted = [k for k, v in results.items() if any(o.startswith("no status") for o in v)]
    assert not aborted, f"bad data sets answered with an abort instead of a failure status:\n{summary}"
    mismatch = set(results["sop-class-mismatch"])
    assert mismatch <= {"Failure 0xA900"} | {f"Failure 0x{c:04X}" for c in range(0xA900, 0xAA00)}, mismatch
    assert dcmtk.echo(hostile_server.dicom_port).returncode == 0
    assert indexed_count(hostile_server, tmp_path) == before
    assert hostile_in_index(hostile_server, tmp_path, "HOSTILE") == []


def test_malformed_files_via_storescu(hostile_server, baseline, tmp_path):
    """The same kind of files through DCMTK's storescu (it refuses to read some of them itself; none may succeed)."""
    rng = random.Random(99)
    files = hostile.malformed_files(tmp_path / "bad", rng, generate_uid(), patient_id="HOSTILE-DCMTK")
    # storescu "repairs" a UID with a space in it (removes the space), so that file is valid once sent
    wanted = [m.path for m in files if m.kind.startswith(("missing-", "invalid-", "truncated", "overrun"))
              and " " not in m.note]
    before = indexed_count(hostile_server, tmp_path)
    with EchoLoop(hostile_server.dicom_port) as echoes:
        res = dcmtk.store(hostile_server.dicom_port, wanted, "-xe")
    statuses = dcmtk.parse_store_log(res.output)
    assert statuses, f"storescu sent nothing:\n{res.output[-3000:]}"
    accepted = {f: s for f, s in statuses.items() if s == "Success" or s.startswith("Warning")}
    assert not accepted, f"malformed files accepted via storescu: {accepted}"
    assert not echoes.failures, echoes.failures[0]
    assert indexed_count(hostile_server, tmp_path) == before
    assert hostile_in_index(hostile_server, tmp_path, "HOSTILE-DCMTK") == []


# -----------------------------------------------------------------------------------------------------------------
# mutated PDUs


class Raw:
    def __init__(self, port: int, timeout: float = 60.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _recv_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("closed")
            buf += chunk
        return buf

    def read_pdu(self) -> tuple[int, bytes]:
        head = self._recv_exact(6)
        pdu_type, _, length = struct.unpack(">BBI", head)
        return pdu_type, self._recv_exact(length)

    def associate(self, aet: str) -> int:
        """Associate for Verification; returns the server's maximum PDU length."""
        self.send(hostile.associate_rq(called=aet))
        pdu_type, body = self.read_pdu()
        assert pdu_type == 0x02, f"expected A-ASSOCIATE-AC, got PDU type 0x{pdu_type:02X}"
        max_len = 0
        off = 68
        while off < len(body):
            item_type, _, length = struct.unpack_from(">BBH", body, off)
            if item_type == 0x50:
                sub = off + 4
                while sub < off + 4 + length:
                    st, _, sl = struct.unpack_from(">BBH", body, sub)
                    if st == 0x51:
                        max_len = struct.unpack_from(">I", body, sub + 4)[0]
                    sub += 4 + sl
            off += 4 + length
        return max_len

    def expect_refusal(self) -> str:
        """The server must end this: an A-ABORT / A-ASSOCIATE-RJ PDU or a closed connection (no hang)."""
        try:
            while True:
                pdu_type, _ = self.read_pdu()
                if pdu_type in (0x03, 0x07):
                    return {0x03: "A-ASSOCIATE-RJ", 0x07: "A-ABORT"}[pdu_type]
        except (ConnectionError, OSError) as e:
            if isinstance(e, socket.timeout):
                raise AssertionError("the server kept a bad connection open") from None
            return "closed"

    def flood_until_closed(self, limit: int = 64 * 1024 * 1024) -> int:
        """Keep sending zeros; the server must drop the connection before `limit` bytes (it may not buffer them)."""
        sent = 0
        chunk = b"\0" * 65536
        try:
            while sent < limit:
                self.sock.sendall(chunk)
                sent += len(chunk)
        except TimeoutError:
            raise AssertionError(f"server stopped reading after {sent} bytes but kept the connection open") from None
        except OSError:
            return sent
        raise AssertionError(f"the server accepted {limit} bytes of a PDU with an absurd declared length")

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def _pdu_cases(aet: str):
    rng = random.Random(4242)

    def garbage(r):
        r.send(rng.randbytes(rng.randrange(64, 4096)))
        return r.expect_refusal()

    def unknown_type(r):
        r.send(struct.pack(">BBI", 0x99, 0, 10) + b"\0" * 10)
        return r.expect_refusal()

    def rq_length_too_long(r):
        pdu = bytearray(hostile.associate_rq(called=aet))
        struct.pack_into(">I", pdu, 2, len(pdu) - 6 + 500)
        r.send(bytes(pdu))
        return r.expect_refusal()  # ARTIM ends it

    def rq_length_too_short(r):
        pdu = bytearray(hostile.associate_rq(called=aet))
        struct.pack_into(">I", pdu, 2, 40)
        r.send(bytes(pdu))
        return r.expect_refusal()

    def rq_item_length_lies(r):
        pdu = bytearray(hostile.associate_rq(called=aet))
        struct.pack_into(">H", pdu, 6 + 68 + 2, 0xFFFF)  # application context item length
        r.send(bytes(pdu))
        return r.expect_refusal()

    def rq_truncated_then_close(r):
        pdu = hostile.associate_rq(called=aet)
        r.send(pdu[: rng.randrange(7, len(pdu) - 1)])
        r.close()
        return "client closed"

    def rq_huge_length(r):
        r.send(struct.pack(">BBI", 0x01, 0, 0xFFFFFFF0))
        return f"closed after {r.flood_until_closed()} bytes"

    def pdata_before_association(r):
        r.send(hostile.p_data(1, hostile.echo_command()))
        return r.expect_refusal()

    def release_before_association(r):
        r.send(hostile.RELEASE_RQ)
        return r.expect_refusal()

    def valid_echo(r):
        r.associate(aet)
        r.send(hostile.p_data(1, hostile.echo_command()))
        pdu_type, body = r.read_pdu()
        assert pdu_type == 0x04, f"no P-DATA-TF answer to a valid C-ECHO (got 0x{pdu_type:02X})"
        r.send(hostile.RELEASE_RQ)
        pdu_type, _ = r.read_pdu()
        assert pdu_type == 0x06, "no A-RELEASE-RP"
        return "echo ok"

    def second_associate_rq(r):
        r.associate(aet)
        r.send(hostile.associate_rq(called=aet))
        return r.expect_refusal()

    def pdata_huge_length(r):
        r.associate(aet)
        r.send(struct.pack(">BBI", 0x04, 0, 0xFFFFFFF0))
        return f"closed after {r.flood_until_closed()} bytes"

    def pdata_over_max_pdu(r):
        max_len = r.associate(aet)
        assert max_len, "A-ASSOCIATE-AC without a maximum length"
        payload = b"\0" * (max_len + 4096)
        r.send(struct.pack(">BBI", 0x04, 0, len(payload)))
        try:
            r.sock.sendall(payload)
        except OSError:
            return "closed while sending"
        return r.expect_refusal()

    def pdv_longer_than_pdu(r):
        r.associate(aet)
        cmd = hostile.echo_command()
        pdv = struct.pack(">IBB", len(cmd) + 5000, 1, 0x03) + cmd
        r.send(struct.pack(">BBI", 0x04, 0, len(pdv)) + pdv)
        return r.expect_refusal()

    def pdv_zero_length(r):
        r.associate(aet)
        r.send(struct.pack(">BBI", 0x04, 0, 4) + struct.pack(">I", 0))
        return r.expect_refusal()

    def pdata_unknown_context(r):
        r.associate(aet)
        r.send(hostile.p_data(99, hostile.echo_command()))
        return r.expect_refusal()

    def garbage_command(r):
        r.associate(aet)
        r.send(hostile.p_data(1, rng.randbytes(300)))
        return r.expect_refusal()

    def truncated_pdata_then_close(r):
        r.associate(aet)
        pdu = hostile.p_data(1, hostile.echo_command())
        r.send(pdu[:-10])
        r.close()
        return "client closed"

    def garbage_after_association(r):
        r.associate(aet)
        r.send(rng.randbytes(2000))
        return r.expect_refusal()

    return [garbage, unknown_type, rq_length_too_long, rq_length_too_short, rq_item_length_lies, rq_truncated_then_close,
            rq_huge_length, pdata_before_association, release_before_association, valid_echo, second_associate_rq,
            pdata_huge_length, pdata_over_max_pdu, pdv_longer_than_pdu, pdv_zero_length, pdata_unknown_context,
            garbage_command, truncated_pdata_then_close, garbage_after_association]


CASE_NAMES = [f.__name__ for f in _pdu_cases("X")]


@pytest.mark.parametrize("case", CASE_NAMES)
def test_mutated_pdu(case, hostile_server, baseline):
    fn = next(f for f in _pdu_cases(hostile_server.aet) if f.__name__ == case)
    with EchoLoop(hostile_server.dicom_port) as echoes:
        for _ in range(3):
            r = Raw(hostile_server.dicom_port)
            try:
                fn(r)
            finally:
                r.close()
    assert not echoes.failures, f"echo failed while sending {case}:\n{echoes.failures[0]}"
    assert hostile_server.running
    assert dcmtk.echo(hostile_server.dicom_port).returncode == 0


def test_random_pdu_fuzz(hostile_server, baseline):
    """Random mutations (bit flips, truncation, length edits) of valid PDU sequences, 150 connections."""
    rng = random.Random(777)
    aet = hostile_server.aet
    valid = [hostile.associate_rq(called=aet), hostile.p_data(1, hostile.echo_command()), hostile.RELEASE_RQ]
    with EchoLoop(hostile_server.dicom_port) as echoes:
        for _ in range(150):
            stream = bytearray(b"".join(valid))
            for _ in range(rng.randrange(1, 6)):
                op = rng.randrange(3)
                pos = rng.randrange(len(stream))
                if op == 0:
                    stream[pos] ^= 1 << rng.randrange(8)
                elif op == 1:
                    del stream[pos:pos + rng.randrange(1, 32)]
                else:
                    stream[pos:pos] = rng.randbytes(rng.randrange(1, 32))
            r = Raw(hostile_server.dicom_port, timeout=60)
            try:
                r.send(bytes(stream))
                try:
                    r.sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                # read whatever comes back until the server closes (it must not hang on a half-closed peer)
                try:
                    while r.sock.recv(65536):
                        pass
                except TimeoutError:
                    raise AssertionError("server kept a fuzzed connection open") from None
                except OSError:
                    pass
            finally:
                r.close()
    assert not echoes.failures, echoes.failures[0]
    assert dcmtk.echo(hostile_server.dicom_port).returncode == 0


def test_idle_connections_do_not_block_service(hostile_server, baseline):
    """Connections that never send anything are ended by ARTIM; meanwhile echo still works."""
    idle = [Raw(hostile_server.dicom_port) for _ in range(20)]
    try:
        assert dcmtk.echo(hostile_server.dicom_port).returncode == 0
        for r in idle:
            assert r.expect_refusal() in ("closed", "A-ABORT")
    finally:
        for r in idle:
            r.close()


def test_index_untouched_and_server_alive(hostile_server, baseline, tmp_path):
    assert hostile_server.running
    assert dcmtk.echo(hostile_server.dicom_port).returncode == 0
    assert indexed_count(hostile_server, tmp_path) == len(baseline.files)
    assert hostile_in_index(hostile_server, tmp_path) == []
