"""API router: statistics (the dashboard's one call), per-minute activity, system information, configuration, log.

``/api/stats`` and ``/api/stats/activity`` need the read right; the figures are counts, not patient data. The
recent failures (audit events with a failed outcome) come only to callers who may read the audit trail.
``/api/system`` (version, uptime, backends) needs read; ``/api/system/config`` and ``/api/system/log`` need admin
(web/auth.py ``api_policy``).
"""

from __future__ import annotations

import logging
import os
import platform
import socket
import sys
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel
from sqlalchemy import func, select
from starlette.concurrency import run_in_threadpool

from ... import __version__
from ...config import redact_url, redacted
from ...index.admin_schema import node_activity
from ...index.security_schema import audit_events
from ...logs import install_ring, ring
from ...services import auth as authsvc
from ...services.activity import series_per_minute
from ...services.auth import Principal
from ...services.metrics import live_values
from .common import bad, need

READER = Depends(need(authsvc.READ))
ADMINISTRATOR = Depends(need(authsvc.ADMIN))

CHART_METRICS = ("store", "query", "retrieve", "association_rejected", "error")


class Stats(BaseModel):
    patients: int
    studies: int
    series: int
    instances: int
    storage_used_bytes: int
    storage_total_bytes: int | None
    storage_free_bytes: int | None
    ingest_bytes_per_day: float
    days_until_full: float | None
    storage_min_free_bytes: int | None = None  # storage_min_free resolved in bytes (None: not set)
    storage_quota_bytes: int | None = None
    storage_refusing: str | None = None  # why new data is refused now (0xA700), None while it is accepted
    scrub_failures: int | None = None  # instances the last integrity scrub found missing or corrupt (services/scrub.py)
    scrub_last_at: datetime | None = None
    jobs: dict[str, int]
    associations_active: int
    http_requests_active: int
    last_24h: dict[str, int]
    failed_associations: list[dict[str, Any]]
    recent_failures: list[dict[str, Any]] | None
    security_alerts_24h: int | None
    generated_ms: float


def _stats(ctx: Any, with_audit: bool) -> dict[str, Any]:
    t0 = time.perf_counter()
    f = dict(ctx.figures.get())
    week = series_per_minute(ctx.index, ("store",), minutes=7 * 24 * 60)
    day = series_per_minute(ctx.index, CHART_METRICS, minutes=24 * 60)
    stored_bytes = week["metrics"]["store"]["bytes"]
    # the ingest rate over the days we have figures for (at least one hour, so a first burst does not dominate)
    first = next((i for i, v in enumerate(stored_bytes) if v), None)
    span_minutes = max(60, len(stored_bytes) - first) if first is not None else 0
    per_day = sum(stored_bytes) / span_minutes * 1440 if span_minutes else 0.0
    free = f["storage_free_bytes"]
    f["ingest_bytes_per_day"] = per_day
    f["days_until_full"] = (free / per_day) if (free is not None and per_day > 0) else None
    live = live_values()
    f["associations_active"] = max(0, int(live.get("openpacs_associations_active", 0)))
    f["http_requests_active"] = max(0, int(live.get("openpacs_http_requests_active", 0)) - 1)  # not this one
    f["last_24h"] = {m: sum(v["count"]) for m, v in day["metrics"].items()}
    with ctx.index.engine.connect() as c:
        rows = c.execute(select(node_activity.c.aet, node_activity.c.associations_rejected,
                                node_activity.c.last_connected_at, node_activity.c.last_address)
                         .where(node_activity.c.associations_rejected > 0)
                         .order_by(node_activity.c.last_connected_at.desc()).limit(10)).all()
        f["failed_associations"] = [{"aet": r.aet, "rejected": int(r.associations_rejected),
                                     "last_connected_at": r.last_connected_at, "last_address": r.last_address}
                                    for r in rows]
        if with_audit:
            since = datetime.now(UTC) - timedelta(hours=24)
            rows = c.execute(select(audit_events.c.id, audit_events.c.at, audit_events.c.event, audit_events.c.user,
                                    audit_events.c.source_address, audit_events.c.outcome, audit_events.c.detail)
                             .where(audit_events.c.outcome != 0, audit_events.c.at >= since)
                             .order_by(audit_events.c.id.desc()).limit(10)).all()
            f["recent_failures"] = [{"id": r.id, "at": r.at, "event": r.event, "user": r.user,
                                     "address": r.source_address, "outcome": r.outcome,
                                     "detail": (r.detail or "")[:300]} for r in rows]
            f["security_alerts_24h"] = int(c.execute(
                select(func.count()).select_from(audit_events)
                .where(audit_events.c.event == "SecurityAlert", audit_events.c.at >= since)).scalar_one())
        else:
            f["recent_failures"] = None
            f["security_alerts_24h"] = None
    f["generated_ms"] = round((time.perf_counter() - t0) * 1000, 2)
    return f


