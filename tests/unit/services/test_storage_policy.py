"""Storage thresholds: storage_min_free / storage_quota refuse new data with 0xA700, nothing written, and ingest
resumes when space returns; a real ENOSPC in the middle of a write gets the same answer and leaves nothing behind."""

from __future__ import annotations

import errno
import os

import pytest
from core_factory import instance, part10, store
from prometheus_client import REGISTRY
from sqlalchemy import func, select

from openpacs.index.schema import instances
from openpacs.services.storage_policy import StorageGuard, Threshold, parse_threshold
from openpacs.services.types import Status


def n_instances(ctx) -> int:
    with ctx.index.engine.connect() as c:
        return int(c.execute(select(func.count()).select_from(instances)).scalar_one())


def blob_and_temp_files(ctx) -> tuple[int, int]:
    blobs = len(list(ctx.store.keys_older_than(float("inf"))))
    return blobs, len(os.listdir(ctx.store.tmp))


class FakeUsage:
    """Wraps a store: usage() reports what the test says, everything else is the real store."""

    def __init__(self, inner, total: int, free: int) -> None:
        self.inner, self.total, self.free, self.calls = inner, total, free, 0

    def usage(self):
        self.calls += 1
        return self.total, self.free

    def __getattr__(self, name):
        return getattr(self.inner, name)


def refusals() -> float:
    return sum(REGISTRY.get_sample_value("openpacs_storage_refusals_total", {"reason": r}) or 0
               for r in ("min_free", "quota"))


@pytest.mark.parametrize(("raw", "expected"), [
    ("", Threshold()), ("0", Threshold()), (12345, Threshold(nbytes=12345)), ("500MB", Threshold(nbytes=500 * 10**6)),
    ("2GiB", Threshold(nbytes=2 * 1024**3)), ("1.5 TB", Threshold(nbytes=1_500_000_000_000)),
    ("10%", Threshold(percent=10.0)), ("2.5%", Threshold(percent=2.5)),
])
def test_parse_threshold(raw, expected):
    assert parse_threshold(raw, "storage_min_free") == expected


@pytest.mark.parametrize("raw", ["ten", "5 parsecs", "-3", "0%", "100%", "150%"])
def test_parse_threshold_refuses_nonsense(raw):
    with pytest.raises(ValueError, match="storage_min_free"):
        parse_threshold(raw, "storage_min_free")


def test_quota_takes_no_percentage():
    with pytest.raises(ValueError, match="storage_quota"):
        parse_threshold("10%", "storage_quota", percent_allowed=False)


def test_bad_threshold_refuses_to_start(make_ctx):
    with pytest.raises(ValueError, match="storage_min_free"):
        make_ctx(storage_min_free="lots")


def test_no_thresholds_no_guard(ctx):
    assert ctx.ingest.guard is None
    assert ctx.figures.get()["storage_refusing"] is None


def test_min_free_refuses_cleanly_and_resumes(make_ctx):
    ctx = make_ctx(storage_min_free="1MB")
    fake = FakeUsage(ctx.store, total=100 * 10**6, free=10**6 + 20_000)
    ctx.ingest.guard.store = fake
    ctx.ingest.guard.ttl = 3600  # one reading: the bytes written since are counted against it
    before = refusals()
    outcomes = [store(ctx, instance(pixels=6000)) for _ in range(6)]
    statuses = [o.status for o in outcomes]
    # about 20 KB above the threshold: the first instances fit, the rest are refused, none after a refusal succeeds
    assert statuses[0] == Status.SUCCESS and statuses[-1] == Status.OUT_OF_RESOURCES
    first_refused = statuses.index(Status.OUT_OF_RESOURCES)
    assert all(s == Status.OUT_OF_RESOURCES for s in statuses[first_refused:])
    assert "storage_min_free" in outcomes[-1].message
    assert fake.calls == 1  # no statvfs per instance
    assert n_instances(ctx) == first_refused
    assert blob_and_temp_files(ctx) == (first_refused, 0)  # nothing written for the refused ones
    assert refusals() - before == 6 - first_refused
    ctx.figures.ttl = 0
    assert ctx.figures.get()["storage_refusing"]
    assert ctx.figures.get()["storage_min_free_bytes"] == 10**6
    # space comes back: the next reading lets ingest go on by itself
    fake.free = 50 * 10**6
    ctx.ingest.guard.ttl = 0
    assert store(ctx, instance()).status == Status.SUCCESS
    assert ctx.figures.get()["storage_refusing"] is None


