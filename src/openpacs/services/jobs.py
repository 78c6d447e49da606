"""The durable job queue in the index, and the worker loop that runs its jobs.

One queue under everything that runs in the background (sending, routing, retrieve from remote archives...).
A job is claimed with a lease that its runner renews; a node that dies (kill -9) stops renewing, and another node
(or the same one after its restart) claims the job again once the lease has run out. On PostgreSQL several nodes
claim with ``SELECT ... FOR UPDATE SKIP LOCKED``; on SQLite the write engine's ``BEGIN IMMEDIATE`` makes the claim a
single-writer transaction. A failed attempt is retried after an exponential backoff until ``max_attempts``.

Jobs that work through instances keep one ``job_items`` row per instance; ``ack`` commits "acknowledged by the peer"
before the runner sends the next instance on that association, so a resumed job never sends it again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, bindparam, func, literal_column, null, or_, select, update

from ..index.db import Index, Prepared, now
from ..index.schema import job_items, jobs
from .types import InstanceRef

log = logging.getLogger(__name__)

PENDING, RUNNING, PAUSED, DONE, FAILED, CANCELLED = "pending", "running", "paused", "done", "failed", "cancelled"
STATES = (PENDING, RUNNING, PAUSED, DONE, FAILED, CANCELLED)
ITEM_PENDING, ITEM_ACKED, ITEM_FAILED = "pending", "acked", "failed"


class JobError(ValueError):
    """A request the queue refuses (unknown job, an action that does not apply to its state)."""


class JobStopped(Exception):
    """Raised inside a runner when its job was cancelled or paused, or its lease was lost."""


@dataclass
class Job:
    id: int
    kind: str
    state: str
    payload: dict[str, Any]
    priority: int = 0
    attempts: int = 0
    max_attempts: int = 5
    destination: str | None = None
    done: int = 0
    failed: int = 0
    total: int = 0
    bytes: int = 0
    progress: float = 0.0
    error: str | None = None
    owner: str | None = None
    not_before: datetime | None = None
    lease_until: datetime | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None


@dataclass
class Item:
    seq: int
    sop_instance_uid: str
    state: str
    status: int | None = None
    error: str | None = None
    bytes: int = 0


def _aware(dt: datetime | None) -> datetime | None:
    return dt.replace(tzinfo=UTC) if dt is not None and dt.tzinfo is None else dt  # SQLite gives naive UTC


def _job(r: Any) -> Job:
    try:
        payload = json.loads(r.payload) if r.payload else {}
    except ValueError:
        payload = {"raw": r.payload}
    return Job(id=r.id, kind=r.kind, state=r.state, payload=payload, priority=r.priority, attempts=r.attempts,
               max_attempts=r.max_attempts, destination=r.destination, done=r.done, failed=r.failed, total=r.total,
               bytes=r.bytes, progress=r.progress or 0.0, error=r.error, owner=r.owner,
               not_before=_aware(r.not_before), lease_until=_aware(r.lease_until), created_at=_aware(r.created_at),
               updated_at=_aware(r.updated_at), started_at=_aware(r.started_at),
               finished_at=_aware(r.finished_at))


def backoff(attempt: int, base: float, cap: float) -> float:
    """Seconds before attempt ``attempt + 1``: base, 2 base, 4 base ... at most ``cap``."""
    return float(min(cap, base * (2 ** max(0, attempt - 1))))


class JobQueue:
    def __init__(self, index: Index, *, lease_seconds: float = 30.0, backoff_base: float = 5.0,
                 backoff_cap: float = 600.0, default_attempts: int = 5, owner: str | None = None) -> None:
        self.index = index
        self.lease_seconds = lease_seconds
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.default_attempts = default_attempts
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        # called (from any thread) after a job was submitted and committed here: the job workers of this node
        # claim it now instead of at their next poll (cli/serve.py: this process's worker, the jobs process)
        self.listeners: list[Callable[[], None]] = []
        self._acks: tuple[Prepared, Prepared, Callable[[datetime], Any]] | None = None

    def notify(self) -> None:
        for listener in self.listeners:
            try:
                listener()
            except Exception as exc:  # noqa: BLE001 - a wake-up is an optimisation; the poll still finds the job
                log.debug("job listener failed: %r", exc)

    # -- submitting ------------------------------------------------------------------------------------------
    def submit(self, kind: str, payload: Mapping[str, Any], *, items: Sequence[str] = (), priority: int = 0,
               destination: str | None = None, max_attempts: int | None = None, item_bytes: Sequence[int] = ()
               ) -> Job:
        with self.index.write_engine.begin() as c:
            job_id = self.submit_in(c, kind, payload, items=items, priority=priority, destination=destination,
                                    max_attempts=max_attempts, item_bytes=item_bytes)
        self.notify()
        job = self.get(job_id)
        assert job is not None
        return job

    def submit_in(self, c: Any, kind: str, payload: Mapping[str, Any], *, items: Sequence[str] = (),
                  priority: int = 0, destination: str | None = None, max_attempts: int | None = None,
                  item_bytes: Sequence[int] = ()) -> int:
        """Queue a job inside the caller's write transaction (it exists only if that transaction commits, e.g. an
        MPPS change and the HL7 message that reports it). Returns its id; the caller calls :meth:`notify` after its
        commit (else the workers find the job at their next poll)."""
        t = now()
        uids = list(dict.fromkeys(items))
        sizes = dict(zip(items, item_bytes, strict=False))
        job_id = int(c.execute(jobs.insert().values(
            kind=kind, state=PENDING, payload=json.dumps(dict(payload)), progress=0.0, priority=priority,
            attempts=0, max_attempts=max_attempts or self.default_attempts, destination=destination,
            total=len(uids), done=0, failed=0, bytes=0, created_at=t, updated_at=t,
        ).returning(jobs.c.id)).scalar_one())
        if uids:
            c.execute(job_items.insert(), [
                {"job_id": job_id, "seq": i, "sop_instance_uid": u, "state": ITEM_PENDING,
                 "bytes": int(sizes.get(u, 0)), "updated_at": t} for i, u in enumerate(uids)])
        return job_id

    def older_unfinished(self, job: Job) -> int | None:
        """The id of an older job of the same kind and destination that has not ended (pending, running, paused):
        runners that must keep their order (HL7 to the RIS) wait for it."""
        stmt = (select(jobs.c.id).where(jobs.c.kind == job.kind, jobs.c.id < job.id,
                                        jobs.c.state.in_((PENDING, RUNNING, PAUSED)))
                .order_by(jobs.c.id).limit(1))
        stmt = stmt.where(jobs.c.destination == job.destination) if job.destination is not None else stmt
        with self.index.engine.connect() as c:
            found = c.execute(stmt).scalar()
        return int(found) if found is not None else None

    def defer(self, job: Job, seconds: float, reason: str) -> None:
        """Put a running job back to pending for ``seconds`` without spending an attempt."""
        t = now()
        with self.index.write_engine.begin() as c:
            c.execute(update(jobs).where(jobs.c.id == job.id, jobs.c.owner == self.owner, jobs.c.state == RUNNING)
                      .values(state=PENDING, lease_until=None, attempts=jobs.c.attempts - 1, updated_at=t,
                              error=reason[:4000], not_before=t + timedelta(seconds=seconds)))

    # -- reading ---------------------------------------------------------------------------------------------
    def get(self, job_id: int) -> Job | None:
        with self.index.engine.connect() as c:
            r = c.execute(select(jobs).where(jobs.c.id == job_id)).first()
        return _job(r) if r is not None else None

    def list_jobs(self, *, state: str | None = None, kind: str | None = None, before: int | None = None,
             limit: int = 100) -> list[Job]:
        stmt = select(jobs)
        if state:
            stmt = stmt.where(jobs.c.state == state)
        if kind:
            stmt = stmt.where(jobs.c.kind == kind)
        if before is not None:
            stmt = stmt.where(jobs.c.id < before)
        with self.index.engine.connect() as c:
            return [_job(r) for r in c.execute(stmt.order_by(jobs.c.id.desc()).limit(limit))]

    def items(self, job_id: int, state: str | None = None, limit: int | None = None) -> list[Item]:
        stmt = select(job_items).where(job_items.c.job_id == job_id)
        if state:
            stmt = stmt.where(job_items.c.state == state)
        stmt = stmt.order_by(job_items.c.seq)
        if limit:
            stmt = stmt.limit(limit)
        with self.index.engine.connect() as c:
            return [Item(r.seq, r.sop_instance_uid, r.state, r.status, r.error, r.bytes) for r in c.execute(stmt)]

    # -- claiming --------------------------------------------------------------------------------------------
    def claim(self, kinds: Iterable[str] | None = None) -> Job | None:
        """The most urgent runnable job, now leased to this node: pending and due, or running with a lapsed lease
        (its node died). Highest priority first, then oldest."""
        t = now()
        runnable = or_(
            and_(jobs.c.state == PENDING, or_(jobs.c.not_before.is_(None), jobs.c.not_before <= t)),
            and_(jobs.c.state == RUNNING, jobs.c.lease_until < t),
        )
        stmt = select(jobs.c.id).where(runnable)
        if kinds is not None:
            stmt = stmt.where(jobs.c.kind.in_(list(kinds)))
        stmt = stmt.order_by(jobs.c.priority.desc(), jobs.c.id).limit(1)
        with self.index.engine.connect() as c:  # a read first: an idle poll never takes the write lock
            if c.execute(stmt).first() is None:
                return None
        if not self.index.is_sqlite:
            stmt = stmt.with_for_update(skip_locked=True)
        with self.index.write_engine.begin() as c:  # SQLite: BEGIN IMMEDIATE, one claimer at a time
            job_id = c.execute(stmt).scalar()
            if job_id is None:
                return None
            c.execute(update(jobs).where(jobs.c.id == job_id).values(
                state=RUNNING, owner=self.owner, lease_until=t + timedelta(seconds=self.lease_seconds),
                attempts=jobs.c.attempts + 1, started_at=func.coalesce(jobs.c.started_at, t), updated_at=t,
                not_before=None))
        return self.get(job_id)

    def renew(self, job: Job) -> str:
        """Extend the lease; the job's state now (a runner stops on anything but running, or a lost lease)."""
        t = now()
        with self.index.write_engine.begin() as c:
            n = c.execute(update(jobs).where(jobs.c.id == job.id, jobs.c.owner == self.owner,
                                             jobs.c.state == RUNNING)
                          .values(lease_until=t + timedelta(seconds=self.lease_seconds))).rowcount
            if n:
                return RUNNING
            state = c.execute(select(jobs.c.state, jobs.c.owner).where(jobs.c.id == job.id)).first()
        if state is None:
            return CANCELLED
        return str(state.state) if state.owner == self.owner or state.state != RUNNING else "lost"

    # -- progress of item jobs -------------------------------------------------------------------------------
    def pending_items(self, job_id: int) -> list[Item]:
        """Items not acknowledged yet (failed ones are tried again by a new attempt)."""
        stmt = (select(job_items).where(job_items.c.job_id == job_id, job_items.c.state != ITEM_ACKED)
                .order_by(job_items.c.seq))
        with self.index.engine.connect() as c:
            return [Item(r.seq, r.sop_instance_uid, r.state, r.status, r.error, r.bytes) for r in c.execute(stmt)]

    def ack(self, job_id: int, seq: int, status: int, nbytes: int) -> None:
        """The peer acknowledged the item: committed before the runner sends the next one."""
        t = now()
        with self.index.write_engine.begin() as c:
            n = c.execute(update(job_items).where(job_items.c.job_id == job_id, job_items.c.seq == seq,
                                                  job_items.c.state != ITEM_ACKED)
                          .values(state=ITEM_ACKED, status=status, error=None, bytes=nbytes, updated_at=t)).rowcount
            if n:
                c.execute(update(jobs).where(jobs.c.id == job_id).values(
                    done=jobs.c.done + 1, bytes=jobs.c.bytes + nbytes, updated_at=t,
                    progress=(jobs.c.done + 1) * 1.0 / jobs.c.total))

    def ack_many(self, acks: Sequence[tuple[int, int, int, int]]) -> None:
        """Several (job id, seq, status, bytes) acknowledgements in one transaction (one commit for many lanes).
        A crash of OpenPACS never loses a committed ack; a power failure may lose the last few, which are then sent
        again (Index.relaxed_commit): their fsync would hold the index's write lock against the ingest path.
        On a lane's path between two instances, so its two statements are compiled once (``Prepared``)."""
        item_sql, job_sql, stamp = self._ack_statements()
        t = stamp(now())
        with self.index.relaxed_commit() as c:
            for job_id, seq, status, nbytes in acks:
                n = item_sql.execute(c, job_id=job_id, seq=seq, acked=ITEM_ACKED, status=status, nbytes=nbytes,
                                     t=t).rowcount
                if n:
                    job_sql.execute(c, job_id=job_id, nbytes=nbytes, t=t)

    def _ack_statements(self) -> tuple[Prepared, Prepared, Callable[[datetime], Any]]:
        if self._acks is None:
            engine = self.index.write_engine
            item = Prepared(engine, update(job_items).where(
                job_items.c.job_id == bindparam("job_id"), job_items.c.seq == bindparam("seq"),
                job_items.c.state != bindparam("acked")).values(
                state=bindparam("acked"), status=bindparam("status"), error=null(), bytes=bindparam("nbytes"),
                updated_at=bindparam("t", type_=job_items.c.updated_at.type)))
            job = Prepared(engine, update(jobs).where(jobs.c.id == bindparam("job_id")).values(
                done=jobs.c.done + literal_column("1"), bytes=jobs.c.bytes + bindparam("nbytes"),
                updated_at=bindparam("t", type_=jobs.c.updated_at.type),
                progress=(jobs.c.done + literal_column("1")) * literal_column("1.0") / jobs.c.total))
            # the driver gets what SQLAlchemy would bind for the column (SQLite: its own text form of the time)
            column_type = jobs.c.updated_at.type
            process = column_type.dialect_impl(engine.dialect).bind_processor(engine.dialect)
            self._acks = (item, job, process or (lambda v: v))
        return self._acks

    def item_failed(self, job_id: int, seq: int, status: int | None, error: str) -> None:
        t = now()
        with self.index.write_engine.begin() as c:
            c.execute(update(job_items).where(job_items.c.job_id == job_id, job_items.c.seq == seq,
                                              job_items.c.state != ITEM_ACKED)
                      .values(state=ITEM_FAILED, status=status, error=error[:1000], updated_at=t))

    def update_payload(self, job_id: int, values: Mapping[str, Any]) -> None:
        """Merge ``values`` into the job's payload (a runner's durable notes, e.g. a storage commitment result)."""
        with self.index.write_engine.begin() as c:
            raw = c.execute(select(jobs.c.payload).where(jobs.c.id == job_id)).scalar()
            if raw is None:
                return
            try:
                payload = json.loads(raw) or {}
            except ValueError:
                payload = {}
            payload.update(values)
            c.execute(update(jobs).where(jobs.c.id == job_id).values(payload=json.dumps(payload), updated_at=now()))

    def unack(self, job_id: int, seq: int, status: int | None, error: str) -> None:
        """An acknowledged item turns out not kept by the peer (storage commitment failed): failed, and sent again
        by the next attempt."""
        t = now()
        with self.index.write_engine.begin() as c:
            row = c.execute(select(job_items.c.state, job_items.c.bytes).where(
                job_items.c.job_id == job_id, job_items.c.seq == seq)).first()
            if row is None:
                return
            c.execute(update(job_items).where(job_items.c.job_id == job_id, job_items.c.seq == seq)
                      .values(state=ITEM_FAILED, status=status, error=error[:1000], updated_at=t))
            if row.state == ITEM_ACKED:
                c.execute(update(jobs).where(jobs.c.id == job_id).values(
                    done=jobs.c.done - 1, bytes=jobs.c.bytes - row.bytes, updated_at=t,
                    progress=(jobs.c.done - 1) * 1.0 / jobs.c.total))

    def _recount(self, c: Any, job_id: int) -> dict[str, Any]:
        rows = dict(c.execute(select(job_items.c.state, func.count()).where(job_items.c.job_id == job_id)
                              .group_by(job_items.c.state)).all())
        total = sum(rows.values())
        done = rows.get(ITEM_ACKED, 0)
        return {"done": done, "failed": rows.get(ITEM_FAILED, 0), "total": total,
                "progress": (done / total) if total else 1.0}

    # -- ending an attempt -----------------------------------------------------------------------------------
    def finish(self, job: Job, error: str | None = None, *, retry: bool = True) -> Job:
        """End the running attempt: done without ``error``; else retried after a backoff while attempts remain
        (and ``retry``), failed after the last. A job cancelled or paused meanwhile keeps that state."""
        t = now()
        with self.index.write_engine.begin() as c:
            row = c.execute(select(jobs).where(jobs.c.id == job.id)).first()
            if row is None:
                raise JobError(f"job {job.id} does not exist")
            counts = self._recount(c, job.id) if row.total else {"progress": 1.0 if error is None else row.progress}
            values: dict[str, Any] = {"updated_at": t, "lease_until": None, **counts}
            if row.state != RUNNING or row.owner != self.owner:
                values.pop("lease_until")
                if row.state == RUNNING:  # another node took it over (our lease lapsed): not ours to end
                    return _job(row)
            elif error is None:
                values.update(state=DONE, error=None, finished_at=t)
            elif retry and row.attempts < row.max_attempts:
                delay = backoff(row.attempts, self.backoff_base, self.backoff_cap)
                values.update(state=PENDING, error=error[:4000], not_before=t + timedelta(seconds=delay))
            else:
                values.update(state=FAILED, error=error[:4000], finished_at=t)
            c.execute(update(jobs).where(jobs.c.id == job.id).values(**values))
        out = self.get(job.id)
        assert out is not None
        return out

    # -- actions ---------------------------------------------------------------------------------------------
    def _act(self, job_id: int, allowed: tuple[str, ...], **values: Any) -> Job:
        with self.index.write_engine.begin() as c:
            state = c.execute(select(jobs.c.state).where(jobs.c.id == job_id)).scalar()
            if state is None:
                raise JobError(f"job {job_id} does not exist")
            if state not in allowed:
                raise JobError(f"job {job_id} is {state}: the action applies to {', '.join(allowed)} jobs")
            c.execute(update(jobs).where(jobs.c.id == job_id).values(updated_at=now(), **values))
        out = self.get(job_id)
        assert out is not None
        return out

    def cancel(self, job_id: int) -> Job:
        return self._act(job_id, (PENDING, RUNNING, PAUSED, FAILED), state=CANCELLED, finished_at=now(),
                         lease_until=None)

    def pause(self, job_id: int) -> Job:
        return self._act(job_id, (PENDING, RUNNING), state=PAUSED, lease_until=None)

    def resume(self, job_id: int) -> Job:
        return self._act(job_id, (PAUSED,), state=PENDING, not_before=None)

    def resubmit(self, job_id: int) -> Job:
        """Run a finished job again: its acknowledged items stay acknowledged, failed ones are tried again; the
        attempts start over."""
        return self._act(job_id, (FAILED, CANCELLED, DONE), state=PENDING, attempts=0, not_before=None,
                         error=None, finished_at=None, lease_until=None)

    def set_priority(self, job_id: int, priority: int) -> Job:
        return self._act(job_id, STATES, priority=priority)


