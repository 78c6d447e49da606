"""API router: IOCM rejections (reject a study, series or instances with a rejection title; list; restore; purge),
de-identification into a new study, and export (zip with a DICOMDIR, folder, remote node). The rules are
services/iocm.py, services/deidentify.py and services/export.py'; every operation is audited there."""

from __future__ import annotations

import asyncio
import shutil
from typing import Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field
from starlette.background import BackgroundTask

from ...services import auth as authsvc
from ...services import export as exportsvc
from ...services import iocm as iocmsvc
from ...services.auth import Principal
from ...services.deidentify import DeidentifyError, DeidOptions, deidentify_study
from ..auth import departments_of
from .common import Page, bad, decode_cursor, encode_cursor, limit_param, need, not_found

ADMINISTRATOR = Depends(need(authsvc.ADMIN))
EXPORTER = Depends(need(authsvc.EXPORT))


class RejectIn(BaseModel):
    reason: Literal["113001", "113037", "113038", "113039"] = Field(
        description="113001 quality, 113037 patient safety, 113038 incorrect worklist entry, 113039 retention expired")
    series: list[str] = Field(default_factory=list, description="only these series (else the whole study)")
    instances: list[str] = Field(default_factory=list, description="only these SOP Instance UIDs")


class DeidIn(BaseModel):
    retain_dates: bool = False
    clean_descriptors: bool = False
    retain_uids: bool = False
    patient_name: str = "ANONYMOUS"
    patient_id: str = ""


class ExportIn(BaseModel):
    studies: list[str]
    format: Literal["zip", "folder", "node"] = "zip"
    destination: str = Field("", description="format node: the node name or AE title")
    folder: str = Field("", description="format folder: a name under <data_dir>/exports")
    deidentify: DeidIn | None = None


class PurgeIn(BaseModel):
    older_than_days: float | None = Field(None, ge=0, description="default: the rejected_purge_days setting")


def build_router(ctx: Any) -> APIRouter:
    router = APIRouter(tags=["iocm"])

    def fail(e: iocmsvc.IOCMError) -> HTTPException:
        return HTTPException({"unknown": 404, "conflict": 409}.get(e.kind, 400), str(e))

    @router.post("/studies/{uid}/reject", summary="Reject a study, some of its series or instances (IOCM note)")
    async def reject(uid: str, spec: RejectIn, request: Request, p: Principal = ADMINISTRATOR) -> dict[str, Any]:
        try:
            return await asyncio.to_thread(ctx.iocm.reject, uid, spec.reason, series_uids=spec.series,
                                           sop_uids=spec.instances, actor=p.name, source="console",
                                           departments=departments_of(request))
        except iocmsvc.IOCMError as e:
            raise fail(e) from None

    @router.get("/rejections", response_model=Page, summary="IOCM rejections, newest first")
    def rejections(state: str = Query("all", description="rejected, restored, purged or all"),
                   study: str = Query("", description="only this study"), limit: int = limit_param(100),
                   cursor: str | None = None, p: Principal = ADMINISTRATOR) -> Page:
        key = decode_cursor(cursor, 1)
        if key is not None and not isinstance(key[0], int):
            raise bad("cursor: not a cursor returned by this API")
        try:
            rows = ctx.iocm.search(state, limit + 1, key[0] if key else None, study)
        except iocmsvc.IOCMError as e:
            raise bad(str(e)) from None
        items = rows[:limit]
        return Page(items=items, next=encode_cursor([items[-1]["id"]]) if len(rows) > limit else None)

    @router.get("/rejections/{rid}", summary="One rejection with its instances")
    def rejection(rid: int, p: Principal = ADMINISTRATOR) -> dict[str, Any]:
        try:
            return ctx.iocm.get(rid)  # type: ignore[no-any-return]
        except iocmsvc.IOCMError as e:
            raise fail(e) from None

    @router.post("/rejections/{rid}/restore", summary="Restore the instances of a rejection (its note is deleted)")
    async def restore(rid: int, p: Principal = ADMINISTRATOR) -> dict[str, Any]:
        try:
            return await asyncio.to_thread(ctx.iocm.restore, rid, p.name)  # type: ignore[no-any-return]
        except iocmsvc.IOCMError as e:
            raise fail(e) from None

    @router.post("/rejections/purge", status_code=202, summary="Queue a purge_rejected job now")
    def purge(spec: PurgeIn, p: Principal = ADMINISTRATOR) -> dict[str, Any]:
        payload: dict[str, Any] = {"recurring": False, "user": p.name}
        if spec.older_than_days is not None:
            payload["older_than_days"] = spec.older_than_days
        job = ctx.jobs.submit(iocmsvc.KIND, payload)
        return {"job": job.id}

    @router.post("/studies/{uid}/deidentify", summary="A de-identified copy of the study, as a new study")
    async def deidentify(uid: str, spec: DeidIn, request: Request, p: Principal = EXPORTER) -> dict[str, Any]:
        try:
            options = DeidOptions.from_json(spec.model_dump())
            return await asyncio.to_thread(deidentify_study, ctx, uid, options, actor=p.name,
                                           departments=departments_of(request))
        except DeidentifyError as e:
            raise (not_found(f"study {uid}") if "no stored instance" in str(e) else bad(str(e))) from None

    @router.post("/export", summary="Export studies: a zip with a DICOMDIR, a folder, or a send to a node")
    async def export(spec: ExportIn, request: Request, p: Principal = EXPORTER) -> Any:
        try:
            res = await asyncio.to_thread(
                exportsvc.export, ctx, spec.studies, spec.format,
                deidentify=spec.deidentify.model_dump() if spec.deidentify is not None else None,
                destination=spec.destination, folder=spec.folder, actor=p.name, departments=departments_of(request))
        except exportsvc.ExportError as e:
            raise HTTPException({"unknown": 404, "conflict": 409}.get(e.kind, 400), str(e)) from None
        except DeidentifyError as e:
            raise bad(str(e)) from None
        if res.format == "zip":
            tmp = res.tmp_dir
            return FileResponse(res.path, media_type="application/zip", filename="export.zip",
                                background=BackgroundTask(lambda: shutil.rmtree(tmp, ignore_errors=True)))
        return {"format": res.format, "instances": res.instances, "folder": res.path or None, "job": res.job_id,
                "studies": res.studies}

    return router
