"""Keyset browsing of studies for the REST API and console: the same matching rules as C-FIND/QIDO
(index.matching), ordered by a sort column with the row id as tie-breaker, so that page 1,000 costs what page 1 does."""

from __future__ import annotations

from typing import Any

from sqlalchemy import and_, exists, or_, select
from sqlalchemy.sql.elements import ColumnElement

from .matching import compile_match
from .query import visible
from .schema import patients, series, studies

SORTS: dict[str, Any] = {
    "date": studies.c.study_date,
    "patient": patients.c.patient_name_norm,
    "accession": studies.c.accession_number,
    "received": studies.c.created_at,
    "updated": studies.c.updated_at,
}

STUDY_COLUMNS = [
    studies.c.id, studies.c.study_instance_uid, studies.c.study_date, studies.c.study_time,
    studies.c.accession_number, studies.c.study_description, studies.c.referring_physician_name,
    studies.c.modalities_in_study, studies.c.sop_classes_in_study, studies.c.department, studies.c.num_series, studies.c.num_instances,
    studies.c.size_bytes, studies.c.created_at, studies.c.updated_at, patients.c.patient_id, patients.c.patient_name,
    patients.c.patient_birth_date, patients.c.patient_sex,
]


def study_conditions(filters: dict[str, str], departments: tuple[str, ...] | None) -> list[ColumnElement]:
    """Conditions for the search fields (keyword -> DICOM query string, C.2.2.2 rules); MatchError on bad values."""
    conds: list[ColumnElement] = []
    pconds: list[ColumnElement] = []
    spec = {
        "PatientName": (patients.c.patient_name_norm, "PN", True),
        "PatientID": (patients.c.patient_id, "LO", True),
        "AccessionNumber": (studies.c.accession_number, "SH", False),
        "StudyDate": (studies.c.study_date, "DA", False),
        "StudyDescription": (studies.c.study_description, "LO", False),
        "ReferringPhysicianName": (studies.c.referring_physician_name_norm, "PN", False),
    }
    for kw, value in filters.items():
        if kw == "ModalitiesInStudy":
            c = compile_match(series.c.modality, "CS", kw, value)
            if c is not None:
                conds.append(exists(select(series.c.id).where(series.c.study_fk == studies.c.id, c)
                                    .correlate_except(series)))
            continue
        if kw == "Department":
            if value:
                conds.append(studies.c.department == value)
            continue
        col, vr, on_patient = spec[kw]
        if vr == "PN":
            value = value.upper()
        c = compile_match(col, vr, kw, value, case_insensitive_pn=False)
        if c is not None:
            (pconds if on_patient else conds).append(c)
    if pconds:
        conds.append(studies.c.patient_fk.in_(select(patients.c.id).where(*pconds)))
    if departments is not None:
        conds.append(studies.c.department.in_(departments))
    conds.append(visible("STUDY"))  # IOCM: a study whose instances are all rejected is hidden
    return conds


def browse_studies(conn: Any, filters: dict[str, str], departments: tuple[str, ...] | None, sort: str, desc: bool,
                   limit: int, after: list[Any] | None) -> tuple[list[dict[str, Any]], list[Any] | None]:
    """One page of studies and the key of its last row (None on the last page). ``after`` is such a key."""
    key = SORTS[sort]
    conds = study_conditions(filters, departments)
    if after is not None:
        v, rid = after
        if desc:
            keyset = or_(key < v, and_(key == v, studies.c.id < rid)) if v is not None else \
                and_(key.is_(None), studies.c.id < rid)
            if v is not None:
                keyset = or_(keyset, key.is_(None))  # NULLs last when descending
        else:
            keyset = or_(key > v, and_(key == v, studies.c.id > rid)) if v is not None else \
                or_(key.is_not(None), and_(key.is_(None), studies.c.id > rid))
        conds.append(keyset)
    order = [key.desc().nulls_last(), studies.c.id.desc()] if desc else [key.asc().nulls_first(), studies.c.id.asc()]
    stmt = (select(*STUDY_COLUMNS, key.label("sortkey")).select_from(studies.join(patients, studies.c.patient_fk == patients.c.id))
            .where(*conds).order_by(*order).limit(limit + 1))
    rows = conn.execute(stmt).mappings().all()
    items = [dict(r) for r in rows[:limit]]
    nxt = None
    if len(rows) > limit:
        last = items[-1]
        sk = last["sortkey"]
        nxt = [sk.isoformat() if hasattr(sk, "isoformat") else sk, last["id"]]
    for it in items:
        it.pop("sortkey", None)
    return items, nxt
