"""The storage services of a context, and the periodic check that queues their jobs (beside the router).

Every ``storage_check_seconds`` the scheduler queues, when none of the kind is waiting or running: a ``compress`` job
of the instances due (``compress``, ``compress_after_days``), a ``scrub`` job when the last one is older than
``scrub_interval_hours``, and a ``retention`` job every ``retention_interval_hours`` when the rules choose any study. It only reads
the index and submits jobs: the work is the job worker's, never the ingest path's.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import select

from ..index.db import now
from ..index.schema import jobs
from .compression import KIND as COMPRESS
from .compression import CompressionService, Compressor, pending_or_running
from .retention import KIND as RETENTION
from .retention import RetentionRunner, RetentionService
from .scrub import KIND as SCRUB
from .scrub import Scrubber, ScrubService

log = logging.getLogger("openpacs.storage")


@dataclass
class StorageServices:
    compression: CompressionService
    retention: RetentionService
    scrub: ScrubService

    def runners(self, ctx: Any) -> dict[str, Any]:
        return {COMPRESS: Compressor(ctx, self.compression), RETENTION: RetentionRunner(ctx),
                SCRUB: Scrubber(ctx, self.scrub)}

    def close(self) -> None:
        self.compression.close()


def for_context(ctx: Any) -> StorageServices:
    """The context's storage services, made on first use; the scrub figures join the dashboard's and /metrics'."""
    svc = getattr(ctx, "storage_services", None)
    if svc is None:
        svc = StorageServices(CompressionService(ctx), RetentionService(ctx), ScrubService(ctx))
        ctx.storage_services = svc
        if getattr(ctx, "figures", None) is not None:
            ctx.figures.extra.append(svc.scrub.figures)
    return svc


def _last_created(ctx: Any, kind: str) -> Any:
    with ctx.index.engine.connect() as c:
        t = c.execute(select(jobs.c.created_at).where(jobs.c.kind == kind).order_by(jobs.c.id.desc()).limit(1)).scalar()
    if t is not None and t.tzinfo is None:
        from datetime import UTC

        t = t.replace(tzinfo=UTC)
    return t


class StorageScheduler:
    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        self.services = for_context(ctx)
        self.started = now()  # a first scrub is due one interval after the first start, not at every start

    def tick(self) -> list[Any]:
        """Queue what is due now; the jobs submitted. One node at a time decides (the others skip this tick), so
        that nodes ticking together never queue the same scrub or retention run twice."""
        with self.ctx.index.exclusive("storage-scheduler") as mine:
            return self._tick() if mine else []

    def _tick(self) -> list[Any]:
        s = self.ctx.settings
        out = []
        if s.compress and not pending_or_running(self.ctx, COMPRESS):
            job = self.services.compression.submit()
            if job is not None:
                out.append(job)
        if s.scrub_interval_hours > 0 and not pending_or_running(self.ctx, SCRUB):
            last = _last_created(self.ctx, SCRUB)
            if now() - (last or self.started) >= timedelta(hours=s.scrub_interval_hours):
                out.append(self.services.scrub.submit())
        every = timedelta(hours=s.retention_interval_hours)
        rules = [r for r in self.services.retention.rules() if r.enabled] if every else []
        if rules and not pending_or_running(self.ctx, RETENTION):
            last = _last_created(self.ctx, RETENTION)
            if last is None or now() - last >= every:
                job = self.services.retention.submit()
                if job is not None:
                    out.append(job)
        return out

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await asyncio.to_thread(self.tick)
            except Exception as e:  # noqa: BLE001 - the index may be briefly unreachable; try at the next tick
                log.warning("storage scheduler: %r", e)
            try:
                await asyncio.wait_for(stop.wait(), timeout=max(1.0, self.ctx.settings.storage_check_seconds))
            except TimeoutError:
                pass