SEND_LEVELS = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID",
               "IMAGE": "SOPInstanceUID"}
_CHUNK = 500


def resolve_refs(ctx: Any, level: str, uids: Sequence[str],
                 departments: tuple[str, ...] | None = None) -> list[InstanceRef]:
    """The stored instances a send names: every instance of the patients, studies or series, or the instances."""
    from pydicom import Dataset

    keyword = SEND_LEVELS[level]
    values = list(uids) if level == "PATIENT" else ["\\".join(uids[i:i + _CHUNK]) for i in range(0, len(uids), _CHUNK)]
    out: dict[str, InstanceRef] = {}
    for value in values:
        ds = Dataset()
        ds.QueryRetrieveLevel = level
        setattr(ds, keyword, value)
        for r in ctx.retrieve.resolve(ds, "PATIENT" if level == "PATIENT" else "STUDY", departments=departments):
            out.setdefault(r.sop_instance_uid, r)
    return list(out.values())


STOW = "stow"  # the job kind of a send to a DICOMweb peer (dicomweb/sender.py); "send" for DIMSE (dimse/sender.py)


def destination_kind(settings: Any, destination: str) -> str | None:
    """``stow`` for a ``[remote_dicomweb.NAME]`` peer, ``send`` for a DICOM node (by node name or AE title), else
    None (unknown destination)."""
    from .nodes import remote_aes_for

    if destination in (getattr(settings, "remote_dicomweb", None) or {}):
        return STOW
    remotes = remote_aes_for(settings)
    if destination in remotes or any(r.aet.strip() == destination.strip() for r in remotes.values()):
        return "send"
    return None


