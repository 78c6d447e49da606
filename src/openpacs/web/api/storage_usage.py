"""API router: storage management — usage by patient, study, modality, department and day; compression at rest;
retention rules, their dry-run preview and runs; study protection; the integrity scrub.

Everything here needs ``admin``. Changes (rules, protection) and the jobs started by hand are audited; the jobs
audit what they do (retention: DICOM Study Deleted per study; scrub: a Security Alert when it finds damage).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Query
from pydantic import BaseModel
from sqlalchemy import distinct, func, select

from ...index.schema import instances, patients, series, studies
from ...services import auth as authsvc
from ...services.auth import Principal
from ...services.compression import CODECS
from ...services.retention import RetentionError
from ...services.storage_schedule import for_context
from .common import need, not_found

ADMINISTRATOR = Depends(need(authsvc.ADMIN))
BY = ("patient", "study", "modality", "department", "day")


class UsageRow(BaseModel):
    key: str
    label: str = ""
    studies: int = 0
    instances: int = 0
    bytes: int = 0
    extra: dict[str, Any] = {}


class Usage(BaseModel):
    by: str
    items: list[UsageRow]
    total_bytes: int
    total_instances: int
    total_studies: int
    storage_total_bytes: int | None = None
    storage_free_bytes: int | None = None
    storage_min_free_bytes: int | None = None
    storage_quota_bytes: int | None = None
    storage_refusing: str | None = None


class JobRef(BaseModel):
    job_id: int | None
    kind: str
    items: int = 0
    detail: str = ""


class RulesIn(BaseModel):
    rules: list[dict[str, Any]]


def _day(v: Any) -> str:
    if isinstance(v, datetime):
        return v.astimezone(UTC).date().isoformat() if v.tzinfo else v.date().isoformat()
    return str(v)[:10] if v is not None else ""


def usage(ctx: Any, by: str, limit: int) -> dict[str, Any]:
    """Bytes and counts grouped by ``by``, largest first (by day: newest first)."""
    with ctx.index.engine.connect() as c:
        n_studies, n_instances, total = c.execute(select(
            func.count(), func.coalesce(func.sum(studies.c.num_instances), 0),
            func.coalesce(func.sum(studies.c.size_bytes), 0)).select_from(studies)).one()
        items: list[dict[str, Any]] = []
        if by == "patient":
            size = func.coalesce(func.sum(studies.c.size_bytes), 0)
            rows = c.execute(select(patients.c.id, patients.c.patient_id, patients.c.patient_name, func.count(),
                                    func.coalesce(func.sum(studies.c.num_instances), 0), size)
                             .select_from(patients.join(studies, studies.c.patient_fk == patients.c.id))
                             .group_by(patients.c.id, patients.c.patient_id, patients.c.patient_name)
                             .order_by(size.desc(), patients.c.id).limit(limit)).all()
            items = [{"key": r[1], "label": r[2] or "", "studies": int(r[3]), "instances": int(r[4]),
                      "bytes": int(r[5])} for r in rows]
        elif by == "study":
            rows = c.execute(select(studies.c.study_instance_uid, studies.c.study_description, studies.c.study_date,
                                    studies.c.modalities_in_study, studies.c.department, studies.c.num_instances,
                                    studies.c.size_bytes, studies.c.protected, patients.c.patient_id,
                                    patients.c.patient_name)
                             .select_from(studies.join(patients, studies.c.patient_fk == patients.c.id))
                             .order_by(studies.c.size_bytes.desc(), studies.c.id).limit(limit)).all()
            items = [{"key": r[0], "label": r[1] or "", "studies": 1, "instances": int(r[5]), "bytes": int(r[6]),
                      "extra": {"study_date": r[2] or "", "modalities": r[3] or "", "department": r[4] or "",
                                "protected": bool(r[7]), "patient_id": r[8], "patient_name": r[9] or ""}}
                     for r in rows]
        elif by == "modality":
            size = func.coalesce(func.sum(series.c.size_bytes), 0)
            mod = func.coalesce(series.c.modality, "")
            rows = c.execute(select(mod, func.count(distinct(series.c.study_fk)),
                                    func.coalesce(func.sum(series.c.num_instances), 0), size)
                             .group_by(mod).order_by(size.desc()).limit(limit)).all()
            items = [{"key": r[0], "studies": int(r[1]), "instances": int(r[2]), "bytes": int(r[3])} for r in rows]
        elif by == "department":
            size = func.coalesce(func.sum(studies.c.size_bytes), 0)
            dep = func.coalesce(studies.c.department, "")
            rows = c.execute(select(dep, func.count(), func.coalesce(func.sum(studies.c.num_instances), 0), size)
                             .group_by(dep).order_by(size.desc()).limit(limit)).all()
            items = [{"key": r[0], "label": r[0] or "(none)", "studies": int(r[1]), "instances": int(r[2]),
                      "bytes": int(r[3])} for r in rows]
        else:  # day of arrival
            day = func.date(instances.c.received_at)
            size = func.coalesce(func.sum(instances.c.size_bytes), 0)
            rows = c.execute(select(day, func.count(distinct(series.c.study_fk)), func.count(), size)
                             .select_from(instances.join(series, instances.c.series_fk == series.c.id))
                             .group_by(day).order_by(day.desc()).limit(limit)).all()
            items = [{"key": _day(r[0]), "studies": int(r[1]), "instances": int(r[2]), "bytes": int(r[3])}
                     for r in rows]
    f = ctx.figures.get() if getattr(ctx, "figures", None) is not None else {}
    return {"by": by, "items": items, "total_bytes": int(total), "total_instances": int(n_instances),
            "total_studies": int(n_studies), "storage_total_bytes": f.get("storage_total_bytes"),
            "storage_free_bytes": f.get("storage_free_bytes"), "storage_min_free_bytes": f.get("storage_min_free_bytes"),
            "storage_quota_bytes": f.get("storage_quota_bytes"), "storage_refusing": f.get("storage_refusing")}


def build_router(ctx: Any) -> APIRouter:
    r = APIRouter(tags=["storage"])
    svc = for_context(ctx)  # the scrub figures join the dashboard's now

    def audit(p: Principal, detail: str, event_type: str = "110132", **kw: Any) -> None:
        if ctx.audit is not None:
            ctx.audit.record("SecurityAlert", principal=p, protocol="API", event_type=event_type, detail=detail, **kw)

    @r.get("/storage/usage", response_model=Usage, summary="Storage used by patient, study, modality, department or day")
    def get_usage(by: str = Query("modality", description="patient | study | modality | department | day"),
                  limit: int = Query(50, ge=1, le=1000), p: Principal = ADMINISTRATOR) -> dict[str, Any]:
        if by not in BY:
            raise HTTPException(400, f"by: one of {', '.join(BY)}")
        return usage(ctx, by, limit)

    # -- compression -----------------------------------------------------------------------------------------------
    @r.get("/storage/compression", summary="Compression at rest: policy, instances compressed, bytes saved")
    def compression_summary(p: Principal = ADMINISTRATOR) -> dict[str, Any]:
        return svc.compression.summary()

    @r.post("/storage/compress", response_model=JobRef, status_code=202,
            summary="Queue a compress job of the instances due now (or of all natively encoded ones: all=true)")
    def compress_now(codec: str | None = Query(None, description=", ".join(CODECS)),
                     all: bool = Query(False, description="ignore compress_after_days"),  # noqa: A002
                     limit: int = Query(1000, ge=1, le=100000), p: Principal = ADMINISTRATOR) -> dict[str, Any]:
        codec = codec or ctx.settings.compress
        if codec not in CODECS:
            raise HTTPException(400, f"codec: one of {', '.join(CODECS)} (no compress policy is set)")
        rows = svc.compression.eligible(limit, after_days=0 if all else None)
        job = svc.compression.submit(rows, codec=codec, user=p.name) if rows else None
        audit(p, f"compression ({codec}) of {len(rows)} instance(s) queued" + (f": job {job.id}" if job else ""))
        return {"job_id": job.id if job else None, "kind": "compress", "items": len(rows),
                "detail": "nothing to compress" if job is None else f"{len(rows)} instance(s)"}

    # -- scrub ---------------------------------------------------------------------------------------------------------
    @r.post("/storage/scrub", response_model=JobRef, status_code=202, summary="Start an integrity scrub now")
    def scrub_now(p: Principal = ADMINISTRATOR) -> dict[str, Any]:
        job = svc.scrub.submit(user=p.name)
        audit(p, f"integrity scrub started: job {job.id}")
        return {"job_id": job.id, "kind": "scrub"}

    @r.get("/storage/scrub", summary="What the last integrity scrub found")
    def scrub_results(limit: int = Query(100, ge=1, le=1000), p: Principal = ADMINISTRATOR) -> dict[str, Any]:
        last = ctx.jobs.list_jobs(kind="scrub", limit=1)
        job = last[0] if last else None
        return {**svc.scrub.figures(), "failures": svc.scrub.failures(limit),
                "last_job": None if job is None else {"id": job.id, "state": job.state,
                                                      "result": job.payload.get("result"),
                                                      "finished_at": job.finished_at}}

    # -- retention -----------------------------------------------------------------------------------------------------
    @r.get("/retention/rules", summary="Retention rules (TOML rules are read-only)")
    def get_rules(p: Principal = ADMINISTRATOR) -> dict[str, Any]:
        try:
            return {"rules": [x.as_dict() for x in svc.retention.rules()]}
        except RetentionError as e:
            raise HTTPException(500, str(e)) from None

    @r.put("/retention/rules", summary="Replace the retention rules kept in the index")
    def put_rules(body: RulesIn, p: Principal = ADMINISTRATOR) -> dict[str, Any]:
        try:
            rules = svc.retention.set_rules(body.rules)
        except RetentionError as e:
            raise HTTPException(400, str(e)) from None
        audit(p, f"retention rules set: {', '.join(x.name for x in rules) or '(none)'}", event_type="110131")
        return {"rules": [x.as_dict() for x in svc.retention.rules()]}

    @r.get("/retention/preview", summary="Dry run: the studies a retention run would delete now")
    def preview(limit: int = Query(1000, ge=1, le=10000), p: Principal = ADMINISTRATOR) -> dict[str, Any]:
        try:
            return svc.retention.preview(limit)
        except RetentionError as e:
            raise HTTPException(400, str(e)) from None

    @r.post("/retention/run", response_model=JobRef, status_code=202,
            summary="Queue a retention job of what the preview chooses now")
    def run_retention(p: Principal = ADMINISTRATOR) -> dict[str, Any]:
        job = svc.retention.submit(user=p.name)
        audit(p, "retention run: nothing to delete" if job is None
              else f"retention run queued: job {job.id}, {job.total} study(ies)",
              study_uids=[] if job is None else list(job.payload.get("reasons", {}))[:50])
        return {"job_id": job.id if job else None, "kind": "retention", "items": job.total if job else 0}

    # -- protection ----------------------------------------------------------------------------------------------------
    def set_protected(uid: str, value: bool, p: Principal) -> dict[str, Any]:
        if not svc.retention.protect(uid, value):
            raise not_found(f"study {uid}")
        if ctx.audit is not None:
            ctx.audit.record("PatientRecord", principal=p, protocol="API", study_uids=[uid],
                             detail=f"study {'protected from' if value else 'no longer protected from'} retention")
        return {"study_instance_uid": uid, "protected": value}

    @r.post("/studies/{uid}/protect", summary="Protect a study from retention rules")
    def protect(uid: str, p: Principal = ADMINISTRATOR) -> dict[str, Any]:
        return set_protected(uid, True, p)

    @r.post("/studies/{uid}/unprotect", summary="Remove a study's retention protection")
    def unprotect(uid: str, p: Principal = ADMINISTRATOR) -> dict[str, Any]:
        return set_protected(uid, False, p)

    return r
