"""Filesystem blob store: temp file + fsync + atomic rename; directory fsyncs batched by the group commit."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterator

from .base import StoredBlob


class FilesystemBlobStore:
    def __init__(self, root: str | os.PathLike[str], sync: str = "auto") -> None:
        self.root = os.path.abspath(root)
        self.tmp = os.path.join(self.root, ".tmp")
        os.makedirs(self.tmp, exist_ok=True)
        self._dirty: set[str] = set()
        self._new_dirs: set[str] = set()  # written into since the last sync, entry in the parent not yet synced
        self._durable_dirs: set[str] = set()  # directories whose own entry is known to be on stable storage
        self._lock = threading.Lock()
        self._pending = False
        # Group durability. "syncfs" (the default where Linux has it): put() only writes, and the group commit makes
        # every blob of the batch durable, data and directory entries, with one syncfs(2) of the blob filesystem
        # ("the same guarantees as fsync() called on every file"; write-back errors reported since Linux 5.8).
        # Measured against "fsync" (one fsync per blob + one per directory), 4 storescu, alternating runs:
        # 512 KB CT 383-433 vs 309-365 inst/s, 8 KB 648-692 vs 542-617. "fsync" suits a blob store that shares its
        # filesystem with busy unrelated writers, whose dirty data syncfs would also flush.
        if sync not in ("auto", "syncfs", "fsync"):
            raise ValueError(f"blob sync mode must be auto, syncfs or fsync, not {sync!r}")
        self._syncfs = None if sync == "fsync" else _load_syncfs()
        if sync == "syncfs" and self._syncfs is None:
            raise OSError("syncfs(2) is not available on this system: use blob_sync = \"fsync\"")
        # temp files older than this store are crash leftovers; newer ones may be writes in flight (in this process
        # or in a sibling worker process), which clean_temp must not pull from under their rename
        self._stale_tmp = [f.name for f in os.scandir(self.tmp)]  # partial writes of a previous run

    # Keys look like "2026112803" + 32 random hex digits: the UTC hour the blob was written, then a random part.
    # Blobs of one hour share a directory (YYYYMMDD/HH/), so a group commit fsyncs one directory, not one per file,
    # and the orphan sweep can walk recent hours only.
    def _path(self, key: str) -> str:
        if len(key) != 42 or not key[:10].isdigit() or not all(c in "0123456789abcdef" for c in key[10:]):
            raise KeyError(f"invalid blob key {key!r}")
        return os.path.join(self.root, key[:8], key[8:10], key[10:])

    def path(self, key: str) -> str | None:
        return self._path(key)

    def put(self, chunks: list[bytes | memoryview]) -> StoredBlob:
        key = time.strftime("%Y%m%d%H", time.gmtime()) + uuid.uuid4().hex
        final = self._path(key)
        tmp = os.path.join(self.tmp, key[10:])
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            size = _write_all(fd, chunks)
            if self._syncfs is None:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.close(fd)
        d = os.path.dirname(final)
        try:
            os.rename(tmp, final)
        except FileNotFoundError:
            os.makedirs(d, exist_ok=True)
            os.rename(tmp, final)
        with self._lock:
            self._pending = True
            self._dirty.add(d)
            if d not in self._durable_dirs:
                # The directory may be new: made by this call, or by a concurrent put whose own bookkeeping may land
                # in a later group commit. Its entry (and its parent's) must be synced before this blob is acked.
                self._new_dirs.add(d)
                self._dirty.add(os.path.dirname(d))
                self._dirty.add(os.path.dirname(os.path.dirname(d)))
        return StoredBlob(key=key, size=size)

    def sync_pending(self) -> None:
        if self._syncfs is not None:
            with self._lock:
                pending, self._pending = self._pending, False
            if pending:
                fd = os.open(self.root, os.O_RDONLY)
                try:
                    if self._syncfs(fd) != 0:
                        err = ctypes.get_errno()
                        raise OSError(err, f"syncfs({self.root}): {os.strerror(err)}")
                finally:
                    os.close(fd)
            return
        with self._lock:
            dirs, self._dirty = self._dirty, set()
            new, self._new_dirs = self._new_dirs, set()
        # parents after children so a new directory's entry is durable once its content is
        for d in sorted(dirs, key=len, reverse=True):
            fd = os.open(d, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        with self._lock:
            self._durable_dirs |= new

    def read(self, key: str, start: int = 0, end: int | None = None) -> bytes:
        with open(self._path(key), "rb") as f:
            if start:
                f.seek(start)
            return f.read() if end is None else f.read(max(0, end - start))

    def stream(self, key: str, start: int = 0, end: int | None = None, chunk: int = 1 << 20) -> Iterator[bytes]:
        with open(self._path(key), "rb") as f:
            f.seek(start)
            remaining = None if end is None else max(0, end - start)
            while remaining is None or remaining > 0:
                n = chunk if remaining is None else min(chunk, remaining)
                b = f.read(n)
                if not b:
                    return
                if remaining is not None:
                    remaining -= len(b)
                yield b

    def delete(self, key: str) -> None:
        try:
            os.unlink(self._path(key))
        except FileNotFoundError:
            pass

    def keys_older_than(self, epoch: float) -> Iterator[str]:
        for day in os.scandir(self.root):
            if not day.is_dir() or len(day.name) != 8 or not day.name.isdigit():
                continue
            for hour in os.scandir(day.path):
                if not hour.is_dir() or len(hour.name) != 2:
                    continue
                for f in os.scandir(hour.path):
                    if len(f.name) == 32 and f.stat().st_mtime < epoch:
                        yield day.name + hour.name + f.name

    def clean_temp(self) -> int:
        """Remove partial writes left by a crash: the temp files that were already there when this store was
        opened (listed then, before any write of this process). Writes started since have new random names."""
        n = 0
        for name in self._stale_tmp:
            try:
                os.unlink(os.path.join(self.tmp, name))
            except FileNotFoundError:
                continue
            n += 1
        self._stale_tmp = []
        return n

    def usage(self) -> tuple[int | None, int | None]:
        du = shutil.disk_usage(self.root)
        return du.total, du.free

    def probe(self) -> None:
        path = os.path.join(self.tmp, "probe-" + uuid.uuid4().hex)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"openpacs")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(path)


def _write_all(fd: int, chunks: list[bytes | memoryview]) -> int:
    """Write the chunks in order with as few system calls as the kernel allows (writev of up to 1024 buffers)."""
    views = [memoryview(c) for c in chunks if len(c)]
    total = sum(len(v) for v in views)
    i = 0
    while i < len(views):
        n = os.writev(fd, views[i : i + 1024])
        while n:
            if n >= len(views[i]):
                n -= len(views[i])
                i += 1
            else:
                views[i] = views[i][n:]
                n = 0
    return total


def _load_syncfs():  # type: ignore[no-untyped-def]
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        fn = libc.syncfs
    except (OSError, AttributeError, TypeError):
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn
