"""Cross-node cache invalidation: configuration kept in the index, caches that every node drops when it changes.

Each node keeps small in-memory copies of configuration that lives in the index (tokens and sessions, remote nodes,
department rules), because the hot paths (every HTTP request, every association) must not query for them. When one
node changes such a table it bumps the topic's epoch in ``cache_epochs`` (and, on PostgreSQL, sends
``NOTIFY openpacs_cache, '<topic>'`` in the same transaction). Every node runs one :class:`ChangeBus` watcher thread:

- on PostgreSQL it ``LISTEN``\\ s on a dedicated connection, so the other nodes drop their copies within milliseconds
  of the commit; it also re-reads the epochs every ``poll`` seconds, which covers a notification lost while the
  listening connection was being re-established;
- on SQLite (one machine, but possibly several processes: the server and an ``openpacs user`` command beside it) it
  reads the epochs every ``poll`` seconds.

The caches' own TTLs stay as the last line of defence (a node that crashed between its commit and its bump).
Callbacks run on the watcher thread and must be cheap (clear a dict, mark a copy stale).
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy import BigInteger, Column, String, Table, select, text, update
from sqlalchemy.exc import IntegrityError

from .schema import metadata

if TYPE_CHECKING:
    from .db import Index

log = logging.getLogger("openpacs.changes")

CHANNEL = "openpacs_cache"

cache_epochs = Table(
    "cache_epochs",
    metadata,
    Column("topic", String(32), primary_key=True),
    Column("epoch", BigInteger, nullable=False, default=0),
)


class ChangeBus:
    def __init__(self, index: Index, poll: float | None = None) -> None:
        self.index = index
        self.poll = poll if poll is not None else (1.0 if index.is_sqlite else 5.0)
        self._subs: dict[str, list[Callable[[], None]]] = defaultdict(list)
        self._seen: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._listen: Any = None
        self.received = 0  # notifications and epoch changes seen from elsewhere (for tests and metrics)

    # -- publishing ----------------------------------------------------------------------------------------------
    def subscribe(self, topic: str, callback: Callable[[], None]) -> None:
        self._subs[topic].append(callback)

    def bump(self, topic: str) -> None:
        """Tell every node (this one included, at once) that ``topic``'s configuration changed."""
        try:
            for _ in range(3):
                try:
                    with self.index.write_engine.begin() as c:
                        n = c.execute(update(cache_epochs).where(cache_epochs.c.topic == topic)
                                      .values(epoch=cache_epochs.c.epoch + 1)).rowcount
                        if not n:
                            c.execute(cache_epochs.insert().values(topic=topic, epoch=1))
                        if not self.index.is_sqlite:
                            c.execute(text("SELECT pg_notify(:ch, :t)"), {"ch": CHANNEL, "t": topic})
                    break
                except IntegrityError:  # two nodes inserted the topic's first row at once: update it instead
                    continue
        except Exception as e:  # the change itself is committed; the other nodes follow within the caches' TTL
            log.warning("could not publish a %s change to the other nodes: %s", topic, e)
        self._fire(topic)

    def _fire(self, topic: str) -> None:
        for cb in list(self._subs.get(topic, ())):
            try:
                cb()
            except Exception:
                log.exception("cache invalidation callback for %s failed", topic)

    # -- watching ------------------------------------------------------------------------------------------------
    def start(self) -> ChangeBus:
        if self._thread is None:
            self._seen = self._epochs()
            self._thread = threading.Thread(target=self._run, name="change-bus", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.poll + 2)
            self._thread = None
        self._close_listen()

    def _epochs(self) -> dict[str, int]:
        try:
            with self.index.engine.connect() as c:
                return {r.topic: int(r.epoch) for r in c.execute(select(cache_epochs.c.topic, cache_epochs.c.epoch))}
        except Exception as e:
            log.debug("cache epochs unreadable: %s", e)
            return dict(self._seen)

    def check(self) -> list[str]:
        """Compare the epochs with those last seen; fire the callbacks of the topics that moved."""
        now = self._epochs()
        moved = [t for t, e in now.items() if self._seen.get(t) != e]
        self._seen = now
        if moved:
            log.info("configuration changed elsewhere: %s (cached copies dropped)", ", ".join(sorted(moved)))
        for t in moved:
            self.received += 1
            self._fire(t)
        return moved

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self.index.is_sqlite:
                    self._stop.wait(self.poll)
                else:
                    self._wait_notify()
                self.check()
            except Exception as e:
                log.warning("change bus: %s", e)
                self._close_listen()
                self._stop.wait(1.0)

    def _wait_notify(self) -> None:
        if self._listen is None:
            import psycopg
            from sqlalchemy.engine import make_url

            url = make_url(self.index.url).set(drivername="postgresql")
            self._listen = psycopg.connect(url.render_as_string(hide_password=False), autocommit=True)
            self._listen.execute(f"LISTEN {CHANNEL}")
            self.check()  # anything that moved while we were not listening
        for _n in self._listen.notifies(timeout=self.poll, stop_after=1):
            break  # one notification is enough: check() reads every epoch

    def _close_listen(self) -> None:
        conn, self._listen = self._listen, None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass
