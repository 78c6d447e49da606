"""The bulk index-load path of the ingest service: many instances into the index in large batches.

For loading an index whose blobs are already in the store (a migration from another archive, a restore, the scale
benchmark ``bench/scale_bench.py``). Each item is a :class:`~openpacs.index.writer.NewInstance` as the ingest
service prepares it (``values``: level -> column -> value, as ``dicom.header.index_values`` gives them, plus the blob
key, size, digest and transfer syntax). Rows are written per chunk of ``batch_size`` instances in one transaction:
PostgreSQL COPY (psycopg) for the instances, patients, studies, series and change feed; ``executemany`` on SQLite.

Everything the normal write path (index/writer.py) keeps is kept, so QIDO-RS and C-FIND answer as for stored data:
the patient's, study's and series' instance/series/study counters and sizes, ModalitiesInStudy (the modality of
each new series, in order of arrival), SOPClassesInStudy, the ``*_norm`` upper-cased person names, ``received_at``,
and one change-feed row per new patient, study, series and instance (routing and prefetch follow the feed).
Patients, studies and series already in the index are extended (their counters and lists updated, their rows
locked FOR UPDATE on PostgreSQL as the writer does); an instance whose SOP Instance UID is already indexed, or that
appears twice in the input, is skipped (counted in ``BulkStats.skipped``): the bulk path never replaces.

Blobs are the caller's business: the rows name whatever blob keys the items carry. ``bench/scale_bench.py`` stores
one tiny real DICOM file in the filesystem store and points every row at it (shared blob): no benchmarked query
reads a blob (every QIDO-RS study default and C-FIND key it sends is an indexed column), the index's tables and
indexes have their real shape and size, and a million files would only measure the filesystem. Retrieving such an
instance returns the shared file, so that data set is for query benchmarks only.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ..index.db import Index
from ..index.schema import instances, patients, series, studies
from ..index.writer import NewInstance

_NORMALIZED = ("patient_name", "referring_physician_name")
# columns whose NOT NULL defaults live in the schema (Column.default / server_default), set explicitly here
_DEFAULTS: dict[str, dict[str, Any]] = {
    "patients": {"patient_id": "", "issuer_of_patient_id": ""},
    "studies": {"modalities_in_study": "", "sop_classes_in_study": "", "protected": False, "qc_version": 0},
    "series": {"qc_version": 0},
    "instances": {},
}
_COLUMNS = {t.name: [c.name for c in t.c] for t in (patients, studies, series, instances)}
_CHANGE_COLUMNS = ["change_type", "level", "uid", "study_instance_uid", "at"]


@dataclass
class BulkStats:
    instances: int = 0
    skipped: int = 0  # already indexed, or twice in the input
    patients: int = 0  # new ones
    studies: int = 0
    series: int = 0
    seconds: float = 0.0
    batches: int = 0

    @property
    def rate(self) -> float:
        return self.instances / self.seconds if self.seconds else 0.0


@dataclass
class _Study:
    id: int
    patient_id: int
    new: bool
    modalities: list[str]
    sop_classes: list[str]
    row: dict[str, Any] | None = None  # the row to insert, when new
    dirty: bool = False
    series: int = 0
    instances: int = 0
    size: int = 0


@dataclass
class _Chunk:
    patients: dict[tuple[str, str], list[Any]] = field(default_factory=dict)  # key -> [id, new, row, st, se, inst]
    patients_by_id: dict[int, list[Any]] = field(default_factory=dict)  # the same entries by patient id
    studies: dict[str, _Study] = field(default_factory=dict)
    series: dict[str, list[Any]] = field(default_factory=dict)  # uid -> [id, study uid, new, row, n, size]
    instances: list[dict[str, Any]] = field(default_factory=list)
    changes: list[dict[str, Any]] = field(default_factory=list)


def _chunks(items: Iterable[NewInstance], size: int) -> Iterator[list[NewInstance]]:
    buf: list[NewInstance] = []
    for it in items:
        buf.append(it)
        if len(buf) >= size:
            yield buf
            buf = []
    if buf:
        yield buf


class BulkLoader:
    """Loads instances into ``index`` in chunks of ``batch_size`` (one transaction each)."""

    def __init__(self, index: Index, batch_size: int = 20_000, changes: bool = True) -> None:
        self.index = index
        self.pg = not index.is_sqlite
        self.batch_size = batch_size
        self.changes = changes

    def load(self, items: Iterable[NewInstance], progress: Any = None) -> BulkStats:
        stats = BulkStats()
        t0 = time.perf_counter()
        for chunk in _chunks(items, self.batch_size):
            self._load_chunk(chunk, stats)
            stats.batches += 1
            if progress is not None:
                progress(stats, time.perf_counter() - t0)
        stats.seconds = time.perf_counter() - t0
        return stats

    # -- one transaction ---------------------------------------------------------------------------------------
    def _load_chunk(self, items: list[NewInstance], stats: BulkStats) -> None:
        raw = self.index.write_engine.raw_connection()
        try:
            cur = raw.cursor()
            try:
                if not self.pg:
                    cur.execute("BEGIN IMMEDIATE")  # also makes max(id) + 1 ours until COMMIT
                self._write(cur, raw, items, stats)
                cur.execute("COMMIT") if not self.pg else raw.commit()
            except BaseException:
                try:
                    cur.execute("ROLLBACK") if not self.pg else raw.rollback()
                except Exception:
                    pass
                raise
            finally:
                cur.close()
        finally:
            raw.close()

    def _write(self, cur: Any, raw: Any, items: list[NewInstance], stats: BulkStats) -> None:
        ts: Any = datetime.now(UTC)
        if not self.pg:  # the text form SQLAlchemy's DateTime reads back (as index/writer.py)
            ts = ts.strftime("%Y-%m-%d %H:%M:%S.%f")
        c = _Chunk()
        # what the index already holds of this chunk
        have_sops = set(self._existing(cur, "instances", "sop_instance_uid",
                                       [it.values["IMAGE"]["sop_instance_uid"] for it in items]))
        fresh: list[NewInstance] = []
        seen: set[str] = set()
        for it in items:
            sop = it.values["IMAGE"]["sop_instance_uid"]
            if sop in have_sops or sop in seen:
                stats.skipped += 1
                continue
            seen.add(sop)
            fresh.append(it)
        if not fresh:
            return
        series_rows = self._existing_rows(cur, "SELECT id, series_instance_uid, study_fk FROM series",
                                          "series_instance_uid",
                                          list({it.values["SERIES"]["series_instance_uid"] for it in fresh}))
        have_series = {r[1]: (int(r[0]), int(r[2])) for r in series_rows}
        study_uids = list({it.values["STUDY"]["study_instance_uid"] for it in fresh})
        lock = " FOR UPDATE" if self.pg else ""
        study_rows = self._existing_rows(
            cur, "SELECT id, study_instance_uid, patient_fk, modalities_in_study, sop_classes_in_study FROM studies",
            "study_instance_uid", study_uids, suffix=lock)
        # an existing series keeps its study, even when the item names another one (as in the writer)
        known = {int(r[0]) for r in study_rows}
        missing = list({sid for _, sid in have_series.values() if sid not in known})
        if missing:
            study_rows += self._existing_rows(
                cur, "SELECT id, study_instance_uid, patient_fk, modalities_in_study, sop_classes_in_study"
                " FROM studies", "id", missing, suffix=lock)
        have_studies = {r[1]: r for r in study_rows}
        by_study_id = {int(r[0]): r[1] for r in study_rows}
        pids = list({(it.values["PATIENT"].get("patient_id") or "") for it in fresh})
        patient_rows = self._existing_rows(cur, "SELECT id, patient_id, issuer_of_patient_id FROM patients",
                                           "patient_id", pids)
        have_patients = {(r[1], r[2] or ""): int(r[0]) for r in patient_rows}
        # ids for the new rows: sequences on PostgreSQL, max(id) under the write lock on SQLite
        n_new_patients = n_new_studies = n_new_series = 0
        pkeys: set[tuple[str, str]] = set()
        skeys: set[str] = set()
        sekeys: set[str] = set()
        for it in fresh:
            pv, stv, sv = it.values["PATIENT"], it.values["STUDY"], it.values["SERIES"]
            pk = (pv.get("patient_id") or "", pv.get("issuer_of_patient_id") or "")
            if pk not in have_patients and pk not in pkeys:
                pkeys.add(pk)
                n_new_patients += 1
            su = stv["study_instance_uid"]
            if su not in have_studies and su not in skeys:
                skeys.add(su)
                n_new_studies += 1
            seu = sv["series_instance_uid"]
            if seu not in have_series and seu not in sekeys:
                sekeys.add(seu)
                n_new_series += 1
        new_ids = {
            "patients": self._ids(cur, "patients", n_new_patients),
            "studies": self._ids(cur, "studies", n_new_studies),
            "series": self._ids(cur, "series", n_new_series),
        }
        for it in fresh:
            self._add(c, it, ts, have_patients, have_studies, by_study_id, have_series, new_ids)
        # rows
        new_patients = [p for p in c.patients_by_id.values() if p[1]]
        for p in new_patients:
            p[2].update(num_studies=p[3], num_series=p[4], num_instances=p[5])
        self._insert(cur, raw, "patients", [p[2] for p in new_patients])
        self._insert(cur, raw, "studies", [self._study_row(s) for s in c.studies.values() if s.new])
        new_series = [s for s in c.series.values() if s[2]]
        for s in new_series:
            s[3].update(num_instances=s[4], size_bytes=s[5])
        self._insert(cur, raw, "series", [s[3] for s in new_series])
        self._insert(cur, raw, "instances", c.instances)
        if self.changes:
            self._insert(cur, raw, "changes", c.changes, _CHANGE_COLUMNS)
        # counters and lists of the entities that were already there
        self._update(cur, "UPDATE series SET num_instances = num_instances + :n, size_bytes = size_bytes + :s,"
                     " updated_at = :at WHERE id = :id",
                     [dict(n=s[4], s=s[5], at=ts, id=s[0]) for s in c.series.values() if not s[2]])
        self._update(cur, "UPDATE studies SET num_instances = num_instances + :ni, num_series = num_series + :ns,"
                     " size_bytes = size_bytes + :s, modalities_in_study = :m, sop_classes_in_study = :c,"
                     " updated_at = :at WHERE id = :id",
                     [dict(ni=s.instances, ns=s.series, s=s.size, m="\\".join(s.modalities),
                           c="\\".join(s.sop_classes), at=ts, id=s.id) for s in c.studies.values() if not s.new])
        self._update(cur, "UPDATE patients SET num_studies = num_studies + :a, num_series = num_series + :b,"
                     " num_instances = num_instances + :c, updated_at = :at WHERE id = :id",
                     [dict(a=p[3], b=p[4], c=p[5], at=ts, id=p[0]) for p in c.patients_by_id.values() if not p[1]])
        stats.instances += len(c.instances)
        stats.patients += len(new_patients)
        stats.studies += sum(1 for s in c.studies.values() if s.new)
        stats.series += len(new_series)

    def _add(self, c: _Chunk, it: NewInstance, ts: Any, have_patients: dict[tuple[str, str], int],
             have_studies: dict[str, Any], by_study_id: dict[int, str], have_series: dict[str, tuple[int, int]],
             new_ids: dict[str, Iterator[int]]) -> None:
        pv, stv, sv, iv = (it.values["PATIENT"], it.values["STUDY"], it.values["SERIES"], it.values["IMAGE"])
        study_uid = stv["study_instance_uid"]
        # the series decides the study (an existing series keeps its study, as in the writer)
        seu = sv["series_instance_uid"]
        se = c.series.get(seu)
        if se is None:
            hit = have_series.get(seu)
            if hit is not None:
                study_uid = by_study_id.get(hit[1], study_uid)
                se = c.series[seu] = [hit[0], study_uid, False, None, 0, 0]
        elif not se[2]:
            study_uid = se[1]
        st = c.studies.get(study_uid)
        if st is None:
            row = have_studies.get(study_uid)
            if row is not None:
                st = _Study(int(row[0]), int(row[2]), False, [m for m in (row[3] or "").split("\\") if m],
                            [m for m in (row[4] or "").split("\\") if m])
                self._patient_entry(c, None, int(row[2]), ts, have_patients, new_ids)
            else:
                pid = self._patient_entry(c, pv, None, ts, have_patients, new_ids)
                sid = next(new_ids["studies"])
                srow = _row("studies", stv, patient_fk=pid, id=sid, created_at=ts, updated_at=ts)
                st = _Study(sid, pid, True, [], [], row=srow)
                c.patients_by_id[pid][3] += 1
                c.changes.append(dict(change_type="NewStudy", level="STUDY", uid=study_uid,
                                      study_instance_uid=study_uid, at=ts))
            c.studies[study_uid] = st
        if se is None:
            seid = next(new_ids["series"])
            se = c.series[seu] = [seid, study_uid, True,
                                  _row("series", sv, study_fk=st.id, id=seid, created_at=ts, updated_at=ts), 0, 0]
            st.series += 1
            c.patients_by_id[st.patient_id][4] += 1
            modality = sv.get("modality")
            if modality and modality not in st.modalities:
                st.modalities.append(modality)
            c.changes.append(dict(change_type="NewSeries", level="SERIES", uid=seu, study_instance_uid=study_uid, at=ts))
        irow = _row("instances", iv, series_fk=se[0], blob_key=it.blob_key, size_bytes=it.size, sha256=it.sha256,
                    transfer_syntax_uid=it.transfer_syntax_uid, calling_aet=it.calling_aet, source=it.source,
                    received_at=ts, called_aet=it.called_aet or None)
        irow.pop("id")
        c.instances.append(irow)
        se[4] += 1
        se[5] += it.size
        st.instances += 1
        st.size += it.size
        cls = iv.get("sop_class_uid")
        if cls and cls not in st.sop_classes:
            st.sop_classes.append(cls)
        c.patients_by_id[st.patient_id][5] += 1
        c.changes.append(dict(change_type="NewInstance", level="IMAGE", uid=iv["sop_instance_uid"],
                              study_instance_uid=study_uid, at=ts))

    def _patient_entry(self, c: _Chunk, pv: dict[str, Any] | None, known_id: int | None, ts: Any,
                       have_patients: dict[tuple[str, str], int], new_ids: dict[str, Iterator[int]]) -> int:
        """The chunk's entry of a patient ([id, new, row, studies, series, instances]); returns the patient id."""
        if known_id is not None:
            if known_id not in c.patients_by_id:
                c.patients_by_id[known_id] = [known_id, False, None, 0, 0, 0]
            return known_id
        assert pv is not None
        key = (pv.get("patient_id") or "", pv.get("issuer_of_patient_id") or "")
        entry = c.patients.get(key)
        if entry is None:
            have = have_patients.get(key)
            if have is not None:
                entry = c.patients_by_id.get(have)
                if entry is None:
                    entry = [have, False, None, 0, 0, 0]
                    c.patients_by_id[have] = entry
            else:
                pid = next(new_ids["patients"])
                entry = [pid, True, _row("patients", pv, patient_id=key[0], issuer_of_patient_id=key[1], id=pid,
                                         created_at=ts, updated_at=ts), 0, 0, 0]
                c.patients_by_id[pid] = entry
                c.changes.append(dict(change_type="NewPatient", level="PATIENT", uid=key[0],
                                      study_instance_uid=None, at=ts))
            c.patients[key] = entry
        return int(entry[0])

    def _study_row(self, s: _Study) -> dict[str, Any]:
        assert s.row is not None
        s.row.update(num_series=s.series, num_instances=s.instances, size_bytes=s.size,
                     modalities_in_study="\\".join(s.modalities), sop_classes_in_study="\\".join(s.sop_classes))
        return s.row

    # -- SQL ---------------------------------------------------------------------------------------------------
    def _existing(self, cur: Any, table: str, column: str, values: list[str]) -> list[str]:
        return [r[1] for r in self._existing_rows(cur, f"SELECT 1, {column} FROM {table}", column, values)]

    def _existing_rows(self, cur: Any, select_sql: str, column: str, values: list[Any], suffix: str = "") -> list[Any]:
        if not values:
            return []
        if self.pg:
            cur.execute(f"{select_sql} WHERE {column} = ANY(%s){suffix}", (values,))
            return list(cur.fetchall())
        out: list[Any] = []
        for i in range(0, len(values), 500):
            part = values[i : i + 500]
            cur.execute(f"{select_sql} WHERE {column} IN ({', '.join('?' * len(part))})", part)
            out += cur.fetchall()
        return out

    def _ids(self, cur: Any, table: str, n: int) -> Iterator[int]:
        if n == 0:
            return iter(())
        if self.pg:
            cur.execute(f"SELECT nextval(pg_get_serial_sequence('{table}', 'id')) FROM generate_series(1, %s)", (n,))
            return iter([int(r[0]) for r in cur.fetchall()])
        cur.execute(f"SELECT coalesce(max(id), 0) FROM {table}")
        start = int(cur.fetchone()[0]) + 1
        # SQLite's AUTOINCREMENT keeps its high-water mark in sqlite_sequence: ids must stay above it too
        cur.execute("SELECT name FROM sqlite_master WHERE name = 'sqlite_sequence'")
        if cur.fetchone() is not None:
            cur.execute("SELECT seq FROM sqlite_sequence WHERE name = ?", (table,))
            r = cur.fetchone()
            if r is not None:
                start = max(start, int(r[0]) + 1)
        return iter(range(start, start + n))

    def _insert(self, cur: Any, raw: Any, table: str, rows: list[dict[str, Any]], columns: list[str] | None = None) -> None:
        if not rows:
            return
        cols = columns or [c for c in _COLUMNS[table] if c != "id" or "id" in rows[0]]
        if self.pg:
            conn = raw.driver_connection  # the psycopg connection under SQLAlchemy's pool proxy
            with conn.cursor() as pc, pc.copy(f"COPY {table} ({', '.join(cols)}) FROM STDIN") as cp:
                for r in rows:
                    cp.write_row([r.get(k) for k in cols])
            return
        cur.executemany(f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                        [[r.get(k) for k in cols] for r in rows])

    def _update(self, cur: Any, sql: str, params: list[dict[str, Any]]) -> None:
        if not params:
            return
        cur.executemany(self.index._writer.sql(sql), params)


def _row(table: str, values: dict[str, Any], **extra: Any) -> dict[str, Any]:
    row = dict.fromkeys(_COLUMNS[table])
    row.update(_DEFAULTS[table])
    row.update({k: v for k, v in values.items() if k in row})
    for col in _NORMALIZED:
        if col in row and row[col] is not None and col + "_norm" in row and values.get(col + "_norm") is None:
            row[col + "_norm"] = str(row[col]).upper()
    if table in ("patients", "studies", "series"):
        row.update(num_instances=0, **({"num_studies": 0, "num_series": 0} if table == "patients" else {}))
        if table != "patients":
            row["size_bytes"] = 0
        if table == "studies":
            row["num_series"] = 0
    row.update(extra)
    return row


def bulk_load(index: Index, items: Iterable[NewInstance], batch_size: int = 20_000, changes: bool = True,
              progress: Any = None) -> BulkStats:
    """Load ``items`` into ``index`` (see the module docstring); returns what was loaded and how fast."""
    return BulkLoader(index, batch_size, changes).load(items, progress)


__all__ = ["BulkLoader", "BulkStats", "bulk_load"]