class Activity(BaseModel):
    start: int  # Unix time of the first bucket
    step: int  # seconds per bucket
    metrics: dict[str, dict[str, list[int]]]


class SystemInfo(BaseModel):
    version: str
    aet: str
    node: str
    started_at: datetime
    uptime_seconds: float
    python: str
    platform: str
    pid: int
    dicom_workers: int
    index_backend: str
    index_url: str
    storage_backend: str
    storage_url: str
    auth_enabled: bool
    ports: dict[str, int]


def build_router(ctx: Any) -> APIRouter:
    router = APIRouter(tags=["system"])
    install_ring()

    @router.get("/stats", response_model=Stats, summary="Dashboard figures: counts, storage, activity, failures")
    async def stats(p: Principal = READER) -> Stats:
        with_audit = authsvc.AUDIT in p.rights or authsvc.ADMIN in p.rights
        return Stats(**await run_in_threadpool(_stats, ctx, with_audit))

    @router.get("/stats/activity", response_model=Activity, summary="Events per time bucket over the last hours")
    async def activity(hours: int = Query(24, ge=1, le=24 * 7, description="how far back (1-168 h)"),
                       step: int = Query(300, ge=60, le=3600, description="bucket size in seconds (60-3600)"),
                       metrics: str = Query(",".join(CHART_METRICS), description="comma-separated metrics"),
                       p: Principal = READER) -> Activity:
        wanted = tuple(m.strip() for m in metrics.split(",") if m.strip())
        unknown = [m for m in wanted if m not in (*CHART_METRICS, "association", "http")]
        if unknown or not wanted:
            raise bad(f"metrics: unknown {', '.join(unknown) or '(none)'}; known: "
                      f"{', '.join((*CHART_METRICS, 'association', 'http'))}")
        if step % 60:
            raise bad("step: a whole number of minutes (a multiple of 60)")
        per = step // 60
        minutes = hours * 60 // per * per
        raw = await run_in_threadpool(series_per_minute, ctx.index, wanted, minutes)
        out: dict[str, dict[str, list[int]]] = {}
        for m, v in raw["metrics"].items():
            out[m] = {k: [sum(v[k][i:i + per]) for i in range(0, minutes, per)] for k in ("count", "bytes")}
        return Activity(start=raw["start"], step=step, metrics=out)

    @router.get("/system", response_model=SystemInfo, summary="Version, uptime, backends and ports of this node")
    def system(request: Request, p: Principal = READER) -> SystemInfo:
        s = ctx.settings
        index_url = redact_url(s.resolved_index_url)
        storage_url = redact_url(s.resolved_storage_url)
        started = getattr(ctx, "started_at", 0.0) or time.time()
        ports = {"dicom": s.dicom_port, "http": s.http_port, "hl7": s.hl7_port}
        if s.tls_cert and s.dicom_tls_port:
            ports["dicom_tls"] = s.dicom_tls_port
        return SystemInfo(
            version=__version__, aet=s.aet, node=socket.gethostname(),
            started_at=datetime.fromtimestamp(started, UTC), uptime_seconds=round(time.time() - started, 1),
            python=sys.version.split()[0], platform=platform.platform(), pid=os.getpid(),
            dicom_workers=s.worker_count,
            index_backend="PostgreSQL" if index_url.startswith("postgresql") else "SQLite", index_url=index_url,
            storage_backend=storage_url.split(":", 1)[0], storage_url=storage_url,
            auth_enabled=bool(s.auth_enabled), ports=ports)

    @router.get("/system/config", summary="Effective configuration, secrets redacted (admin)")
    def config(p: Principal = ADMINISTRATOR) -> dict[str, Any]:
        return redacted(ctx.settings)

    @router.get("/system/log", summary="Recent lines of this process's log (admin); poll with after=<last seq>")
    def log(after: int = Query(0, ge=0), level: str = Query("INFO", description="DEBUG, INFO, WARNING, ERROR"),
            limit: int = Query(500, ge=1, le=2000), p: Principal = ADMINISTRATOR) -> dict[str, Any]:
        lvl = logging.getLevelName(level.upper())
        if not isinstance(lvl, int):
            raise bad("level: one of DEBUG, INFO, WARNING, ERROR")
        items = ring.since(after, lvl, limit)
        return {"items": items, "last": items[-1]["seq"] if items else after}

    return router
