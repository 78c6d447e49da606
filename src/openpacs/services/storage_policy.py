"""Storage thresholds: refuse new data cleanly before the blob store runs out of space or over its quota.

``storage_min_free`` (bytes, or ``N%`` of the store's size) and ``storage_quota`` (bytes of stored instances) are
checked before every blob write. The check costs no system call per instance: the free space (statvfs) and the used
bytes (the index's study counters) are read at most once per ``ttl`` second, and the bytes this process wrote since
are counted against them, so concurrent associations crossing the threshold are refused at the right instance rather
than a second late. A refusal is a clean DICOM status (0xA700, Out of Resources) and nothing is written; when space
comes back (files removed, the disk grown, the quota raised) the next reading lets ingest resume by itself.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select

from .metrics import STORAGE_REFUSALS

log = logging.getLogger("openpacs.storage")

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


@dataclass(frozen=True)
class Threshold:
    """A size in bytes, or a percentage of the store's total size."""

    nbytes: int = 0
    percent: float | None = None

    def resolve(self, total: int | None) -> int | None:
        if self.percent is None:
            return self.nbytes or None
        return int(total * self.percent / 100) if total else None

    def __str__(self) -> str:
        return f"{self.percent:g}%" if self.percent is not None else str(self.nbytes)


def parse_threshold(raw: Any, name: str, percent_allowed: bool = True) -> Threshold:
    """``""``/``0`` (off), ``123456``, ``"500MB"``, ``"2GiB"``, ``"10%"`` -> Threshold; ValueError naming the setting."""
    text = str(raw).strip().lower().replace(" ", "").replace("_", "")
    if text in ("", "0", "none", "off"):
        return Threshold()
    m = re.fullmatch(r"(\d+(?:\.\d+)?)%", text)
    if m:
        if not percent_allowed:
            raise ValueError(f"{name} takes a size in bytes (e.g. 500GB), not a percentage")
        pct = float(m.group(1))
        if not 0 < pct < 100:
            raise ValueError(f"{name} percentage must be between 0 and 100, not {raw!r}")
        return Threshold(percent=pct)
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([a-z]*)", text)
    if not m or m.group(2) not in _UNITS:
        raise ValueError(f"{name} must be a size (bytes, or with KB/MB/GB/TB/KiB/MiB/GiB/TiB)"
                         f"{' or a percentage (10%)' if percent_allowed else ''}, not {raw!r}")
    return Threshold(nbytes=int(float(m.group(1)) * _UNITS[m.group(2)]))


class StorageGuard:
    """Decides, before a blob is written, whether new data may be taken (one per process, shared by every protocol)."""

    def __init__(self, store: Any, index: Any, min_free: Threshold, quota: Threshold, ttl: float = 1.0) -> None:
        self.store, self.index = store, index
        self.min_free, self.quota = min_free, quota
        self.ttl = ttl
        self._lock = threading.Lock()
        self._read_at = -1e9
        self._total: int | None = None
        self._free: int | None = None
        self._used = 0
        self._written = 0  # bytes written by this process since the last reading
        self.refusals = 0
        self.refusing: str | None = None  # the reason while below a threshold (dashboard, /readyz-like figures)

    @property
    def enabled(self) -> bool:
        return bool(self.min_free.nbytes or self.min_free.percent or self.quota.nbytes)

    def _refresh(self) -> None:
        total = free = None
        try:
            total, free = self.store.usage()
        except OSError as e:
            log.warning("free space of the blob store unreadable: %s", e)
        used = 0
        if self.quota.nbytes:
            from ..index.schema import studies

            with self.index.engine.connect() as c:
                used = int(c.execute(select(func.coalesce(func.sum(studies.c.size_bytes), 0))).scalar_one())
        self._total, self._free, self._used, self._written = total, free, used, 0
        self._read_at = time.monotonic()

    def check(self, nbytes: int) -> str | None:
        """None if a blob of ``nbytes`` may be written now (and it is counted as written), else the refusal reason."""
        if not self.enabled:
            return None
        with self._lock:
            if time.monotonic() - self._read_at >= self.ttl:
                self._refresh()
            reason = self._reason(nbytes)
            if reason is None:
                self._written += nbytes
            else:
                self.refusals += 1
            if reason != self.refusing:
                if reason is not None and self.refusing is None:
                    log.error("storage threshold reached, refusing new data: %s", reason)
                elif reason is None:
                    log.warning("storage back above its thresholds: accepting new data again")
                self.refusing = reason
        if reason is not None:
            STORAGE_REFUSALS.labels(reason="quota" if reason.startswith("quota") else "min_free").inc()
        return reason

    def _reason(self, nbytes: int) -> str | None:
        limit = self.min_free.resolve(self._total)
        if limit is not None and self._free is not None:
            after = self._free - self._written - nbytes
            if after < limit:
                return (f"storage almost full: {max(0, self._free - self._written)} bytes free, "
                        f"storage_min_free is {limit}")
        if self.quota.nbytes:
            after = self._used + self._written + nbytes
            if after > self.quota.nbytes:
                return f"quota reached: {self._used + self._written} bytes stored, storage_quota is {self.quota.nbytes}"
        return None

    def write_failed(self) -> None:
        """A write failed (ENOSPC, EDQUOT...): read the space again at the next check instead of trusting the cache."""
        with self._lock:
            self._read_at = -1e9

    def figures(self) -> dict[str, Any]:
        """Thresholds resolved in bytes and whether new data is refused now (dashboard, /metrics)."""
        with self._lock:
            if self.enabled and time.monotonic() - self._read_at >= self.ttl:
                self._refresh()
                self.refusing = self._reason(0)
            return {"storage_min_free_bytes": self.min_free.resolve(self._total) if self.enabled else None,
                    "storage_quota_bytes": self.quota.nbytes or None,
                    "storage_refusing": self.refusing}


def build_guard(settings: Any, store: Any, index: Any) -> StorageGuard:
    return StorageGuard(store, index, parse_threshold(settings.storage_min_free, "storage_min_free"),
                        parse_threshold(settings.storage_quota, "storage_quota", percent_allowed=False))
