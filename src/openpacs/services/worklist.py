"""Orders, the Modality Worklist and MPPS: protocol-free rules. hl7/orders.py (ORM/OMI), dimse/ris.py (MWL C-FIND,
MPPS N-CREATE/N-SET) and web/api/worklist.py only translate into these calls.

A scheduled procedure step is one worklist entry. Orders create and update steps (keyed by the order number and the
step ID), cancel or discontinue them; the MPPS a modality reports moves its step to IN PROGRESS, then COMPLETED or
DISCONTINUED. Only SCHEDULED and IN PROGRESS steps are on the worklist unless a query asks for a status.
"""

from __future__ import annotations

import json
import re
import secrets
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydicom import Dataset
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from sqlalchemy import and_, insert, or_, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.sql.elements import ColumnElement

from ..index import matching
from ..index.worklist_schema import (
    CANCELLED,
    COMPLETED,
    DISCONTINUED,
    IN_PROGRESS,
    ON_WORKLIST,
    SCHEDULED,
    mpps,
    scheduled_steps,
)

STATUSES = (SCHEDULED, IN_PROGRESS, COMPLETED, DISCONTINUED, CANCELLED)
FINAL = (COMPLETED, DISCONTINUED, CANCELLED)
PRIORITIES = ("STAT", "HIGH", "ROUTINE", "MEDIUM", "LOW")

t = scheduled_steps.c

# Worklist attributes held in columns: keyword -> column name (top level of the MWL identifier).
TOP_LEVEL: dict[str, str] = {
    "AccessionNumber": "accession_number",
    "RequestedProcedureID": "requested_procedure_id",
    "RequestedProcedureDescription": "requested_procedure_description",
    "RequestedProcedurePriority": "requested_procedure_priority",
    "ReasonForTheRequestedProcedure": "reason_for_the_requested_procedure",
    "StudyInstanceUID": "study_instance_uid",
    "RequestingPhysician": "requesting_physician",
    "ReferringPhysicianName": "referring_physician_name",
    "AdmissionID": "admission_id",
    "CurrentPatientLocation": "current_patient_location",
    "PatientID": "patient_id",
    "IssuerOfPatientID": "issuer_of_patient_id",
    "PatientName": "patient_name",
    "PatientBirthDate": "patient_birth_date",
    "PatientSex": "patient_sex",
    "PatientWeight": "patient_weight",
    "MedicalAlerts": "medical_alerts",
    "Allergies": "allergies",
    "PregnancyStatus": "pregnancy_status",
    "PlacerOrderNumberImagingServiceRequest": "placer_order_number",
    "FillerOrderNumberImagingServiceRequest": "filler_order_number",
}
# ... and inside the Scheduled Procedure Step Sequence item
STEP_LEVEL: dict[str, str] = {
    "Modality": "modality",
    "ScheduledStationAETitle": "scheduled_station_ae_title",
    "ScheduledStationName": "scheduled_station_name",
    "ScheduledProcedureStepLocation": "scheduled_procedure_step_location",
    "ScheduledProcedureStepStartDate": "scheduled_procedure_step_start_date",
    "ScheduledProcedureStepStartTime": "scheduled_procedure_step_start_time",
    "ScheduledPerformingPhysicianName": "scheduled_performing_physician_name",
    "ScheduledProcedureStepDescription": "scheduled_procedure_step_description",
    "ScheduledProcedureStepID": "scheduled_procedure_step_id",
    "ScheduledProcedureStepStatus": "status",
}
CODE_SEQUENCES = {"RequestedProcedureCodeSequence": "requested_procedure_code",
                  "ScheduledProtocolCodeSequence": "scheduled_protocol_code"}
_NORM = {"patient_name": "patient_name_norm",
         "scheduled_performing_physician_name": "scheduled_performing_physician_name_norm"}
# the IHE SWF (RAD-5) return keys a query without keys gets, beside those it asks for
IHE_RETURN_KEYS = (
    "SpecificCharacterSet", "AccessionNumber", "ReferringPhysicianName", "ReferencedStudySequence",
    "ReferencedPatientSequence", "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
    "PatientWeight", "MedicalAlerts", "Allergies", "PregnancyStatus", "StudyInstanceUID", "RequestingPhysician",
    "RequestedProcedureDescription", "RequestedProcedureCodeSequence", "AdmissionID", "CurrentPatientLocation",
    "RequestedProcedureID", "RequestedProcedurePriority", "ReasonForTheRequestedProcedure",
    "ScheduledProcedureStepSequence",
)


