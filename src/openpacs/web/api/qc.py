"""API router: the reconciliation (QC) list — studies with no matching order or disagreeing with it; link one to an
order (the study takes the order's patient and accession) or dismiss it. Administrators only; both audited
(Patient Record). The rules are services/qc.py's."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from pydantic import BaseModel

from ...services import auth as authsvc
from ...services import qc as qcsvc
from ...services.auth import Principal
from .common import Page, bad, decode_cursor, encode_cursor, limit_param, need, not_found

ADMINISTRATOR = Depends(need(authsvc.ADMIN))


class LinkIn(BaseModel):
    step_id: int


def build_router(ctx: Any) -> APIRouter:
    router = APIRouter(prefix="/qc", tags=["qc"])
    service = qcsvc.for_context(ctx)

    def fail(e: qcsvc.QCError) -> HTTPException:
        if e.kind == "unknown":
            return not_found(str(e).removeprefix("no ").rsplit(" ", 1)[0])
        return HTTPException(409 if e.kind == "conflict" else 400, str(e))

    def audit(request: Request, p: Principal, item: dict[str, Any], detail: str) -> None:
        if ctx.audit is not None:
            ctx.audit.record("PatientRecord", action="U", user=p.name, role=p.role, protocol="HTTP",
                             source_address=request.scope.get("openpacs.client", ""),
                             patient_id=item.get("patient_id") or "", patient_name=item.get("patient_name") or "",
                             study_uids=[item["study_instance_uid"]], detail=detail)

    @router.get("", response_model=Page, summary="QC items, newest first (keyset pages)")
    def search(status: str = Query("open", description="open, linked, dismissed or all"),
               limit: int = limit_param(100), cursor: str | None = Query(None), p: Principal = ADMINISTRATOR) -> Page:
        key = decode_cursor(cursor, 1)
        if key is not None and not isinstance(key[0], int):
            raise bad("cursor: not a cursor returned by this API")
        try:
            rows = service.search(status, limit + 1, key[0] if key else None)
        except qcsvc.QCError as e:
            raise bad(str(e)) from None
        items = rows[:limit]
        return Page(items=items, next=encode_cursor([items[-1]["id"]]) if len(rows) > limit else None)

    @router.post("/{item_id}/link", summary="Link the study to an order: it takes the order's patient and accession")
    def link(item_id: int, spec: LinkIn, request: Request, p: Principal = ADMINISTRATOR) -> dict[str, Any]:
        try:
            before = service.get(item_id)
            item = service.link(item_id, spec.step_id, p.name)
        except qcsvc.QCError as e:
            raise fail(e) from None
        audit(request, p, item, f"QC item {item_id}: study linked to worklist entry {spec.step_id}; patient "
              f"{before['patient_id']} -> {item['patient_id']}, accession {before['accession_number']} -> "
              f"{item['accession_number']}")
        return item

    @router.post("/{item_id}/dismiss", summary="Dismiss a QC item (the study stays as it is)")
    def dismiss(item_id: int, request: Request, p: Principal = ADMINISTRATOR) -> dict[str, Any]:
        try:
            item = service.dismiss(item_id, p.name)
        except qcsvc.QCError as e:
            raise fail(e) from None
        audit(request, p, item, f"QC item {item_id} dismissed ({item['kind']})")
        return item

    return router
