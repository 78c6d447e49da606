"""The ingest write path: one transaction per group commit, in plain SQL on a DBAPI connection.

This is the hottest code of the archive. SQLAlchemy Core's per-statement construction and cache-key work cost more
than SQLite itself for small batches, so the writer keeps one raw connection and a handful of fixed SQL strings
(written once, in the DBAPI's parameter style). Everything else in the index uses SQLAlchemy Core.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from .schema import instances, patients, series, studies

INSTANCE_COLUMNS = [c.name for c in instances.c if c.name != "id"]


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
    called_aet: str = ""
    replace: bool = False  # duplicate policy "overwrite": replace an existing instance's blob
    departments: tuple[str, ...] | None = None  # the sender's scope: it may replace only instances of these


@dataclass
class WriteResult:
    inserted: bool
    existing_sha256: str = ""
    existing_blob_key: str = ""  # set when a duplicate exists (or was replaced: the old blob to delete)
    replaced: bool = False
    refused: bool = False  # an overwrite of an instance in a study outside the sender's departments


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


class BatchWriter:
    """Writes batches through a DBAPI cursor. ``pyformat`` selects %(name)s parameters (psycopg) over :name."""

    def __init__(self, pyformat: bool) -> None:
        self.pyformat = pyformat
        self._cache: dict[str, str] = {}

    def sql(self, s: str) -> str:
        out = self._cache.get(s)
        if out is None:
            out = re.sub(r":(\w+)", r"%(\1)s", s) if self.pyformat else s
            self._cache[s] = out
        return out

    def _insert(self, cur: Any, table: str, values: dict[str, Any]) -> int:
        cols = sorted(values)
        stmt = self.sql(f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join(':' + c for c in cols)}) RETURNING id")
        cur.execute(stmt, values)
        return int(cur.fetchone()[0])

    def write(self, cur: Any, items: Sequence[NewInstance]) -> list[WriteResult]:
        ts: Any = datetime.now(UTC)
        if not self.pyformat:  # SQLite: the text form SQLAlchemy's DateTime reads back
            ts = ts.strftime("%Y-%m-%d %H:%M:%S.%f")
        b = _Batch()
        results: list[WriteResult] = []
        uids = sorted({it.values["IMAGE"]["sop_instance_uid"] for it in items})
        params = {f"u{i}": u for i, u in enumerate(uids)}
        cur.execute(
            self.sql("SELECT i.id, i.sop_instance_uid, i.sha256, i.blob_key, st.department FROM instances i"
                     " JOIN series s ON i.series_fk = s.id JOIN studies st ON s.study_fk = st.id"
                     " WHERE i.sop_instance_uid IN (" + ", ".join(f":u{i}" for i in range(len(uids))) + ")"),
            params,
        )
        existing = {r[1]: r for r in cur.fetchall()}
        in_batch: dict[str, NewInstance] = {}
        replacing: dict[str, tuple[int, NewInstance]] = {}
        new_rows: list[dict[str, Any]] = []
        for it in items:
            iv = it.values["IMAGE"]
            sop_uid = iv["sop_instance_uid"]
            study_uid = it.values["STUDY"]["study_instance_uid"]
            row = existing.get(sop_uid)
            if row is not None:
                if it.replace and row[2] != it.sha256 and it.departments is not None and row[4] not in it.departments:
                    # a scoped sender may not replace (and so move or empty) another department's instance
                    results.append(WriteResult(False, row[2], row[3], refused=True))
                elif it.replace and row[2] != it.sha256 and sop_uid not in replacing:
                    # done after this batch's own rows and counters: the new content may name another series,
                    # study or patient, so the old row goes (with recounts) and the new one is inserted afresh
                    replacing[sop_uid] = (row[0], it)
                    b.changes.append(dict(change_type="UpdatedInstance", level="IMAGE", uid=sop_uid,
                                          study_instance_uid=study_uid, at=ts))
                    results.append(WriteResult(False, row[2], row[3], replaced=True))
                else:
                    results.append(WriteResult(False, row[2], row[3]))
                continue
            first = in_batch.get(sop_uid)
            if first is not None:  # the same instance twice in one batch: the first one wins
                results.append(WriteResult(False, first.sha256, first.blob_key))
                continue
            in_batch[sop_uid] = it
            series_id, study_id = self._series_for(cur, it, b, ts)
            row_values = dict.fromkeys(INSTANCE_COLUMNS)
            row_values.update(iv)
            row_values.update(series_fk=series_id, blob_key=it.blob_key, size_bytes=it.size, sha256=it.sha256,
                              transfer_syntax_uid=it.transfer_syntax_uid, calling_aet=it.calling_aet,
                              source=it.source, received_at=ts, called_aet=it.called_aet or None)
            new_rows.append(row_values)
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
            b.changes.append(dict(change_type="NewInstance", level="IMAGE", uid=sop_uid, study_instance_uid=study_uid,
                                  at=ts))
            results.append(WriteResult(True))
        if new_rows:
            cur.executemany(self.sql(
                f"INSERT INTO instances ({', '.join(INSTANCE_COLUMNS)}) VALUES ({', '.join(':' + c for c in INSTANCE_COLUMNS)})"
            ), new_rows)
        for sid, (n, size) in b.series_counts.items():
            cur.execute(self.sql("UPDATE series SET num_instances = num_instances + :n, size_bytes = size_bytes + :s,"
                                 " updated_at = :at WHERE id = :id"), dict(n=n, s=size, at=ts, id=sid))
        for acc in b.studies.values():
            p = dict(ni=acc.new_instances, ns=acc.new_series, s=acc.size, at=ts, id=acc.id)
            extra = ""
            if acc.dirty:
                extra = ", modalities_in_study = :mods, sop_classes_in_study = :classes"
                p.update(mods="\\".join(acc.modalities), classes="\\".join(acc.sop_classes))
            cur.execute(self.sql("UPDATE studies SET num_instances = num_instances + :ni, num_series = num_series + :ns,"
                                 " size_bytes = size_bytes + :s, updated_at = :at" + extra + " WHERE id = :id"), p)
        for pid, (nst, nse, ninst) in b.patient_counts.items():
            cur.execute(self.sql("UPDATE patients SET num_studies = num_studies + :a, num_series = num_series + :b,"
                                 " num_instances = num_instances + :c, updated_at = :at WHERE id = :id"),
                        dict(a=nst, b=nse, c=ninst, at=ts, id=pid))
        if b.changes:
            cur.executemany(self.sql("INSERT INTO changes (change_type, level, uid, study_instance_uid, at)"
                                     " VALUES (:change_type, :level, :uid, :study_instance_uid, :at)"), b.changes)
        for old_id, it in replacing.values():
            self._remove_instance(cur, old_id)
            self.write(cur, [dataclasses.replace(it, replace=False)])
        return results

    def _remove_instance(self, cur: Any, instance_id: int) -> None:
        """Delete one instance row and bring its series, study and patient counters and lists back in line
        (removing the ones left empty)."""
        cur.execute(self.sql("SELECT s.id, s.study_fk, st.patient_fk FROM instances i JOIN series s ON i.series_fk = s.id"
                             " JOIN studies st ON s.study_fk = st.id WHERE i.id = :id"), {"id": instance_id})
        series_id, study_id, patient_id = cur.fetchone()
        cur.execute(self.sql("DELETE FROM instances WHERE id = :id"), {"id": instance_id})
        # counters count the instances not rejected (IOCM, services/iocm.py); the series goes with its last row
        cur.execute(self.sql("SELECT count(*), count(CASE WHEN rejected IS NULL THEN 1 END),"
                             " coalesce(sum(CASE WHEN rejected IS NULL THEN size_bytes END), 0)"
                             " FROM instances WHERE series_fk = :id"), {"id": series_id})
        total, n, size = cur.fetchone()
        if total == 0:
            cur.execute(self.sql("DELETE FROM series WHERE id = :id"), {"id": series_id})
        else:
            cur.execute(self.sql("UPDATE series SET num_instances = :n, size_bytes = :s WHERE id = :id"),
                        {"n": n, "s": size, "id": series_id})
        cur.execute(self.sql("SELECT modality, num_instances, size_bytes FROM series WHERE study_fk = :id ORDER BY id"),
                    {"id": study_id})
        rows = cur.fetchall()
        if not rows:
            cur.execute(self.sql("DELETE FROM studies WHERE id = :id"), {"id": study_id})
        else:
            rows = [r for r in rows if r[1] > 0]
            cur.execute(self.sql("SELECT DISTINCT i.sop_class_uid FROM instances i JOIN series s ON i.series_fk = s.id"
                                 " WHERE s.study_fk = :id AND i.rejected IS NULL"), {"id": study_id})
            classes = sorted(r[0] for r in cur.fetchall())
            modalities = list(dict.fromkeys(r[0] for r in rows if r[0]))
            cur.execute(self.sql("UPDATE studies SET num_series = :ns, num_instances = :ni, size_bytes = :s,"
                                 " modalities_in_study = :m, sop_classes_in_study = :c WHERE id = :id"),
                        {"ns": len(rows), "ni": sum(r[1] for r in rows), "s": sum(r[2] for r in rows),
                         "m": "\\".join(modalities), "c": "\\".join(classes), "id": study_id})
        cur.execute(self.sql("SELECT num_series, num_instances FROM studies WHERE patient_fk = :id"), {"id": patient_id})
        prow = cur.fetchall()
        if not prow:
            cur.execute(self.sql("DELETE FROM patients WHERE id = :id"), {"id": patient_id})
        else:
            prow = [r for r in prow if r[1] > 0]
            cur.execute(self.sql("UPDATE patients SET num_studies = :a, num_series = :b, num_instances = :c"
                                 " WHERE id = :id"),
                        {"a": len(prow), "b": sum(r[0] for r in prow), "c": sum(r[1] for r in prow), "id": patient_id})

    def _series_for(self, cur: Any, it: NewInstance, b: _Batch, ts: Any) -> tuple[int, int]:
        sv = it.values["SERIES"]
        uid = sv["series_instance_uid"]
        hit = b.series.get(uid)
        if hit is not None:
            return hit
        cur.execute(self.sql("SELECT id, study_fk FROM series WHERE series_instance_uid = :uid"), {"uid": uid})
        row = cur.fetchone()
        if row is not None:
            self._study_acc(cur, row[1], b)
            b.series[uid] = (row[0], row[1])
            return row[0], row[1]
        study_id = self._study_for(cur, it, b, ts)
        series_id = self._insert(cur, series.name, {**sv, "study_fk": study_id, "created_at": ts, "updated_at": ts,
                                                    "num_instances": 0, "size_bytes": 0})
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

    def _study_acc(self, cur: Any, study_id: int, b: _Batch) -> _StudyAcc:
        acc = b.studies.get(study_id)
        if acc is None:
            # The lists are read, extended and written back: on PostgreSQL two nodes (or worker processes) adding
            # series to one study would each write back their own extension. FOR UPDATE serialises them on the
            # study row (SQLite's BEGIN IMMEDIATE already serialises whole transactions).
            cur.execute(self.sql("SELECT patient_fk, modalities_in_study, sop_classes_in_study FROM studies"
                                 " WHERE id = :id" + (" FOR UPDATE" if self.pyformat else "")), {"id": study_id})
            row = cur.fetchone()
            acc = _StudyAcc(study_id, row[0], [m for m in (row[1] or "").split("\\") if m],
                            [m for m in (row[2] or "").split("\\") if m])
            b.studies[study_id] = acc
        return acc

    def _study_for(self, cur: Any, it: NewInstance, b: _Batch, ts: Any) -> int:
        stv = it.values["STUDY"]
        uid = stv["study_instance_uid"]
        cur.execute(self.sql("SELECT id FROM studies WHERE study_instance_uid = :uid"), {"uid": uid})
        row = cur.fetchone()
        if row is not None:
            self._study_acc(cur, row[0], b)
            return int(row[0])
        pv = it.values["PATIENT"]
        pid = pv.get("patient_id") or ""
        issuer = pv.get("issuer_of_patient_id") or ""
        cur.execute(self.sql("SELECT id FROM patients WHERE patient_id = :pid AND issuer_of_patient_id = :iss"),
                    {"pid": pid, "iss": issuer})
        prow = cur.fetchone()
        if prow is None:
            patient_id = self._insert(cur, patients.name, {
                **pv, "patient_id": pid, "issuer_of_patient_id": issuer, "created_at": ts, "updated_at": ts,
                "num_studies": 0, "num_series": 0, "num_instances": 0})
            b.changes.append(dict(change_type="NewPatient", level="PATIENT", uid=pid, study_instance_uid=uid, at=ts))
        else:
            patient_id = int(prow[0])
        study_id = self._insert(cur, studies.name, {
            **stv, "patient_fk": patient_id, "created_at": ts, "updated_at": ts, "num_series": 0, "num_instances": 0,
            "size_bytes": 0, "modalities_in_study": "", "sop_classes_in_study": ""})
        b.studies[study_id] = _StudyAcc(study_id, patient_id, [], [])
        b.patient_counts.setdefault(patient_id, [0, 0, 0])[0] += 1
        b.changes.append(dict(change_type="NewStudy", level="STUDY", uid=uid, study_instance_uid=uid, at=ts))
        return study_id