# DIMSE status codes of N-CREATE / N-SET refusals (PS3.7 C.4.2, C.4.3; PS3.4 F.7.2.2)
PROCESSING_FAILURE = 0x0110
DUPLICATE_SOP_INSTANCE = 0x0111
NO_SUCH_OBJECT_INSTANCE = 0x0112
INVALID_ATTRIBUTE_VALUE = 0x0106
MISSING_ATTRIBUTE = 0x0120
MISSING_ATTRIBUTE_VALUE = 0x0121
MPPS_NO_LONGER_UPDATABLE = 0xA710  # Error ID with 0x0110: "Performed Procedure Step Object may no longer be updated"
# Type 1 at N-CREATE (PS3.4 Table F.7.2-1)
MPPS_CREATE_REQUIRED = ("ScheduledStepAttributesSequence", "PerformedProcedureStepID", "PerformedStationAETitle",
                        "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime",
                        "PerformedProcedureStepStatus", "Modality")
MPPS_FINAL_REQUIRED = ("PerformedProcedureStepEndDate", "PerformedProcedureStepEndTime")
# set at N-CREATE, "Not allowed" in N-SET
MPPS_NOT_SETTABLE = ("PerformedProcedureStepID", "PerformedStationAETitle", "PerformedProcedureStepStartDate",
                     "PerformedProcedureStepStartTime", "Modality", "PatientID", "StudyID")


class MppsRefusal(Exception):
    """An N-CREATE / N-SET the rules refuse: its DIMSE status, the offending attributes and the Error ID."""

    def __init__(self, status: int, comment: str, offending: Iterable[str] = (), error_id: int | None = None) -> None:
        super().__init__(comment)
        self.status = status
        self.comment = comment
        self.offending = list(offending)
        self.error_id = error_id


def _require(ds: Dataset, keywords: Iterable[str], missing_status: int = MISSING_ATTRIBUTE) -> None:
    absent = [k for k in keywords if k not in ds]
    if absent:
        raise MppsRefusal(missing_status, f"missing: {', '.join(absent)}", absent)
    empty = [k for k in keywords if ds[k].is_empty]
    if empty:
        raise MppsRefusal(MISSING_ATTRIBUTE_VALUE, f"no value: {', '.join(empty)}", empty)


class WorklistError(ValueError):
    """A request the rules refuse: ``kind`` unknown (no such order/step/instance), invalid, conflict."""

    def __init__(self, message: str, kind: str = "invalid") -> None:
        super().__init__(message)
        self.kind = kind


def now() -> datetime:
    return datetime.now(UTC)


def _norm(v: str | None) -> str | None:
    return v.upper() if v else v


def start_datetime(date: str | None, time: str | None) -> str | None:
    if not date:
        return None
    return date + (matching.stored_time(time)[:6] if time else "000000")


def step_values(values: Mapping[str, Any]) -> dict[str, Any]:
    """Column values of a step as given (keywords or column names), with the derived columns filled in."""
    cols = set(scheduled_steps.c.keys())
    out: dict[str, Any] = {}
    for k, v in values.items():
        col = TOP_LEVEL.get(k) or STEP_LEVEL.get(k) or CODE_SEQUENCES.get(k) or k
        if col not in cols:
            raise WorklistError(f"{k}: not a worklist attribute")
        if col in ("requested_procedure_code", "scheduled_protocol_code") and isinstance(v, (list, tuple)):
            v = json.dumps(list(v)) if any(v) else None
        out[col] = v if v != "" else None
    date = out.get("scheduled_procedure_step_start_date")
    time = out.get("scheduled_procedure_step_start_time")
    if date is not None and not re.fullmatch(r"\d{8}", date):
        raise WorklistError(f"ScheduledProcedureStepStartDate {date!r} is not YYYYMMDD")
    if time is not None:
        time = time.replace(":", "")
        if not re.fullmatch(r"\d{2}(\d{2}(\d{2})?)?(\.\d{1,6})?", time):
            raise WorklistError(f"ScheduledProcedureStepStartTime {time!r} is not HHMMSS")
        out["scheduled_procedure_step_start_time"] = matching.stored_time(time.split(".")[0])
    if "scheduled_procedure_step_start_date" in out or "scheduled_procedure_step_start_time" in out:
        out["start_datetime"] = start_datetime(date, out.get("scheduled_procedure_step_start_time"))
    for col, norm in _NORM.items():
        if col in out:
            out[norm] = _norm(out[col])
    prio = out.get("requested_procedure_priority")
    if prio is not None and prio not in PRIORITIES:
        raise WorklistError(f"RequestedProcedurePriority {prio!r}: one of {', '.join(PRIORITIES)}")
    return out


