"""A primary blob store with a cold tier behind one ``BlobStore``: the key says which store holds the blob.

Why routing by key: every retrieval path (C-GET/C-MOVE through ``services.retrieve.read_file``, WADO-RS/URI through
``read``/``stream``/``path``, rendering, routing, doctor) already reads a blob by its index key, so when the key
itself names the store, none of them changes and none needs a second index column to look up. A blob moved to the
tier (services/tiering.py) gets the key ``"tier/" + <key in the tier store>``; the index row is switched to that key
in one transaction once the copy has been verified, and the primary copy is deleted after it. Keys without the
prefix are the primary store's, so an archive without a tier is unchanged.

Reads of tiered blobs may go through a local cache (``tier_cache_dir``): a whole-blob read fills it, later reads
(and ``path()``, so WADO's zero-copy and frame paths) are served from it; it is bounded by ``cache_max`` bytes and
evicts the least recently used blobs. The cache only ever holds copies: losing it loses nothing.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from .base import BlobStore, StoredBlob

TIER_PREFIX = "tier/"


def is_tier_key(key: str) -> bool:
    return key.startswith(TIER_PREFIX)


_TOUCH_EVERY_NS = 10 * 10**9  # a cached blob's access time is refreshed at most this often


class TieredBlobStore:
    def __init__(self, primary: BlobStore, tier: BlobStore, cache_dir: str | None = None,
                 cache_max: int = 10 << 30) -> None:
        self.primary = primary
        self.tier = tier
        self.cache_dir = os.path.abspath(cache_dir) if cache_dir else None
        self.cache_max = cache_max
        self._cache_lock = threading.Lock()
        if self.cache_dir:
            os.makedirs(self.cache_dir, exist_ok=True)

    def __getattr__(self, name: str) -> Any:  # root, tmp ... of a filesystem primary (doctor, tests)
        if name in ("primary", "tier") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.primary, name)

    def _route(self, key: str) -> tuple[BlobStore, str]:
        if key.startswith(TIER_PREFIX):
            return self.tier, key[len(TIER_PREFIX) :]
        return self.primary, key

    # -- the cache of tiered blobs ---------------------------------------------------------------------------------
    def _cached(self, inner: str) -> str | None:
        if not self.cache_dir or "/" in inner or inner.startswith("."):
            return None
        p = os.path.join(self.cache_dir, inner)
        try:
            st = os.stat(p)
        except OSError:
            return None
        now = time.time_ns()
        if now - st.st_atime_ns > _TOUCH_EVERY_NS:  # not one inode write per frame of a slide
            # LRU by access time, set here; the mtime is left alone: readers key their caches of a file's layout
            # by it (dicom/frames.py), and a touched mtime made every frame of a cached slide rebuild its index
            try:
                os.utime(p, ns=(now, st.st_mtime_ns))
            except OSError:  # not our file (EPERM): still a cached copy, only its rank is not refreshed
                pass
        return p

    def _fill(self, inner: str, data: bytes) -> None:
        if not self.cache_dir or "/" in inner or inner.startswith(".") or len(data) > self.cache_max:
            return
        tmp = os.path.join(self.cache_dir, f".{uuid.uuid4().hex}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, os.path.join(self.cache_dir, inner))
        except OSError:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            return
        self._evict()

    def _evict(self) -> None:
        assert self.cache_dir is not None
        with self._cache_lock:
            files = []
            for e in os.scandir(self.cache_dir):
                if e.is_file() and not e.name.startswith("."):
                    st = e.stat()
                    files.append((max(st.st_atime, st.st_mtime), st.st_size, e.path))
            total = sum(f[1] for f in files)
            for _, size, p in sorted(files):
                if total <= self.cache_max:
                    break
                try:
                    os.unlink(p)
                except OSError:
                    continue
                total -= size

    def _drop_cached(self, inner: str) -> None:
        if self.cache_dir and "/" not in inner and not inner.startswith("."):
            try:
                os.unlink(os.path.join(self.cache_dir, inner))
            except OSError:
                pass

    # -- BlobStore ----------------------------------------------------------------------------------------------------
    def put(self, chunks: list[bytes | memoryview]) -> StoredBlob:
        return self.primary.put(chunks)

    def put_tier(self, chunks: list[bytes | memoryview]) -> StoredBlob:
        """Write a blob into the tier store; the key returned is the routed one (``tier/...``)."""
        blob = self.tier.put(chunks)
        self.tier.sync_pending()
        return StoredBlob(key=TIER_PREFIX + blob.key, size=blob.size)

    def sync_pending(self) -> None:
        self.primary.sync_pending()

    def read(self, key: str, start: int = 0, end: int | None = None) -> bytes:
        store, inner = self._route(key)
        if store is self.primary:
            return self.primary.read(inner, start, end)
        cached = self._cached(inner)
        if cached is not None:
            with open(cached, "rb") as f:
                f.seek(start)
                return f.read() if end is None else f.read(max(0, end - start))
        data = self.tier.read(inner, start, end)
        if start == 0 and end is None:
            self._fill(inner, data)
        return data

    def stream(self, key: str, start: int = 0, end: int | None = None, chunk: int = 1 << 20) -> Iterator[bytes]:
        store, inner = self._route(key)
        if store is self.primary:
            return self.primary.stream(inner, start, end, chunk)
        cached = self._cached(inner)
        if cached is not None:
            return _file_chunks(cached, start, end, chunk)
        return self.tier.stream(inner, start, end, chunk)

    def path(self, key: str) -> str | None:
        store, inner = self._route(key)
        if store is self.primary:
            return self.primary.path(inner)
        cached = self._cached(inner)
        if cached is not None:
            return cached
        return self.tier.path(inner)  # a filesystem tier has paths; an object store none

    def open(self, key: str) -> Any:
        """A seekable file object where the holding store offers one (S3: ranged GETs), else AttributeError."""
        store, inner = self._route(key)
        return store.open(inner)  # type: ignore[attr-defined]

    def delete(self, key: str) -> None:
        store, inner = self._route(key)
        store.delete(inner)
        if store is self.tier:
            self._drop_cached(inner)

    def keys_older_than(self, epoch: float) -> Iterator[str]:
        yield from self.primary.keys_older_than(epoch)
        for k in self.tier.keys_older_than(epoch):
            yield TIER_PREFIX + k

    def clean_temp(self) -> int:
        return self.primary.clean_temp() + self.tier.clean_temp()

    def usage(self) -> tuple[int | None, int | None]:
        return self.primary.usage()

    def probe(self) -> None:
        self.primary.probe()  # ingest's readiness; a tier outage delays tiering and tiered reads, not new images


def _file_chunks(path: str, start: int, end: int | None, chunk: int) -> Iterator[bytes]:
    with open(path, "rb") as f:
        f.seek(start)
        remaining = None if end is None else max(0, end - start)
        while remaining is None or remaining > 0:
            b = f.read(chunk if remaining is None else min(chunk, remaining))
            if not b:
                return
            if remaining is not None:
                remaining -= len(b)
            yield b
