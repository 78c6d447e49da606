"""API router: the Modality Worklist (scheduled procedure steps). List and read need ``read``; creating an entry by
hand (no RIS) and cancelling one need ``store`` (technologists, radiologists, administrators), audited as Order
Record (DCM 110109). The rules are services/worklist.py's."""

from __future__ import annotations

import re
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from pydantic import BaseModel, Field

from ...services import auth as authsvc
from ...services import worklist as wl
from ...services.auth import Principal
from .common import Page, bad, decode_cursor, encode_cursor, limit_param, need, not_found

READER = Depends(need(authsvc.READ))
WRITER = Depends(need(authsvc.STORE))


class EntryIn(BaseModel):
    """A worklist entry by DICOM keyword: patient ID, accession number, modality and start date are required."""

    PatientID: str = Field(min_length=1, max_length=64)
    PatientName: str = Field("", max_length=320)
    IssuerOfPatientID: str = Field("", max_length=64)
    PatientBirthDate: str = Field("", pattern=r"^(\d{8})?$")
    PatientSex: str = Field("", pattern=r"^(M|F|O)?$")
    AccessionNumber: str = Field(min_length=1, max_length=16)
    RequestedProcedureID: str = Field("", max_length=16)
    RequestedProcedureDescription: str = Field("", max_length=64)
    RequestedProcedurePriority: str = Field("", pattern=r"^(STAT|HIGH|ROUTINE|MEDIUM|LOW)?$")
    StudyInstanceUID: str = Field("", pattern=r"^([0-9]+(\.[0-9]+)*)?$", max_length=64)
    ReferringPhysicianName: str = Field("", max_length=320)
    Modality: str = Field(min_length=1, max_length=16)
    ScheduledStationAETitle: str = Field("", max_length=16)
    ScheduledStationName: str = Field("", max_length=16)
    ScheduledProcedureStepStartDate: str = Field(pattern=r"^\d{8}$")
    ScheduledProcedureStepStartTime: str = Field("", pattern=r"^(\d{2}(\d{2}(\d{2})?)?)?$")
    ScheduledProcedureStepDescription: str = Field("", max_length=64)
    ScheduledProcedureStepID: str = Field("", max_length=16)
    ScheduledPerformingPhysicianName: str = Field("", max_length=320)


STATUS_FILTERS = ("active", "all", *wl.STATUSES)
_DATE = re.compile(r"^\d{8}$")


def build_router(ctx: Any) -> APIRouter:
    router = APIRouter(prefix="/worklist", tags=["worklist"])
    service = wl.for_context(ctx)

    def audit(request: Request, p: Principal, action: str, entry: dict[str, Any], detail: str) -> None:
        if ctx.audit is not None:
            ctx.audit.record("OrderRecord", action=action, user=p.name, role=p.role, protocol="HTTP",
                             source_address=request.scope.get("openpacs.client", ""),
                             patient_id=entry.get("patient_id") or "", patient_name=entry.get("patient_name") or "",
                             detail=detail)

    @router.get("", response_model=Page, summary="Worklist entries, newest first (keyset pages)")
    def search(
        status: str = Query("active", description="active (SCHEDULED and IN PROGRESS), all, or one status"),
        modality: str | None = Query(None, max_length=16), station: str | None = Query(None, max_length=16),
        date_from: str | None = Query(None, description="YYYYMMDD"), date_to: str | None = Query(None),
        patient_id: str | None = Query(None, max_length=64), accession: str | None = Query(None, max_length=16),
        limit: int = limit_param(100), cursor: str | None = Query(None), p: Principal = READER,
    ) -> Page:
        if status not in STATUS_FILTERS:
            raise bad(f"status: one of {', '.join(STATUS_FILTERS)}")
        for name, v in (("date_from", date_from), ("date_to", date_to)):
            if v and not _DATE.match(v):
                raise bad(f"{name}: YYYYMMDD")
        key = decode_cursor(cursor, 1)
        if key is not None and not isinstance(key[0], int):
            raise bad("cursor: not a cursor returned by this API")
        rows = service.search(status=status, modality=modality, station=station, date_from=date_from,
                              date_to=date_to, patient_id=patient_id, accession=accession, limit=limit + 1,
                              after=key[0] if key else None)
        items = rows[:limit]
        return Page(items=items, next=encode_cursor([items[-1]["id"]]) if len(rows) > limit else None)

    @router.get("/{entry_id}", summary="One worklist entry")
    def one(entry_id: int, p: Principal = READER) -> dict[str, Any]:
        try:
            return service.get(entry_id)
        except wl.WorklistError:
            raise not_found("worklist entry") from None

    @router.post("", status_code=201, summary="Create a worklist entry by hand (when there is no RIS)")
    def create(spec: EntryIn, request: Request, p: Principal = WRITER) -> dict[str, Any]:
        values = {k: v for k, v in spec.model_dump().items() if v != ""}
        try:
            entry = service.create(values)
        except wl.WorklistError as e:
            raise HTTPException(409 if e.kind == "conflict" else 400, str(e)) from None
        audit(request, p, "C", entry, f"worklist entry {entry['id']} created: accession {entry['accession_number']}"
              f" {entry['modality']} {entry['scheduled_procedure_step_start_date']}")
        return entry

    @router.delete("/{entry_id}", summary="Cancel a worklist entry (it leaves the worklist)")
    def cancel(entry_id: int, request: Request, p: Principal = WRITER) -> dict[str, Any]:
        try:
            entry = service.cancel(entry_id)
        except wl.WorklistError as e:
            if e.kind == "unknown":
                raise not_found("worklist entry") from None
            raise HTTPException(409, str(e)) from None
        audit(request, p, "D", entry, f"worklist entry {entry_id} cancelled: accession {entry['accession_number']}")
        return entry

    return router
