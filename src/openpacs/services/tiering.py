"""Cold tier: whole studies move from the primary blob store to ``tier_url`` (e.g. S3) and back, as ``tier`` jobs.

Where a blob lives is in its key (storage/tiered.py: ``tier/...`` keys are the tier's), so moving an instance is:
read it from the primary, write it to the tier (acknowledged by the store: durable), read the copy back and check
its size and SHA-256 against what was read, switch the instance's ``blob_key`` in one index transaction guarded by
the old key (an instance replaced meanwhile keeps its new blob, and the copy goes), then delete the primary copy.
A crash at any point leaves the index naming a complete blob: before the switch the tier copy is an orphan (the
orphan sweep removes it), after it the primary copy is (idem). Moving back is the same the other way; the primary
copy is synced (``sync_pending``) before the switch, as ingest does before it acknowledges.

Jobs: ``{"action": "tier", "studies": [...]}`` or ``{"action": "tier", "older_than_days": N}`` (studies received,
``studies.created_at``, more than N days ago that still have a blob on the primary), ``{"action": "back",
"studies": [...]}``. They are submitted by ``POST /api/storage/tier`` (web/api/tiering.py) and once a day by
:class:`TierScheduler` when ``tier_after_days`` > 0. A job is resumable: what has moved stays moved, a retry moves
the rest.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, exists, select, update

from ..index.schema import instances, jobs, series, studies
from ..storage.tiered import TIER_PREFIX, TieredBlobStore
from .jobs import JobContext, JobQueue, PermanentError

log = logging.getLogger("openpacs.tiering")

KIND = "tier"
ACTIONS = ("tier", "back")
SCHEDULE_SECONDS = 86400.0


class TieringError(ValueError):
    pass


def tiered_store(ctx: Any) -> TieredBlobStore | None:
    return ctx.store if isinstance(ctx.store, TieredBlobStore) else None


def due_studies(index: Any, older_than_days: float, limit: int = 100000) -> list[str]:
    """Studies received before now - N days that still have an instance on the primary store."""
    cutoff = datetime.now(UTC) - timedelta(days=older_than_days)
    on_primary = exists(select(instances.c.id).join(series, series.c.id == instances.c.series_fk)
                        .where(series.c.study_fk == studies.c.id, ~instances.c.blob_key.startswith(TIER_PREFIX)))
    stmt = (select(studies.c.study_instance_uid).where(studies.c.created_at < cutoff, on_primary)
            .order_by(studies.c.created_at).limit(limit))
    with index.engine.connect() as c:
        return [r[0] for r in c.execute(stmt)]


def study_placement(index: Any, study_uid: str) -> dict[str, int] | None:
    """How many instances of the study are on the primary and on the tier (None: no such study)."""
    stmt = (select(instances.c.blob_key).join(series, series.c.id == instances.c.series_fk)
            .join(studies, studies.c.id == series.c.study_fk).where(studies.c.study_instance_uid == study_uid))
    with index.engine.connect() as c:
        found = c.execute(select(studies.c.id).where(studies.c.study_instance_uid == study_uid)).first()
        if found is None:
            return None
        keys = [r[0] for r in c.execute(stmt)]
    tier = sum(1 for k in keys if k.startswith(TIER_PREFIX))
    return {"primary": len(keys) - tier, "tier": tier}


def submit(ctx: Any, action: str, study_uids: list[str] | None = None, older_than_days: float | None = None,
           owner: str = "") -> Any:
    if action not in ACTIONS:
        raise TieringError(f"action: one of {', '.join(ACTIONS)}")
    if tiered_store(ctx) is None:
        raise TieringError("no cold tier is configured (tier_url)")
    payload: dict[str, Any] = {"action": action, "user": owner}
    if study_uids:
        payload["studies"] = list(dict.fromkeys(study_uids))
    elif action == "tier" and older_than_days is not None:
        payload["older_than_days"] = older_than_days
    else:
        raise TieringError("name the studies (or, to tier, older_than_days)")
    return ctx.jobs.submit(KIND, payload, max_attempts=5)


class Tierer:
    """Runs ``tier`` jobs."""

    def __init__(self, ctx: Any, queue: JobQueue) -> None:
        self.ctx = ctx
        self.queue = queue

    async def __call__(self, jc: JobContext) -> None:
        await asyncio.to_thread(self.run, jc)

    def run(self, jc: JobContext) -> None:
        store = tiered_store(self.ctx)
        if store is None:
            raise PermanentError("no cold tier is configured (tier_url)")
        p = jc.job.payload
        action = p.get("action", "tier")
        if action not in ACTIONS:
            raise PermanentError(f"unknown tier action {action!r}")
        uids = [str(u) for u in p.get("studies") or []]
        if not uids and action == "tier" and p.get("older_than_days") is not None:
            uids = due_studies(self.ctx.index, float(p["older_than_days"]))
        moved = nbytes = 0
        errors: list[str] = []
        done_studies: list[str] = []
        for uid in uids:
            jc.check()
            rows = self._instances(uid, to_tier=action == "tier")
            study_errors = 0
            for row in rows:
                jc.check()
                try:
                    nbytes += self._move(store, row, to_tier=action == "tier")
                    moved += 1
                except Exception as e:  # noqa: BLE001 - reported; the job is retried for what is left
                    study_errors += 1
                    errors.append(f"{row.sop_instance_uid}: {e}")
                    log.warning("tier %s of %s failed: %s", action, row.sop_instance_uid, e)
            if rows and not study_errors:
                done_studies.append(uid)
                if self.ctx.audit is not None:
                    where = "to the cold tier" if action == "tier" else "back to primary storage"
                    self.ctx.audit.record("InstancesTransferred", user=str(p.get("user") or "tiering"),
                                          protocol="JOB", study_uids=[uid],
                                          detail=f"tier job {jc.job.id}: {len(rows)} instance(s) moved {where}")
        self.queue.update_payload(jc.job.id, {"result": {"instances": moved, "bytes": nbytes,
                                                         "studies": done_studies, "errors": errors[:20]}})
        if errors:
            raise OSError(f"{len(errors)} instance(s) not moved; first: {errors[0]}")

    def _instances(self, study_uid: str, to_tier: bool) -> list[Any]:
        on_tier = instances.c.blob_key.startswith(TIER_PREFIX)
        stmt = (select(instances.c.id, instances.c.sop_instance_uid, instances.c.blob_key, instances.c.size_bytes)
                .join(series, series.c.id == instances.c.series_fk).join(studies, studies.c.id == series.c.study_fk)
                .where(studies.c.study_instance_uid == study_uid, ~on_tier if to_tier else on_tier)
                .order_by(instances.c.id))
        with self.ctx.index.engine.connect() as c:
            return list(c.execute(stmt))

    def _move(self, store: TieredBlobStore, row: Any, to_tier: bool) -> int:
        old = row.blob_key
        data = store.read(old)
        if len(data) != row.size_bytes:
            raise OSError(f"blob {old} holds {len(data)} bytes, the index says {row.size_bytes}")
        digest = hashlib.sha256(data).digest()
        if to_tier:
            blob = store.put_tier([data])
        else:
            blob = store.put([data])
            store.sync_pending()  # durable before the index names it
        back = store.read(blob.key)
        if len(back) != len(data) or hashlib.sha256(back).digest() != digest:
            store.delete(blob.key)
            raise OSError(f"the copy of {old} read back differs from the original")
        with self.ctx.index.write_engine.begin() as c:
            switched = c.execute(update(instances).where(and_(instances.c.id == row.id, instances.c.blob_key == old))
                                 .values(blob_key=blob.key)).rowcount
        if not switched:  # replaced or deleted meanwhile: its blob is someone else's business; ours goes
            store.delete(blob.key)
            return 0
        store.delete(old)
        return len(data)


class TierScheduler:
    """Submits one ``tier`` job a day (``tier_after_days`` > 0), unless one was submitted in the last day (by any
    node: the check is on the job table)."""

    def __init__(self, ctx: Any, interval: float = 600.0) -> None:
        self.ctx = ctx
        self.interval = interval

    def due(self) -> bool:
        days = float(getattr(self.ctx.settings, "tier_after_days", 0) or 0)
        if days <= 0 or tiered_store(self.ctx) is None:
            return False
        since = datetime.now(UTC) - timedelta(seconds=SCHEDULE_SECONDS)
        with self.ctx.index.engine.connect() as c:
            recent = c.execute(select(jobs.c.id).where(jobs.c.kind == KIND, jobs.c.created_at >= since,
                                                       jobs.c.payload.contains('"older_than_days"')).limit(1)).first()
        return recent is None

    def tick(self) -> Any:
        if not self.due():
            return None
        days = float(self.ctx.settings.tier_after_days)
        job = submit(self.ctx, "tier", older_than_days=days, owner="tiering")
        log.info("tiering: job %d moves the studies received more than %g days ago", job.id, days)
        return job

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await asyncio.to_thread(self.tick)
            except Exception as e:  # noqa: BLE001 - the next check tries again
                log.warning("tiering check failed: %r", e)
            try:
                await asyncio.wait_for(stop.wait(), timeout=self.interval)
            except TimeoutError:
                pass