def test_min_free_percentage_of_the_store(make_ctx):
    ctx = make_ctx(storage_min_free="10%")
    ctx.ingest.guard.store = FakeUsage(ctx.store, total=10**9, free=99 * 10**6)
    out = store(ctx, instance())
    assert out.status == Status.OUT_OF_RESOURCES and "100000000" in out.message


def test_free_space_is_read_at_most_once_a_second(make_ctx):
    ctx = make_ctx(storage_min_free="1KB")
    fake = FakeUsage(ctx.store, total=10**12, free=10**11)
    ctx.ingest.guard.store = fake
    for _ in range(20):
        assert store(ctx, instance()).status == Status.SUCCESS
    assert fake.calls <= 2


def test_quota_counts_the_index_and_what_is_being_written(make_ctx):
    ctx = make_ctx(storage_quota="30000")
    ok = [store(ctx, instance(pixels=8000)).status for _ in range(5)]
    assert ok[:3] == [Status.SUCCESS] * 3 and ok[3:] == [Status.OUT_OF_RESOURCES] * 2
    assert n_instances(ctx) == 3
    # another node of the cluster (or a restart) sees the same used bytes from the index
    other = make_ctx(storage_quota="30000")
    out = store(other, instance(pixels=8000))
    assert out.status == Status.OUT_OF_RESOURCES and "storage_quota" in out.message
    # deleting a study frees quota (at the next reading of the index)
    from core_factory import SRC

    from openpacs.index.schema import studies

    with ctx.index.engine.connect() as c:
        uid = c.execute(select(studies.c.study_instance_uid)).scalars().first()
    assert ctx.ingest.delete("STUDY", uid, SRC) == 1
    other.ingest.guard.ttl = 0
    assert store(other, instance(pixels=8000)).status == Status.SUCCESS


def test_enospc_in_the_middle_of_a_write_leaves_nothing(ctx, monkeypatch):
    """A full disk during writev: 0xA700, the temp file removed, no index row, and the next store works again."""
    from openpacs.storage import filesystem

    real = filesystem._write_all
    calls = {"n": 0}

    def fail_halfway(fd, chunks):
        calls["n"] += 1
        os.write(fd, b"partial bytes")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(filesystem, "_write_all", fail_halfway)
    ds = instance()
    out = store(ctx, ds)
    assert calls["n"] == 1
    assert out.status == Status.OUT_OF_RESOURCES and "No space left" in out.message
    assert n_instances(ctx) == 0 and blob_and_temp_files(ctx) == (0, 0)
    monkeypatch.setattr(filesystem, "_write_all", real)
    assert store(ctx, ds).status == Status.SUCCESS  # resumes by itself
    assert n_instances(ctx) == 1


def test_enospc_at_group_commit_sync_is_not_acknowledged(ctx, monkeypatch):
    """Write-back error reported by the batch sync (syncfs/fsync): every store of the batch fails, blobs removed."""
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ctx.store, "sync_pending", full)
    out = store(ctx, instance())
    assert out.status == Status.OUT_OF_RESOURCES
    assert n_instances(ctx) == 0 and blob_and_temp_files(ctx) == (0, 0)


def test_refused_part10_file_via_store_file(make_ctx):
    ctx = make_ctx(storage_quota="1000")
    out = ctx.ingest.store_file(part10(instance(pixels=4000)), source=ctx_source())
    assert out.status == Status.OUT_OF_RESOURCES
    assert blob_and_temp_files(ctx) == (0, 0)


def ctx_source():
    from core_factory import SRC

    return SRC


def test_guard_figures_without_free_space_reading():
    class NoUsage:
        def usage(self):
            return None, None

    g = StorageGuard(NoUsage(), None, Threshold(percent=5.0), Threshold())
    assert g.check(10**9) is None  # an object store cannot tell its free space: the percentage does not apply
    assert g.figures()["storage_min_free_bytes"] is None
