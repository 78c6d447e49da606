"""The MLLP listener's transport: TLS with the DICOM TLS certificates (mutual TLS when tls_ca is set), the
connection limit, the idle timeout, and ``hl7_port = 0``. A real `openpacs serve`; python-hl7 builds the messages."""

from __future__ import annotations

import socket
import ssl

import hl7
import pytest
from helpers.ports import free_port
from helpers.server import OpenPACSServer, stop_cleanly
from unit.security.tlsutil import make_pki

VT, FS, CR = b"\x0b", b"\x1c", b"\r"


def msg(cid: str) -> bytes:
    return (f"MSH|^~\\&|RIS|HOSP|PACS|RAD|2025||ADT^A08|{cid}|P|2.5\rEVN|A08\r"
            f"PID|1||T-{cid}^^^HOSP||Tls^Patient\r").encode()


def exchange(sock: socket.socket, data: bytes) -> hl7.Message:
    sock.sendall(VT + data + FS + CR)
    buf = b""
    while FS not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before the ACK")
        buf += chunk
    return hl7.parse(buf[buf.index(VT) + 1 : buf.index(FS)].decode())


def closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except (ConnectionResetError, ssl.SSLError):
        return True


class HttpsServer(OpenPACSServer):
    """With tls_cert the web side is HTTPS: wait on the HL7 port instead of /healthz over plain HTTP."""

    def _wait_healthz(self) -> None:
        from helpers.ports import wait_for_port

        wait_for_port(self.hl7_port, timeout=self.startup_timeout, alive=self._alive)


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    base = tmp_path_factory.mktemp("hl7tls")
    pki = make_pki(base / "pki", "good", rsa_keys=True, dual_use=True)
    rogue = make_pki(base / "rogue", "rogue", rsa_keys=True, dual_use=True)
    server = HttpsServer(base / "data", settings={
        "tls_cert": str(pki["cert"]), "tls_key": str(pki["key"]), "tls_ca": str(pki["ca"]), "hl7_tls": True,
        "dicom_tls_port": free_port()})
    server.start()
    yield server, pki, rogue
    stop_cleanly(server)


def _client(pki: dict, cert: bool = True) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki["ca"]))
    if cert:
        ctx.load_cert_chain(str(pki["client_cert"]), str(pki["client_key"]))
    return ctx


def test_mllp_over_tls_with_client_certificates(tls_server) -> None:
    server, pki, rogue = tls_server
    with socket.create_connection(("127.0.0.1", server.hl7_port), timeout=30) as raw:
        with _client(pki).wrap_socket(raw, server_hostname="localhost") as s:
            for i in range(3):
                ack = exchange(s, msg(f"TLS-{i}"))
                assert str(ack.segment("MSA")[1]) == "AA" and str(ack.segment("MSA")[2]) == f"TLS-{i}"
    # no client certificate, or one of another CA: no session, no message applied
    for ctx in (_client(pki, cert=False), _client({**rogue, "ca": pki["ca"]})):
        with socket.create_connection(("127.0.0.1", server.hl7_port), timeout=30) as raw:
            with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
                with ctx.wrap_socket(raw, server_hostname="localhost") as s:
                    exchange(s, msg("TLS-BAD"))
    # plain MLLP on the TLS port gets no ACK
    with socket.create_connection(("127.0.0.1", server.hl7_port), timeout=30) as s:
        s.sendall(VT + msg("PLAIN-1") + FS + CR)
        try:
            data = s.recv(65536)
        except (ConnectionResetError, TimeoutError):
            data = b""
        assert b"MSA" not in data


def test_idle_timeout_connection_limit_and_port_off(tmp_path) -> None:
    server = OpenPACSServer(tmp_path / "data", settings={"hl7_idle_timeout": 1.0, "hl7_max_connections": 2})
    server.start()
    try:
        a = socket.create_connection(("127.0.0.1", server.hl7_port), timeout=60)
        b = socket.create_connection(("127.0.0.1", server.hl7_port), timeout=60)
        assert str(exchange(a, msg("LIM-1")).segment("MSA")[1]) == "AA"
        assert str(exchange(b, msg("LIM-2")).segment("MSA")[1]) == "AA"
        c = socket.create_connection(("127.0.0.1", server.hl7_port), timeout=60)
        assert closed_by_server(c)  # a third connection over hl7_max_connections = 2 is closed at once
        c.close()
        # idle connections are closed by the server (1 s idle timeout; the socket waits up to 60 s)
        assert closed_by_server(a) and closed_by_server(b)
        a.close()
        b.close()
        with socket.create_connection(("127.0.0.1", server.hl7_port), timeout=60) as d:
            assert str(exchange(d, msg("LIM-3")).segment("MSA")[1]) == "AA"  # slots were freed
    finally:
        stop_cleanly(server)
    off = OpenPACSServer(tmp_path / "off", settings={"hl7_port": 0})
    flag = ["--hl7-port", str(off.hl7_port)]
    off.argv = lambda: [a for i, a in enumerate(OpenPACSServer.argv(off))  # type: ignore[method-assign]
                        if OpenPACSServer.argv(off)[i : i + 2] != flag and OpenPACSServer.argv(off)[i - 1 : i + 1] != flag]
    off.start()
    try:
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", off.hl7_port), timeout=5).close()
        assert "HL7 MLLP" not in off.log_text()  # no listener at all, not one on the default 2575
    finally:
        stop_cleanly(off)
