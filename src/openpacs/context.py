"""Composition root: the only place that picks backends. Builds storage, index and services from Settings."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from .config import Settings
from .index.db import Index
from .services.activity import ActivityRecorder
from .services.audit import AuditService
from .services.auth import AuthService, OIDCValidator
from .services.departments import DepartmentService
from .services.ingest import IngestService
from .services.iocm import IOCMService
from .services.jobs import JobQueue
from .services.metrics import Monitor, SystemFigures
from .services.nodes import NodesService
from .services.qc import QCService
from .services.query import QueryService
from .services.reports import ReportService
from .services.retrieve import RetrieveService
from .services.routing import RoutingService
from .services.storage_policy import build_guard
from .storage import BlobStore, open_store

log = logging.getLogger(__name__)


@dataclass
class Context:
    settings: Settings
    store: BlobStore
    index: Index
    ingest: IngestService
    query: QueryService
    retrieve: RetrieveService
    auth: AuthService | None = None
    audit: AuditService | None = None
    departments: DepartmentService | None = None
    nodes: NodesService | None = None
    monitor: Monitor | None = None
    figures: SystemFigures | None = None
    started_at: float = 0.0
    reports: ReportService | None = None
    jobs: JobQueue | None = None
    routing: RoutingService | None = None
    iocm: IOCMService | None = None

    def close(self) -> None:
        if self.monitor is not None:
            self.monitor.close()  # the last counts go to the index before it closes
        if self.nodes is not None:
            self.nodes.close()
        if self.audit is not None:
            self.audit.close()
        if self.reports is not None:
            self.reports.close()
        self.ingest.close()
        self.index.close()


def build_context(settings: Settings, *, migrate: bool = True) -> Context:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    store = open_store(settings.resolved_storage_url, sync=settings.blob_sync, settings=settings)  # + tier_url
    index = Index(settings.resolved_index_url)
    if migrate:
        index.migrate()
    ingest = IngestService(settings, store, index)
    query = QueryService(settings, store, index)
    retrieve = RetrieveService(settings, store, index)
    auth, audit, departments = build_security(settings, index)
    ingest.classify_department = departments.classify
    nodes = NodesService(settings, index, ttl=settings.config_cache_seconds)
    monitor = Monitor(ActivityRecorder(index, settings.aet).start())
    ingest.monitor = monitor
    guard = build_guard(settings, store, index)
    if guard.enabled:
        ingest.guard = guard
    reports = ReportService(index, ingest)
    ingest.on_stored = reports.study_stored  # reports (ORU) waiting for their study are attached when it arrives
    reports.listeners.append(QCService(index).check_study)  # new studies reconciled with the RIS's orders
    iocm = IOCMService(index, ingest, store, settings, audit)
    ingest.on_stored = iocm.chain(ingest.on_stored)  # IOCM rejection notes (Key Object Selections) applied on arrival
    figures = SystemFigures(index, store)
    figures.guard = ingest.guard
    jobs = JobQueue(index, lease_seconds=settings.job_lease_seconds, backoff_base=settings.job_backoff_seconds,
                    backoff_cap=settings.job_backoff_max, default_attempts=settings.job_max_attempts)
    return Context(settings, store, index, ingest, query, retrieve, auth, audit, departments, nodes,
                   monitor=monitor, figures=figures, started_at=time.time(), reports=reports, jobs=jobs,
                   routing=RoutingService(index, settings, nodes), iocm=iocm)


def build_security(settings: Settings, index: Index) -> tuple[AuthService, AuditService, DepartmentService]:
    auth = AuthService(index, session_hours=settings.session_hours, token_days=settings.token_days,
                       cache_seconds=settings.config_cache_seconds)
    if settings.oidc_issuer:
        role_map = dict(p.split("=", 1) for p in settings.oidc_role_map.split(",") if "=" in p) or None
        auth.oidc = OIDCValidator(settings.oidc_issuer, settings.oidc_audience, settings.oidc_jwks_url,
                                  algorithms=[a.strip() for a in settings.oidc_algorithms.split(",")],
                                  role_claim=settings.oidc_role_claim, role_map=role_map,
                                  department_claim=settings.oidc_department_claim)
    audit = AuditService(index, node=settings.aet, spool_dir=settings.data_dir / "audit-spool",
                         syslog_url=settings.audit_syslog, syslog_ca=settings.audit_syslog_ca,
                         syslog_cert=settings.audit_syslog_cert, syslog_key=settings.audit_syslog_key)
    departments = DepartmentService(index, default=settings.default_department or None,
                                    reload_every=max(30.0, settings.config_cache_seconds))
    return auth, audit, departments
