"""`openpacs serve`: one event loop running the DICOM upper layer and the HTTP server until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import uvicorn

from .. import eventloop
from ..config import Settings, security_refusal  # noqa: F401 - re-exported (openpacs doctor uses it too)
from ..context import Context, build_context

if TYPE_CHECKING:
    from ..services.jobs import Runner

log = logging.getLogger("openpacs")


def sweep_orphans(ctx: Context, before: float) -> int:
    """Delete blobs no index row references (left by a crash between the blob write and the commit).

    With an embedded index (SQLite) this server is the only writer, so every blob older than its start is settled.
    With a shared index (PostgreSQL, several nodes on one store) another node may be between its blob write and its
    commit at any moment: only blobs older than ``orphan_grace_seconds`` are candidates, and one node at a time
    sweeps (a PostgreSQL advisory lock). Blob keys are never reused, so an old unreferenced key stays unreferenced."""
    shared = not ctx.index.is_sqlite
    cutoff = min(before, time.time() - ctx.settings.orphan_grace_seconds) if shared else before
    with ctx.index.exclusive("orphan-sweep") as mine:
        if not mine:
            return 0
        removed = ctx.store.clean_temp()
        candidates = set(ctx.store.keys_older_than(cutoff))
        if candidates:
            orphans = candidates - ctx.index.blob_keys()
            for key in orphans:
                ctx.store.delete(key)
            removed += len(orphans)
    if removed:
        log.warning("orphan sweep removed %d unreferenced blob(s) / partial writes", removed)
    return removed


def _sweep_periodically(ctx: Context, started: float) -> None:
    """At start; on a shared index again once the grace period has passed (then every blob older than this start
    is settled, so a crash's orphans go within ``orphan_grace_seconds``), then every ``orphan_sweep_hours``."""
    sweep_orphans(ctx, started)
    if ctx.index.is_sqlite:
        return
    try:
        time.sleep(max(0.0, started + ctx.settings.orphan_grace_seconds - time.time()) + 1.0)
        sweep_orphans(ctx, started)
    except Exception:
        log.exception("orphan sweep failed")
    hours = ctx.settings.orphan_sweep_hours
    while hours > 0:
        time.sleep(hours * 3600)
        try:
            sweep_orphans(ctx, time.time())
        except Exception:
            log.exception("orphan sweep failed")


def first_start_admin(ctx: Context) -> None:
    """With authentication on and no user yet: create ``admin`` with a generated password, shown once."""
    if ctx.auth is None or not ctx.settings.auth_enabled:
        return
    password = ctx.auth.ensure_admin()
    if password is None:
        return
    print(f"\n  OpenPACS first start: created user 'admin' with password\n\n      {password}\n\n"
          "  It is shown only this once. Change it with `openpacs user passwd admin`.\n", flush=True)
    log.warning("first start: created the 'admin' user; its generated password was printed on standard output")
    if ctx.audit is not None:
        ctx.audit.record("SecurityAlert", user=ctx.settings.aet, protocol="CLI", event_type="110137",
                         detail="first start: administrator account 'admin' created")


async def _serve(settings: Settings) -> None:
    from ..dimse.server import serve_dimse
    from ..web.app import build_app
    from ..web.protocol import protocol_kwargs

    started = time.time()
    ctx = build_context(settings)
    ctx.index.changes.start()  # configuration changed by other nodes/processes drops this node's cached copies
    if ctx.routing is not None:
        ctx.routing.config_rules()  # a malformed [[routes]] table stops the start with its name (RouteError)
        from ..services.routing import Router

        Router(ctx, ctx.routing).start_following()  # before anything listens: nothing arrives unrouted
    first_start_admin(ctx)
    if ctx.audit is not None:
        from ..config import redacted
        from ..services.audit import audit_configuration

        audit_configuration(ctx.index, ctx.audit, redacted(settings), settings.aet)  # no secrets in the index
    if ctx.audit is not None:
        ctx.audit.record("ApplicationActivity", event_type="110120", user=settings.aet, protocol="CLI",
                         detail=f"OpenPACS started (auth {'on' if settings.auth_enabled else 'off: development mode'})")
    # partial writes from a crash go first (they are temp files); the full sweep runs beside the services
    threading.Thread(target=_sweep_periodically, args=(ctx, started), name="orphan-sweep", daemon=True).start()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    app = build_app(ctx)
    # HTTPS (tls_cert/tls_key, unless http_tls is off behind a TLS proxy): the guarded protocol does the handshake
    # itself, so that its connection limit and header timeout hold before it too (web/protocol.py)
    config = uvicorn.Config(app, host=settings.http_host, port=settings.http_port, log_level="warning",
                            lifespan="off", access_log=False, timeout_graceful_shutdown=10,
                            **protocol_kwargs(settings))
    http = _EmbeddedServer(config)

    dimse_ready = asyncio.Event()
    dimse_task = asyncio.create_task(serve_dimse(settings, ctx, stop, dimse_ready), name="dimse")
    from ..hl7.server import serve_hl7

    hl7_ready = asyncio.Event()
    hl7_task = asyncio.create_task(serve_hl7(ctx, stop, hl7_ready), name="hl7")
    await dimse_ready.wait() if not dimse_task.done() else None
    jobs_task = asyncio.create_task(_run_jobs(ctx, stop, STORAGE), name="jobs")
    router_task = asyncio.create_task(_run_distribution(ctx, stop), name="distribution")
    tiering_task = asyncio.create_task(_run_tiering(ctx, stop), name="tiering")
    storage_task = asyncio.create_task(_run_storage(ctx, stop), name="storage")
    await hl7_ready.wait() if not hl7_task.done() else None
    # HTTP last: /healthz answering means every listener (DICOM, HL7) is bound, so clients may connect at once
    http_task = asyncio.create_task(http.serve(), name="http")
    log.info("OpenPACS %s listening: DICOM %s:%d, HTTP http://%s:%d/ (index %s)", settings.aet, settings.dicom_host,
             settings.dicom_port, settings.http_host, settings.http_port, settings.resolved_index_url.split("@")[-1])
    stop_wait = asyncio.create_task(stop.wait())
    services: set[asyncio.Task[object]] = {stop_wait, dimse_task, http_task}  # type: ignore[arg-type]
    if settings.hl7_port:
        services.add(hl7_task)  # type: ignore[arg-type]
    done, _ = await asyncio.wait(services, return_when=asyncio.FIRST_COMPLETED)
    stop.set()
    http.should_exit = True
    for t in (dimse_task, http_task, hl7_task, jobs_task, router_task, tiering_task, storage_task):
        try:
            await asyncio.wait_for(t, timeout=60)
        except Exception as e:  # a failed service is reported, the others still stop cleanly
            log.error("%s stopped with %r", t.get_name(), e)
    if ctx.audit is not None:
        ctx.audit.record("ApplicationActivity", event_type="110121", user=settings.aet, protocol="CLI",
                         detail="OpenPACS stopped")
    await asyncio.to_thread(ctx.close)
    log.info("OpenPACS stopped")
    for finished in done:
        exc = None if finished is stop_wait else finished.exception()
        if exc is not None:
            raise exc


# the two job workers: distribution (the jobs process's, unless job_process is off) and storage (the serving
# process's, beside its ingest)
DISTRIBUTION = "distribution"
STORAGE = "storage"


def job_runners(ctx: Context, group: str) -> dict[str, Runner]:
    """The runners of one job worker (services/jobs.py). ``distribution``: send jobs (C-STORE, STOW-RS), retrieve
    and prefetch jobs, HL7 messages to the RIS; ``storage``: cold tier moves, IOCM purges, compress, retention and
    scrub."""
    assert ctx.jobs is not None
    runners: dict[str, Runner] = {}
    if group == DISTRIBUTION:
        from ..dicomweb.sender import KIND as STOW
        from ..dicomweb.sender import StowSender
        from ..dimse.sender import KIND as SEND
        from ..dimse.sender import Sender
        from ..hl7.outbound import KIND as HL7_OUT
        from ..hl7.outbound import RisSender
        from ..services.prefetch import KIND as PREFETCH
        from ..services.prefetch import Prefetcher
        from ..services.remote_qr import KIND as RETRIEVE
        from ..services.remote_qr import Retriever

        runners.update({SEND: Sender(ctx, ctx.jobs), HL7_OUT: RisSender(ctx.settings.ris_hl7_timeout),
                        STOW: StowSender(ctx, ctx.jobs), RETRIEVE: Retriever(ctx, ctx.jobs),
                        PREFETCH: Prefetcher(ctx, ctx.jobs)})
    elif group == STORAGE:
        from ..services.iocm import KIND as PURGE_REJECTED
        from ..services.iocm import PurgeRejectedRunner
        from ..services.storage_schedule import for_context as storage_services
        from ..services.tiering import KIND as TIER
        from ..services.tiering import Tierer

        runners[TIER] = Tierer(ctx, ctx.jobs)  # cold tier moves (services/tiering.py)
        runners[PURGE_REJECTED] = PurgeRejectedRunner(ctx, ctx.jobs)  # services/iocm.py
        runners.update(storage_services(ctx).runners(ctx))  # compress, retention, scrub (services/storage_schedule.py)
    return runners


async def _run_jobs(ctx: Context, stop: asyncio.Event, group: str) -> None:
    """The job worker of this process, for the runners of ``group``."""
    from ..services.iocm import ensure_scheduled
    from ..services.jobs import JobWorker

    assert ctx.jobs is not None
    if group == STORAGE:
        await asyncio.to_thread(ensure_scheduled, ctx.jobs)  # the recurring IOCM purge, which this worker runs
    worker = JobWorker(ctx.jobs, job_runners(ctx, group), concurrency=ctx.settings.job_concurrency)
    ctx.jobs.listeners.append(worker.wake)
    await worker.run(stop)


async def run_router(ctx: Context, stop: asyncio.Event) -> None:
    """Auto-routing (services/routing.py): follows the change feed and submits send jobs, beside the job worker."""
    from ..services.routing import Router

    assert ctx.routing is not None and ctx.jobs is not None
    await Router(ctx, ctx.routing).run(stop)


async def _run_distribution(ctx: Context, stop: asyncio.Event) -> None:
    """Distribution and routing: in the jobs process (cli/jobs_process.py) unless ``job_process`` is off."""
    if ctx.settings.job_process:
        from .jobs_process import JobsProcess

        proc = JobsProcess(ctx.settings)
        assert ctx.jobs is not None
        ctx.jobs.listeners.append(proc.wake)  # jobs submitted here (API, CLI through the API) start at once
        await proc.supervise(stop)
        return
    tasks = [asyncio.create_task(_run_jobs(ctx, stop, DISTRIBUTION), name="distribution")]
    if ctx.routing is not None:
        tasks.append(asyncio.create_task(run_router(ctx, stop), name="router"))
    await asyncio.gather(*tasks)


async def _run_storage(ctx: Context, stop: asyncio.Event) -> None:
    """Storage management (services/storage_schedule.py): queues compress, scrub and retention jobs when due."""
    from ..services.storage_schedule import StorageScheduler

    scheduler = StorageScheduler(ctx)
    try:
        await scheduler.run(stop)
    finally:
        await asyncio.to_thread(scheduler.services.close)


async def _run_tiering(ctx: Context, stop: asyncio.Event) -> None:
    """The daily cold-tier check (services/tiering.py): a tier job when tier_after_days > 0."""
    from ..services.tiering import TierScheduler

    await TierScheduler(ctx).run(stop)


class _EmbeddedServer(uvicorn.Server):
    """uvicorn inside our event loop: SIGTERM/SIGINT belong to `serve`, which stops every service in order."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def serve(settings: Settings) -> int:
    refusal = security_refusal(settings)
    if refusal:
        log.error("%s", refusal)
        return 2
    from ..services.routing import RouteError

    try:
        eventloop.run(_serve(settings))
    except OSError as e:
        log.error("cannot start: %s", e)
        return 1
    except RouteError as e:
        log.error("cannot start: %s", e)
        return 2
    return 0
