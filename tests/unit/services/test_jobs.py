"""The durable job queue on SQLite and PostgreSQL: claim order, leases, retries with backoff, actions, item acks."""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import update

from openpacs.index.db import Index, now
from openpacs.index.schema import jobs
from openpacs.services import jobs as J


@pytest.fixture
def index(index_url: str) -> Any:
    ix = Index(index_url)
    yield ix
    ix.close()


def test_claim_order_priority_then_age(index: Index) -> None:
    q = J.JobQueue(index)
    a = q.submit("send", {"n": 1})
    b = q.submit("send", {"n": 2}, priority=5)
    c = q.submit("send", {"n": 3})
    order = [q.claim(), q.claim(), q.claim(), q.claim()]
    assert [j.id if j else None for j in order] == [b.id, a.id, c.id, None]
    assert order[0] is not None and order[0].state == J.RUNNING and order[0].attempts == 1
    assert order[0].owner == q.owner


def test_kinds_filter(index: Index) -> None:
    q = J.JobQueue(index)
    q.submit("other", {})
    assert q.claim(["send"]) is None
    assert q.claim(["other"]) is not None


def test_concurrent_claimers_never_share_a_job(index: Index) -> None:
    qs = [J.JobQueue(index, owner=f"node{i}") for i in range(4)]
    submitted = {qs[0].submit("send", {"i": i}).id for i in range(40)}
    got: list[int] = []
    lock = threading.Lock()

    def claimer(q: J.JobQueue) -> None:
        while (j := q.claim()) is not None:
            with lock:
                got.append(j.id)

    threads = [threading.Thread(target=claimer, args=(q,)) for q in qs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == sorted(submitted)  # each exactly once


def test_retry_with_backoff_then_failed(index: Index) -> None:
    q = J.JobQueue(index, backoff_base=10, backoff_cap=15)
    j = q.submit("send", {}, max_attempts=3)
    c1 = q.claim()
    assert c1 is not None
    r = q.finish(c1, "peer down")
    assert r.state == J.PENDING and r.error == "peer down" and r.not_before is not None
    assert 9 <= (r.not_before - now()).total_seconds() <= 10.5
    assert q.claim() is None  # not due yet
    with index.write_engine.begin() as c:
        c.execute(update(jobs).where(jobs.c.id == j.id).values(not_before=now() - timedelta(seconds=1)))
    c2 = q.claim()
    assert c2 is not None and c2.attempts == 2
    r = q.finish(c2, "peer down again")
    assert 14 <= (r.not_before - now()).total_seconds() <= 15.5  # 2 x base, capped at 15
    with index.write_engine.begin() as c:
        c.execute(update(jobs).where(jobs.c.id == j.id).values(not_before=None))
    c3 = q.claim()
    assert c3 is not None and c3.attempts == 3
    assert q.finish(c3, "still down").state == J.FAILED
    assert J.backoff(1, 5, 600) == 5 and J.backoff(4, 5, 600) == 40 and J.backoff(20, 5, 600) == 600


def test_permanent_error_not_retried(index: Index) -> None:
    q = J.JobQueue(index)
    q.submit("send", {})
    c = q.claim()
    assert c is not None
    assert q.finish(c, "unknown destination", retry=False).state == J.FAILED


def test_lapsed_lease_is_claimed_again(index: Index) -> None:
    dead = J.JobQueue(index, lease_seconds=0.2, owner="dead")
    alive = J.JobQueue(index, lease_seconds=30, owner="alive")
    j = dead.submit("send", {})
    assert dead.claim() is not None
    assert alive.claim() is None  # leased
    time.sleep(0.3)
    c = alive.claim()
    assert c is not None and c.id == j.id and c.owner == "alive" and c.attempts == 2
    assert dead.renew(c) == "lost"  # the old owner learns it lost the job
    assert alive.renew(c) == J.RUNNING
    assert dead.finish(c, "late").state == J.RUNNING  # not the old owner's to end


def test_items_ack_progress_and_resume(index: Index) -> None:
    q = J.JobQueue(index)
    j = q.submit("send", {}, items=["1.2.3", "1.2.4", "1.2.5", "1.2.3"], item_bytes=[10, 20, 30, 10])
    assert j.total == 3
    c = q.claim()
    assert c is not None
    pend = q.pending_items(j.id)
    assert [i.sop_instance_uid for i in pend] == ["1.2.3", "1.2.4", "1.2.5"]
    q.ack(j.id, pend[0].seq, 0, 100)
    q.ack(j.id, pend[0].seq, 0, 100)  # idempotent
    q.item_failed(j.id, pend[1].seq, 0xA700, "out of resources")
    mid = q.get(j.id)
    assert mid is not None and mid.done == 1 and mid.bytes == 100 and abs(mid.progress - 1 / 3) < 1e-6
    r = q.finish(c, "1 instance failed")
    assert r.state == J.PENDING and r.failed == 1
    assert [i.status for i in q.items(j.id, J.ITEM_FAILED)] == [0xA700]
    assert [i.sop_instance_uid for i in q.pending_items(j.id)] == ["1.2.4", "1.2.5"]  # the acked one is not resent


def test_actions(index: Index) -> None:
    q = J.JobQueue(index)
    j = q.submit("send", {})
    assert q.pause(j.id).state == J.PAUSED
    assert q.claim() is None
    with pytest.raises(J.JobError):
        q.pause(j.id)
    assert q.resume(j.id).state == J.PENDING
    c = q.claim()
    assert c is not None
    assert q.cancel(j.id).state == J.CANCELLED
    assert q.renew(c) == J.CANCELLED
    assert q.finish(c, None).state == J.CANCELLED  # a cancel during the attempt wins
    r = q.resubmit(j.id)
    assert r.state == J.PENDING and r.attempts == 0
    assert q.set_priority(j.id, 9).priority == 9
    with pytest.raises(J.JobError):
        q.cancel(10**9)


def test_worker_runs_retries_and_stops_on_cancel(index: Index) -> None:
    q = J.JobQueue(index, lease_seconds=0.6, backoff_base=0.05, backoff_cap=0.1)
    calls: dict[int, int] = {}

    async def flaky(jc: J.JobContext) -> None:
        calls[jc.job.id] = calls.get(jc.job.id, 0) + 1
        if jc.job.payload.get("mode") == "flaky" and calls[jc.job.id] < 3:
            raise OSError("connection refused")
        if jc.job.payload.get("mode") == "forever":
            while True:
                jc.check()
                await asyncio.sleep(0.05)

    flaky_job = q.submit("t", {"mode": "flaky"})
    forever = q.submit("t", {"mode": "forever"})

    async def main() -> None:
        stop = asyncio.Event()
        w = J.JobWorker(q, {"t": flaky}, concurrency=2, poll=0.05)
        task = asyncio.create_task(w.run(stop))
        for _ in range(200):
            await asyncio.sleep(0.05)
            f = q.get(flaky_job.id)
            if f is not None and f.state == J.DONE and forever.id in w.running:
                break
        await asyncio.to_thread(q.cancel, forever.id)
        for _ in range(100):
            await asyncio.sleep(0.05)
            if forever.id not in w.running:
                break
        stop.set()
        await task

    asyncio.run(main())
    f = q.get(flaky_job.id)
    assert f is not None and f.state == J.DONE and f.attempts == 3 and calls[flaky_job.id] == 3
    g = q.get(forever.id)
    assert g is not None and g.state == J.CANCELLED


def test_acks_commit_relaxed_and_leave_the_connection_durable(index: Index) -> None:
    """ack_many commits through Index.relaxed_commit: the acks are there for every other connection, a failed
    transaction records none of them, and the pooled connection goes back to the durable setting."""
    q = J.JobQueue(index)
    j = q.submit("send", {}, items=["1.2.1", "1.2.2", "1.2.3"], item_bytes=[1, 2, 3])
    assert q.claim() is not None
    q.ack_many([(j.id, 0, 0, 10), (j.id, 1, 0xB000, 20)])
    got = q.get(j.id)
    assert got is not None and got.done == 2 and got.bytes == 30
    assert [i.sop_instance_uid for i in q.pending_items(j.id)] == ["1.2.3"]
    with pytest.raises(RuntimeError), index.relaxed_commit() as c:
        c.execute(update(jobs).where(jobs.c.id == j.id).values(done=99))
        raise RuntimeError("rolled back")
    after = q.get(j.id)
    assert after is not None and after.done == 2
    with index.write_engine.connect() as c:
        if index.is_sqlite:
            assert c.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL again
        else:
            assert c.exec_driver_sql("SHOW synchronous_commit").scalar() == "on"


def test_a_submission_from_another_thread_wakes_the_worker(index: Index) -> None:
    """JobQueue.listeners: the worker claims a job submitted by another thread at once, not at its next poll (an
    hour here)."""
    q = J.JobQueue(index)
    ran = threading.Event()

    async def runner(jc: J.JobContext) -> None:
        ran.set()

    async def main() -> None:
        stop = asyncio.Event()
        w = J.JobWorker(q, {"t": runner}, poll=3600)
        q.listeners.append(w.wake)
        task = asyncio.create_task(w.run(stop))
        await asyncio.sleep(0.2)  # the worker found nothing and waits
        await asyncio.to_thread(q.submit, "t", {})
        for _ in range(200):
            if ran.is_set():
                break
            await asyncio.sleep(0.05)
        stop.set()
        await task

    asyncio.run(main())
    assert ran.is_set(), "the submitted job did not run before the worker's next poll"
