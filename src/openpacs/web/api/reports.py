"""API router: reports received over HL7 (ORU^R01), with their text and whether they are stored with their study
as Basic Text SR yet. Reading needs ``read``; a department-scoped user sees the reports of their departments'
studies only (reports still waiting for their study: unscoped users only)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query

from ...services import auth as authsvc
from ...services import reports as rp
from ...services.auth import Principal
from .common import bad, need

READER = Depends(need(authsvc.READ))


def build_router(ctx: Any) -> APIRouter:
    router = APIRouter(prefix="/reports", tags=["reports"])
    service = rp.for_context(ctx)

    @router.get("", summary="Reports by accession number or study (newest first)")
    def search(accession: str | None = Query(None, max_length=64), study: str | None = Query(None, max_length=64),
               p: Principal = READER) -> dict[str, Any]:
        if not accession and not study:
            raise bad("accession or study is required")
        items = [r for r in service.search(accession=accession, study_uid=study)
                 if p.departments is None or (r["department"] is not None and r["department"] in p.departments)]
        return {"items": items}

    return router
