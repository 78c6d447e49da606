"""HTTPS on the web port (tls_cert/tls_key): TLS ≥ 1.2 only, Secure cookies, HSTS."""

from __future__ import annotations

import ssl
import time
import urllib.request

import pytest
import requests

from tests.helpers.server import OpenPACSServer
from tests.unit.security.tlsutil import make_pki


class HttpsServer(OpenPACSServer):
    def _wait_healthz(self) -> None:
        ctx = ssl.create_default_context(cafile=str(self.ca))
        deadline = time.monotonic() + self.startup_timeout
        while True:
            self._alive()
            try:
                with urllib.request.urlopen(f"https://127.0.0.1:{self.http_port}/healthz", timeout=5, context=ctx) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(self.log_tail())
            time.sleep(0.1)


@pytest.fixture(scope="module")
def https_server(tmp_path_factory) -> HttpsServer:
    base = tmp_path_factory.mktemp("https")
    pki = make_pki(base / "pki")
    server = HttpsServer(
        base / "data", settings={"auth": "on", "tls_cert": str(pki["cert"]), "tls_key": str(pki["key"]),
                            "dicom_tls_port": 0}  # HTTPS only here: no DICOM TLS listener on the fixed default port
    )
    server.ca = pki["ca"]
    server.start()
    yield server
    server.stop()


def test_https_headers_and_secure_cookie(https_server: HttpsServer) -> None:
    base = f"https://127.0.0.1:{https_server.http_port}"
    r = requests.get(f"{base}/login", verify=str(https_server.ca), timeout=30)
    assert r.status_code == 200
    assert "max-age=" in r.headers["strict-transport-security"]
    assert "Secure" in r.headers["set-cookie"] and "HttpOnly" in r.headers["set-cookie"]
    assert requests.get(f"{base}/dicom-web/studies", verify=str(https_server.ca), timeout=30).status_code == 401


def test_old_tls_refused(https_server: HttpsServer) -> None:
    import socket

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    with socket.create_connection(("127.0.0.1", https_server.http_port), timeout=10) as raw:
        with pytest.raises((ssl.SSLError, OSError)):
            with ctx.wrap_socket(raw) as s:
                s.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
                s.recv(10)


def test_plain_http_on_the_tls_port_gets_nothing(https_server: HttpsServer) -> None:
    with pytest.raises(requests.RequestException):
        requests.get(f"http://127.0.0.1:{https_server.http_port}/healthz", timeout=10)
