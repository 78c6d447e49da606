"""Integrity scrub: every blob re-read and its SHA-256 compared with the one recorded at ingest (a ``scrub`` job).

Runs every ``scrub_interval_hours`` (services/storage_schedule.py) and on ``POST /api/storage/scrub``. What it finds
goes to ``scrub_results`` (missing, unreadable or corrupt instances, with the blob it read): the dashboard and the
storage page show it, ``/metrics`` has ``openpacs_scrub_failures``, ``openpacs doctor`` reports it, and storage
commitment answers a failure for an instance the last scrub found corrupt. Each full run replaces the previous
run's findings; an instance whose blob was replaced since (sent again) is not flagged any more.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from sqlalchemy import delete, func, insert, select

from ..index.db import now
from ..index.schema import instances, series, studies
from ..index.storage_schema import scrub_results
from .jobs import JobContext, JobQueue

log = logging.getLogger("openpacs.scrub")

KIND = "scrub"
MISSING, CORRUPT, UNREADABLE = "missing", "corrupt", "unreadable"
_CHUNK = 500


def _digest(store: Any, key: str) -> str:
    from .doctor import blob_digest

    return blob_digest(store, key)


class ScrubService:
    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx

    def submit(self, user: str = "scheduler") -> Any:
        queue: JobQueue = self.ctx.jobs
        return queue.submit(KIND, {"user": user}, priority=-20)

    def check_one(self, key: str, digest: str) -> tuple[str, str] | None:
        """None when the blob matches, else (problem, detail)."""
        try:
            actual = _digest(self.ctx.store, key)
        except (FileNotFoundError, KeyError) as e:
            return MISSING, f"blob {key} not found: {e}"
        except Exception as e:  # noqa: BLE001 - I/O error, a truncated file
            return UNREADABLE, f"blob {key} unreadable: {e}"
        if actual != digest:
            return CORRUPT, f"SHA-256 {actual} differs from {digest} recorded at ingest"
        return None

    def run(self, job_id: int | None = None, check: Any = None, progress: Any = None) -> dict[str, Any]:
        """Scrub every instance; returns the counts (and records the problems)."""
        t0 = time.perf_counter()
        checked = nbytes = 0
        found: dict[str, dict[str, Any]] = {}
        last_id = 0
        stmt = (select(instances.c.id, instances.c.sop_instance_uid, instances.c.blob_key, instances.c.sha256,
                       instances.c.size_bytes, studies.c.study_instance_uid)
                .select_from(instances.join(series, instances.c.series_fk == series.c.id)
                             .join(studies, series.c.study_fk == studies.c.id)))
        while True:
            if check is not None:
                check()
            with self.ctx.index.engine.connect() as c:
                rows = c.execute(stmt.where(instances.c.id > last_id).order_by(instances.c.id).limit(_CHUNK)).all()
            if not rows:
                break
            for r in rows:
                last_id = r.id
                problem = self.check_one(r.blob_key, r.sha256)
                checked += 1
                nbytes += int(r.size_bytes)
                if problem is not None and self._still_same(r.sop_instance_uid, r.blob_key):
                    found[r.sop_instance_uid] = {"sop_instance_uid": r.sop_instance_uid, "blob_key": r.blob_key,
                                                 "problem": problem[0], "detail": problem[1],
                                                 "study_instance_uid": r.study_instance_uid}
            if progress is not None:
                progress(checked, nbytes, len(found))
        t = now()
        with self.ctx.index.write_engine.begin() as c:
            c.execute(delete(scrub_results))
            if found:
                c.execute(insert(scrub_results), [dict(v, job_id=job_id, found_at=t) for v in found.values()])
        counts = {MISSING: 0, CORRUPT: 0, UNREADABLE: 0}
        for v in found.values():
            counts[v["problem"]] += 1
        result = {"checked": checked, "bytes": nbytes, "failures": len(found), **counts,
                  "seconds": round(time.perf_counter() - t0, 3), "finished_at": t.isoformat()}
        if found:
            log.error("integrity scrub: %d instance(s) missing or corrupt of %d checked", len(found), checked)
        else:
            log.info("integrity scrub: %d instance(s) checked, all match", checked)
        return result

    def _still_same(self, sop: str, key: str) -> bool:
        with self.ctx.index.engine.connect() as c:
            return c.execute(select(instances.c.blob_key).where(instances.c.sop_instance_uid == sop)).scalar() == key

    def failures(self, limit: int = 100) -> list[dict[str, Any]]:
        """What the last scrub found, of the instances that still have the blob it read."""
        stmt = (select(scrub_results).join(instances, (instances.c.sop_instance_uid == scrub_results.c.sop_instance_uid)
                                           & (instances.c.blob_key == scrub_results.c.blob_key))
                .order_by(scrub_results.c.found_at.desc()).limit(limit))
        with self.ctx.index.engine.connect() as c:
            return [dict(r._mapping) for r in c.execute(stmt)]

    def figures(self) -> dict[str, Any]:
        """For the dashboard and /metrics: failures of the last scrub and when it ran."""
        return scrub_figures(self.ctx.index.engine)


def scrub_figures(engine: Any) -> dict[str, Any]:
    from ..index.schema import jobs

    try:
        with engine.connect() as c:
            n = c.execute(select(func.count()).select_from(
                scrub_results.join(instances, (instances.c.sop_instance_uid == scrub_results.c.sop_instance_uid)
                                   & (instances.c.blob_key == scrub_results.c.blob_key)))).scalar_one()
            last = c.execute(select(jobs.c.finished_at).where(jobs.c.kind == KIND, jobs.c.state == "done")
                             .order_by(jobs.c.id.desc()).limit(1)).scalar()
    except Exception:  # noqa: BLE001 - an index not migrated yet (doctor on an old data directory)
        return {"scrub_failures": None, "scrub_last_at": None}
    return {"scrub_failures": int(n), "scrub_last_at": last}


def flagged(index: Any, uids: list[str]) -> set[str]:
    """Of ``uids``, the instances the last scrub found missing or corrupt (and whose blob has not changed since)."""
    out: set[str] = set()
    with index.engine.connect() as c:
        if not c.execute(select(func.count()).select_from(scrub_results)).scalar_one():
            return out  # the usual case: nothing found
        for i in range(0, len(uids), _CHUNK):
            stmt = (select(scrub_results.c.sop_instance_uid)
                    .join(instances, (instances.c.sop_instance_uid == scrub_results.c.sop_instance_uid)
                          & (instances.c.blob_key == scrub_results.c.blob_key))
                    .where(scrub_results.c.sop_instance_uid.in_(uids[i:i + _CHUNK])))
            out |= {r[0] for r in c.execute(stmt)}
    return out


class Scrubber:
    """Runs ``scrub`` jobs."""

    def __init__(self, ctx: Any, service: ScrubService) -> None:
        self.ctx = ctx
        self.service = service

    async def __call__(self, jc: JobContext) -> None:
        result = await asyncio.to_thread(self.service.run, jc.job.id, jc.check)
        await asyncio.to_thread(jc.queue.update_payload, jc.job.id, {"result": result})
        audit = getattr(self.ctx, "audit", None)
        if audit is not None and result["failures"]:
            audit.record("SecurityAlert", user=str(jc.job.payload.get("user") or "scrub"), protocol="JOB",
                         outcome=4, detail=f"integrity scrub (job {jc.job.id}): {result['failures']} instance(s) "
                         f"missing or corrupt ({result[MISSING]} missing, {result[CORRUPT]} corrupt, "
                         f"{result[UNREADABLE]} unreadable) of {result['checked']}")


def doctor_check(idx: Any) -> Any:
    """``openpacs doctor``: what the last integrity scrub found (a Check of services/doctor.py)."""
    from .doctor import FAIL, OK, SKIP, Check

    title = "Integrity scrub"
    if idx is None:
        return Check("scrub", title, SKIP, "index unavailable")
    f = scrub_figures(idx.engine)
    if f["scrub_failures"] is None:
        return Check("scrub", title, SKIP, "the index has no scrub results yet (not migrated to 0016)")
    if f["scrub_failures"]:
        with idx.engine.connect() as c:
            rows = c.execute(select(scrub_results.c.sop_instance_uid, scrub_results.c.problem)
                             .join(instances, (instances.c.sop_instance_uid == scrub_results.c.sop_instance_uid)
                                   & (instances.c.blob_key == scrub_results.c.blob_key)).limit(5)).all()
        return Check("scrub", title, FAIL, f"the last integrity scrub ({f['scrub_last_at']}) found "
                     f"{f['scrub_failures']} instance(s) missing or corrupt",
                     "restore those blobs from backup, or delete the instances and have them sent again; then run "
                     "the scrub again (console Storage page, or POST /api/storage/scrub)",
                     {"failures": f["scrub_failures"], "last_at": str(f["scrub_last_at"]),
                      "examples": [{"sop_instance_uid": r[0], "problem": r[1]} for r in rows]})
    if f["scrub_last_at"] is None:
        return Check("scrub", title, OK, "no integrity scrub has run yet",
                     "it runs every scrub_interval_hours; start one from the console Storage page")
    return Check("scrub", title, OK, f"the last integrity scrub ({f['scrub_last_at']}) found every blob intact",
                 "", {"failures": 0, "last_at": str(f["scrub_last_at"])})
