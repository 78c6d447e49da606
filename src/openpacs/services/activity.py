"""What happened, per minute and per peer, kept in the index: the dashboard's 24-hour charts and the nodes' activity.

Every process (the serving one and each DIMSE worker) counts in memory, off the hot path (a dict update under a
lock), and a flusher thread adds its counts to the index every few seconds with additive upserts
(``INSERT … ON CONFLICT DO UPDATE SET count = count + excluded.count``, on SQLite and PostgreSQL alike). So the
figures add up across processes and nodes, survive restarts, and a slow index never slows down a C-STORE: at worst
the charts lag by one flush.

- ``activity`` (minute, node, metric) -> count, bytes: metrics ``store``, ``query``, ``retrieve``,
  ``association``, ``association_rejected``, ``error`` (a failed store or a failed operation), ``http``.
- ``node_activity`` (peer AE title): last connection and address, associations (accepted / rejected), instances and
  bytes received and sent, queries. C-ECHO results are written there by services/nodes.py.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.engine import Connection

from ..index.admin_schema import activity, node_activity
from ..index.db import Index

log = logging.getLogger("openpacs.activity")

FLUSH_SECONDS = 5.0
KEEP_MINUTES = 8 * 24 * 60  # a week and a day of per-minute rows; older ones are pruned by the flusher

PEER_COUNTERS = ("associations", "associations_rejected", "instances_received", "bytes_received",
                 "instances_sent", "bytes_sent", "queries")


class _Peer:
    __slots__ = ("last_connected_at", "last_address", *PEER_COUNTERS)

    def __init__(self) -> None:
        self.last_connected_at: datetime | None = None
        self.last_address: str | None = None
        for name in PEER_COUNTERS:
            setattr(self, name, 0)


class ActivityRecorder:
    """In-memory counts of one process, flushed to the index by a daemon thread (and by :meth:`close`)."""

    def __init__(self, index: Index, node: str, flush_seconds: float = FLUSH_SECONDS) -> None:
        self.index = index
        self.node = node[:64]
        self.flush_seconds = flush_seconds
        self._lock = threading.Lock()
        self._minutes: dict[tuple[int, str], list[int]] = defaultdict(lambda: [0, 0])
        self._peers: dict[str, _Peer] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_prune = 0.0

    # -- counting (any thread, any time: no I/O) -------------------------------------------------------------
    def count(self, metric: str, n: int = 1, nbytes: int = 0, at: float | None = None) -> None:
        minute = int((time.time() if at is None else at) // 60)
        with self._lock:
            cell = self._minutes[(minute, metric)]
            cell[0] += n
            cell[1] += nbytes

    def peer(self, aet: str, *, address: str | None = None, connected: bool = False, **counts: int) -> None:
        """Add to a peer's counters (``associations=1``, ``instances_received=1, bytes_received=…`` …)."""
        if not aet:
            return
        aet = aet.strip()[:16]
        with self._lock:
            p = self._peers.get(aet)
            if p is None:
                p = self._peers[aet] = _Peer()
            if connected:
                p.last_connected_at = datetime.now(UTC)
                if address:
                    p.last_address = address
            for name, n in counts.items():
                setattr(p, name, getattr(p, name) + n)

    # -- flushing ----------------------------------------------------------------------------------------------
    def start(self) -> ActivityRecorder:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="activity-flush", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        self.flush()

    def _run(self) -> None:
        while not self._stop.wait(self.flush_seconds):
            self.flush()

    def flush(self) -> None:
        with self._lock:
            minutes, self._minutes = self._minutes, defaultdict(lambda: [0, 0])
            peers, self._peers = self._peers, {}
        if not minutes and not peers:
            return
        try:
            with self.index.write_engine.begin() as c:
                for (minute, metric), (n, nbytes) in minutes.items():
                    self._add_minute(c, minute, metric, n, nbytes)
                for aet, p in peers.items():
                    self._add_peer(c, aet, p)
                if time.time() - self._last_prune > 3600:
                    c.execute(delete(activity).where(activity.c.minute < int(time.time() // 60) - KEEP_MINUTES))
                    self._last_prune = time.time()
        except Exception as e:  # the index is down: keep the counts for the next flush
            log.warning("activity flush failed (%s); kept for the next one", e)
            with self._lock:
                for key, (n, nbytes) in minutes.items():
                    cell = self._minutes[key]
                    cell[0] += n
                    cell[1] += nbytes
                for aet, p in peers.items():
                    mine = self._peers.setdefault(aet, _Peer())
                    for name in PEER_COUNTERS:
                        setattr(mine, name, getattr(mine, name) + getattr(p, name))
                    if p.last_connected_at and (mine.last_connected_at is None
                                                or p.last_connected_at > mine.last_connected_at):
                        mine.last_connected_at, mine.last_address = p.last_connected_at, p.last_address

    def _upsert(self, c: Connection, table: Any, keys: dict[str, Any], values: dict[str, Any],
                added: dict[str, str]) -> None:
        if self.index.is_sqlite:
            from sqlalchemy.dialects.sqlite import insert
        else:
            from sqlalchemy.dialects.postgresql import insert  # type: ignore[assignment]
        stmt = insert(table).values(**keys, **values)
        update = {col: table.c[col] + stmt.excluded[col] for col in added.values()}
        update.update({col: stmt.excluded[col] for col in values if col not in added.values()
                       and values[col] is not None})
        c.execute(stmt.on_conflict_do_update(index_elements=list(keys), set_=update))

    def _add_minute(self, c: Connection, minute: int, metric: str, n: int, nbytes: int) -> None:
        self._upsert(c, activity, {"minute": minute, "node": self.node, "metric": metric},
                     {"count": n, "bytes": nbytes}, {"count": "count", "bytes": "bytes"})

    def _add_peer(self, c: Connection, aet: str, p: _Peer) -> None:
        values: dict[str, Any] = {name: getattr(p, name) for name in PEER_COUNTERS}
        values["last_connected_at"] = p.last_connected_at
        values["last_address"] = p.last_address
        self._upsert(c, node_activity, {"aet": aet}, values, {n: n for n in PEER_COUNTERS})


def series_per_minute(index: Index, metrics: tuple[str, ...], minutes: int = 24 * 60,
                      now: float | None = None) -> dict[str, Any]:
    """Per-minute counts of the last ``minutes`` minutes, summed over nodes: ``{"start": minute, "metrics":
    {metric: {"count": [...], "bytes": [...]}}}`` (index 0 = the oldest minute; minutes with nothing are 0)."""
    end = int((time.time() if now is None else now) // 60)
    start = end - minutes + 1
    out: dict[str, dict[str, list[int]]] = {m: {"count": [0] * minutes, "bytes": [0] * minutes} for m in metrics}
    stmt = select(activity.c.minute, activity.c.metric, activity.c.count, activity.c.bytes).where(
        activity.c.minute >= start, activity.c.minute <= end, activity.c.metric.in_(metrics))
    with index.engine.connect() as c:
        for minute, metric, n, nbytes in c.execute(stmt):
            out[metric]["count"][minute - start] += n
            out[metric]["bytes"][minute - start] += nbytes
    return {"start": start * 60, "step": 60, "metrics": out}
