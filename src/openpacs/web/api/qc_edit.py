"""API router: quality-control edits (services/qc_edit.py) — edit patient, study and series attributes; merge patients
and studies; split a study; move an instance; the QC history and undo. Administrators only; every operation and undo
is audited (Patient Record, with the studies touched)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, Depends, HTTPException, Query, Request
from pydantic import BaseModel, Field
from sqlalchemy import select

from ...index.schema import patients, studies
from ...services import auth as authsvc
from ...services import qc_edit as svc
from ...services.auth import Principal
from .common import Page, bad, decode_cursor, encode_cursor, limit_param, need, not_found

ADMINISTRATOR = Depends(need(authsvc.ADMIN))


class MergeIn(BaseModel):
    into: str = Field(description="the surviving study's StudyInstanceUID (or the surviving patient's PatientID)")
    issuer: str | None = Field(None, description="patients: IssuerOfPatientID of the merged-away patient")
    into_issuer: str | None = Field(None, description="patients: IssuerOfPatientID of the surviving patient")


class SplitIn(BaseModel):
    series: list[str] | None = Field(None, description="SeriesInstanceUIDs to move (whole series)")
    instances: list[str] | None = Field(None, description="SOPInstanceUIDs to move")
    into: str | None = Field(None, description="an existing study; omitted: a new study (a new StudyInstanceUID)")
    attributes: dict[str, Any] | None = Field(None, description="study attributes of the new study")


class MoveIn(BaseModel):
    series: str | None = Field(None, description="the target series")
    study: str | None = Field(None, description="the target study (the instance goes to a new series there)")


def build_router(ctx: Any) -> APIRouter:
    router = APIRouter(tags=["qc"])
    service = svc.QCEditService(ctx.index, ctx.retrieve.patients)

    def fail(e: svc.QCEditError) -> HTTPException:
        if e.kind == "unknown":
            return not_found(str(e).removeprefix("no "))
        return HTTPException(409 if e.kind == "conflict" else 400, str(e))

    def audit(request: Request, p: Principal, entry: dict[str, Any], detail: str) -> None:
        if ctx.audit is None:
            return
        pid, name = "", ""
        with ctx.index.engine.connect() as conn:
            for uid in entry["study_uids"]:
                r = conn.execute(select(patients.c.patient_id, patients.c.patient_name)
                                 .select_from(studies.join(patients, studies.c.patient_fk == patients.c.id))
                                 .where(studies.c.study_instance_uid == uid)).first()
                if r is not None:
                    pid, name = r[0] or "", r[1] or ""
                    break
        if entry["level"] == "PATIENT" and not pid:
            pid = entry["uid"]
        ctx.audit.record("PatientRecord", action="U", user=p.name, role=p.role, protocol="HTTP",
                         source_address=request.scope.get("openpacs.client", ""), patient_id=pid,
                         patient_name=name, study_uids=entry["study_uids"],
                         detail=f"QC {detail} (history {entry['id']})")

    def run(request: Request, p: Principal, detail: str, fn: Any, *args: Any, **kw: Any) -> dict[str, Any]:
        try:
            entry: dict[str, Any] = fn(*args, **kw)
        except svc.QCEditError as e:
            raise fail(e) from None
        audit(request, p, entry, detail)
        return entry

    def attrs(body: dict[str, Any]) -> dict[str, Any]:
        values = body.get("attributes", body)
        if not isinstance(values, dict) or not values:
            raise bad("the body: {attribute keyword: new value, ...} (or {\"attributes\": {...}})")
        return values

    def changed(entry: dict[str, Any]) -> str:
        old, new = entry["old"]["values"], entry["new"]["values"]
        return "; ".join(f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in new)

    def edit(level: str, uid: str, request: Request, body: dict[str, Any], p: Principal) -> dict[str, Any]:
        try:
            entry = service.edit(level, uid, attrs(body), p.name)
        except svc.QCEditError as e:
            raise fail(e) from None
        audit(request, p, entry, f"edit of {level.lower()} {uid}: {changed(entry)}")
        return entry

    @router.patch("/studies/{uid}", summary="Edit study attributes (kept in the QC history; undoable)")
    def edit_study(uid: str, request: Request, body: dict[str, Any] = Body(...),
                   p: Principal = ADMINISTRATOR) -> dict[str, Any]:
        return edit("STUDY", uid, request, body, p)

    @router.patch("/series/{uid}", summary="Edit series attributes (kept in the QC history; undoable)")
    def edit_series(uid: str, request: Request, body: dict[str, Any] = Body(...),
                    p: Principal = ADMINISTRATOR) -> dict[str, Any]:
        return edit("SERIES", uid, request, body, p)

    @router.patch("/patients/{pid}", summary="Edit patient demographics (kept in the QC history; undoable)")
    def edit_patient(pid: str, request: Request, body: dict[str, Any] = Body(...),
                     issuer: str | None = Query(None, description="IssuerOfPatientID, when several share the ID"),
                     p: Principal = ADMINISTRATOR) -> dict[str, Any]:
        values = attrs(body)
        try:
            entry = service.edit("PATIENT", pid, values, p.name, issuer)
        except svc.QCEditError as e:
            raise fail(e) from None
        audit(request, p, entry, f"edit of patient {pid}: {changed(entry)}")
        return entry

    @router.post("/studies/{uid}/merge", summary="Merge this study into another (its series move; it goes)")
    def merge_study(uid: str, spec: MergeIn, request: Request, p: Principal = ADMINISTRATOR) -> dict[str, Any]:
        return run(request, p, f"merge of study {uid} into {spec.into}", service.merge_studies, uid, spec.into,
                   p.name)

    @router.post("/studies/{uid}/split", summary="Move series or instances to a new or another study")
    def split_study(uid: str, spec: SplitIn, request: Request, p: Principal = ADMINISTRATOR) -> dict[str, Any]:
        what = f"{len(spec.series)} series" if spec.series else f"{len(spec.instances or [])} instance(s)"
        return run(request, p, f"split of {what} from study {uid} to {spec.into or 'a new study'}", service.split,
                   uid, p.name, series_uids=spec.series, instance_uids=spec.instances, into=spec.into,
                   attributes=spec.attributes)

    @router.post("/instances/{uid}/move", summary="Move an instance to another series, or to another study")
    def move_instance(uid: str, spec: MoveIn, request: Request, p: Principal = ADMINISTRATOR) -> dict[str, Any]:
        return run(request, p, f"move of instance {uid} to {'series ' + spec.series if spec.series else 'study ' + str(spec.study)}",
                   service.move_instance, uid, p.name, series_uid=spec.series, study_uid=spec.study)

    @router.post("/patients/{pid}/merge", summary="Merge this patient into another (its studies move; it goes)")
    def merge_patient(pid: str, spec: MergeIn, request: Request, p: Principal = ADMINISTRATOR) -> dict[str, Any]:
        return run(request, p, f"merge of patient {pid} into {spec.into}", service.merge_patients, pid, spec.into,
                   p.name, source_issuer=spec.issuer, into_issuer=spec.into_issuer)

    @router.get("/qc/history", response_model=Page, summary="QC edits, merges, splits and moves, newest first")
    def history(uid: str | None = Query(None, description="asked on this UID / PatientID, or touching this study"),
                limit: int = limit_param(100), cursor: str | None = Query(None),
                p: Principal = ADMINISTRATOR) -> Page:
        key = decode_cursor(cursor, 1)
        if key is not None and not isinstance(key[0], int):
            raise bad("cursor: not a cursor returned by this API")
        rows = service.history(limit + 1, key[0] if key else None, uid)
        items = rows[:limit]
        return Page(items=items, next=encode_cursor([items[-1]["id"]]) if len(rows) > limit else None)

    @router.post("/qc/history/{entry_id}/undo", summary="Undo a QC operation (restores the state before it)")
    def undo(entry_id: int, request: Request, p: Principal = ADMINISTRATOR) -> dict[str, Any]:
        try:
            before = service.get(entry_id)
        except svc.QCEditError as e:
            raise fail(e) from None
        return run(request, p, f"undo of {before['operation']} of {before['level'].lower()} {before['uid']}",
                   service.undo, entry_id, p.name)

    return router
