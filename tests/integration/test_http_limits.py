"""The HTTP listener's own limits (web/protocol.py) on a real `openpacs serve`: a client that never completes its
request headers is closed after http_header_timeout, and connections beyond http_max_connections are closed at once,
while the DICOM listener serves on."""

from __future__ import annotations

import socket
import time
import urllib.request

import pytest
from helpers import dcmtk
from helpers.server import OpenPACSServer


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    server = OpenPACSServer(
        tmp_path_factory.mktemp("httplimits") / "data",
        settings={"http_header_timeout": 1.0, "http_max_connections": 8},
    )
    server.start()
    yield server
    server.stop()


def _closed_by_server(sock: socket.socket, within: float) -> bool:
    """True if the server closes the connection within ``within`` s (bytes still in flight, such as the rest of a
    previous response, are read past)."""
    deadline = time.monotonic() + within
    while True:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            if sock.recv(65536) == b"":
                return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False


def _healthy(server: OpenPACSServer) -> bool:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/healthz", timeout=10) as r:
        return r.status == 200


def test_slow_headers_are_closed(limited) -> None:
    s = socket.create_connection(("127.0.0.1", limited.http_port))
    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
    started = time.monotonic()
    assert _closed_by_server(s, within=10)
    assert 0.5 < time.monotonic() - started < 9
    s.close()
    # a kept-alive connection's next request is held to the same limit
    s = socket.create_connection(("127.0.0.1", limited.http_port))
    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert b" 200 " in s.recv(65536).split(b"\r\n", 1)[0]
    s.sendall(b"GET /healthz HTTP/1.1\r\n")
    assert _closed_by_server(s, within=10)
    s.close()
    assert _healthy(limited)


def test_connections_beyond_the_limit_are_closed(limited) -> None:
    held = [socket.create_connection(("127.0.0.1", limited.http_port)) for _ in range(8)]
    try:
        time.sleep(0.3)
        extra = socket.create_connection(("127.0.0.1", limited.http_port))
        assert _closed_by_server(extra, within=0.8)  # at once, not after the header timeout
        extra.close()
        assert dcmtk.echo(limited.dicom_port).returncode == 0  # DICOM unaffected
    finally:
        for s in held:
            s.close()
    time.sleep(0.3)
    assert _healthy(limited)


@pytest.fixture(scope="module")
def limited_https(tmp_path_factory):
    from tests.integration.test_security_tls import HttpsServer
    from tests.unit.security.tlsutil import make_pki

    base = tmp_path_factory.mktemp("httpslimits")
    pki = make_pki(base / "pki")
    server = HttpsServer(
        base / "data",
        settings={"tls_cert": str(pki["cert"]), "tls_key": str(pki["key"]), "dicom_tls_port": 0,
                  "http_header_timeout": 1.0, "http_max_connections": 8},
    )
    server.ca = pki["ca"]
    server.start()
    yield server
    server.stop()


def test_https_limits_hold_before_the_handshake(limited_https) -> None:
    """Connections that never send a ClientHello count and time out like any other (HTTPS is where a hospital
    listens beyond loopback)."""
    import ssl

    port = limited_https.http_port
    silent = socket.create_connection(("127.0.0.1", port))
    assert _closed_by_server(silent, within=10)  # after the 1 s header timeout
    silent.close()
    held = [socket.create_connection(("127.0.0.1", port)) for _ in range(8)]
    try:
        time.sleep(0.3)
        extra = socket.create_connection(("127.0.0.1", port))
        assert _closed_by_server(extra, within=0.8)
        extra.close()
    finally:
        for s in held:
            s.close()
    time.sleep(0.3)
    ctx = ssl.create_default_context(cafile=str(limited_https.ca))
    with urllib.request.urlopen(f"https://127.0.0.1:{port}/healthz", timeout=10, context=ctx) as r:
        assert r.status == 200
