"""Retrieve: which stored instances a C-MOVE / C-GET / WADO request names, and their bytes."""

from __future__ import annotations

from typing import Any

from pydicom import Dataset
from sqlalchemy import bindparam, select

from ..config import Settings
from ..dicom.header import as_text
from ..index.db import Index, Prepared
from ..index.hl7_schema import patient_demographics
from ..index.matching import MatchError
from ..index.query import _JOIN
from ..index.schema import instances, patients, series, studies
from ..storage import BlobStore
from .query import LEVEL_OF_MODEL, QueryError
from .types import InstanceRef, Status

_UNIQUE = {
    "PATIENT": ("PatientID", patients.c.patient_id),
    "STUDY": ("StudyInstanceUID", studies.c.study_instance_uid),
    "SERIES": ("SeriesInstanceUID", series.c.series_instance_uid),
    "IMAGE": ("SOPInstanceUID", instances.c.sop_instance_uid),
}
_ORDER = ("PATIENT", "STUDY", "SERIES", "IMAGE")


class RetrieveService:
    def __init__(self, settings: Settings, store: BlobStore, index: Index) -> None:
        self.settings = settings
        self.store = store
        self.index = index
        from .patients import PatientService

        self.patients = PatientService(index)
        from .qc_edit import QCOverlay

        self.qc_overlay = QCOverlay(index)  # QC edits (services/qc_edit.py): the study and series modules
        self._lookups: dict[tuple[bool, bool, int | None], Prepared] = {}

    def _select(self):  # type: ignore[no-untyped-def]
        return select(
            studies.c.study_instance_uid, series.c.series_instance_uid, instances.c.sop_instance_uid,
            instances.c.sop_class_uid, instances.c.transfer_syntax_uid, instances.c.blob_key, instances.c.size_bytes,
            instances.c.sha256, studies.c.patient_fk, patient_demographics.c.version,
            studies.c.id, studies.c.qc_version, series.c.id, series.c.qc_version,  # services/qc_edit.py overlay
        ).select_from(_JOIN["IMAGE"].outerjoin(patient_demographics,
                                               patient_demographics.c.patient_fk == studies.c.patient_fk)
                      ).where(instances.c.rejected.is_(None))  # IOCM (services/iocm.py): rejected are not served

    def _refs(self, stmt) -> list[InstanceRef]:  # type: ignore[no-untyped-def]
        stmt = stmt.order_by(studies.c.id, series.c.id, instances.c.id)
        with self.index.engine.connect() as conn:
            return _as_refs(conn.execute(stmt))

    def _prepared(self, shape: tuple[bool, bool, int | None]) -> Prepared:
        """The list_instances statement for a (series given, instance given, departments or None) shape, compiled
        once."""
        p = self._lookups.get(shape)
        if p is None:
            stmt = self._select().where(studies.c.study_instance_uid == bindparam("study"))
            if shape[0]:
                stmt = stmt.where(series.c.series_instance_uid == bindparam("series"))
            if shape[1]:
                stmt = stmt.where(instances.c.sop_instance_uid == bindparam("sop"))
            if shape[2] is not None:
                stmt = stmt.where(studies.c.department.in_([bindparam(f"d{i}") for i in range(shape[2])]))
            p = self._lookups[shape] = Prepared(self.index.engine,
                                                stmt.order_by(studies.c.id, series.c.id, instances.c.id))
        return p

    def resolve(self, identifier: Dataset, model: str, departments: tuple[str, ...] | None = None) -> list[InstanceRef]:
        """Instances named by a C-MOVE/C-GET identifier: unique keys at the level and above (PS3.4 C.4.2.2.1)."""
        level = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
        if level not in LEVEL_OF_MODEL.get(model, ()):
            raise QueryError(Status.IDENTIFIER_MISMATCH, f"Query/Retrieve Level {level!r} invalid for {model} Root")
        stmt = self._select()
        constrained = False
        for lvl in _ORDER[: _ORDER.index(level) + 1]:
            keyword, col = _UNIQUE[lvl]
            value = (as_text(identifier, _tag(keyword)) or "").strip()
            if not value:
                if lvl == level:
                    raise QueryError(Status.IDENTIFIER_MISMATCH, f"{keyword} is required at the {level} level")
                continue
            if "*" in value or "?" in value:
                raise QueryError(Status.IDENTIFIER_MISMATCH, f"{keyword}: wildcards are not allowed in a retrieve")
            values = [v.strip() for v in value.split("\\") if v.strip()]
            if lvl == "PATIENT" and len(values) > 1:
                raise QueryError(Status.IDENTIFIER_MISMATCH, "PatientID takes a single value")
            stmt = stmt.where(col.in_(values))
            constrained = True
        if not constrained:
            raise QueryError(Status.IDENTIFIER_MISMATCH, "no unique key in the identifier")
        if departments is not None:
            stmt = stmt.where(studies.c.department.in_(departments))
        try:
            return self._refs(stmt)
        except MatchError as e:
            raise QueryError(Status.IDENTIFIER_MISMATCH, str(e)) from e

    def list_instances(self, study_uid: str, series_uid: str | None = None, sop_uid: str | None = None,
                       departments: tuple[str, ...] | None = None, dbapi_conn: Any = None) -> list[InstanceRef]:
        """The instances of a study, series or one instance (a statement compiled once per shape: this is every
        frame a viewer asks for). ``dbapi_conn``: run on that bare connection (``Index.loop_reader``)."""
        params: dict[str, Any] = {"study": study_uid}
        if series_uid is not None:
            params["series"] = series_uid
        if sop_uid is not None:
            params["sop"] = sop_uid
        if departments is not None:
            if not departments:  # a scope of no department sees no study
                return []
            params.update((f"d{i}", d) for i, d in enumerate(departments))
        prepared = self._prepared((series_uid is not None, sop_uid is not None,
                                   None if departments is None else len(departments)))
        if dbapi_conn is not None:
            return _as_refs(prepared.dbapi_rows(dbapi_conn, **params))
        with self.index.engine.connect() as conn:
            return _as_refs(prepared.rows(conn, **params))

    def read_file(self, ref: InstanceRef) -> bytes:
        """The Part 10 file as stored, with the index's patient module when ADT changed it (services/patients.py:
        coerce on retrieval, the one rule of every retrieval path; untouched patients are byte-identical)."""
        data = self.store.read(ref.blob_key)
        if ref.demographics_version:
            data = self.patients.coerce(data, ref.patient_fk, ref.demographics_version)
        if ref.qc_key is not None:  # QC edits, merges, splits, moves (services/qc_edit.py): study + series modules
            data = self.qc_overlay.coerce(data, ref.qc_key)
        return data


def _as_refs(rows: Any) -> list[InstanceRef]:
    return [InstanceRef(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], patient_fk=r[8] if r[9] else 0,
                        demographics_version=r[9] or 0,
                        qc_key=(r[10], r[11], r[12], r[13]) if r[11] or r[13] else None)
            for r in rows]


def _tag(keyword: str) -> int:
    from pydicom.datadict import tag_for_keyword

    t = tag_for_keyword(keyword)
    assert t is not None
    return t
