"""API router: the durable job queue (services/jobs.py): list, detail with the instances the peer refused and its
status codes, actions (cancel, pause, resume, resubmit, priority), and the send requests that submit jobs."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Query
from pydantic import BaseModel, Field
from sqlalchemy import select

from ...index.schema import jobs
from ...services import auth as authsvc
from ...services import jobs as jobsvc
from ...services.auth import Principal
from .common import Page, bad, decode_cursor, encode_cursor, limit_param, need, not_found

STATES = jobsvc.STATES
ACTIONS = ("cancel", "pause", "resume", "resubmit")


READER = Depends(need(authsvc.READ))
EXPORTER = Depends(need(authsvc.EXPORT))
ADMINISTRATOR = Depends(need(authsvc.ADMIN))

class JobOut(BaseModel):
    id: int
    kind: str
    state: str
    progress: float
    error: str | None
    owner: str | None
    payload: Any
    created_at: datetime | None
    updated_at: datetime | None
    priority: int = 0
    attempts: int = 0
    max_attempts: int = 0
    destination: str | None = None
    done: int = 0
    failed: int = 0
    total: int = 0
    bytes: int = 0
    not_before: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None


class ItemOut(BaseModel):
    sop_instance_uid: str
    state: str
    status: int | None = Field(None, description="the peer's DIMSE status (e.g. 42752 = 0xA700)")
    error: str | None = None


class JobDetail(JobOut):
    failed_items: list[ItemOut] = []


class SendRequest(BaseModel):
    destination: str = Field(..., min_length=1, max_length=64,
                             description="a node name or its AE title (C-STORE), or a [remote_dicomweb] peer (STOW-RS)")
    priority: int = Field(0, ge=-100, le=100)
    associations: int | None = Field(None, ge=1, le=16, description="default: the node's max_associations")
    commit: bool = Field(False, description="ask the DICOM node for storage commitment: the job is done only once "
                                            "the peer has committed every instance")


class InstancesSend(SendRequest):
    uids: list[str] = Field(..., min_length=1, max_length=10000)


class PriorityIn(BaseModel):
    priority: int = Field(..., ge=-100, le=100)


def _out(r: Any) -> JobOut:
    try:
        payload = json.loads(r.payload) if r.payload else None
    except ValueError:
        payload = r.payload
    return JobOut(id=r.id, kind=r.kind, state=r.state, progress=r.progress or 0.0, error=r.error, owner=r.owner,
                  payload=payload, created_at=r.created_at, updated_at=r.updated_at, priority=r.priority,
                  attempts=r.attempts, max_attempts=r.max_attempts, destination=r.destination, done=r.done,
                  failed=r.failed, total=r.total, bytes=r.bytes, not_before=r.not_before, started_at=r.started_at,
                  finished_at=r.finished_at)


def _job_out(j: jobsvc.Job) -> JobOut:
    return JobOut(**{k: getattr(j, k) for k in JobOut.model_fields})


def build_router(ctx: Any) -> APIRouter:
    router = APIRouter(tags=["jobs"])

    @router.get("/jobs", response_model=Page, summary="Jobs, newest first (keyset pages)")
    def list_jobs(
        state: str | None = Query(None, description=f"one of {', '.join(STATES)}"),
        kind: str | None = Query(None, max_length=64),
        limit: int = limit_param(),
        cursor: str | None = Query(None),
        p: Principal = READER,
    ) -> Page:
        if state and state not in STATES:
            raise bad(f"state: one of {', '.join(STATES)}")
        key = decode_cursor(cursor, 1)
        stmt = select(jobs)
        if state:
            stmt = stmt.where(jobs.c.state == state)
        if kind:
            stmt = stmt.where(jobs.c.kind == kind)
        if key is not None:
            if not isinstance(key[0], int):
                raise bad("cursor: not a cursor returned by this API")
            stmt = stmt.where(jobs.c.id < key[0])
        stmt = stmt.order_by(jobs.c.id.desc()).limit(limit + 1)
        with ctx.index.engine.connect() as c:
            rows = c.execute(stmt).all()
        items = [_out(r) for r in rows[:limit]]
        return Page(items=items, next=encode_cursor([items[-1].id]) if len(rows) > limit else None)

    @router.get("/jobs/{job_id}", response_model=JobDetail, summary="One job, with its failed instances")
    def get_job(job_id: int, p: Principal = READER) -> JobDetail:
        if not 1 <= job_id < 2**63:
            raise bad("job_id: an integer from 1 to 2^63-1")
        with ctx.index.engine.connect() as c:
            r = c.execute(select(jobs).where(jobs.c.id == job_id)).first()
        if r is None:
            raise not_found(f"job {job_id}")
        failed = [ItemOut(sop_instance_uid=i.sop_instance_uid, state=i.state, status=i.status, error=i.error)
                  for i in ctx.jobs.items(job_id, jobsvc.ITEM_FAILED, limit=1000)]
        return JobDetail(**_out(r).model_dump(), failed_items=failed)

    @router.post("/jobs/{job_id}/{action}", response_model=JobOut, summary="cancel, pause, resume or resubmit")
    def act(job_id: int, action: str, p: Principal = EXPORTER) -> JobOut:
        if action not in ACTIONS:
            raise not_found(f"action {action!r} (one of {', '.join(ACTIONS)})")
        try:
            return _job_out(getattr(ctx.jobs, action)(job_id))
        except jobsvc.JobError as e:
            if "does not exist" in str(e):
                raise not_found(f"job {job_id}") from None
            raise HTTPException(409, str(e)) from None

    @router.put("/jobs/{job_id}/priority", response_model=JobOut, summary="Change a job's priority")
    def priority(job_id: int, body: PriorityIn, p: Principal = EXPORTER) -> JobOut:
        try:
            return _job_out(ctx.jobs.set_priority(job_id, body.priority))
        except jobsvc.JobError:
            raise not_found(f"job {job_id}") from None

    def _send(level: str, uids: list[str], body: SendRequest, p: Principal) -> JobOut:
        kind = jobsvc.destination_kind(ctx.settings, body.destination)  # TOML + index nodes, DICOMweb peers
        if kind is None:
            raise not_found(f"destination {body.destination!r} (no such node or DICOMweb peer)")
        if body.commit and kind != "send":
            raise bad(f"commit: storage commitment applies to DICOM nodes; {body.destination!r} is a DICOMweb peer")
        try:
            job = jobsvc.submit_send(ctx, body.destination, level, uids, priority=body.priority,
                                     associations=body.associations, departments=p.departments,
                                     commit=body.commit)
        except jobsvc.JobError as e:
            raise not_found(str(e)) from None
        except Exception as e:  # QueryError: a UID the retrieve refuses
            raise bad(str(getattr(e, "message", e))) from None
        if ctx.audit is not None:
            ctx.audit.record("BeginTransferring", principal=p, protocol="API", destination=body.destination,
                             study_uids=uids if level == "STUDY" else [],
                             patient_id=uids[0] if level == "PATIENT" else "",
                             detail=f"send job {job.id}: {job.total} instance(s) of {level.lower()} to "
                                    f"{body.destination}")
        return _job_out(job)

    @router.post("/studies/{uid}/send", response_model=JobOut, status_code=202, summary="Send a study to a node")
    def send_study(uid: str, body: SendRequest, p: Principal = EXPORTER) -> JobOut:
        return _send("STUDY", [uid], body, p)

    @router.post("/series/{uid}/send", response_model=JobOut, status_code=202, summary="Send a series to a node")
    def send_series(uid: str, body: SendRequest, p: Principal = EXPORTER) -> JobOut:
        return _send("SERIES", [uid], body, p)

    @router.post("/patients/{patient_id}/send", response_model=JobOut, status_code=202,
                 summary="Send every study of a patient to a node")
    def send_patient(patient_id: str, body: SendRequest, p: Principal = EXPORTER) -> JobOut:
        return _send("PATIENT", [patient_id], body, p)

    @router.post("/instances/send", response_model=JobOut, status_code=202, summary="Send instances to a node")
    def send_instances(body: InstancesSend, p: Principal = EXPORTER) -> JobOut:
        return _send("IMAGE", body.uids, body, p)

    return router
