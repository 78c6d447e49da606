"""The jobs process of ``openpacs serve``: distribution (send, STOW-RS, retrieve, prefetch, HL7 to the RIS) and
auto-routing in a process of their own.

Why a second process: the serving process is bound by its one GIL while modalities store (it acknowledges C-STOREs
at ~100 % of one core), and forwarding in that same process took its CPU out of ingest (ingest_4 with a rule
forwarding everything: 0.56 of ingest without it, bench/RESULTS.md). Here the C-STORE SCU lanes and the router have
their own interpreter, at a lower CPU priority (``job_nice``): acknowledging what modalities send comes first when
the machine is busy, and nothing changes when it is not.

Both processes share the index (the durable job queue, the change feed) and the blob store; nothing else passes
between them. The serving process keeps the storage jobs (compress, scrub, retention, tiering, IOCM purge), which
follow its ingest. A job submitted through the API wakes this process at once (one byte on a socket pair); jobs
the router queues here wake its own worker; anything else is found at the next poll. The serving process restarts
the jobs process if it dies; when the serving process dies (even kill -9) the socket pair closes and this process
stops as on a shutdown: running jobs leave their lease, and every acknowledged instance is already recorded, so the
next start resumes each job where it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import socket
from typing import Any

from .. import eventloop
from ..config import Settings

log = logging.getLogger(__name__)

RESTART_SECONDS = 2.0
STOP_GRACE = 45.0  # a stopping worker waits up to 30 s for its running jobs (services/jobs.JobWorker.run)


class JobsProcess:
    """The serving process's handle on its jobs process: start, wake, supervise, stop."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.process: Any = None
        self._ctrl: socket.socket | None = None

    def start(self) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        proc = multiprocessing.get_context("spawn").Process(
            target=_main, args=(self.settings, child), name="openpacs-jobs", daemon=True)
        proc.start()
        child.close()
        parent.setblocking(False)
        self.process, self._ctrl = proc, parent
        log.info("jobs process %d started (distribution and routing, nice +%d)", proc.pid, self.settings.job_nice)

    def wake(self) -> None:
        """From any thread: a job was submitted. A full socket buffer already holds a wake-up; nothing to add."""
        ctrl = self._ctrl
        if ctrl is not None:
            with contextlib.suppress(OSError):
                ctrl.send(b"W")

    async def supervise(self, stop: asyncio.Event) -> None:
        """Keeps the jobs process running until ``stop``, then stops it (SIGTERM-equivalent over the socket)."""
        loop = asyncio.get_running_loop()
        stopping = asyncio.create_task(stop.wait())
        try:
            while True:
                if self.process is None:
                    self.start()
                exited = loop.run_in_executor(None, self.process.join)
                done, _ = await asyncio.wait({exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if stopping in done:
                    break
                log.error("jobs process %d exited with code %s; starting it again in %.0f s", self.process.pid,
                          self.process.exitcode, RESTART_SECONDS)
                self._close()
                self.process = None
                try:
                    await asyncio.wait_for(stop.wait(), RESTART_SECONDS)
                    return
                except TimeoutError:
                    pass
        finally:
            stopping.cancel()
            await self._stop()

    async def _stop(self) -> None:
        proc = self.process
        if proc is None:
            return
        if self._ctrl is not None:
            with contextlib.suppress(OSError):
                self._ctrl.send(b"S")
        await asyncio.get_running_loop().run_in_executor(None, proc.join, STOP_GRACE)
        if proc.is_alive():
            log.warning("jobs process %d did not stop; killing it", proc.pid)
            proc.kill()
            await asyncio.get_running_loop().run_in_executor(None, proc.join, 5)
        self._close()
        self.process = None

    def _close(self) -> None:
        if self._ctrl is not None:
            self._ctrl.close()
            self._ctrl = None
        from ..services.metrics import process_exited

        if self.process is not None and self.process.pid is not None:
            process_exited(self.process.pid)


def _main(settings: Settings, ctrl: socket.socket) -> None:
    if settings.job_nice > 0:
        os.nice(settings.job_nice)  # before any thread starts: they all inherit it
    eventloop.run_child(_run(settings, ctrl), settings, "jobs")
    os._exit(0)  # skip interpreter teardown of daemon threads after a clean close


async def _run(settings: Settings, ctrl: socket.socket) -> None:
    from ..context import build_context
    from ..services.jobs import JobWorker
    from .serve import DISTRIBUTION, job_runners, run_router

    loop = asyncio.get_running_loop()
    ctx = await asyncio.to_thread(build_context, settings, migrate=False)
    ctx.index.changes.start()  # routes, nodes and settings edited elsewhere drop this process's cached copies
    assert ctx.jobs is not None
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    worker = JobWorker(ctx.jobs, job_runners(ctx, DISTRIBUTION), concurrency=settings.job_concurrency)
    ctx.jobs.listeners.append(worker.wake)  # jobs the router queues here
    ctrl.setblocking(False)

    def on_ctrl() -> None:
        while True:
            try:
                msg = ctrl.recv(16)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                msg = b""
            if msg == b"W":
                worker.wake()
                continue
            # b"S", or end of file: the serving process stops or died
            stop.set()
            loop.remove_reader(ctrl)
            return

    loop.add_reader(ctrl, on_ctrl)
    log.info("jobs process %d running: %d job kinds, routing %s, nice %d", os.getpid(), len(worker.runners),
             "on" if ctx.routing is not None else "off", os.getpriority(os.PRIO_PROCESS, 0))
    tasks = [asyncio.create_task(worker.run(stop), name="jobs")]
    if ctx.routing is not None:
        tasks.append(asyncio.create_task(run_router(ctx, stop), name="router"))
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        failed = not stop.is_set()  # a service ended by itself: the serving process starts us again
        stop.set()
        for t in tasks:
            try:
                await t
            except Exception as exc:  # noqa: BLE001 - reported; the others still stop cleanly
                log.error("%s stopped with %r", t.get_name(), exc)
        if failed:
            raise RuntimeError("a service of the jobs process ended")
    finally:
        await asyncio.to_thread(ctx.close)
