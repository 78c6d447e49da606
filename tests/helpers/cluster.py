"""Several OpenPACS nodes on one PostgreSQL index and one S3 bucket, with Debian's HAProxy in front (issue 16).

The nodes are real `openpacs serve` processes (helpers.server.OpenPACSServer) that share nothing but the index URL
and the bucket; HAProxy balances DIMSE in TCP mode and HTTP in HTTP mode, with health checks, as docs/scale-out.md
describes for production.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from .ports import free_port, wait_for_port
from .server import OpenPACSServer


def haproxy_binary() -> str | None:
    for p in ("/usr/sbin/haproxy", "/usr/bin/haproxy"):
        if Path(p).exists():
            return p
    return shutil.which("haproxy")


class HAProxy:
    """HAProxy on loopback: ``dicom_port`` (TCP, round robin) and ``http_port`` (HTTP, /healthz checks)."""

    def __init__(self, workdir: Path, nodes: list[OpenPACSServer]) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.nodes = nodes
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.cfg = self.workdir / "haproxy.cfg"
        self.proc: subprocess.Popen | None = None

    def config(self) -> str:
        dicom = "\n".join(f"    server n{i} 127.0.0.1:{n.dicom_port} check inter 300 fall 1 rise 2"
                          for i, n in enumerate(self.nodes, 1))
        http = "\n".join(f"    server n{i} 127.0.0.1:{n.http_port} check inter 300 fall 1 rise 2"
                         for i, n in enumerate(self.nodes, 1))
        return f"""global
    maxconn 4096

defaults
    timeout connect 2s
    timeout client 120s
    timeout server 120s
    retries 3
    option redispatch

frontend dicom
    mode tcp
    bind 127.0.0.1:{self.dicom_port}
    default_backend dicom_nodes

backend dicom_nodes
    mode tcp
    balance roundrobin
{dicom}

frontend web
    mode http
    bind 127.0.0.1:{self.http_port}
    default_backend web_nodes

backend web_nodes
    mode http
    balance roundrobin
    option httpchk GET /healthz
    retry-on conn-failure empty-response
{http}
"""

    def start(self) -> HAProxy:
        binary = haproxy_binary()
        assert binary, "haproxy not installed"
        self.cfg.write_text(self.config())
        subprocess.run([binary, "-c", "-f", str(self.cfg)], check=True, capture_output=True, text=True)
        self.log = open(self.workdir / "haproxy.log", "a")
        self.proc = subprocess.Popen([binary, "-db", "-f", str(self.cfg)], stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        wait_for_port(self.dicom_port, timeout=30)
        wait_for_port(self.http_port, timeout=30)
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None


def start_nodes(nodes: list[OpenPACSServer]) -> None:
    """Start every node at once (they migrate the shared index in turn, under the advisory lock)."""
    import threading

    errors: list[BaseException] = []

    def one(n: OpenPACSServer) -> None:
        try:
            n.start()
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(n,)) for n in nodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def wait_until(pred, timeout: float = 60.0, interval: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)
