"""The DIMSE listener: one accepting process handing connections to itself and to worker processes.

The serving process accepts every connection and passes it (SCM_RIGHTS over a SOCK_SEQPACKET pair) to the least
loaded process, itself included. That spreads associations evenly over the cores (SO_REUSEPORT hashing leaves one
process with 3 of 4 associations far too often) and keeps one exact count for ``max_associations``. Each worker
builds its own Context (``build_context(settings, migrate=False)``) and its own thread pool.

DICOM TLS (``dicom_tls_port`` with ``tls_cert``): a second listening socket in the same serving process. Its
connections are handed over the same way, marked as TLS; the process that owns the connection does the handshake
(``connect_accepted_socket(ssl=...)``) and serves it with the same ``Association`` code. The plain listener is
unchanged by it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import multiprocessing
import os
import signal
import socket
import ssl
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .. import eventloop
from ..config import Settings
from . import access
from .association import Association

log = logging.getLogger("openpacs.dimse")

EXECUTOR_THREADS = 16
SHUTDOWN_GRACE = 30.0
ACCEPT_PAUSE = 0.5  # seconds without accepting after accept() failed (out of file descriptors)
_OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


class Endpoint:
    """What associations in one process share: settings, services, the thread pool, the live set."""

    def __init__(
        self,
        settings: Settings,
        ctx: Any,
        loop: asyncio.AbstractEventLoop,
        executor: ThreadPoolExecutor,
        on_closed: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self.ctx = ctx
        self.loop = loop
        self.executor = executor
        self.associations: set[Association] = set()
        self._on_closed = on_closed
        self._stores = 0
        self._stores_idle = asyncio.Event()
        self._stores_idle.set()
        self._server_tls: ssl.SSLContext | None = None
        self._client_tls: ssl.SSLContext | None = None
        self.audit_jobs: set[asyncio.Future[Any]] = set()

    @property
    def server_tls(self) -> ssl.SSLContext:
        """The DICOM TLS server context of this process (built once; SSL contexts do not cross processes)."""
        if self._server_tls is None:
            self._server_tls = access.tls_context(self.settings)
        return self._server_tls

    @property
    def client_tls(self) -> ssl.SSLContext:
        if self._client_tls is None:
            self._client_tls = access.client_tls_context(self.settings)
        return self._client_tls

    def in_background(self, fn: Callable[[], None]) -> None:
        """Run blocking audit work (a patient lookup, then ``record``) off the event loop; awaited at shutdown."""
        try:
            fut = self.loop.run_in_executor(self.executor, fn)
        except RuntimeError:  # executor already shut down
            fn()
            return
        self.audit_jobs.add(fut)
        fut.add_done_callback(self.audit_jobs.discard)

    def protocol(self, reject_limit: bool = False) -> Association:
        return Association(self, reject_limit=reject_limit)

    def association_opened(self, assoc: Association) -> None:
        if assoc._requestor is None:
            self.associations.add(assoc)
            monitor = getattr(self.ctx, "monitor", None)
            if monitor is not None:
                monitor.association_opened()

    def association_closed(self, assoc: Association) -> None:
        if assoc in self.associations:
            self.associations.discard(assoc)
            monitor = getattr(self.ctx, "monitor", None)
            if monitor is not None:
                monitor.association_closed()
            if self._on_closed is not None:
                self._on_closed()

    def stores_started(self) -> None:
        self._stores += 1
        self._stores_idle.clear()

    def stores_finished(self) -> None:
        self._stores -= 1
        if self._stores <= 0:
            self._stores_idle.set()

    async def shutdown(self, grace: float = SHUTDOWN_GRACE) -> None:
        """Let in-flight C-STOREs finish (bounded), then abort what is still open."""
        try:
            await asyncio.wait_for(self._stores_idle.wait(), timeout=grace)
        except TimeoutError:
            log.warning("shutdown: %d C-STORE(s) still in progress after %.0fs", self._stores, grace)
        for assoc in list(self.associations):
            assoc.abort("server shutting down")
        for assoc in list(self.associations):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(assoc.closed), timeout=2)
        if self.audit_jobs:
            await asyncio.wait(list(self.audit_jobs), timeout=10)

    def adopt(self, sock: socket.socket, reject_limit: bool = False, tls: bool = False) -> None:
        """Serve an accepted connection in this process (after a TLS handshake if it came to the TLS port)."""
        sock.setblocking(False)

        async def connect() -> None:
            try:
                if tls:
                    try:
                        peer = sock.getpeername()[0]
                    except OSError:
                        peer = ""
                    try:
                        await self.loop.connect_accepted_socket(
                            lambda: self.protocol(reject_limit),
                            sock,
                            ssl=self.server_tls,
                            ssl_handshake_timeout=self.settings.artim_timeout,
                        )
                    except ssl.SSLError as exc:
                        self.tls_refused(peer, exc)
                        raise
                else:
                    await self.loop.connect_accepted_socket(lambda: self.protocol(reject_limit), sock)
            except Exception as exc:  # noqa: BLE001
                log.warning("could not serve connection%s: %r", " (DICOM TLS)" if tls else "", exc)
                sock.close()
                if self._on_closed is not None:
                    self._on_closed()

        self.loop.create_task(connect())

    def tls_refused(self, peer: str, exc: ssl.SSLError) -> None:
        """A failed TLS handshake (plain DICOM on the TLS port, an untrusted or missing client certificate, an old
        protocol version) is a node authentication failure: audited as a Security Alert."""
        reason = getattr(exc, "reason", None) or str(exc)
        access.security_alert(self.ctx, "", peer, "110126", f"DICOM TLS handshake refused: {reason}", user=peer)


class _Worker:
    def __init__(self, index: int, process: Any, ctrl: socket.socket) -> None:
        self.index = index
        self.process = process
        self.ctrl = ctrl
        self.ready = False
        self.alive = True
        self.load = 0


class _Dispatcher:
    def __init__(self, settings: Settings, endpoint: Endpoint, lsock: socket.socket) -> None:
        self.settings = settings
        self.endpoint = endpoint
        self.lsock = lsock
        self.tls_sock: socket.socket | None = None
        self.local_load = 0
        self.workers: list[_Worker] = []
        self._turn = 0
        self.stopping = False

    def local_closed(self) -> None:
        self.local_load = max(0, self.local_load - 1)

    def total(self) -> int:
        return self.local_load + sum(w.load for w in self.workers if w.alive)

    def accept(self) -> None:
        self._accept_all(self.lsock, self.accept, "DICOM", tls=False)

    def accept_tls(self) -> None:
        assert self.tls_sock is not None
        self._accept_all(self.tls_sock, self.accept_tls, "DICOM TLS", tls=True)

    def _accept_all(self, sock: socket.socket, callback: Callable[[], None], what: str, tls: bool) -> None:
        """Take every connection waiting on ``sock`` (``callback``: the reader registered for it)."""
        while True:
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _OUT_OF_RESOURCES:
                    self._accept_failed(sock, callback, what, exc)
                else:  # one aborted connection: the next ones are fine
                    log.warning("%s: accept failed: %s", what, exc)
                return
            self.dispatch(conn, tls=tls)

    @staticmethod
    def _accept_failed(sock: socket.socket, callback: Callable[[], None], what: str, exc: OSError) -> None:
        """Out of descriptors (or memory): the pending connection stays queued and the socket stays readable, so
        listening on would spin. Stop listening for ACCEPT_PAUSE seconds; one log line per pause."""
        log.warning("%s: accept failed: %s; accepting again in %.1f s", what, exc, ACCEPT_PAUSE)
        loop = asyncio.get_running_loop()
        loop.remove_reader(sock)

        def resume() -> None:
            if sock.fileno() >= 0:  # not closed by a shutdown meanwhile
                loop.add_reader(sock, callback)

        loop.call_later(ACCEPT_PAUSE, resume)

    def dispatch(self, conn: socket.socket, tls: bool = False) -> None:
        if self.total() >= self.settings.max_associations:
            self.local_load += 1
            self.endpoint.adopt(conn, reject_limit=True, tls=tls)
            return
        ready = [w for w in self.workers if w.alive and w.ready]
        self._turn += 1
        # least loaded first; ties rotate so that the serving process does not always take the first one
        choices: list[tuple[int, int, _Worker | None]] = [(self.local_load, self._turn % (len(ready) + 1), None)]
        choices += [(w.load, (self._turn + i + 1) % (len(ready) + 1), w) for i, w in enumerate(ready)]
        _, _, target = min(choices, key=lambda c: (c[0], c[1]))
        if target is not None:
            try:
                socket.send_fds(target.ctrl, [b"T" if tls else b"C"], [conn.fileno()])
                target.load += 1
                conn.close()
                return
            except OSError as exc:
                log.warning("could not hand a connection to DIMSE worker %d: %s", target.index, exc)
        self.local_load += 1
        self.endpoint.adopt(conn, tls=tls)

    def on_worker_message(self, worker: _Worker) -> None:
        while True:
            try:
                msg = worker.ctrl.recv(64)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                msg = b""
            if not msg:
                if worker.alive and not self.stopping:
                    log.warning("DIMSE worker %d exited", worker.index)
                worker.alive = False
                worker.load = 0
                asyncio.get_running_loop().remove_reader(worker.ctrl)
                if worker.process.pid is not None:  # its open associations no longer count in /metrics
                    from ..services.metrics import process_exited

                    process_exited(worker.process.pid)
                return
            if msg == b"R":
                worker.ready = True
            elif msg == b"D":
                worker.load = max(0, worker.load - 1)


def _listen(settings: Settings, port: int | None = None) -> socket.socket:
    host = settings.dicom_host or None
    port = settings.dicom_port if port is None else port
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, socktype, proto, _, addr = infos[0]
    sock = socket.socket(family, socktype, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(addr)
    sock.listen(512)
    sock.setblocking(False)
    return sock


async def serve_dimse(settings: Settings, ctx: Any, stop: asyncio.Event, ready: asyncio.Event | None = None) -> None:
    """Serve DICOM on (dicom_host, dicom_port) until ``stop`` is set; runs ``worker_count - 1`` worker processes.

    ``ready`` is set once listening, and also when the start fails (the exception is this coroutine's result), so
    that nobody waits for a listener that will never be."""
    loop = asyncio.get_running_loop()
    for warning in access.settings_warnings(settings):
        log.warning("%s", warning)
    executor = ThreadPoolExecutor(max_workers=EXECUTOR_THREADS, thread_name_prefix="dimse")
    endpoint = Endpoint(settings, ctx, loop, executor)
    tls_on = bool(settings.tls_cert) and settings.dicom_tls_port > 0
    try:
        if tls_on:
            endpoint.server_tls  # noqa: B018 - a bad certificate or key stops the start, before anything listens
        lsock = _listen(settings)
    except BaseException:
        executor.shutdown(wait=False)
        if ready is not None:
            ready.set()
        raise
    dispatcher = _Dispatcher(settings, endpoint, lsock)
    if tls_on:
        try:
            dispatcher.tls_sock = _listen(settings, settings.dicom_tls_port)
        except OSError as exc:
            lsock.close()
            executor.shutdown(wait=False)
            if ready is not None:
                ready.set()
            raise OSError(exc.errno, f"dicom_tls_port {settings.dicom_tls_port}: {exc.strerror}") from exc
    endpoint._on_closed = dispatcher.local_closed
    mp = multiprocessing.get_context("spawn")
    for index in range(1, settings.worker_count):
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        proc = mp.Process(
            target=_worker_main, args=(settings, child, index), name=f"openpacs-dimse-{index}", daemon=True
        )
        proc.start()
        child.close()
        parent.setblocking(False)
        worker = _Worker(index, proc, parent)
        dispatcher.workers.append(worker)
        loop.add_reader(parent, dispatcher.on_worker_message, worker)
    loop.add_reader(lsock, dispatcher.accept)
    if dispatcher.tls_sock is not None:
        loop.add_reader(dispatcher.tls_sock, dispatcher.accept_tls)
        log.info(
            "DICOM TLS listening on %s:%d (TLS >= 1.2, BCP195 ciphers, %s)",
            settings.dicom_host,
            settings.dicom_tls_port,
            "client certificates required (tls_ca)" if settings.tls_ca else "no client certificates",
        )
    log.info(
        "DIMSE listening on %s:%d as %s (%d process%s)",
        settings.dicom_host,
        settings.dicom_port,
        settings.aet,
        settings.worker_count,
        "es" if settings.worker_count > 1 else "",
    )
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        dispatcher.stopping = True
        loop.remove_reader(lsock)
        lsock.close()
        if dispatcher.tls_sock is not None:
            loop.remove_reader(dispatcher.tls_sock)
            dispatcher.tls_sock.close()
        for w in dispatcher.workers:
            with contextlib.suppress(OSError):
                w.ctrl.send(b"S")
        await endpoint.shutdown(min(SHUTDOWN_GRACE, settings.dimse_timeout))
        for w in dispatcher.workers:
            await loop.run_in_executor(None, w.process.join, SHUTDOWN_GRACE + 5)
            if w.process.is_alive():
                log.warning("DIMSE worker %d did not stop; killing it", w.index)
                w.process.kill()
            if w.alive:
                loop.remove_reader(w.ctrl)
            w.ctrl.close()
        executor.shutdown(wait=False)


def _worker_main(settings: Settings, ctrl: socket.socket, index: int) -> None:
    eventloop.run_child(_worker(settings, ctrl), settings, f"dimse-{index}")


async def _worker(settings: Settings, ctrl: socket.socket) -> None:
    from ..context import build_context

    loop = asyncio.get_running_loop()
    executor = ThreadPoolExecutor(max_workers=EXECUTOR_THREADS, thread_name_prefix="dimse")
    ctx = await loop.run_in_executor(executor, lambda: build_context(settings, migrate=False))
    ctx.index.changes.start()  # this worker's cached nodes and department rules follow changes made elsewhere
    ctrl.setblocking(False)

    def closed() -> None:
        with contextlib.suppress(OSError):
            ctrl.send(b"D")

    endpoint = Endpoint(settings, ctx, loop, executor, on_closed=closed)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)

    def on_ctrl() -> None:
        while True:
            try:
                msg, fds, _, _ = socket.recv_fds(ctrl, 64, 16)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                msg, fds = b"", []
            for fd in fds:
                endpoint.adopt(socket.socket(fileno=fd), tls=msg == b"T")
            if not msg or msg == b"S":
                stop.set()
                loop.remove_reader(ctrl)
                return

    loop.add_reader(ctrl, on_ctrl)
    ctrl.send(b"R")
    await stop.wait()
    await endpoint.shutdown(min(SHUTDOWN_GRACE, settings.dimse_timeout))
    await loop.run_in_executor(None, ctx.close)
    executor.shutdown(wait=False)
    os._exit(0)  # skip interpreter teardown of daemon threads (the committer) after a clean close
