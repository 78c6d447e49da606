"""Quality-control edits, protocol-free: edit patient, study and series attributes; merge patients; merge studies;
split a study (series or instances to a new or another study); move an instance. Every operation is one row of the
QC history (who, when, the state before and after) and can be undone.

The retrieval rule is the one of services/patients.py, extended: **coerce on retrieval**, stored files are never
rewritten. The index is made authoritative where QC changed it, and every retrieval path (C-GET, C-MOVE, WADO-RS,
WADO-URI, metadata, the console's tags, zip export) reads files through ``RetrieveService.read_file``, which overlays:

- the patient module, for a patient edited or receiving studies from another patient: exactly as ADT does (the
  ``patient_demographics`` row, its version bumped by ``PatientService._bump``);
- the study and series modules (``STUDY_MODULE``, ``SERIES_MODULE``: the UIDs included), for an instance whose study or
  series has ``qc_version`` > 0. Every edit, merge, split, move and undo bumps the ``qc_version`` of the studies and
  series whose served DICOM it changes, so a moved series is served with its new study's StudyInstanceUID and study
  attributes, and an instance moved to a new series with that series' SeriesInstanceUID. The overlay is cached by
  (study, version, series, version): a new version is a new key, on every node.

C-FIND, QIDO-RS, the console and the REST API read the index, which each operation updates in the same transaction
(counters and lists recounted as ingest keeps them; rows left empty deleted, and kept in the history for undo). The
change feed gets UpdatedStudy / UpdatedSeries / UpdatedPatient (and NewStudy / Deleted) for routing and other nodes.

Undo applies the state before back, provided what the operation made is still so (edited values unchanged, moved
objects where it put them); otherwise it refuses (a later operation must be undone first).
"""

from __future__ import annotations

import io
import json
import threading
from collections import OrderedDict
from datetime import UTC, datetime
from typing import Any

from pydicom import config, dcmread
from pydicom.dataelem import DataElement
from pydicom.uid import generate_uid
from pydicom.valuerep import validate_value
from sqlalchemy import DateTime, delete, func, insert, select, update
from sqlalchemy.engine import Connection

from ..index.db import Index
from ..index.hl7_schema import patient_demographics
from ..index.qc_edit_schema import qc_history
from ..index.schema import ATTRIBUTES, changes, instances, patients, series, studies
from .patients import PatientIdentifier, PatientService, _charsets, _fits

STUDY_MODULE = ("StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "StudyID", "StudyDescription",
                "ReferringPhysicianName", "NameOfPhysiciansReadingStudy", "AdmittingDiagnosesDescription",
                "PatientAge", "PatientSize", "PatientWeight")
SERIES_MODULE = ("SeriesInstanceUID", "SeriesNumber", "SeriesDescription", "SeriesDate", "SeriesTime",
                 "BodyPartExamined", "ProtocolName", "Laterality", "StationName", "InstitutionName",
                 "InstitutionalDepartmentName")
PATIENT_MODULE = ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex")
EDITABLE = {"PATIENT": PATIENT_MODULE, "STUDY": STUDY_MODULE[1:], "SERIES": SERIES_MODULE[1:]}
TABLE = {"PATIENT": patients, "STUDY": studies, "SERIES": series}
_NORM = {"patient_name": "patient_name_norm", "referring_physician_name": "referring_physician_name_norm"}
_CHUNK = 500


class QCEditError(Exception):
    """An operation that cannot be done: ``invalid`` (400), ``unknown`` (404), ``conflict`` (409)."""

    def __init__(self, message: str, kind: str = "invalid") -> None:
        super().__init__(message)
        self.kind = kind


def _col(keyword: str) -> str:
    return ATTRIBUTES[keyword].column


def _now() -> datetime:
    return datetime.now(UTC)


# -- the retrieval overlay ------------------------------------------------------------------------------------------
class QCOverlay:
    """The study and series modules the index holds for an instance QC touched, and the file with them overlaid."""

    def __init__(self, index: Index) -> None:
        self.index = index
        self._modules: OrderedDict[tuple[int, int, int, int], dict[str, str | None]] = OrderedDict()
        self._lock = threading.Lock()

    def module(self, key: tuple[int, int, int, int]) -> dict[str, str | None]:
        with self._lock:
            hit = self._modules.get(key)
            if hit is not None:
                return hit
        study_pk, _sv, series_pk, _v = key
        with self.index.engine.connect() as conn:
            st = conn.execute(select(*[studies.c[_col(k)] for k in STUDY_MODULE])
                              .where(studies.c.id == study_pk)).first()
            se = conn.execute(select(*[series.c[_col(k)] for k in SERIES_MODULE])
                              .where(series.c.id == series_pk)).first()
        module: dict[str, str | None] = {}
        if st is not None:
            module.update(zip(STUDY_MODULE, st, strict=True))
        if se is not None:
            module.update(zip(SERIES_MODULE, se, strict=True))
        with self._lock:
            self._modules[key] = module
            while len(self._modules) > 4096:
                self._modules.popitem(last=False)
        return module

    def coerce(self, data: bytes, key: tuple[int, int, int, int]) -> bytes:
        module = self.module(key)
        return coerce_modules(data, module) if module else data


