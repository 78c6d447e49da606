"""Filesystem blob store: atomic durable writes, opaque keys, ranges, temp cleanup, directory fsync bookkeeping."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from openpacs.storage import FilesystemBlobStore, open_store
from openpacs.storage.filesystem import _load_syncfs


@pytest.fixture
def store(tmp_path):
    # the per-file fsync mode: these tests watch its fsync calls; the syncfs mode has its own tests below
    return FilesystemBlobStore(tmp_path / "blobs", sync="fsync")


def test_put_read_roundtrip_and_size(store):
    b = store.put([b"abc", memoryview(b"defg"), bytearray(b"h")])
    assert b.size == 8
    assert store.read(b.key) == b"abcdefgh"
    assert os.path.isfile(store.path(b.key))
    assert os.listdir(store.tmp) == []


def test_empty_blob(store):
    b = store.put([])
    assert b.size == 0 and store.read(b.key) == b""


def test_keys_are_fresh_and_never_derived_from_content(store):
    data = b"1.2.840.113619.2.55 PATIENT^NAME"
    keys = {store.put([data]).key for _ in range(50)}
    assert len(keys) == 50
    for k in keys:
        assert "1.2.840" not in k and "PATIENT" not in k
        assert os.path.commonpath([store.root, store.path(k)]) == store.root


@pytest.mark.parametrize(
    "bad", ["", "../../etc/passwd", "a" * 32, "0" * 31, "/abs/path", "00" * 16 + "/..", "ZZ" * 16, "0" * 100]
)
def test_invalid_keys_refused(store, bad):
    for op in (store.read, store.path, store.delete, lambda k: list(store.stream(k))):
        with pytest.raises(KeyError):
            op(bad)


def test_valid_key_shape_accepted(store):
    k = store.put([b"x"]).key
    assert store.read(k) == b"x"
    # the same shape with another random part is valid but absent
    other = k[:-1] + ("0" if k[-1] != "0" else "1")
    with pytest.raises(FileNotFoundError):
        store.read(other)


def test_range_reads(store):
    data = bytes(range(256)) * 40
    k = store.put([data]).key
    assert store.read(k, 10, 20) == data[10:20]
    assert store.read(k, 100) == data[100:]
    assert store.read(k, 0, 0) == b""
    assert store.read(k, 20, 10) == b""
    assert store.read(k, len(data) - 3, len(data) + 100) == data[-3:]
    assert store.read(k, len(data) + 5) == b""
    assert b"".join(store.stream(k, chunk=7)) == data
    assert b"".join(store.stream(k, 5, 1000, chunk=64)) == data[5:1000]
    assert all(len(c) <= 64 for c in store.stream(k, 5, 1000, chunk=64))
    assert b"".join(store.stream(k, len(data) - 2, chunk=1)) == data[-2:]
    assert list(store.stream(k, 10, 10)) == []


def test_failed_write_leaves_no_temp_file_and_no_blob(store):
    class Boom:
        def __len__(self):
            return 3

        def __buffer__(self, flags):
            raise OSError("disk on fire")

    with pytest.raises((TypeError, OSError)):  # the write fails after the first chunk
        store.put([b"ok", Boom()])
    assert os.listdir(store.tmp) == []
    assert list(store.keys_older_than(float("inf"))) == []


def test_clean_temp_removes_partial_writes(store, tmp_path):
    for i in range(3):
        p = os.path.join(store.tmp, f"partial{i}")
        with open(p, "wb") as f:
            f.write(b"half")
        os.utime(p, (1000, 1000))  # left by an earlier process
    store = type(store)(store.root, sync="fsync")  # the restarted process opens the store
    k = store.put([b"whole"]).key
    assert store.clean_temp() == 3
    assert os.listdir(store.tmp) == []
    assert store.read(k) == b"whole"


def test_clean_temp_spares_writes_in_flight(store, monkeypatch):
    """The orphan sweep runs while the server already accepts stores: a temp file being written must survive."""
    # a crash leftover from an earlier process, there when the restarted process opens the store
    leftover = os.path.join(store.tmp, "0" * 32)
    with open(leftover, "wb") as f:
        f.write(b"old")
    store = type(store)(store.root, sync="fsync")
    started, release = threading.Event(), threading.Event()
    real_fsync = os.fsync

    def slow_fsync(fd):
        started.set()
        release.wait(10)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    result: list[object] = []
    t = threading.Thread(target=lambda: result.append(store.put([b"in flight"])))
    t.start()
    assert started.wait(10)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert store.clean_temp() == 1
    release.set()
    t.join(10)
    assert result and store.read(result[0].key) == b"in flight"
    assert os.listdir(store.tmp) == []


def test_delete_is_idempotent(store):
    k = store.put([b"x"]).key
    store.delete(k)
    store.delete(k)
    assert not os.path.exists(store.path(k))


def test_keys_older_than(store):
    k1 = store.put([b"1"]).key
    k2 = store.put([b"2"]).key
    os.utime(store.path(k1), (1000, 1000))
    assert set(store.keys_older_than(2000)) == {k1}
    assert set(store.keys_older_than(float("inf"))) == {k1, k2}
    # stray files that are not blobs are never reported (the sweep would delete them)
    with open(os.path.join(os.path.dirname(store.path(k2)), "README"), "w") as f:
        f.write("x")
    assert set(store.keys_older_than(float("inf"))) == {k1, k2}


def test_sync_pending_covers_every_directory_written(store, monkeypatch):
    synced: list[str] = []
    real_open = os.open

    def spy_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))

    monkeypatch.setattr(os, "fsync", spy_fsync)
    keys = [store.put([b"x"]).key for _ in range(20)]
    synced.clear()
    store.sync_pending()
    for k in keys:
        assert os.path.dirname(store.path(k)) in synced
    synced.clear()
    store.sync_pending()  # nothing new: nothing to sync
    assert synced == []
    del real_open


def test_new_directories_have_their_parent_entries_synced(store, monkeypatch):
    """A directory created for a blob is only durable once its parent directory is fsynced too."""
    synced: list[str] = []
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")))
    k = store.put([b"x"]).key
    store.sync_pending()
    d = os.path.dirname(store.path(k))
    p = d
    while p != store.root:
        assert p in synced, (p, synced)
        p = os.path.dirname(p)
    assert store.root in synced
    # every directory fsynced after the ones it contains
    assert synced.index(d) < synced.index(store.root)


def test_directory_created_by_another_thread_is_still_synced_for_this_blob(store, monkeypatch):
    """Thread A renames into a directory thread B has just created (B's makedirs, then A's rename succeeds at the
    first try): A's acknowledgement must not depend on B's bookkeeping, which may land in a later group commit."""
    k0 = store.put([b"probe"]).key
    d = os.path.dirname(store.path(k0))
    store.delete(k0)
    fresh = FilesystemBlobStore(store.root, sync="fsync")  # knows nothing about which directories are durable
    synced: list[str] = []
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")))
    k = fresh.put([b"A"]).key
    assert os.path.dirname(fresh.path(k)) == d  # same directory, which already existed: no makedirs in this put
    fresh.sync_pending()
    assert d in synced and os.path.dirname(d) in synced and store.root in synced
    # once known durable, later blobs in that directory cost one directory fsync only
    synced.clear()
    fresh.put([b"B"])
    fresh.sync_pending()
    assert [p for p in synced if "/.tmp/" not in p] == [d]


def test_concurrent_puts(store):
    with ThreadPoolExecutor(8) as pool:
        blobs = list(pool.map(lambda i: store.put([str(i).encode() * 100]), range(200)))
    store.sync_pending()
    assert len({b.key for b in blobs}) == 200
    for i, b in enumerate(blobs):
        assert store.read(b.key) == str(i).encode() * 100
    assert os.listdir(store.tmp) == []


def test_open_store_urls(tmp_path):
    s = open_store(f"file://{tmp_path / 'x'}")
    assert isinstance(s, FilesystemBlobStore) and s.root == str(tmp_path / "x")
    assert isinstance(open_store(str(tmp_path / "y")), FilesystemBlobStore)
    with pytest.raises(ValueError):
        open_store("ftp://host/blobs")  # s3:// is supported: tests/unit/storage/test_s3_store.py


@pytest.mark.skipif(_load_syncfs() is None, reason="no syncfs(2) on this system")
def test_syncfs_mode_syncs_once_per_group_and_never_fsyncs_each_blob(tmp_path, monkeypatch):
    store = FilesystemBlobStore(tmp_path / "blobs", sync="syncfs")
    calls: list[int] = []
    real = store._syncfs
    store._syncfs = lambda fd: calls.append(fd) or real(fd)
    monkeypatch.setattr(os, "fsync", lambda fd: pytest.fail("per-blob fsync in syncfs mode"))
    keys = [store.put([b"blob", str(i).encode()]).key for i in range(5)]
    store.sync_pending()
    assert len(calls) == 1  # one call makes the whole group durable
    store.sync_pending()
    assert len(calls) == 1  # nothing written since: no call
    assert [store.read(k) for k in keys] == [b"blob" + str(i).encode() for i in range(5)]


def test_syncfs_failure_is_reported(tmp_path):
    store = FilesystemBlobStore(tmp_path / "blobs", sync="auto")
    if store._syncfs is None:
        pytest.skip("no syncfs(2) on this system")
    store._syncfs = lambda fd: -1
    store.put([b"x"])
    with pytest.raises(OSError, match="syncfs"):
        store.sync_pending()


def test_unknown_sync_mode_is_refused(tmp_path):
    with pytest.raises(ValueError, match="sync mode"):
        FilesystemBlobStore(tmp_path / "blobs", sync="sometimes")
