"""Monitoring: Prometheus metrics (``/metrics``), the per-minute activity of the dashboard, and the system figures.

One facade, :class:`Monitor`, is what the protocols call (ingest, DIMSE, DICOMweb, HTTP): it updates the
``prometheus_client`` metrics of this process and the :class:`~.activity.ActivityRecorder` that the dashboard
reads. Both are in-memory operations; nothing here does I/O on a request's path.

Several processes (DIMSE workers): ``openpacs serve`` sets ``PROMETHEUS_MULTIPROC_DIR`` to a new empty directory
before anything imports ``prometheus_client``, so each process writes its samples to memory-mapped
files there and ``/metrics`` (served by the main process) adds them up with ``MultiProcessCollector``. Without it
(tests in one process, ``openpacs import``) the default registry is used. The index-derived gauges (instances,
storage used and free, jobs by state) are computed at scrape time by :class:`IndexCollector`, cached for a few
seconds so that a tight scrape interval cannot load the index.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import REGISTRY, Collector
from sqlalchemy import func, select

from ..index.db import Index
from ..index.schema import jobs, patients, series, studies
from .activity import ActivityRecorder

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

STORED = Counter("openpacs_instances_stored", "Instances stored (acknowledged after they were durable)", ["protocol"])
STORED_BYTES = Counter("openpacs_stored_bytes", "Bytes of the instances stored", ["protocol"])
STORE_FAILED = Counter("openpacs_store_failures", "Stores refused or failed, by DICOM status", ["protocol", "status"])
STORE_SECONDS = Histogram("openpacs_store_duration_seconds", "Time from a received instance to its durable commit",
                          ["protocol"], buckets=_LATENCY)
QUERIES = Counter("openpacs_queries", "Queries answered (C-FIND, QIDO-RS)", ["protocol", "level"])
QUERY_SECONDS = Histogram("openpacs_query_duration_seconds", "Time to answer a query, all matches sent",
                          ["protocol", "level"], buckets=_LATENCY)
RETRIEVED = Counter("openpacs_instances_retrieved", "Instances sent (C-GET, C-MOVE)", ["protocol"])
RETRIEVE_BYTES = Counter("openpacs_retrieve_bytes", "Bytes of DICOM data sent (C-GET, C-MOVE, WADO)", ["protocol"])
ASSOCIATIONS = Counter("openpacs_associations", "DICOM associations accepted")
ASSOC_ACTIVE = Gauge("openpacs_associations_active", "DICOM associations open now", multiprocess_mode="livesum")
ASSOC_REJECTED = Counter("openpacs_associations_rejected", "DICOM associations rejected or aborted at negotiation",
                         ["reason"])
HTTP_REQUESTS = Counter("openpacs_http_requests", "HTTP requests answered", ["route", "status"])
HTTP_ACTIVE = Gauge("openpacs_http_requests_active", "HTTP requests in progress", multiprocess_mode="livesum")
HTTP_SECONDS = Histogram("openpacs_http_request_duration_seconds", "HTTP response time (to the last byte)", ["route"],
                         buckets=_LATENCY)
STORAGE_REFUSALS = Counter("openpacs_storage_refusals", "Instances refused because the storage is below "
                           "storage_min_free or over storage_quota (0xA700)", ["reason"])
HL7_MESSAGES = Counter("openpacs_hl7_messages", "HL7 v2 messages answered, by type and acknowledgment code",
                       ["type", "ack"])


def multiprocess_enabled() -> bool:
    from prometheus_client import values

    return values.ValueClass.__name__ != "MutexValue" and bool(os.environ.get(MULTIPROC_ENV))


def process_exited(pid: int) -> None:
    """A DIMSE worker ended: its live gauges (associations open) no longer count."""
    if multiprocess_enabled():
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


class Monitor:
    """What the protocols report; ``activity`` is None where nothing is persisted (unit tests of one layer)."""

    def __init__(self, activity: ActivityRecorder | None = None) -> None:
        self.activity = activity
        self.last_store = float("-inf")  # time.monotonic() of the last acknowledged store (none yet)

    # stores (the one ingest path reports these, whatever the protocol)
    def stored(self, protocol: str, seconds: float, nbytes: int, calling_aet: str = "") -> None:
        self.last_store = time.monotonic()  # background work (services/compression.py) yields while ingest is busy
        protocol = _protocol(protocol)
        STORED.labels(protocol).inc()
        STORED_BYTES.labels(protocol).inc(nbytes)
        STORE_SECONDS.labels(protocol).observe(seconds)
        if self.activity is not None:
            self.activity.count("store", 1, nbytes)
            if calling_aet:
                self.activity.peer(calling_aet, instances_received=1, bytes_received=nbytes)

    def store_failed(self, protocol: str, status: int) -> None:
        STORE_FAILED.labels(_protocol(protocol), f"0x{status:04X}").inc()
        if self.activity is not None:
            self.activity.count("error")

    def queried(self, protocol: str, level: str, seconds: float, calling_aet: str = "") -> None:
        level = (level or "").lower() or "unknown"
        QUERIES.labels(protocol, level).inc()
        QUERY_SECONDS.labels(protocol, level).observe(seconds)
        if self.activity is not None:
            self.activity.count("query")
            if calling_aet:
                self.activity.peer(calling_aet, queries=1)

    def retrieved(self, protocol: str, nbytes: int, peer_aet: str = "", instances: int = 1) -> None:
        RETRIEVE_BYTES.labels(protocol).inc(nbytes)
        if instances:
            RETRIEVED.labels(protocol).inc(instances)
        if self.activity is not None:  # a WADO request counts as one retrieval (instances=0: not counted there)
            self.activity.count("retrieve", max(instances, 1), nbytes)
            if peer_aet:
                self.activity.peer(peer_aet, instances_sent=instances, bytes_sent=nbytes)

    # associations
    def association_opened(self) -> None:
        ASSOC_ACTIVE.inc()

    def association_closed(self) -> None:
        ASSOC_ACTIVE.dec()

    def association_accepted(self, calling_aet: str, address: str) -> None:
        ASSOCIATIONS.inc()
        if self.activity is not None:
            self.activity.count("association")
            self.activity.peer(calling_aet, address=address, connected=True, associations=1)

    def association_rejected(self, reason: str, calling_aet: str = "", address: str = "") -> None:
        ASSOC_REJECTED.labels(reason).inc()
        if self.activity is not None:
            self.activity.count("association_rejected")
            if calling_aet:
                self.activity.peer(calling_aet, address=address, connected=True, associations_rejected=1)

    def operation_failed(self) -> None:
        if self.activity is not None:
            self.activity.count("error")

    # HTTP
    def http_started(self) -> None:
        HTTP_ACTIVE.inc()

    def http(self, route: str, status: int, seconds: float) -> None:
        HTTP_ACTIVE.dec()
        HTTP_REQUESTS.labels(route, str(status)).inc()
        HTTP_SECONDS.labels(route).observe(seconds)
        if self.activity is not None:
            self.activity.count("http")
            if status >= 500:
                self.activity.count("error")

    def hl7(self, message_type: str, ack: str) -> None:
        HL7_MESSAGES.labels(message_type or "unknown", ack or "").inc()

    def close(self) -> None:
        if self.activity is not None:
            self.activity.close()


def _protocol(source_protocol: str) -> str:
    p = source_protocol.lower()
    return {"dicomweb": "stow", "dimse": "dimse", "import": "import"}.get(p, p or "unknown")


# ---- figures derived from the index (scrape time, dashboard, /api/stats) --------------------------------------

class SystemFigures:
    """Counts, storage and jobs, read from the index and the store, cached ``ttl`` seconds."""

    def __init__(self, index: Index, store: Any, ttl: float = 5.0) -> None:
        self.index = index
        self.store = store
        self.ttl = ttl
        self._lock = threading.Lock()
        self._at = 0.0
        self._value: dict[str, Any] = {}
        self.guard: Any = None
        self.extra: list[Any] = []  # callables adding figures (services/scrub.py: scrub_failures, scrub_last_at)

    def get(self) -> dict[str, Any]:
        with self._lock:
            if time.monotonic() - self._at < self.ttl and self._value:
                return self._value
        value = self._compute()
        with self._lock:
            self._value, self._at = value, time.monotonic()
        return value

    def _compute(self) -> dict[str, Any]:
        with self.index.engine.connect() as c:
            n_patients = c.execute(select(func.count()).select_from(patients)).scalar_one()
            n_studies, n_instances, used = c.execute(
                select(func.count(), func.coalesce(func.sum(studies.c.num_instances), 0),
                       func.coalesce(func.sum(studies.c.size_bytes), 0)).select_from(studies)).one()
            n_series = c.execute(select(func.count()).select_from(series)).scalar_one()
            job_states: dict[str, int] = {str(k): int(v) for k, v in c.execute(
                select(jobs.c.state, func.count()).group_by(jobs.c.state)).all()}
        total, free = (None, None)
        usage = getattr(self.store, "usage", None)
        if usage is not None:
            try:
                total, free = usage()
            except OSError:
                total, free = None, None
        out = {"patients": int(n_patients), "studies": int(n_studies), "series": int(n_series),
               "instances": int(n_instances), "storage_used_bytes": int(used), "storage_total_bytes": total,
               "storage_free_bytes": free, "jobs": {k: int(v) for k, v in job_states.items()},
               "storage_min_free_bytes": None, "storage_quota_bytes": None, "storage_refusing": None}
        if self.guard is not None:  # services.storage_policy.StorageGuard: thresholds and refusals
            out.update(self.guard.figures())
        for more in self.extra:
            out.update(more())
        return out


class IndexCollector(Collector):
    def __init__(self, figures: SystemFigures) -> None:
        self.figures = figures

    def collect(self) -> Iterator[GaugeMetricFamily]:
        f = self.figures.get()
        yield GaugeMetricFamily("openpacs_index_instances", "Instances in the index", value=f["instances"])
        yield GaugeMetricFamily("openpacs_index_studies", "Studies in the index", value=f["studies"])
        yield GaugeMetricFamily("openpacs_storage_used_bytes", "Bytes of the stored instances",
                                value=f["storage_used_bytes"])
        if f["storage_free_bytes"] is not None:
            yield GaugeMetricFamily("openpacs_storage_free_bytes", "Free bytes where the blobs are stored",
                                    value=f["storage_free_bytes"])
        if f.get("storage_min_free_bytes") is not None:
            yield GaugeMetricFamily("openpacs_storage_min_free_bytes", "storage_min_free in bytes: below it new data "
                                    "is refused", value=f["storage_min_free_bytes"])
        if f.get("storage_quota_bytes") is not None:
            yield GaugeMetricFamily("openpacs_storage_quota_bytes", "storage_quota in bytes", value=f["storage_quota_bytes"])
        yield GaugeMetricFamily("openpacs_storage_refusing", "1 while new data is refused for lack of space or quota",
                                value=1 if f.get("storage_refusing") else 0)
        if f.get("scrub_failures") is not None:
            yield GaugeMetricFamily("openpacs_scrub_failures", "Instances the last integrity scrub found missing or "
                                    "corrupt", value=f["scrub_failures"])
        fam = GaugeMetricFamily("openpacs_jobs", "Jobs by state", labels=["state"])
        for state in sorted(set(f["jobs"]) | {"pending", "running", "failed"}):
            fam.add_metric([state], f["jobs"].get(state, 0))
        yield fam


def exposition(figures: SystemFigures | None) -> bytes:
    """The Prometheus text format of every process's metrics plus the index-derived gauges."""
    if multiprocess_enabled():
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = CollectorRegistry()
        registry.register(_Forward(REGISTRY))
    if figures is not None:
        registry.register(IndexCollector(figures))
    return generate_latest(registry)


class _Forward(Collector):
    def __init__(self, inner: CollectorRegistry) -> None:
        self.inner = inner

    def collect(self) -> Iterable[Any]:
        return self.inner.collect()


def live_values(names: Iterable[str] = ("openpacs_associations_active", "openpacs_http_requests_active")) -> dict[str, float]:
    """Current values of gauges summed over every process (the dashboard's "active now")."""
    wanted = set(names)
    if multiprocess_enabled():
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        families = registry.collect()
    else:
        families = REGISTRY.collect()
    out = dict.fromkeys(wanted, 0.0)
    for fam in families:
        for sample in fam.samples:
            if sample.name in wanted:
                out[sample.name] += sample.value
    return out
