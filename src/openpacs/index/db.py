"""The SQL index: engines for SQLite (WAL, one writer) and PostgreSQL, batched ingest writes, lookups, deletes."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, delete, event, exc, func, insert, select, text, update
from sqlalchemy.engine import Connection, Engine

from .schema import changes, instances, patients, series, settings_table, studies

log = logging.getLogger(__name__)


def now() -> datetime:
    return datetime.now(UTC)


def _normalize_url(url: str) -> str:
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


@dataclass
class NewInstance:
    """One instance to index, prepared by the ingest service (blob already durable)."""

    values: dict[str, dict[str, Any]]  # level -> column -> value (from dicom.header.index_values)
    blob_key: str
    size: int
    sha256: str
    transfer_syntax_uid: str
    calling_aet: str = ""
    source: str = ""
    replace: bool = False  # duplicate policy "overwrite": replace an existing instance's blob


@dataclass
class WriteResult:
    inserted: bool
    existing_sha256: str = ""
    existing_blob_key: str = ""  # set when a duplicate exists (or was replaced: the old blob to delete)
    replaced: bool = False


@dataclass
class _StudyAcc:
    id: int
    patient_id: int
    modalities: list[str]
    sop_classes: list[str]
    dirty: bool = False
    new_series: int = 0
    new_instances: int = 0
    size: int = 0


@dataclass
class _Batch:
    series: dict[str, tuple[int, int]] = field(default_factory=dict)  # series uid -> (series id, study id)
    studies: dict[int, _StudyAcc] = field(default_factory=dict)
    series_counts: dict[int, list[int]] = field(default_factory=dict)  # series id -> [instances, bytes]
    patient_counts: dict[int, list[int]] = field(default_factory=dict)  # patient id -> [studies, series, instances]
    changes: list[dict[str, Any]] = field(default_factory=list)


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

    # -- lifecycle -------------------------------------------------------------------------------------------
    def migrate(self) -> None:
        from .migrate import upgrade

        upgrade(self.write_engine)

    def ping(self) -> bool:
        try:
            with self.engine.connect() as c:
                c.execute(text("SELECT 1"))
            return True
        except exc.SQLAlchemyError:
            return False

    def close(self) -> None:
        self.engine.dispose()
        if self.write_engine is not self.engine:
            self.write_engine.dispose()

    # -- writes ----------------------------------------------------------------------------------------------
    def write_batch(self, items: Sequence[NewInstance]) -> list[WriteResult]:
        """Index a batch in one transaction (the group commit). Retries on lock/uniqueness races."""
        for attempt in range(20):
            try:
                with self.write_engine.begin() as conn:
                    return self._write_batch(conn, items)
            except (exc.IntegrityError, exc.OperationalError) as e:
                if attempt == 19:
                    raise
                log.debug("index write retry %d after %s", attempt, e.__class__.__name__)
                time.sleep(0.005 * (attempt + 1))
        raise AssertionError("unreachable")

    def _write_batch(self, conn: Connection, items: Sequence[NewInstance]) -> list[WriteResult]:
        ts = now()
        b = _Batch()
        results: list[WriteResult] = []
        for it in items:
            iv = it.values["IMAGE"]
            sop_uid = iv["sop_instance_uid"]
            row = conn.execute(
                select(instances.c.id, instances.c.sha256, instances.c.blob_key).where(
                    instances.c.sop_instance_uid == sop_uid
                )
            ).first()
            if row is not None:
                if it.replace and row.sha256 != it.sha256:
                    conn.execute(
                        update(instances)
                        .where(instances.c.id == row.id)
                        .values(
                            blob_key=it.blob_key, size_bytes=it.size, sha256=it.sha256,
                            transfer_syntax_uid=it.transfer_syntax_uid, received_at=ts,
                            calling_aet=it.calling_aet, source=it.source,
                        )
                    )
                    b.changes.append(dict(change_type="UpdatedInstance", level="IMAGE", uid=sop_uid,
                                          study_instance_uid=it.values["STUDY"]["study_instance_uid"], at=ts))
                    results.append(WriteResult(False, row.sha256, row.blob_key, replaced=True))
                else:
                    results.append(WriteResult(False, row.sha256, row.blob_key))
                continue
            series_id, study_id = self._series_for(conn, it, b, ts)
            conn.execute(
                insert(instances).values(
                    series_fk=series_id, blob_key=it.blob_key, size_bytes=it.size, sha256=it.sha256,
                    transfer_syntax_uid=it.transfer_syntax_uid, calling_aet=it.calling_aet, source=it.source,
                    received_at=ts, **iv,
                )
            )
            acc = b.studies[study_id]
            acc.new_instances += 1
            acc.size += it.size
            sc = b.series_counts.setdefault(series_id, [0, 0])
            sc[0] += 1
            sc[1] += it.size
            b.patient_counts.setdefault(acc.patient_id, [0, 0, 0])[2] += 1
            cls = iv.get("sop_class_uid")
            if cls and cls not in acc.sop_classes:
                acc.sop_classes.append(cls)
                acc.dirty = True
            b.changes.append(dict(change_type="NewInstance", level="IMAGE", uid=sop_uid,
                                  study_instance_uid=it.values["STUDY"]["study_instance_uid"], at=ts))
            results.append(WriteResult(True))
        for sid, (n, size) in b.series_counts.items():
            conn.execute(
                update(series).where(series.c.id == sid).values(
                    num_instances=series.c.num_instances + n, size_bytes=series.c.size_bytes + size, updated_at=ts
                )
            )
        for acc in b.studies.values():
            vals: dict[str, Any] = dict(
                num_instances=studies.c.num_instances + acc.new_instances,
                num_series=studies.c.num_series + acc.new_series,
                size_bytes=studies.c.size_bytes + acc.size,
                updated_at=ts,
            )
            if acc.dirty:
                vals["modalities_in_study"] = "\\".join(acc.modalities)
                vals["sop_classes_in_study"] = "\\".join(acc.sop_classes)
            conn.execute(update(studies).where(studies.c.id == acc.id).values(**vals))
        for pid, (nst, nse, ninst) in b.patient_counts.items():
            conn.execute(
                update(patients).where(patients.c.id == pid).values(
                    num_studies=patients.c.num_studies + nst,
                    num_series=patients.c.num_series + nse,
                    num_instances=patients.c.num_instances + ninst,
                    updated_at=ts,
                )
            )
        if b.changes:
            conn.execute(insert(changes), b.changes)
        return results

    def _series_for(self, conn: Connection, it: NewInstance, b: _Batch, ts: datetime) -> tuple[int, int]:
        sv = it.values["SERIES"]
        uid = sv["series_instance_uid"]
        hit = b.series.get(uid)
        if hit is not None:
            return hit
        row = conn.execute(select(series.c.id, series.c.study_fk).where(series.c.series_instance_uid == uid)).first()
        if row is not None:
            study_id = row.study_fk
            self._study_acc(conn, study_id, b)
            b.series[uid] = (row.id, study_id)
            return row.id, study_id
        study_id = self._study_for(conn, it, b, ts)
        series_id = conn.execute(insert(series).values(study_fk=study_id, created_at=ts, updated_at=ts, **sv)).inserted_primary_key[0]
        acc = b.studies[study_id]
        acc.new_series += 1
        b.patient_counts.setdefault(acc.patient_id, [0, 0, 0])[1] += 1
        modality = sv.get("modality")
        if modality and modality not in acc.modalities:
            acc.modalities.append(modality)
            acc.dirty = True
        b.changes.append(dict(change_type="NewSeries", level="SERIES", uid=uid,
                              study_instance_uid=it.values["STUDY"]["study_instance_uid"], at=ts))
        b.series[uid] = (series_id, study_id)
        return series_id, study_id

    def _study_acc(self, conn: Connection, study_id: int, b: _Batch) -> _StudyAcc:
        acc = b.studies.get(study_id)
        if acc is None:
            row = conn.execute(
                select(studies.c.patient_fk, studies.c.modalities_in_study, studies.c.sop_classes_in_study).where(
                    studies.c.id == study_id
                )
            ).one()
            acc = _StudyAcc(
                study_id, row.patient_fk,
                [m for m in (row.modalities_in_study or "").split("\\") if m],
                [m for m in (row.sop_classes_in_study or "").split("\\") if m],
            )
            b.studies[study_id] = acc
        return acc

    def _study_for(self, conn: Connection, it: NewInstance, b: _Batch, ts: datetime) -> int:
        stv = it.values["STUDY"]
        uid = stv["study_instance_uid"]
        row = conn.execute(select(studies.c.id).where(studies.c.study_instance_uid == uid)).first()
        if row is not None:
            self._study_acc(conn, row.id, b)
            return row.id
        pv = it.values["PATIENT"]
        pid = pv.get("patient_id") or ""
        issuer = pv.get("issuer_of_patient_id") or ""
        prow = conn.execute(
            select(patients.c.id).where(patients.c.patient_id == pid, patients.c.issuer_of_patient_id == issuer)
        ).first()
        if prow is None:
            patient_id = conn.execute(
                insert(patients).values(created_at=ts, updated_at=ts, **{**pv, "patient_id": pid, "issuer_of_patient_id": issuer})
            ).inserted_primary_key[0]
            b.changes.append(dict(change_type="NewPatient", level="PATIENT", uid=pid, study_instance_uid=uid, at=ts))
        else:
            patient_id = prow.id
        study_id = conn.execute(insert(studies).values(patient_fk=patient_id, created_at=ts, updated_at=ts, **stv)).inserted_primary_key[0]
        b.studies[study_id] = _StudyAcc(study_id, patient_id, [], [])
        b.patient_counts.setdefault(patient_id, [0, 0, 0])[0] += 1
        b.changes.append(dict(change_type="NewStudy", level="STUDY", uid=uid, study_instance_uid=uid, at=ts))
        return study_id

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
            conn.execute(delete(instances).where(instances.c.id.in_([r.id for r in rows])))
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
            return [r.blob_key for r in rows]

    def _recount_series(self, conn: Connection, sid: int) -> None:
        n, size = conn.execute(
            select(func.count(), func.coalesce(func.sum(instances.c.size_bytes), 0)).where(instances.c.series_fk == sid)
        ).one()
        if n == 0:
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
        classes = conn.execute(
            select(instances.c.sop_class_uid).distinct()
            .select_from(instances.join(series, instances.c.series_fk == series.c.id))
            .where(series.c.study_fk == stid)
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
        conn.execute(update(patients).where(patients.c.id == pid).values(
            num_studies=len(rows), num_series=sum(r.num_series for r in rows),
            num_instances=sum(r.num_instances for r in rows),
        ))

    # -- settings in the index -------------------------------------------------------------------------------
    def get_setting(self, key: str) -> str | None:
        with self.engine.connect() as c:
            return c.execute(select(settings_table.c.value).where(settings_table.c.key == key)).scalar_one_or_none()
