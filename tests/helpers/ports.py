"""Free TCP ports that stay clear of other pytest-xdist workers and of the kernel's ephemeral range."""

from __future__ import annotations

import os
import random
import socket
import threading

_lock = threading.Lock()
_handed_out: set[int] = set()


def _worker_index() -> int:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    digits = "".join(c for c in worker if c.isdigit())
    return int(digits) if digits else 0


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A port nobody listens on, from a 1000-port block of 20000-31999 owned by this xdist worker.

    Linux hands out client (ephemeral) ports from 32768 up, so a port below that is not taken by an outgoing
    connection between the check and the server's bind."""
    base = 20000 + (_worker_index() % 12) * 1000
    with _lock:
        for _ in range(2000):
            port = base + random.randrange(1000)
            if port in _handed_out:
                continue
            if _bindable(port):
                _handed_out.add(port)
                return port
    raise RuntimeError("no free port found")


def wait_for_port(port: int, host: str = "127.0.0.1", timeout: float = 60.0, alive=None) -> None:
    """Wait until something accepts TCP connections on port. ``alive`` is called between attempts and may raise."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        if alive is not None:
            alive()
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s") from None
            time.sleep(0.05)