def coerce_modules(data: bytes, module: dict[str, str | None]) -> bytes:
    """The Part 10 file with these attributes set from the index (an empty index value empties the element the file
    has, and adds none); the file meta, the transfer syntax and every other element stay."""
    ds = dcmread(io.BytesIO(data), force=True)
    if not _fits([v for v in module.values() if v], _charsets(ds)):
        ds.decode()
        ds.SpecificCharacterSet = "ISO_IR 192"
    for kw, v in module.items():
        a = ATTRIBUTES[kw]
        if v:
            ds[a.tag] = DataElement(a.tag, a.vr, v.split("\\") if "\\" in v else v)
        elif a.tag in ds:
            ds[a.tag] = DataElement(a.tag, a.vr, None)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=data[128:132] == b"DICM")
    return out.getvalue()


# -- rows as JSON (the history keeps deleted rows whole, for undo) --------------------------------------------------
def _jsonable(row: Any) -> dict[str, Any]:
    return {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in dict(row._mapping).items()}


def _restorable(table: Any, data: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in data.items():
        if k not in table.c:
            continue
        if isinstance(table.c[k].type, DateTime) and isinstance(v, str):
            v = datetime.fromisoformat(v)
        out[k] = v
    return out


def _chunks(ids: list[Any]) -> Any:
    for i in range(0, len(ids), _CHUNK):
        yield ids[i : i + _CHUNK]


class QCEditService:
    def __init__(self, index: Index, patient_service: PatientService | None = None) -> None:
        self.index = index
        self.patients = patient_service or PatientService(index)

    # -- reads ------------------------------------------------------------------------------------------------
    def history(self, limit: int = 100, before: int | None = None, uid: str | None = None) -> list[dict[str, Any]]:
        """Newest first; ``uid``: the operations asked on it or touching that study."""
        stmt = select(qc_history).order_by(qc_history.c.id.desc()).limit(limit)
        if before is not None:
            stmt = stmt.where(qc_history.c.id < before)
        if uid:
            stmt = stmt.where((qc_history.c.uid == uid) | qc_history.c.study_uids.contains(uid))
        with self.index.engine.connect() as conn:
            return [_entry(r) for r in conn.execute(stmt)]

    def get(self, entry_id: int) -> dict[str, Any]:
        with self.index.engine.connect() as conn:
            r = conn.execute(select(qc_history).where(qc_history.c.id == entry_id)).first()
        if r is None:
            raise QCEditError(f"no QC history entry {entry_id}", "unknown")
        return _entry(r)

    # -- edits ------------------------------------------------------------------------------------------------
    def edit(self, level: str, key: str, values: dict[str, Any], user: str, issuer: str | None = None
             ) -> dict[str, Any]:
        """Set attributes of a patient (``key``: PatientID), study or series (``key``: its UID)."""
        level = level.upper()
        if level not in EDITABLE:
            raise QCEditError(f"level {level}: one of PATIENT, STUDY, SERIES")
        values = _validated(level, values)
        with self.index.write_engine.begin() as conn:
            pk = self._pk(conn, level, key, issuer)
            row = conn.execute(select(TABLE[level]).where(TABLE[level].c.id == pk)).first()
            assert row is not None
            old = {k: getattr(row, _col(k)) for k in values}
            new = {k: v for k, v in values.items() if (old[k] or None) != v}
            if not new:
                raise QCEditError("nothing to change: the values are those stored")
            old = {k: old[k] for k in new}
            ts = _now()
            uids = self._apply(conn, level, pk, new, user, ts)
            entry = self._log(conn, ts, user, "edit", level, key, uids, {"pk": pk, "values": old},
                              {"pk": pk, "values": new})
        return entry

    def _pk(self, conn: Connection, level: str, key: str, issuer: str | None = None) -> int:
        if level == "PATIENT":
            row = (self.patients.find(conn, PatientIdentifier(key, issuer), lock=True) if issuer is not None
                   else self._one_patient(conn, key))
            if row is None:
                raise QCEditError(f"no patient {key}", "unknown")
            return int(row.id)
        t = TABLE[level]
        col = t.c.study_instance_uid if level == "STUDY" else t.c.series_instance_uid
        stmt = select(t.c.id).where(col == key)
        if not self.index.is_sqlite:
            stmt = stmt.with_for_update()
        pk = conn.execute(stmt).scalar()
        if pk is None:
            raise QCEditError(f"no {level.lower()} {key}", "unknown")
        return int(pk)

    @staticmethod
    def _one_patient(conn: Connection, pid: str) -> Any:
        rows = conn.execute(select(patients.c.id).where(patients.c.patient_id == pid)).all()
        if len(rows) > 1:
            raise QCEditError(f"several patients have the ID {pid}: name the issuer", "conflict")
        return rows[0] if rows else None

    def _apply(self, conn: Connection, level: str, pk: int, values: dict[str, str | None], user: str,
               ts: datetime) -> list[str]:
        """Write the values, make the change visible on retrieval (version bumps) and in the change feed; the study
        UIDs touched."""
        t = TABLE[level]
        cols: dict[str, Any] = {_col(k): v for k, v in values.items()}
        for c, norm in _NORM.items():
            if c in cols:
                cols[norm] = cols[c].upper() if cols[c] else None
        if level == "PATIENT":
            row = conn.execute(select(patients).where(patients.c.id == pk)).one()
            pid = cols.get("patient_id", row.patient_id)
            iss = cols.get("issuer_of_patient_id", row.issuer_of_patient_id) or ""
            if pid is None or not pid.strip():
                raise QCEditError("PatientID cannot be empty")
            cols["issuer_of_patient_id"] = iss
            clash = conn.execute(select(patients.c.id).where(patients.c.patient_id == pid,
                                                             patients.c.issuer_of_patient_id == iss,
                                                             patients.c.id != pk)).first()
            if clash is not None:
                raise QCEditError(f"patient {pid} already exists: merge the two patients instead", "conflict")
            conn.execute(update(patients).where(patients.c.id == pk).values(updated_at=ts, **cols))
            self.patients._bump(conn, pk, None, f"QC edit by {user}", ts)
            uids = PatientService._study_uids(conn, pk)
            conn.execute(insert(changes), [
                dict(change_type="UpdatedPatient", level="PATIENT", uid=pid, study_instance_uid=None, at=ts),
                *[dict(change_type="UpdatedStudy", level="STUDY", uid=u, study_instance_uid=u, at=ts) for u in uids]])
            return uids
        conn.execute(update(t).where(t.c.id == pk).values(updated_at=ts, qc_version=t.c.qc_version + 1, **cols))
        if level == "STUDY":
            uid = conn.execute(select(studies.c.study_instance_uid).where(studies.c.id == pk)).scalar_one()
            conn.execute(insert(changes).values(change_type="UpdatedStudy", level="STUDY", uid=uid,
                                                study_instance_uid=uid, at=ts))
            return [uid]
        r = conn.execute(select(series.c.series_instance_uid, studies.c.study_instance_uid)
                         .select_from(series.join(studies, series.c.study_fk == studies.c.id))
                         .where(series.c.id == pk)).one()
        conn.execute(insert(changes), [
            dict(change_type="UpdatedSeries", level="SERIES", uid=r[0], study_instance_uid=r[1], at=ts),
            dict(change_type="UpdatedStudy", level="STUDY", uid=r[1], study_instance_uid=r[1], at=ts)])
        return [r[1]]

    # -- structural operations --------------------------------------------------------------------------------
    def merge_studies(self, source: str, into: str, user: str) -> dict[str, Any]:
        """Every series of ``source`` moves to study ``into`` (whose study attributes, and patient, they take);
        ``source`` goes."""
        if source == into:
            raise QCEditError("a study cannot be merged into itself")
        with self.index.write_engine.begin() as conn:
            src = self._study(conn, source)
            dst = self._study(conn, into)
            sids = [r[0] for r in conn.execute(select(series.c.id).where(series.c.study_fk == src.id))]
            plan = _Plan()
            plan.series = {sid: dst.id for sid in sids}
            return self._run(conn, plan, user, "merge", "STUDY", source, {"into": into})

    def split(self, source: str, user: str, series_uids: list[str] | None = None,
              instance_uids: list[str] | None = None, into: str | None = None,
              attributes: dict[str, Any] | None = None) -> dict[str, Any]:
        """Series (whole) or instances of ``source`` move to study ``into``, or to a new study (a new
        StudyInstanceUID, the source's study attributes and patient, with ``attributes`` set); moved instances go to
        a new series of the target study per series they came from."""
        if bool(series_uids) == bool(instance_uids):
            raise QCEditError("name either series or instances to split off")
        if into == source:
            raise QCEditError("the target study is the source study")
        values = _validated("STUDY", attributes or {})
        with self.index.write_engine.begin() as conn:
            src = self._study(conn, source)
            plan = _Plan()
            rows: list[Any]
            if series_uids:
                rows = list(conn.execute(select(series.c.id, series.c.series_instance_uid, series.c.study_fk)
                                    .where(series.c.series_instance_uid.in_(series_uids))))
                _all_found("series", series_uids, [r[1] for r in rows])
                if any(r.study_fk != src.id for r in rows):
                    raise QCEditError(f"not every series named is in study {source}")
                everything = conn.execute(select(func.count()).select_from(series)
                                          .where(series.c.study_fk == src.id)).scalar_one()
                if len(rows) == everything and into is None:
                    raise QCEditError("every series of the study is named: nothing would be left to split from")
            else:
                assert instance_uids is not None
                rows = self._instances(conn, instance_uids)
                if any(r.study_fk != src.id for r in rows):
                    raise QCEditError(f"not every instance named is in study {source}")
            target = self._study(conn, into).id if into else self._new_study(conn, src, values, plan)
            if series_uids:
                plan.series = {r.id: target for r in rows}
            else:
                self._instances_to_study(conn, rows, target, plan)
            return self._run(conn, plan, user, "split", "STUDY", source,
                             {"into": into, "new_study": bool(plan.created_studies)})

    def move_instance(self, sop_uid: str, user: str, series_uid: str | None = None,
                      study_uid: str | None = None) -> dict[str, Any]:
        """One instance to another series (``series_uid``) or to a new series of another study (``study_uid``)."""
        if bool(series_uid) == bool(study_uid):
            raise QCEditError("name either the target series or the target study")
        with self.index.write_engine.begin() as conn:
            rows = self._instances(conn, [sop_uid])
            plan = _Plan()
            if series_uid:
                dst = conn.execute(select(series.c.id).where(series.c.series_instance_uid == series_uid)).scalar()
                if dst is None:
                    raise QCEditError(f"no series {series_uid}", "unknown")
                if dst == rows[0].series_fk:
                    raise QCEditError("the instance is in that series already")
                plan.instances = {rows[0].id: int(dst)}
            else:
                assert study_uid is not None
                self._instances_to_study(conn, rows, self._study(conn, study_uid).id, plan)
            return self._run(conn, plan, user, "move", "IMAGE", sop_uid,
                             {"to_series": series_uid, "to_study": study_uid})

    def merge_patients(self, source: str, into: str, user: str, source_issuer: str | None = None,
                       into_issuer: str | None = None) -> dict[str, Any]:
        """Every study of patient ``source`` moves to patient ``into`` (whose patient module retrieval then serves,
        as for an HL7 A40); ``source`` goes."""
        with self.index.write_engine.begin() as conn:
            a = self._pk(conn, "PATIENT", source, source_issuer)
            b = self._pk(conn, "PATIENT", into, into_issuer)
            if a == b:
                raise QCEditError("a patient cannot be merged into itself")
            plan = _Plan()
            plan.studies = {r[0]: b for r in conn.execute(select(studies.c.id).where(studies.c.patient_fk == a))}
            plan.patients.add(a)
            return self._run(conn, plan, user, "merge", "PATIENT", source, {"into": into})

    def _study(self, conn: Connection, uid: str | None) -> Any:
        stmt = select(studies).where(studies.c.study_instance_uid == uid)
        if not self.index.is_sqlite:
            stmt = stmt.with_for_update()
        row = conn.execute(stmt).first()
        if row is None:
            raise QCEditError(f"no study {uid}", "unknown")
        return row

    @staticmethod
    def _instances(conn: Connection, uids: list[str]) -> list[Any]:
        rows: list[Any] = []
        for part in _chunks(sorted(set(uids))):
            rows += conn.execute(select(instances.c.id, instances.c.sop_instance_uid, instances.c.series_fk,
                                        series.c.study_fk)
                                 .select_from(instances.join(series, instances.c.series_fk == series.c.id))
                                 .where(instances.c.sop_instance_uid.in_(part))).all()
        _all_found("instance", uids, [r.sop_instance_uid for r in rows])
        return rows

    @staticmethod
    def _new_study(conn: Connection, src: Any, values: dict[str, str | None], plan: _Plan) -> int:
        ts = _now()
        row = {k: v for k, v in src._mapping.items() if k != "id"}
        row.update(study_instance_uid=generate_uid(), num_series=0, num_instances=0, size_bytes=0,
                   modalities_in_study="", sop_classes_in_study="", created_at=ts, updated_at=ts, qc_version=1)
        row.update({_col(k): v for k, v in values.items()})
        for c, norm in _NORM.items():
            if c in row and norm in row:
                row[norm] = row[c].upper() if row[c] else None
        pk = conn.execute(insert(studies).values(**row)).inserted_primary_key
        assert pk is not None
        plan.created_studies.append(row["study_instance_uid"])
        return int(pk[0])

    @staticmethod
    def _instances_to_study(conn: Connection, rows: list[Any], target: int, plan: _Plan) -> None:
        """Instances to study ``target``: in a new series there per series they come from (its attributes, a new
        SeriesInstanceUID)."""
        made: dict[int, int] = {}
        ts = _now()
        for r in rows:
            if r.study_fk == target:
                raise QCEditError(f"instance {r.sop_instance_uid} is in that study already")
            if r.series_fk not in made:
                src = conn.execute(select(series).where(series.c.id == r.series_fk)).one()
                values = {k: v for k, v in src._mapping.items() if k != "id"}
                values.update(series_instance_uid=generate_uid(), study_fk=target, num_instances=0, size_bytes=0,
                              created_at=ts, updated_at=ts, qc_version=1)
                pk = conn.execute(insert(series).values(**values)).inserted_primary_key
                assert pk is not None
                made[r.series_fk] = int(pk[0])
                plan.created_series.append(values["series_instance_uid"])
            plan.instances[r.id] = made[r.series_fk]

    def _run(self, conn: Connection, plan: _Plan, user: str, operation: str, level: str, uid: str,
             asked: dict[str, Any]) -> dict[str, Any]:
        old, new, study_uids = self._execute(conn, plan)
        old["created"] = {"studies": plan.created_studies, "series": plan.created_series}
        return self._log(conn, _now(), user, operation, level, uid, study_uids, old, {**new, **asked})

    def _execute(self, conn: Connection, plan: _Plan, deleted: dict[str, list[Any]] | None = None
                 ) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
        """Move the rows, bump what retrieval must overlay, recount, delete what is left empty, write the change
        feed. The moves as ``{uid: parent}`` before and after, with the rows deleted; the study UIDs touched."""
        ts = _now()
        s_uid = _uids(conn, studies, studies.c.study_instance_uid)
        se_uid = _uids(conn, series, series.c.series_instance_uid)
        old: dict[str, Any] = {"studies": {}, "series": {}, "instances": {}}
        new: dict[str, Any] = {"studies": {}, "series": {}, "instances": {}}
        touched_series: set[int] = set()
        touched_studies: set[int] = set()
        touched_patients: set[int] = set(plan.patients)
        bump_patients: set[int] = set()
        if plan.studies:
            rows = conn.execute(select(studies.c.id, studies.c.study_instance_uid, studies.c.patient_fk)
                                .where(studies.c.id.in_(list(plan.studies)))).all()
            for r in rows:
                old["studies"][r.study_instance_uid] = r.patient_fk
                new["studies"][r.study_instance_uid] = plan.studies[r.id]
                touched_studies.add(r.id)
                touched_patients.update((r.patient_fk, plan.studies[r.id]))
                if r.patient_fk != plan.studies[r.id]:
                    bump_patients.add(plan.studies[r.id])
            for target in set(plan.studies.values()):
                ids = [k for k, v in plan.studies.items() if v == target]
                for part in _chunks(ids):
                    conn.execute(update(studies).where(studies.c.id.in_(part)).values(patient_fk=target,
                                                                                     updated_at=ts))
        bump_patients |= self._patients_changed(conn, plan)
        if plan.series:
            rows = conn.execute(select(series.c.id, series.c.series_instance_uid, series.c.study_fk)
                                .where(series.c.id.in_(list(plan.series)))).all()
            for r in rows:
                old["series"][r.series_instance_uid] = s_uid(r.study_fk)
                new["series"][r.series_instance_uid] = s_uid(plan.series[r.id])
                touched_series.add(r.id)
                touched_studies.update((r.study_fk, plan.series[r.id]))
            for target in set(plan.series.values()):
                ids = [k for k, v in plan.series.items() if v == target]
                for part in _chunks(ids):
                    conn.execute(update(series).where(series.c.id.in_(part)).values(
                        study_fk=target, qc_version=series.c.qc_version + 1, updated_at=ts))
        if plan.instances:
            for part in _chunks(list(plan.instances)):
                rows = conn.execute(select(instances.c.id, instances.c.sop_instance_uid, instances.c.series_fk)
                                    .where(instances.c.id.in_(part))).all()
                for r in rows:
                    old["instances"][r.sop_instance_uid] = se_uid(r.series_fk)
                    new["instances"][r.sop_instance_uid] = se_uid(plan.instances[r.id])
                    touched_series.update((r.series_fk, plan.instances[r.id]))
            for target in set(plan.instances.values()):
                ids = [k for k, v in plan.instances.items() if v == target]
                for part in _chunks(ids):
                    conn.execute(update(instances).where(instances.c.id.in_(part)).values(series_fk=target))
            targets = list(set(plan.instances.values()))
            conn.execute(update(series).where(series.c.id.in_(targets)).values(
                qc_version=series.c.qc_version + 1, updated_at=ts))
        if touched_series:
            touched_studies.update(r[0] for r in conn.execute(
                select(series.c.study_fk).where(series.c.id.in_(list(touched_series)))))
        if touched_studies:
            touched_patients.update(p for _, p in conn.execute(select(studies.c.id, studies.c.patient_fk)
                                                               .where(studies.c.id.in_(list(touched_studies)))))
        study_uids = sorted({s_uid(i) for i in touched_studies} - {""})
        deleted = deleted if deleted is not None else {"patients": [], "demographics": [], "studies": [],
                                                       "series": []}
        self._settle(conn, touched_series, touched_studies, touched_patients, deleted)
        for pk in sorted(bump_patients):
            if conn.execute(select(patients.c.id).where(patients.c.id == pk)).first() is not None:
                self.patients._bump(conn, pk, None, "QC", ts)
        feed: list[dict[str, Any]] = []
        gone = {r["study_instance_uid"] for r in deleted["studies"]}
        for u in study_uids:
            feed.append(dict(change_type="Deleted" if u in gone else "UpdatedStudy", level="STUDY", uid=u,
                             study_instance_uid=None if u in gone else u, at=ts))
        for u in list(new["series"]) + sorted(set(new["instances"].values())):
            feed.append(dict(change_type="UpdatedSeries", level="SERIES", uid=u, study_instance_uid=None, at=ts))
        if feed:
            conn.execute(insert(changes), feed)
        old["deleted"] = deleted
        return old, new, study_uids

    @staticmethod
    def _patients_changed(conn: Connection, plan: _Plan) -> set[int]:
        """The target patients of series or instances that change patient: their patient module is then served
        from the index (as after an HL7 A40)."""
        out: set[int] = set()
        if plan.series:
            src = dict(conn.execute(select(series.c.id, studies.c.patient_fk)
                                    .select_from(series.join(studies, series.c.study_fk == studies.c.id))
                                    .where(series.c.id.in_(list(plan.series)))).all())
            dst = dict(conn.execute(select(studies.c.id, studies.c.patient_fk)
                                    .where(studies.c.id.in_(list(set(plan.series.values()))))).all())
            out |= {dst[t] for sid, t in plan.series.items() if src.get(sid) != dst[t]}
        if plan.instances:
            targets = list(set(plan.instances.values()))
            dst = dict(conn.execute(select(series.c.id, studies.c.patient_fk)
                                    .select_from(series.join(studies, series.c.study_fk == studies.c.id))
                                    .where(series.c.id.in_(targets))).all())
            for part in _chunks(list(plan.instances)):
                rows = conn.execute(select(instances.c.id, studies.c.patient_fk)
                                    .select_from(instances.join(series, instances.c.series_fk == series.c.id)
                                                 .join(studies, series.c.study_fk == studies.c.id))
                                    .where(instances.c.id.in_(part))).all()
                out |= {dst[plan.instances[r[0]]] for r in rows if r[1] != dst[plan.instances[r[0]]]}
        return out

    def _settle(self, conn: Connection, series_ids: set[int], study_ids: set[int], patient_ids: set[int],
                deleted: dict[str, list[Any]]) -> None:
        """Recount (as the index does after deletes and rejections), keeping the rows left empty for undo."""
        ix = self.index
        for sid in sorted(series_ids):
            if conn.execute(select(instances.c.id).where(instances.c.series_fk == sid).limit(1)).first() is None:
                row = conn.execute(select(series).where(series.c.id == sid)).first()
                if row is not None:
                    deleted["series"].append(_jsonable(row))
            ix._recount_series(conn, sid)
        for stid in sorted(study_ids):
            if conn.execute(select(series.c.id).where(series.c.study_fk == stid).limit(1)).first() is None:
                row = conn.execute(select(studies).where(studies.c.id == stid)).first()
                if row is not None:
                    deleted["studies"].append(_jsonable(row))
            ix._recount_study(conn, stid)
        for pid in sorted(patient_ids):
            if conn.execute(select(studies.c.id).where(studies.c.patient_fk == pid).limit(1)).first() is None:
                row = conn.execute(select(patients).where(patients.c.id == pid)).first()
                if row is not None:
                    deleted["patients"].append(_jsonable(row))
                    demo = conn.execute(select(patient_demographics)
                                        .where(patient_demographics.c.patient_fk == pid)).first()
                    if demo is not None:
                        deleted["demographics"].append(_jsonable(demo))
                conn.execute(delete(patient_demographics).where(patient_demographics.c.patient_fk == pid))
            ix._recount_patient(conn, pid)

    # -- undo -------------------------------------------------------------------------------------------------
    def undo(self, entry_id: int, user: str) -> dict[str, Any]:
        with self.index.write_engine.begin() as conn:
            r = conn.execute(select(qc_history).where(qc_history.c.id == entry_id)).first()
            if r is None:
                raise QCEditError(f"no QC history entry {entry_id}", "unknown")
            if r.undone_at is not None:
                raise QCEditError(f"QC history entry {entry_id} is undone already", "conflict")
            old, new = json.loads(r.old), json.loads(r.new)
            ts = _now()
            if r.operation == "edit":
                self._undo_edit(conn, r.level, old, new, user, ts)
            else:
                self._undo_moves(conn, old, new)
            conn.execute(update(qc_history).where(qc_history.c.id == entry_id).values(undone_at=ts,
                                                                                      undone_by=user))
            out = conn.execute(select(qc_history).where(qc_history.c.id == entry_id)).one()
        return _entry(out)

    def _undo_edit(self, conn: Connection, level: str, old: dict[str, Any], new: dict[str, Any], user: str,
                   ts: datetime) -> None:
        pk = old["pk"]
        row = conn.execute(select(TABLE[level]).where(TABLE[level].c.id == pk)).first()
        if row is None:
            raise QCEditError(f"the edited {level.lower()} is no longer stored", "conflict")
        for k, v in new["values"].items():
            if (getattr(row, _col(k)) or None) != (v or None):
                raise QCEditError(f"{k} changed since (now {getattr(row, _col(k))!r}): undo the later change first",
                                  "conflict")
        self._apply(conn, level, pk, old["values"], user, ts)

    def _undo_moves(self, conn: Connection, old: dict[str, Any], new: dict[str, Any]) -> None:
        s_uid = _uids(conn, studies, studies.c.study_instance_uid)
        se_uid = _uids(conn, series, series.c.series_instance_uid)
        # what the operation made must still be so
        for uid, patient_pk in new["studies"].items():
            row = conn.execute(select(studies.c.patient_fk).where(studies.c.study_instance_uid == uid)).first()
            if row is None or row[0] != patient_pk:
                raise QCEditError(f"study {uid} changed since: undo the later change first", "conflict")
        for uid, study in new["series"].items():
            row = conn.execute(select(series.c.study_fk).where(series.c.series_instance_uid == uid)).first()
            if row is None or s_uid(row[0]) != study:
                raise QCEditError(f"series {uid} moved since: undo the later change first", "conflict")
        moved = list(new["instances"].items())
        for part in _chunks(moved):
            found = dict(conn.execute(select(instances.c.sop_instance_uid, instances.c.series_fk)
                                      .where(instances.c.sop_instance_uid.in_([u for u, _ in part]))).all())
            for uid, ser in part:
                if uid not in found or se_uid(found[uid]) != ser:
                    raise QCEditError(f"instance {uid} moved since: undo the later change first", "conflict")
        deleted = old["deleted"]
        for table, key, unique in ((patients, "patients", None), (patient_demographics, "demographics", None),
                                   (studies, "studies", "study_instance_uid"),
                                   (series, "series", "series_instance_uid")):
            for data in deleted[key]:
                pkcol = table.c.patient_fk if key == "demographics" else table.c.id
                clash = conn.execute(select(pkcol).where(pkcol == data[pkcol.name])).first()
                if clash is None and unique:
                    clash = conn.execute(select(table.c.id).where(table.c[unique] == data[unique])).first()
                if clash is None and key == "patients":
                    clash = conn.execute(select(patients.c.id).where(
                        patients.c.patient_id == data["patient_id"],
                        patients.c.issuer_of_patient_id == data["issuer_of_patient_id"])).first()
                if clash is not None:
                    raise QCEditError(f"cannot restore a {key} row the operation removed: its ID or UID is in use "
                                      "again", "conflict")
                conn.execute(insert(table).values(**_restorable(table, data)))
        plan = _Plan()
        p_ids = {r.id for r in conn.execute(select(patients.c.id))} if old["studies"] else set()
        for uid, patient_pk in old["studies"].items():
            if patient_pk not in p_ids:
                raise QCEditError(f"patient of study {uid} is gone", "conflict")
            plan.studies[_pk_of(conn, studies, studies.c.study_instance_uid, uid)] = patient_pk
        for uid, study in old["series"].items():
            plan.series[_pk_of(conn, series, series.c.series_instance_uid, uid)] = _pk_of(
                conn, studies, studies.c.study_instance_uid, study)
        targets: dict[str, int] = {}
        for ser in old["instances"].values():
            if ser not in targets:
                targets[ser] = _pk_of(conn, series, series.c.series_instance_uid, ser)
        for part in _chunks(list(old["instances"].items())):
            ids = dict(conn.execute(select(instances.c.sop_instance_uid, instances.c.id)
                                    .where(instances.c.sop_instance_uid.in_([u for u, _ in part]))).all())
            for uid, ser in part:
                plan.instances[ids[uid]] = targets[ser]
        restored = {r["id"] for r in deleted["series"]}
        self._execute(conn, plan, deleted={"patients": [], "demographics": [], "studies": [], "series": []})
        if restored:  # served again from the index's view of them: a new version (the caches hold the old one)
            conn.execute(update(series).where(series.c.id.in_(list(restored))).values(
                qc_version=series.c.qc_version + 1))
        created = old.get("created", {})
        for uid in created.get("series", []):
            if conn.execute(select(series.c.id, series.c.num_instances).where(
                    series.c.series_instance_uid == uid)).first() is not None:
                sid = _pk_of(conn, series, series.c.series_instance_uid, uid)
                if conn.execute(select(instances.c.id).where(instances.c.series_fk == sid).limit(1)).first() is None:
                    conn.execute(delete(series).where(series.c.id == sid))
        for uid in created.get("studies", []):
            row = conn.execute(select(studies.c.id, studies.c.patient_fk)
                               .where(studies.c.study_instance_uid == uid)).first()
            if row is not None and conn.execute(select(series.c.id).where(series.c.study_fk == row.id)
                                                .limit(1)).first() is None:
                conn.execute(delete(studies).where(studies.c.id == row.id))
                self.index._recount_patient(conn, row.patient_fk)
                conn.execute(insert(changes).values(change_type="Deleted", level="STUDY", uid=uid,
                                                    study_instance_uid=None, at=_now()))

    # -- history ----------------------------------------------------------------------------------------------
    @staticmethod
    def _log(conn: Connection, ts: datetime, user: str, operation: str, level: str, uid: str,
             study_uids: list[str], old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
        pk = conn.execute(insert(qc_history).values(
            at=ts, user=user or "", operation=operation, level=level, uid=uid, study_uids="\\".join(study_uids),
            old=json.dumps(old, default=str), new=json.dumps(new, default=str))).inserted_primary_key
        assert pk is not None
        return _entry(conn.execute(select(qc_history).where(qc_history.c.id == pk[0])).one())


class _Plan:
    """Where rows go: study pk -> patient pk, series pk -> study pk, instance pk -> series pk; rows it created."""

    def __init__(self) -> None:
        self.studies: dict[int, int] = {}
        self.series: dict[int, int] = {}
        self.instances: dict[int, int] = {}
        self.patients: set[int] = set()  # to recount (and delete when left empty)
        self.created_studies: list[str] = []
        self.created_series: list[str] = []


def _uids(conn: Connection, table: Any, col: Any) -> Any:
    cache: dict[int, str] = {}

    def get(pk: int) -> str:
        if pk not in cache:
            cache[pk] = conn.execute(select(col).where(table.c.id == pk)).scalar() or ""
        return cache[pk]

    return get


def _pk_of(conn: Connection, table: Any, col: Any, uid: str) -> int:
    pk = conn.execute(select(table.c.id).where(col == uid)).scalar()
    if pk is None:
        raise QCEditError(f"{table.name} {uid} is no longer stored: undo the later change first", "conflict")
    return int(pk)


def _all_found(what: str, asked: list[str], found: list[str]) -> None:
    missing = sorted(set(asked) - set(found))
    if missing:
        raise QCEditError(f"no {what} {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}", "unknown")


def _validated(level: str, values: dict[str, Any]) -> dict[str, str | None]:
    """Attribute keywords of the level with string values valid for their VR (``""`` or null empties)."""
    out: dict[str, str | None] = {}
    for k, v in values.items():
        if k not in EDITABLE[level]:
            raise QCEditError(f"{k}: not an editable {level.lower()} attribute (one of "
                              f"{', '.join(EDITABLE[level])})")
        if v is not None and not isinstance(v, str | int | float):
            raise QCEditError(f"{k}: a string value")
        s = None if v is None or str(v).strip() == "" else str(v).strip()
        if s is not None:
            try:
                validate_value(ATTRIBUTES[k].vr, s, config.RAISE)
            except ValueError as e:
                raise QCEditError(f"{k}: {e}") from None
        out[k] = s
    return out


def _entry(r: Any) -> dict[str, Any]:
    def iso(v: Any) -> Any:
        return v.isoformat() if isinstance(v, datetime) else v

    return {"id": r.id, "at": iso(r.at), "user": r.user, "operation": r.operation, "level": r.level, "uid": r.uid,
            "study_uids": [u for u in (r.study_uids or "").split("\\") if u], "old": json.loads(r.old),
            "new": json.loads(r.new), "undone_at": iso(r.undone_at), "undone_by": r.undone_by}