def submit_send(ctx: Any, destination: str, level: str, uids: Sequence[str], *, priority: int = 0,
                associations: int | None = None, departments: tuple[str, ...] | None = None,
                commit: bool = False) -> Job:
    """A ``send`` job (a DICOM node) or a ``stow`` job (a DICOMweb peer) of every instance named, fixed now
    (instances stored later are not part of it). ``commit``: ask the DICOM node for storage commitment at the end."""
    if level not in SEND_LEVELS:
        raise JobError(f"level: one of {', '.join(SEND_LEVELS)}")
    kind = destination_kind(ctx.settings, destination)
    if kind is None:
        raise JobError(f"destination {destination!r} unknown (no such node, [remote_aes.*] or [remote_dicomweb.*])")
    if commit and kind == STOW:
        raise JobError(f"storage commitment applies to DICOM nodes; {destination!r} is a DICOMweb peer")
    uids = [u.strip() for u in uids if u and u.strip()]
    if not uids:
        raise JobError("nothing to send: no UID given")
    refs = resolve_refs(ctx, level, uids, departments)
    if not refs:
        raise JobError(f"nothing to send: no stored instance for {level.lower()} {', '.join(uids[:3])}")
    payload: dict[str, Any] = {"destination": destination, "level": level, "uids": uids[:100]}
    if associations and kind != STOW:
        payload["associations"] = int(associations)
    if commit:
        payload["commit"] = True
    queue: JobQueue = ctx.jobs
    return queue.submit(kind, payload, items=[r.sop_instance_uid for r in refs], priority=priority,
                        destination=destination, item_bytes=[r.size for r in refs])