@dataclass
class OrderRef:
    placer: str = ""
    filler: str = ""
    accession: str = ""

    def condition(self) -> ColumnElement[bool]:
        if self.filler:
            return t.filler_order_number == self.filler
        if self.placer:
            return t.placer_order_number == self.placer
        return t.accession_number == self.accession

    def __str__(self) -> str:
        return self.filler or self.placer or self.accession


class WorklistService:
    def __init__(self, index: Any, outbound: Any = None) -> None:
        self.index = index
        self.outbound = outbound  # hl7.outbound.RisOutbound: tells the RIS when a step starts and ends

    # ---- orders --------------------------------------------------------------------------------------------
    def schedule(self, conn: Connection, order: OrderRef, steps: list[dict[str, Any]], source: str = "hl7",
                 control_id: str = "") -> list[int]:
        """New or changed order (NW, XO): each step created, or updated when the order already has that step ID.
        A step that has started (MPPS) keeps its status; a cancelled one scheduled again is back on the list."""
        if not (order.placer or order.filler or order.accession):
            raise WorklistError("the order has no placer or filler order number", "invalid")
        ids: list[int] = []
        stamp = now()
        for raw in steps:
            values = step_values(raw)
            values.setdefault("placer_order_number", order.placer or None)
            values.setdefault("filler_order_number", order.filler or None)
            if not values.get("scheduled_procedure_step_id"):
                values["scheduled_procedure_step_id"] = values.get("requested_procedure_id") or values.get(
                    "accession_number") or secrets.token_hex(6).upper()
            existing = None
            if order.placer or order.filler:
                existing = conn.execute(
                    select(t.id, t.status).where(order.condition(),
                                                 t.scheduled_procedure_step_id == values["scheduled_procedure_step_id"])
                ).first()
            values.update(updated_at=stamp, control_id=control_id or None)
            if existing is None:
                values.update(status=SCHEDULED, source=source, created_at=stamp)
                values.setdefault("patient_id", "")
                key = conn.execute(insert(scheduled_steps).values(**values)).inserted_primary_key
                assert key is not None
                ids.append(int(key[0]))
            else:
                if existing.status in (CANCELLED, DISCONTINUED):
                    values["status"] = SCHEDULED
                conn.execute(update(scheduled_steps).where(t.id == existing.id).values(**values))
                ids.append(int(existing.id))
        return ids

    def set_order_status(self, conn: Connection, order: OrderRef, status: str, control_id: str = "") -> int:
        """Cancel (CA), discontinue (DC) or change the status (SC) of every step of an order; the number changed.
        Completed steps stay completed. An order we do not know is an error (the RIS must hear of it)."""
        if status not in STATUSES:
            raise WorklistError(f"unknown step status {status!r}")
        found = conn.execute(select(t.id, t.status).where(order.condition())).all()
        if not found:
            raise WorklistError(f"no scheduled procedure step for order {order}", "unknown")
        ids = [r.id for r in found if r.status != COMPLETED or status == COMPLETED]
        if ids:
            conn.execute(update(scheduled_steps).where(t.id.in_(ids))
                         .values(status=status, updated_at=now(), control_id=control_id or None))
        return len(ids)

    def follow_patient(self, conn: Connection, demo: Any, prior: Any = None) -> int:
        """ADT: the worklist entries (not yet final) of the patient, or of the prior patient of a merge or identifier
        change, take the demographics the message sent. Plain SQL: it runs for every ADT message."""
        from .patients import sql  # noqa: PLC0415 - services.patients imports nothing of ours; kept local for clarity

        ident = prior or demo.identifier
        values: dict[str, Any] = {}
        if prior is not None:
            values.update(patient_id=demo.identifier.id, issuer_of_patient_id=demo.identifier.issuer or None)
        if demo.name is not None:
            values.update(patient_name=demo.name or None, patient_name_norm=_norm(demo.name) or None)
        if demo.birth_date is not None:
            values["patient_birth_date"] = demo.birth_date or None
        if demo.sex is not None:
            values["patient_sex"] = demo.sex or None
        if not values:
            return 0
        sets = ", ".join(f"{k} = :set_{k}" for k in values)
        params = {f"set_{k}": v for k, v in values.items()}
        params.update(pid=ident.id, issuer=ident.issuer or "", s1=SCHEDULED, s2=IN_PROGRESS)
        done = sql(conn, f"UPDATE scheduled_steps SET {sets} WHERE patient_id = :pid AND status IN (:s1, :s2)"
                         " AND (:issuer = '' OR issuer_of_patient_id IS NULL OR issuer_of_patient_id = :issuer)",
                   params)
        return int(done.rowcount or 0)

    # ---- the REST API --------------------------------------------------------------------------------------
    def create(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """One entry made by hand (no RIS): accession number and patient ID required, a step ID made if absent."""
        for key in ("PatientID", "AccessionNumber", "Modality", "ScheduledProcedureStepStartDate"):
            if not values.get(key) and not values.get(TOP_LEVEL.get(key) or STEP_LEVEL.get(key, key)):
                raise WorklistError(f"{key} is required")
        v = dict(values)
        with self.index.write_engine.begin() as conn:
            accession = str(v.get("AccessionNumber") or v.get("accession_number"))
            exists = conn.execute(select(t.id).where(t.accession_number == accession,
                                                     t.status.in_(ON_WORKLIST))).first()
            if exists is not None:
                raise WorklistError(f"accession number {accession} is already on the worklist", "conflict")
            (sid,) = self.schedule(conn, OrderRef(placer=accession), [v], source="api")
        return self.get(sid)

    def get(self, step_id: int) -> dict[str, Any]:
        with self.index.engine.connect() as c:
            row = c.execute(select(scheduled_steps).where(t.id == step_id)).first()
        if row is None:
            raise WorklistError(f"no worklist entry {step_id}", "unknown")
        return as_dict(row)

    def cancel(self, step_id: int) -> dict[str, Any]:
        with self.index.write_engine.begin() as conn:
            row = conn.execute(select(t.status).where(t.id == step_id)).first()
            if row is None:
                raise WorklistError(f"no worklist entry {step_id}", "unknown")
            if row.status in FINAL:
                raise WorklistError(f"worklist entry {step_id} is already {row.status}", "conflict")
            conn.execute(update(scheduled_steps).where(t.id == step_id).values(status=CANCELLED, updated_at=now()))
        return self.get(step_id)

    def search(self, *, status: str | None = None, modality: str | None = None, station: str | None = None,
               date_from: str | None = None, date_to: str | None = None, patient_id: str | None = None,
               accession: str | None = None, limit: int = 100, after: int | None = None) -> list[dict[str, Any]]:
        stmt = select(scheduled_steps)
        if status == "active" or status is None:
            stmt = stmt.where(t.status.in_(ON_WORKLIST))
        elif status != "all":
            stmt = stmt.where(t.status == status)
        for col, v in ((t.modality, modality), (t.scheduled_station_ae_title, station), (t.patient_id, patient_id),
                       (t.accession_number, accession)):
            if v:
                stmt = stmt.where(col == v)
        if date_from:
            stmt = stmt.where(t.scheduled_procedure_step_start_date >= date_from)
        if date_to:
            stmt = stmt.where(t.scheduled_procedure_step_start_date <= date_to)
        if after is not None:
            stmt = stmt.where(t.id < after)
        with self.index.engine.connect() as c:
            return [as_dict(r) for r in c.execute(stmt.order_by(t.id.desc()).limit(limit))]

    # ---- Modality Worklist C-FIND ----------------------------------------------------------------------------
    def find(self, identifier: Dataset, limit: int | None = None) -> list[Dataset]:
        """PS3.4 K.2.2 matching of an MWL identifier; each match holds the requested keys (IHE SWF's if none)."""
        stmt = select(scheduled_steps).where(*compile_identifier(identifier))
        if limit:
            stmt = stmt.limit(limit)
        with self.index.engine.connect() as c:
            rows = c.execute(stmt.order_by(t.start_datetime, t.id)).all()
        return [response(identifier, r) for r in rows]

    def find_encoded(self, identifier: Dataset, implicit: bool) -> list[bytes]:
        """:meth:`find` with each match already encoded in Little Endian (implicit or explicit VR) for the wire."""
        stmt = select(scheduled_steps).where(*compile_identifier(identifier))
        p = plan(identifier)
        with self.index.engine.connect() as c:
            rows = c.execute(stmt.order_by(t.start_datetime, t.id)).all()
        return [encode_match(p, r, implicit) for r in rows]

    # ---- MPPS (PS3.4 F.7) ------------------------------------------------------------------------------------
    def mpps_create(self, uid: str, attributes: Dataset, calling_aet: str) -> None:
        """N-CREATE: a new MPPS IN PROGRESS; the steps it names go IN PROGRESS."""
        _require(attributes, MPPS_CREATE_REQUIRED)
        status = _text(attributes, "PerformedProcedureStepStatus").strip()
        if status != IN_PROGRESS:
            raise MppsRefusal(INVALID_ATTRIBUTE_VALUE, f"PerformedProcedureStepStatus {status!r}: an MPPS is "
                              "created IN PROGRESS", ["PerformedProcedureStepStatus"])
        with self.index.write_engine.begin() as conn:
            if conn.execute(select(mpps.c.sop_instance_uid).where(mpps.c.sop_instance_uid == uid)).first():
                raise MppsRefusal(DUPLICATE_SOP_INSTANCE, f"MPPS {uid} exists")
            stamp = now()
            conn.execute(insert(mpps).values(sop_instance_uid=uid, status=IN_PROGRESS, calling_aet=calling_aet,
                                             created_at=stamp, updated_at=stamp, attributes=attributes.to_json()))
            self._follow(conn, uid, attributes, IN_PROGRESS)

    def mpps_set(self, uid: str, modification: Dataset) -> str:
        """N-SET: merge the modification into the MPPS; COMPLETED / DISCONTINUED are final and need the end date,
        time and (COMPLETED) the performed series. Returns the MPPS status after the change."""
        with self.index.write_engine.begin() as conn:
            row = conn.execute(select(mpps.c.status, mpps.c.attributes).where(mpps.c.sop_instance_uid == uid)
                               .with_for_update()).first()
            if row is None:
                raise MppsRefusal(NO_SUCH_OBJECT_INSTANCE, f"no MPPS {uid}")
            if row.status != IN_PROGRESS:
                raise MppsRefusal(PROCESSING_FAILURE, f"MPPS is {row.status}: it may no longer be updated",
                                  error_id=MPPS_NO_LONGER_UPDATABLE)
            merged = Dataset.from_json(row.attributes)
            for elem in modification:
                if elem.keyword in MPPS_NOT_SETTABLE and elem.keyword in merged and elem.value != merged[elem.tag].value:
                    raise MppsRefusal(INVALID_ATTRIBUTE_VALUE, f"{elem.keyword} may not be changed by N-SET",
                                      [elem.keyword])
                merged[elem.tag] = elem
            status = _text(merged, "PerformedProcedureStepStatus").strip()
            if status not in (IN_PROGRESS, COMPLETED, DISCONTINUED):
                raise MppsRefusal(INVALID_ATTRIBUTE_VALUE, f"PerformedProcedureStepStatus {status!r}",
                                  ["PerformedProcedureStepStatus"])
            if status != IN_PROGRESS:
                _require(merged, MPPS_FINAL_REQUIRED, missing_status=MISSING_ATTRIBUTE_VALUE)
                if status == COMPLETED and not merged.get("PerformedSeriesSequence"):
                    raise MppsRefusal(MISSING_ATTRIBUTE_VALUE, "PerformedSeriesSequence: a COMPLETED MPPS names "
                                      "its series", ["PerformedSeriesSequence"])
                for item in merged.get("PerformedSeriesSequence") or []:
                    if not _text(item, "SeriesInstanceUID").strip():
                        raise MppsRefusal(MISSING_ATTRIBUTE_VALUE, "PerformedSeriesSequence item without "
                                          "SeriesInstanceUID", ["PerformedSeriesSequence"])
            conn.execute(update(mpps).where(mpps.c.sop_instance_uid == uid)
                         .values(status=status, updated_at=now(), attributes=merged.to_json()))
            if status != IN_PROGRESS:
                self._follow(conn, uid, merged, status)
        return status

    def mpps_get(self, uid: str) -> tuple[str, Dataset] | None:
        with self.index.engine.connect() as c:
            row = c.execute(select(mpps.c.status, mpps.c.attributes).where(mpps.c.sop_instance_uid == uid)).first()
        return None if row is None else (row.status, Dataset.from_json(row.attributes))

    def _follow(self, conn: Connection, uid: str, attributes: Dataset, status: str) -> None:
        """The steps an MPPS names (Scheduled Step Attributes Sequence) take its state; the RIS is told (in this
        transaction's job queue) when ``ris_hl7`` is set."""
        cond = _named_steps(attributes)
        if cond is None:
            return
        values: dict[str, Any] = {"status": status, "updated_at": now()}
        if status == IN_PROGRESS:
            values["mpps_uid"] = uid
        conn.execute(update(scheduled_steps).where(cond, t.status.not_in((CANCELLED,))).values(**values))
        if self.outbound is not None:
            steps = conn.execute(select(scheduled_steps).where(cond, t.status == status).order_by(t.id)).all()
            self.outbound.report(conn, uid, attributes, status, steps)


def _named_steps(attributes: Dataset) -> ColumnElement[bool] | None:
    conds = []
    for item in attributes.get("ScheduledStepAttributesSequence", None) or []:
        sps = str(item.get("ScheduledProcedureStepID", "") or "")
        acc = str(item.get("AccessionNumber", "") or "")
        study = str(item.get("StudyInstanceUID", "") or "")
        rp = str(item.get("RequestedProcedureID", "") or "")
        if not sps:
            continue
        c = [t.scheduled_procedure_step_id == sps]
        if acc:
            c.append(t.accession_number == acc)
        elif study:
            c.append(t.study_instance_uid == study)
        elif rp:
            c.append(t.requested_procedure_id == rp)
        else:
            continue
        conds.append(and_(*c))
    return or_(*conds) if conds else None


def as_dict(row: Any) -> dict[str, Any]:
    out = dict(row._mapping)
    for col in ("requested_procedure_code", "scheduled_protocol_code"):
        out[col] = json.loads(out[col]) if out.get(col) else None
    for col in ("patient_name_norm", "scheduled_performing_physician_name_norm", "start_datetime"):
        out.pop(col, None)
    return out


def _text(ds: Dataset, keyword: str) -> str:
    elem = ds.get(keyword) if keyword in ds else None
    if elem is None:
        return ""
    v = elem.value if isinstance(elem, DataElement) else elem
    if v is None:
        return ""
    if isinstance(v, MultiValue | list | tuple):
        return "\\".join(str(x) for x in v)
    return str(v)


def _match(col_name: str, keyword: str, value: str) -> ColumnElement[bool] | None:
    vr = dictionary_VR(keyword)
    col = scheduled_steps.c[col_name]
    norm = _NORM.get(col_name)
    try:
        return matching.compile_match(col, vr, keyword, value, column_name=col_name,
                                      norm_col=scheduled_steps.c[norm] if norm else None, empty_value=True)
    except matching.MatchError as e:
        raise WorklistError(str(e)) from e


def compile_identifier(identifier: Dataset) -> list[ColumnElement[bool]]:
    conds: list[ColumnElement[bool]] = []
    for keyword, col in TOP_LEVEL.items():
        if keyword in identifier and dictionary_VR(keyword) != "US":
            c = _match(col, keyword, _text(identifier, keyword))
            if c is not None:
                conds.append(c)
    seq = identifier.get("ScheduledProcedureStepSequence", None)
    item = seq[0] if seq else None
    if seq is not None and len(seq) > 1:
        raise WorklistError("ScheduledProcedureStepSequence: a query holds one item")
    status_asked = False
    if item is not None:
        date = _text(item, "ScheduledProcedureStepStartDate").strip()
        time = _text(item, "ScheduledProcedureStepStartTime").strip()
        combined = bool(date and time and "-" in time and "\\" not in date + time and date != '""'
                        and time != '""')
        for keyword, col in STEP_LEVEL.items():
            if keyword not in item:
                continue
            if combined and keyword in ("ScheduledProcedureStepStartDate", "ScheduledProcedureStepStartTime"):
                continue
            value = _text(item, keyword)
            if keyword == "ScheduledProcedureStepStatus" and value.strip():
                status_asked = True
            c = _match(col, keyword, value)
            if c is not None:
                conds.append(c)
        if combined:
            conds.append(_combined(date, time))
    if not status_asked:
        conds.append(t.status.in_(ON_WORKLIST))
    return conds


def _combined(date: str, time: str) -> ColumnElement[bool]:
    """PS3.4 C.2.2.2.5: a date and a time range matched as one date-time range on the step's start."""
    dlo, sep, dhi = date.partition("-")
    if not sep:
        dhi = dlo
    try:
        dlo = matching._normalize_date(dlo, "ScheduledProcedureStepStartDate")
        dhi = matching._normalize_date(dhi, "ScheduledProcedureStepStartDate")
        tlo, thi = matching.time_bounds(time, "ScheduledProcedureStepStartTime")
    except matching.MatchError as e:
        raise WorklistError(str(e)) from e
    conds: list[ColumnElement[bool]] = [t.start_datetime.is_not(None)]
    if dlo:
        conds.append(t.start_datetime >= dlo + (tlo.split(".")[0] or "000000")[:6].ljust(6, "0"))
    if dhi:
        conds.append(t.start_datetime <= dhi + (thi.split(".")[0] or "235959")[:6].ljust(6, "9"))
    return and_(*conds)


def _code_item(value: str | None) -> Sequence:
    if not value:
        return Sequence([])
    code = json.loads(value)
    item = Dataset()
    item.CodeValue = code[0] if len(code) > 0 else ""
    item.CodingSchemeDesignator = code[1] if len(code) > 1 and code[1] else "L"
    item.CodeMeaning = code[2] if len(code) > 2 else ""
    return Sequence([item])


def _put(out: Dataset, keyword: str, value: Any) -> None:
    tag = tag_for_keyword(keyword)
    assert tag is not None
    vr = dictionary_VR(tag)
    if vr == "US":
        out.add(DataElement(tag, vr, int(value) if value not in (None, "") else None))
    else:
        out.add(DataElement(tag, vr, "" if value is None else str(value)))


def _fill(out: Dataset, asked: Iterable[Any], row: Any, columns: Mapping[str, str]) -> None:
    for elem in asked:
        keyword = elem.keyword if isinstance(elem, DataElement) else elem
        if not keyword or keyword in ("SpecificCharacterSet", "ScheduledProcedureStepSequence"):
            continue
        if keyword in CODE_SEQUENCES:
            out.add(DataElement(keyword, "SQ", _code_item(getattr(row, CODE_SEQUENCES[keyword]))))
        elif keyword in columns:
            _put(out, keyword, getattr(row, columns[keyword]))
        else:  # asked for, not held: returned empty (PS3.4 K.6.1.2.2: zero length for a type 2 return key)
            tag = tag_for_keyword(keyword)
            if tag is None:
                continue
            vr = dictionary_VR(tag)
            out.add(DataElement(tag, vr, Sequence([]) if vr == "SQ" else None))


_STEP_RETURN = (*STEP_LEVEL, "ScheduledProtocolCodeSequence", "PreMedication", "RequestedContrastAgent")


def response(identifier: Dataset, row: Any) -> Dataset:
    asked = [e for e in identifier if e.tag.group != 0x0000]
    if len(asked) <= 1:  # nothing asked (or only the character set): the IHE SWF worklist keys
        asked_keys: list[Any] = list(IHE_RETURN_KEYS)
        step_keys: list[Any] = list(_STEP_RETURN)
    else:
        asked_keys = asked
        seq = identifier.get("ScheduledProcedureStepSequence", None)
        # a zero-length sequence or one empty item asks for every attribute of the item (PS3.4 C.2.2.2.6)
        step_keys = list(seq[0]) if seq and len(seq[0]) else list(_STEP_RETURN)
    out = Dataset()
    _fill(out, asked_keys, row, TOP_LEVEL)
    if any((k.keyword if isinstance(k, DataElement) else k) == "ScheduledProcedureStepSequence" for k in asked_keys):
        item = Dataset()
        _fill(item, step_keys, row, STEP_LEVEL)
        out.ScheduledProcedureStepSequence = Sequence([item])
    if _needs_unicode(out):
        out.SpecificCharacterSet = "ISO_IR 192"
    return out


def _needs_unicode(ds: Dataset) -> bool:
    for elem in ds.iterall():
        if isinstance(elem.value, str) and not elem.value.isascii():
            return True
        if elem.VR == "PN" and elem.value is not None and not str(elem.value).isascii():
            return True
    return False


# ---- the wire form of the matches, without pydicom (the worklist's hot path) ------------------------------------
# One plan per query: (tag, VR, column or code-sequence column or None for an empty key, step plan for the SPS
# sequence); each match is then encoded straight to Little Endian bytes, implicit or explicit VR.

_Plan = list[tuple[int, str, str, str | None, "list[Any] | None"]]  # tag, VR, kind, column, items plan
_CODE_TAGS = ((0x00080100, "SH", 0), (0x00080102, "SH", 1), (0x00080104, "LO", 2))
_LONG_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UC", "UN", "UR", "UT", "SV", "UV"})


def _keywords(asked: Iterable[Any]) -> list[str]:
    return [e.keyword if isinstance(e, DataElement) else e for e in asked]


def plan(identifier: Dataset) -> _Plan:
    asked = [e for e in identifier if e.tag.group != 0x0000]
    if len(asked) <= 1:
        top, step = list(IHE_RETURN_KEYS), list(_STEP_RETURN)
    else:
        top = _keywords(asked)
        seq = identifier.get("ScheduledProcedureStepSequence", None)
        step = _keywords(seq[0]) if seq and len(seq[0]) else list(_STEP_RETURN)
    return _plan_of(top, TOP_LEVEL, step)


def _plan_of(keywords: list[str], columns: Mapping[str, str], step: list[str] | None) -> _Plan:
    out: _Plan = []
    for kw in keywords:
        if not kw or kw == "SpecificCharacterSet":
            continue
        tag = tag_for_keyword(kw)
        if tag is None:
            continue
        vr = dictionary_VR(tag)
        if kw == "ScheduledProcedureStepSequence":
            if step is not None:
                out.append((tag, "SQ", "item", None, _plan_of(step, STEP_LEVEL, None)))
        elif kw in CODE_SEQUENCES:
            out.append((tag, "SQ", "code", CODE_SEQUENCES[kw], None))
        elif kw in columns:
            out.append((tag, vr, "column", columns[kw], None))
        else:
            out.append((tag, vr, "empty", None, None))
    out.sort(key=lambda x: x[0])
    return out


def _values(p: _Plan, row: Any) -> tuple[list[tuple[int, str, Any]], bool]:
    """(tag, VR, value) of a match (value: str, int, None, or a list of items for SQ) and whether it needs UTF-8."""
    out: list[tuple[int, str, Any]] = []
    unicode = False
    for tag, vr, kind, col, items in p:
        if kind == "column":
            v = getattr(row, col)  # type: ignore[arg-type]
            if vr == "US":
                v = int(v) if v not in (None, "") else None
            elif v is not None:
                v = str(v)
                unicode = unicode or not v.isascii()
            out.append((tag, vr, v))
        elif kind == "item":
            item, u = _values(items or [], row)
            unicode = unicode or u
            out.append((tag, "SQ", [item]))
        elif kind == "code":
            raw = getattr(row, col)  # type: ignore[arg-type]
            if raw:
                code = json.loads(raw) + ["", "", ""]
                code[1] = code[1] or "L"
                fields = [(t, cvr, str(code[i])) for t, cvr, i in _CODE_TAGS]
                unicode = unicode or not all(f[2].isascii() for f in fields)
                out.append((tag, "SQ", [fields]))
            else:
                out.append((tag, "SQ", []))
        else:
            out.append((tag, vr, [] if vr == "SQ" else None))
    return out, unicode


def _encode(elements: list[tuple[int, str, Any]], implicit: bool) -> bytes:
    out = bytearray()
    for tag, vr, value in elements:
        if vr == "SQ":
            raw = b"".join(b"\xfe\xff\x00\xe0" + _U32.pack(len(b)) + b
                           for b in (_encode(item, implicit) for item in value))
        elif vr == "US":
            raw = b"" if value is None else _U16.pack(value)
        else:
            raw = value.encode("utf-8") if value else b""
            if len(raw) % 2:
                raw += b"\0" if vr == "UI" else b" "
        if implicit:
            out += _TAG_LEN.pack(tag >> 16, tag & 0xFFFF, len(raw))
        elif vr in _LONG_VRS:
            out += _TAG_VR_LONG.pack(tag >> 16, tag & 0xFFFF, vr.encode(), len(raw))
        else:
            out += _TAG_VR_SHORT.pack(tag >> 16, tag & 0xFFFF, vr.encode(), len(raw))
        out += raw
    return bytes(out)


_U16, _U32 = struct.Struct("<H"), struct.Struct("<I")
_TAG_LEN = struct.Struct("<HHI")
_TAG_VR_SHORT = struct.Struct("<HH2sH")
_TAG_VR_LONG = struct.Struct("<HH2s2xI")
_UTF8 = (0x00080005, "CS", "ISO_IR 192")


def encode_match(p: _Plan, row: Any, implicit: bool) -> bytes:
    elements, unicode = _values(p, row)
    if unicode:
        elements.insert(0, _UTF8)
    return _encode(elements, implicit)


def for_context(ctx: Any) -> WorklistService:
    """The context's worklist service, made on first use (the DIMSE workers, the HL7 listener and the API share it
    per process)."""
    svc = getattr(ctx, "worklist", None)
    if svc is None:
        outbound = None
        settings = getattr(ctx, "settings", None)
        if settings is not None and settings.ris_hl7 and getattr(ctx, "jobs", None) is not None:
            from ..hl7.outbound import RisOutbound

            outbound = RisOutbound(settings, ctx.jobs)
        svc = WorklistService(ctx.index, outbound)
        ctx.worklist = svc
    return svc
