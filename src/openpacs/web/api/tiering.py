"""API router: the cold tier (services/tiering.py): move studies to ``tier_url`` and back as ``tier`` jobs, and see
where a study's blobs are. Administration: the admin right."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, HTTPException
from pydantic import BaseModel, Field
from sqlalchemy import func, select

from ...index.schema import instances
from ...services import auth as authsvc
from ...services import tiering
from ...services.auth import Principal
from ...storage.tiered import TIER_PREFIX
from .common import need, not_found
from .jobs import JobOut, _job_out

ADMINISTRATOR = Depends(need(authsvc.ADMIN))
READER = Depends(need(authsvc.READ))


class TierRequest(BaseModel):
    action: Literal["tier", "back"] = Field("tier", description="tier: to the cold tier; back: to primary storage")
    studies: list[str] = Field([], max_length=10000, description="StudyInstanceUIDs")
    older_than_days: float | None = Field(None, ge=0, description="instead of studies (action tier): every study "
                                                                  "received more than this many days ago")


class TierStatus(BaseModel):
    configured: bool
    tier_after_days: int
    tiered_instances: int
    tiered_bytes: int


class Placement(BaseModel):
    study_instance_uid: str
    primary: int
    tier: int


def build_router(ctx: Any) -> APIRouter:
    router = APIRouter(tags=["storage"])

    @router.get("/storage/tier", response_model=TierStatus, summary="The cold tier: configured, what it holds")
    def status(p: Principal = READER) -> TierStatus:
        on_tier = instances.c.blob_key.startswith(TIER_PREFIX)
        with ctx.index.engine.connect() as c:
            n, size = c.execute(select(func.count(), func.coalesce(func.sum(instances.c.size_bytes), 0))
                                .where(on_tier)).one()
        return TierStatus(configured=tiering.tiered_store(ctx) is not None,
                          tier_after_days=int(ctx.settings.tier_after_days or 0), tiered_instances=int(n),
                          tiered_bytes=int(size))

    @router.post("/storage/tier", response_model=JobOut, status_code=202,
                 summary="Move studies to the cold tier (or back): a tier job")
    def submit(body: TierRequest, p: Principal = ADMINISTRATOR) -> JobOut:
        if body.studies:
            missing = [u for u in body.studies if tiering.study_placement(ctx.index, u) is None]
            if missing:
                raise not_found(f"study {missing[0]}")
        try:
            job = tiering.submit(ctx, body.action, body.studies or None, body.older_than_days, owner=p.name)
        except tiering.TieringError as e:
            raise HTTPException(409 if "configured" in str(e) else 400, str(e)) from None
        if ctx.audit is not None:
            where = "to the cold tier" if body.action == "tier" else "back to primary storage"
            what = f"{len(body.studies)} study(ies)" if body.studies else f"studies older than {body.older_than_days} d"
            ctx.audit.record("BeginTransferring", principal=p, protocol="API", study_uids=body.studies,
                             destination="tier" if body.action == "tier" else "primary",
                             detail=f"tier job {job.id}: {what} {where}")
        return _job_out(job)

    @router.get("/storage/tier/studies/{uid}", response_model=Placement,
                summary="How many instances of a study are on primary storage and on the tier")
    def placement(uid: str, p: Principal = ADMINISTRATOR) -> Placement:
        found = tiering.study_placement(ctx.index, uid)
        if found is None:
            raise not_found(f"study {uid}")
        return Placement(study_instance_uid=uid, **found)

    return router