Runner = Callable[["JobContext"], Awaitable[None]]


@dataclass
class JobContext:
    """What a runner gets: its job, the queue, and ``check()`` to stop promptly on cancel/pause/lost lease."""

    job: Job
    queue: JobQueue
    stopped: str | None = None
    _tasks: list[asyncio.Task[Any]] = field(default_factory=list)

    def check(self) -> None:
        if self.stopped is not None:
            raise JobStopped(self.stopped)


class PermanentError(Exception):
    """A runner's failure that retrying cannot mend (unknown destination, nothing to send): failed at once."""


class Deferred(Exception):
    """Raised by a runner that cannot start yet (an older job it must follow is still queued): back to pending for
    ``seconds``, no attempt spent."""

    def __init__(self, seconds: float, reason: str) -> None:
        super().__init__(reason)
        self.seconds = seconds


class JobWorker:
    """Claims jobs and runs them on the event loop, ``concurrency`` at a time; renews their leases."""

    def __init__(self, queue: JobQueue, runners: Mapping[str, Runner], *, concurrency: int = 2,
                 poll: float = 1.0) -> None:
        self.queue = queue
        self.runners = dict(runners)
        self.concurrency = concurrency
        self.poll = poll
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.running: dict[int, JobContext] = {}

    def wake(self) -> None:
        """A job was submitted (any thread of this process, or the serving process for the jobs process): claim
        now instead of at the next poll."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._wake.set)  # from the loop's own thread too

    async def run(self, stop: asyncio.Event) -> None:
        self._loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task[None]] = set()
        while not stop.is_set():
            self._wake.clear()  # before claiming: a job submitted while we claim wakes the wait below
            while len(tasks) < self.concurrency:
                try:
                    job = await asyncio.to_thread(self.queue.claim, self.runners)
                except Exception as exc:  # noqa: BLE001 - the index may be briefly unreachable
                    log.warning("job claim failed: %r", exc)
                    job = None
                if job is None:
                    break
                t = asyncio.create_task(self._run_one(job), name=f"job-{job.id}")
                tasks.add(t)
                t.add_done_callback(tasks.discard)
            waiters: list[asyncio.Future[Any]] = [asyncio.create_task(stop.wait()),
                                                  asyncio.create_task(self._wake.wait())]
            if tasks:
                waiters.append(asyncio.ensure_future(asyncio.wait(set(tasks), return_when=asyncio.FIRST_COMPLETED)))
            _, pending = await asyncio.wait(waiters, timeout=self.poll, return_when=asyncio.FIRST_COMPLETED)
            for w in pending:
                w.cancel()
        for jc in self.running.values():
            jc.stopped = "shutdown"
        if tasks:
            await asyncio.wait(tasks, timeout=30)

    async def _renew(self, jc: JobContext) -> None:
        while True:
            await asyncio.sleep(max(0.2, self.queue.lease_seconds / 3))
            try:
                state = await asyncio.to_thread(self.queue.renew, jc.job)
            except Exception as exc:  # noqa: BLE001
                log.warning("job %d: lease renewal failed: %r", jc.job.id, exc)
                continue
            if state != RUNNING:
                jc.stopped = state
                return

    async def _run_one(self, job: Job) -> None:
        jc = JobContext(job, self.queue)
        self.running[job.id] = jc
        renew = asyncio.create_task(self._renew(jc))
        error: str | None = None
        retry = True
        try:
            runner = self.runners[job.kind]
            await runner(jc)
            if jc.stopped is not None:
                raise JobStopped(jc.stopped)
        except JobStopped as stop:
            log.info("job %d stopped: %s", job.id, stop)
            error = f"stopped: {stop}"
        except PermanentError as exc:
            error, retry = str(exc) or type(exc).__name__, False
        except Deferred as wait:
            await asyncio.to_thread(self.queue.defer, job, wait.seconds, str(wait))
            return
        except Exception as exc:  # noqa: BLE001 - a failed attempt is retried, never crashes the worker
            log.warning("job %d (%s) attempt %d failed: %r", job.id, job.kind, job.attempts, exc)
            error = str(exc) or repr(exc)
        finally:
            renew.cancel()
            self.running.pop(job.id, None)
        if jc.stopped == "shutdown":
            # leave it running with its lease: on restart it is claimed again once the lease lapses; release the
            # lease now so that the next start takes it at once
            await asyncio.to_thread(self._release, job)
            return
        try:
            await asyncio.to_thread(self.queue.finish, job, error, retry=retry)
        except Exception as exc:  # noqa: BLE001
            log.error("job %d: cannot record its end: %r", job.id, exc)

    def _release(self, job: Job) -> None:
        t = now()
        with self.queue.index.write_engine.begin() as c:
            c.execute(update(jobs).where(jobs.c.id == job.id, jobs.c.owner == self.queue.owner,
                                         jobs.c.state == RUNNING)
                      .values(state=PENDING, lease_until=None, attempts=jobs.c.attempts - 1, updated_at=t))
