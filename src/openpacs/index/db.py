"""The SQL index: engines for SQLite (WAL, one writer) and PostgreSQL, batched ingest writes, lookups, deletes."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, delete, event, exc, func, insert, select, text, update
from sqlalchemy.engine import Connection, Engine

from .schema import changes, instances, patients, series, studies
from .writer import BatchWriter, NewInstance, WriteResult

__all__ = ["Index", "NewInstance", "WriteResult"]

log = logging.getLogger(__name__)


_EMPTY_INSTANCE: dict[str, Any] = {c.name: None for c in instances.c if c.name != "id"}


def now() -> datetime:
    return datetime.now(UTC)


class Prepared:
    """A statement compiled once for an engine's dialect and run through the driver (``exec_driver_sql``): a hot
    lookup (a viewer's frame requests) skips SQLAlchemy's per-call statement building, cache key and compilation.
    Its bind parameters are named (``bindparam``); the rows are the driver's, without result type processing, so
    it suits statements whose columns are plain strings and integers."""

    def __init__(self, engine: Engine, stmt: Any) -> None:
        compiled = stmt.compile(dialect=engine.dialect)
        self.sql = str(compiled)
        self.order: tuple[str, ...] | None = tuple(compiled.positiontup) if compiled.positiontup else None

    def rows(self, conn: Connection, **params: Any) -> list[Any]:
        return list(self.execute(conn, **params))

    def execute(self, conn: Connection, **params: Any) -> Any:
        """Run it (e.g. an UPDATE: its ``rowcount``); a datetime parameter goes to the driver as it is given."""
        return conn.exec_driver_sql(self.sql, self._args(params))

    def dbapi_rows(self, dbapi_conn: Any, **params: Any) -> list[Any]:
        """The same on a bare DBAPI connection (``Index.loop_reader``)."""
        return list(dbapi_conn.execute(self.sql, self._args(params)))

    def _args(self, params: dict[str, Any]) -> Any:
        return tuple(params[n] for n in self.order) if self.order is not None else params


def _normalize_url(url: str) -> str:
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


class Index:
    def __init__(self, url: str) -> None:
        self.url = _normalize_url(url)
        self.is_sqlite = self.url.startswith("sqlite")
        if self.is_sqlite:
            path = self.url.split("///", 1)[1] if "///" in self.url else ""
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.engine = self._sqlite_engine(write=False)
            self.write_engine = self._sqlite_engine(write=True)
        else:
            self.engine = create_engine(self.url, pool_size=8, max_overflow=16, pool_pre_ping=True)
            self.write_engine = self.engine
        self._writer = BatchWriter(pyformat=not self.is_sqlite)
        from .changes import ChangeBus

        self.changes = ChangeBus(self)  # cross-node cache invalidation (started by `openpacs serve`)
        self._write_lock = threading.Lock()
        self._raw: Any = None
        self._loop_readers: list[Any] = []
        if self.is_sqlite:
            import sqlite3

            self._retryable: tuple[type[BaseException], ...] = (sqlite3.OperationalError, sqlite3.IntegrityError)
        else:
            import psycopg

            self._retryable = (psycopg.errors.UniqueViolation, psycopg.errors.SerializationFailure,
                               psycopg.errors.DeadlockDetected)

    def _sqlite_engine(self, write: bool) -> Engine:
        engine = create_engine(self.url, connect_args={"check_same_thread": False, "timeout": 60})

        @event.listens_for(engine, "connect")
        def _connect(dbapi_conn: Any, _rec: Any) -> None:
            dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (IMMEDIATE for writers)
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")  # a commit is durable before the C-STORE success
            cur.execute("PRAGMA busy_timeout=60000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA case_sensitive_like=ON")  # PS3.4: only PN matching may ignore case
            cur.execute("PRAGMA cache_size=-65536")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin(conn: Connection) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

        return engine

    def loop_reader(self) -> Any | None:
        """A read-only SQLite connection of its own for an event loop's lookups by key (a viewer's frame requests),
        or None (PostgreSQL: a network round trip is never made on an event loop; an in-memory database). In WAL
        mode a reader never waits for a writer, and with no busy timeout it never waits at all: a rare SQLITE_BUSY
        is an ``OperationalError`` and the caller asks a thread instead. Autocommit: each SELECT is its own
        snapshot, with no pool, BEGIN or ROLLBACK around it. The caller keeps it to its one thread."""
        path = self.url.split("///", 1)[1] if self.is_sqlite and "///" in self.url else ""
        if not path or path == ":memory:" or not Path(path).exists():
            return None
        import sqlite3

        conn = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True, isolation_level=None,
                               check_same_thread=False, timeout=0)
        conn.execute("PRAGMA case_sensitive_like=ON")
        conn.execute("PRAGMA cache_size=-16384")
        self._loop_readers.append(conn)
        return conn

    # -- lifecycle -------------------------------------------------------------------------------------------
    def migrate(self) -> None:
        from .migrate import upgrade

        upgrade(self.write_engine)  # on PostgreSQL under an advisory lock: nodes starting together migrate in turn

    @contextlib.contextmanager
    def exclusive(self, name: str) -> Iterator[bool]:
        """Across the nodes of a cluster, at most one holds ``name`` at a time: yields True to the holder, False to
        the others (who skip this round). A PostgreSQL session advisory lock, released on exit or when the holder's
        connection dies; on SQLite (one node) always True."""
        if self.is_sqlite:
            yield True
            return
        key = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big", signed=True)
        with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:  # no transaction held
            got = bool(c.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar())
            try:
                yield got
            finally:
                if got:
                    c.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})

    @contextlib.contextmanager
    def relaxed_commit(self) -> Iterator[Connection]:
        """A write transaction whose commit survives a crash of this process (kill -9) but not a power loss or a
        crash of the database server: SQLite ``synchronous=NORMAL`` for this one commit (WAL: the commit is in the
        log, in the kernel's cache, without its fsync), PostgreSQL ``synchronous_commit = off``. Only for records
        whose loss is harmless and whose fsync would cost the ingest path its write lock: a send job's
        acknowledgements (lost ones mean instances sent again after a power failure, never an instance lost).
        Images and everything else commit durably (``write_engine.begin()``)."""
        if not self.is_sqlite:
            with self.write_engine.begin() as c:
                c.exec_driver_sql("SET LOCAL synchronous_commit TO OFF")
                yield c
            return
        with self.write_engine.connect() as c:
            raw = c.connection.dbapi_connection
            assert raw is not None
            raw.execute("PRAGMA synchronous=NORMAL")  # outside any transaction, as SQLite requires
            try:
                with c.begin():  # BEGIN IMMEDIATE (the engine's begin event)
                    yield c
            finally:
                try:
                    raw.execute("PRAGMA synchronous=FULL")
                except Exception:
                    c.invalidate()  # never back in the pool with relaxed durability
                    raise

    def ping(self) -> bool:
        try:
            with self.engine.connect() as c:
                c.execute(text("SELECT 1"))
            return True
        except exc.SQLAlchemyError:
            return False

    def close(self) -> None:
        self.changes.stop()
        with self._write_lock:
            if self._raw is not None:
                self._raw.close()
                self._raw = None
        for conn in self._loop_readers:
            conn.close()
        self._loop_readers.clear()
        self.engine.dispose()
        if self.write_engine is not self.engine:
            self.write_engine.dispose()

    # -- writes ----------------------------------------------------------------------------------------------
    def write_batch(self, items: Sequence[NewInstance]) -> list[WriteResult]:
        """Index a batch in one transaction (the group commit). Retries on lock/uniqueness races between nodes."""
        with self._write_lock:
            for attempt in range(20):
                raw = self._raw_writer()
                cur = raw.cursor()
                try:
                    if self.is_sqlite:
                        cur.execute("BEGIN IMMEDIATE")
                    results = self._writer.write(cur, items)
                    raw.commit() if not self.is_sqlite else cur.execute("COMMIT")
                    return results
                except Exception as e:
                    try:
                        raw.rollback() if not self.is_sqlite else cur.execute("ROLLBACK")
                    except Exception:
                        self._drop_raw_writer()
                    retryable = isinstance(e, self._retryable)
                    if not retryable or attempt == 19:
                        raise
                    log.debug("index write retry %d after %s", attempt, e.__class__.__name__)
                    time.sleep(0.005 * (attempt + 1))
                finally:
                    cur.close()
            raise AssertionError("unreachable")

    def _raw_writer(self) -> Any:
        if self._raw is None:
            self._raw = self.write_engine.raw_connection()
        return self._raw

    def _drop_raw_writer(self) -> None:
        if self._raw is not None:
            try:
                self._raw.invalidate()
            except Exception:
                pass
            self._raw = None

    # -- reads -----------------------------------------------------------------------------------------------
    def find_instance(self, sop_instance_uid: str) -> Any:
        with self.engine.connect() as c:
            return c.execute(
                select(instances.c.id, instances.c.sha256, instances.c.blob_key, instances.c.size_bytes).where(
                    instances.c.sop_instance_uid == sop_instance_uid
                )
            ).first()

    def blob_keys(self) -> set[str]:
        with self.engine.connect() as c:
            return {r[0] for r in c.execute(select(instances.c.blob_key))}

    def counts(self) -> dict[str, int]:
        with self.engine.connect() as c:
            return {
                name: c.execute(select(func.count()).select_from(t)).scalar_one()
                for name, t in (("patients", patients), ("studies", studies), ("series", series), ("instances", instances))
            }

    # -- deletes ---------------------------------------------------------------------------------------------
    def delete(self, level: str, uids: Iterable[str]) -> list[str]:
        """Delete resources (and what they contain), fix the counters; return the blob keys to remove afterwards."""
        uids = list(uids)
        with self.write_engine.begin() as conn:
            q = (
                select(instances.c.id, instances.c.blob_key, instances.c.size_bytes, instances.c.sop_instance_uid,
                       series.c.id.label("series_id"), studies.c.id.label("study_id"),
                       studies.c.study_instance_uid, studies.c.patient_fk)
                .select_from(instances.join(series, instances.c.series_fk == series.c.id)
                             .join(studies, series.c.study_fk == studies.c.id))
            )
            col = {"STUDY": studies.c.study_instance_uid, "SERIES": series.c.series_instance_uid,
                   "IMAGE": instances.c.sop_instance_uid}[level]
            rows = conn.execute(q.where(col.in_(uids))).all()
            if not rows:
                return []
            ts = now()
            # the keys of the rows actually deleted: a store racing this delete may have replaced a row's blob since
            # the select (PostgreSQL, READ COMMITTED), and it is that newer blob that must go with the row
            deleted_keys = [k for (k,) in conn.execute(
                delete(instances).where(instances.c.id.in_([r.id for r in rows])).returning(instances.c.blob_key))]
            touched_series = {r.series_id for r in rows}
            touched_studies = {r.study_id for r in rows}
            touched_patients = {r.patient_fk for r in rows}
            for sid in touched_series:
                self._recount_series(conn, sid)
            for stid in touched_studies:
                self._recount_study(conn, stid)
            for pid in touched_patients:
                self._recount_patient(conn, pid)
            conn.execute(insert(changes), [
                dict(change_type="Deleted", level=level, uid=u, study_instance_uid=None, at=ts) for u in uids
            ])
            return deleted_keys

    def recount(self, conn: Connection, series_ids: Iterable[int]) -> None:
        """Bring the counters and lists of these series and of their studies and patients back in line (after an
        IOCM rejection or restore changed which instances they count), inside the caller's transaction."""
        sids = sorted(set(series_ids))
        if not sids:
            return
        rows = conn.execute(select(series.c.id, series.c.study_fk, studies.c.patient_fk)
                            .select_from(series.join(studies, series.c.study_fk == studies.c.id))
                            .where(series.c.id.in_(sids))).all()
        for r in rows:
            self._recount_series(conn, r.id)
        for stid in sorted({r.study_fk for r in rows}):
            self._recount_study(conn, stid)
        for pid in sorted({r.patient_fk for r in rows}):
            self._recount_patient(conn, pid)

    def _recount_series(self, conn: Connection, sid: int) -> None:
        """Counters count the instances not rejected (IOCM, services/iocm.py); the series goes with its last row."""
        total, n, size = conn.execute(
            select(func.count(), func.count(instances.c.id).filter(instances.c.rejected.is_(None)),
                   func.coalesce(func.sum(instances.c.size_bytes).filter(instances.c.rejected.is_(None)), 0))
            .where(instances.c.series_fk == sid)
        ).one()
        if total == 0:
            conn.execute(delete(series).where(series.c.id == sid))
        else:
            conn.execute(update(series).where(series.c.id == sid).values(num_instances=n, size_bytes=size))

    def _recount_study(self, conn: Connection, stid: int) -> None:
        rows = conn.execute(
            select(series.c.modality, series.c.num_instances, series.c.size_bytes).where(series.c.study_fk == stid)
        ).all()
        if not rows:
            conn.execute(delete(studies).where(studies.c.id == stid))
            return
        rows = [r for r in rows if r.num_instances > 0]  # a series of rejected instances only is not counted
        classes = conn.execute(
            select(instances.c.sop_class_uid).distinct()
            .select_from(instances.join(series, instances.c.series_fk == series.c.id))
            .where(series.c.study_fk == stid, instances.c.rejected.is_(None))
        ).scalars().all()
        modalities: list[str] = []
        for r in rows:
            if r.modality and r.modality not in modalities:
                modalities.append(r.modality)
        conn.execute(update(studies).where(studies.c.id == stid).values(
            num_series=len(rows), num_instances=sum(r.num_instances for r in rows),
            size_bytes=sum(r.size_bytes for r in rows), modalities_in_study="\\".join(modalities),
            sop_classes_in_study="\\".join(classes),
        ))

    def _recount_patient(self, conn: Connection, pid: int) -> None:
        rows = conn.execute(select(studies.c.num_series, studies.c.num_instances).where(studies.c.patient_fk == pid)).all()
        if not rows:
            conn.execute(delete(patients).where(patients.c.id == pid))
            return
        rows = [r for r in rows if r.num_instances > 0]  # a study of rejected instances only is not counted
        conn.execute(update(patients).where(patients.c.id == pid).values(
            num_studies=len(rows), num_series=sum(r.num_series for r in rows),
            num_instances=sum(r.num_instances for r in rows),
        ))
