"""API router: remote DICOM nodes (index nodes editable, TOML ``[remote_aes.*]`` read-only), their activity, C-ECHO;
query/retrieve from remote archives (DICOM nodes and ``[remote_dicomweb.*]`` peers, services/remote_qr.py)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from pydantic import BaseModel, ConfigDict, Field, StrictBool
from starlette.responses import JSONResponse, Response

from ...services import auth as authsvc
from ...services import remote_qr
from ...services.auth import Principal
from ...services.nodes import Node, NodeConflict, NodeError, NodesService
from .common import need, not_found
from .jobs import JobOut

READER = Depends(need(authsvc.READ))
ADMINISTRATOR = Depends(need(authsvc.ADMIN))

class NodeIn(BaseModel):
    """A node to add, or the fields to change (PUT: the fields given replace the stored ones)."""

    model_config = ConfigDict(extra="forbid")
    name: str | None = None
    aet: str | None = None
    host: str | None = None
    port: int | str | None = None
    kind: str | None = None
    allow: list[str] | str | None = None
    departments: list[str] | None = None
    tls: StrictBool | None = None
    description: str | None = None


class NodeOut(BaseModel):
    name: str
    aet: str
    host: str
    port: int
    kind: str
    allow: list[str]
    departments: list[str] | None
    tls: bool
    description: str
    source: str
    editable: bool
    activity: dict[str, Any]


class EchoOut(BaseModel):
    node: str
    ok: bool
    status: int | None
    ms: float | None
    total_ms: float
    detail: str
    at: datetime


class RemoteArchiveOut(BaseModel):
    name: str
    protocol: str = Field(..., description="dimse (C-FIND, C-MOVE/C-GET) or dicomweb (QIDO-RS, WADO-RS)")
    address: str
    methods: list[str]


class RetrieveIn(BaseModel):
    """What to fetch from the remote into this archive: ``uids`` at ``level`` (or the single UID / Patient ID of that
    level given by its keyword), with the study (and series) above for series and instances."""

    model_config = ConfigDict(extra="forbid")
    level: str = Field("STUDY", description="PATIENT, STUDY, SERIES or IMAGE (INSTANCE)")
    uids: list[str] = Field(default_factory=list, max_length=1000)
    PatientID: str | None = None
    StudyInstanceUID: str | None = None
    SeriesInstanceUID: str | None = None
    method: str | None = Field(None, description="move (C-MOVE to our AE title, the default) or get (C-GET) for a "
                                                 "DICOM node; wado (WADO-RS) for a DICOMweb peer")
    priority: int = Field(0, ge=-100, le=100)


def _activity(row: dict[str, Any] | None) -> dict[str, Any]:
    keys = ("last_connected_at", "last_address", "associations", "associations_rejected", "instances_received",
            "bytes_received", "instances_sent", "bytes_sent", "queries", "last_echo_at", "last_echo_ok", "last_echo_ms")
    row = row or {}
    return {k: row.get(k) for k in keys}


def node_out(n: Node, activity: dict[str, dict[str, Any]]) -> NodeOut:
    return NodeOut(name=n.name, aet=n.aet, host=n.host, port=n.port, kind=n.kind, allow=list(n.allow),
                   departments=list(n.departments) if n.departments is not None else None, tls=n.tls,
                   description=n.description, source=n.source, editable=n.editable,
                   activity=_activity(activity.get(n.aet)))


def build_router(ctx: Any) -> APIRouter:
    router = APIRouter(tags=["nodes"])

    def svc() -> NodesService:
        if ctx.nodes is None:
            raise HTTPException(404, "remote nodes are not available on this node")
        return ctx.nodes  # type: ignore[no-any-return]

    def alert(request: Request, p: Principal, detail: str) -> None:
        if ctx.audit is not None:  # Security Alert, Network Configuration (DCM 110128)
            ctx.audit.record("SecurityAlert", user=p.name, role=p.role, protocol="HTTP", event_type="110128",
                             source_address=request.scope.get("openpacs.client", ""), detail=detail)

    def one(name: str) -> Node:
        n = svc().get(name)
        if n is None:
            raise not_found(f"node {name!r}")
        return n

    @router.get("/nodes", response_model=list[NodeOut], summary="Remote nodes with their activity")
    def list_nodes(p: Principal = READER) -> list[NodeOut]:
        nodes = svc().list()
        act = svc().activity(n.aet for n in nodes)
        return [node_out(n, act) for n in nodes]

    @router.post("/nodes", response_model=NodeOut, status_code=201, summary="Add a remote node",
                 responses={400: {"description": "invalid node"}, 409: {"description": "name taken"}})
    def add_node(spec: NodeIn, request: Request, p: Principal = ADMINISTRATOR) -> NodeOut:
        try:
            n = svc().add(spec.model_dump(exclude_unset=True))
        except NodeError as e:
            raise HTTPException(400, str(e)) from None
        except NodeConflict as e:
            raise HTTPException(409, str(e)) from None
        alert(request, p, f"remote node {n.name!r} added: {n.aet}@{n.host}:{n.port} allow {','.join(n.allow)}")
        return node_out(n, svc().activity([n.aet]))

    @router.get("/nodes/{name}", response_model=NodeOut, summary="One remote node")
    def get_node(name: str, p: Principal = READER) -> NodeOut:
        n = one(name)
        return node_out(n, svc().activity([n.aet]))

    @router.put("/nodes/{name}", response_model=NodeOut, summary="Change a remote node (TOML nodes: 409)",
                responses={400: {"description": "invalid"}, 404: {"description": "unknown"},
                           409: {"description": "read-only or name taken"}})
    def put_node(name: str, spec: NodeIn, request: Request, p: Principal = ADMINISTRATOR) -> NodeOut:
        try:
            n = svc().update(name, spec.model_dump(exclude_unset=True))
        except NodeError as e:
            raise HTTPException(400, str(e)) from None
        except NodeConflict as e:
            raise HTTPException(409, str(e)) from None
        if n is None:
            raise not_found(f"node {name!r}")
        alert(request, p, f"remote node {name!r} changed: {n.name} {n.aet}@{n.host}:{n.port} allow {','.join(n.allow)}")
        return node_out(n, svc().activity([n.aet]))

    @router.delete("/nodes/{name}", status_code=204, summary="Remove a remote node (TOML nodes: 409)",
                   responses={404: {"description": "unknown"}, 409: {"description": "read-only"}})
    def delete_node(name: str, request: Request, p: Principal = ADMINISTRATOR) -> Response:
        try:
            ok = svc().remove(name)
        except NodeConflict as e:
            raise HTTPException(409, str(e)) from None
        if not ok:
            raise not_found(f"node {name!r}")
        alert(request, p, f"remote node {name!r} removed")
        return Response(status_code=204)

    @router.post("/nodes/{name}/echo", response_model=EchoOut, summary="C-ECHO the node: result and round-trip time")
    def echo_node(name: str, p: Principal = ADMINISTRATOR) -> EchoOut:
        n = one(name)
        r = svc().echo(n)
        return EchoOut(node=n.name, ok=r.ok, status=r.status, ms=r.ms, total_ms=r.total_ms, detail=r.detail, at=r.at)

    # -- query/retrieve from remote archives -------------------------------------------------------------------
    def remote(name: str) -> remote_qr.Remote:
        r = remote_qr.find_remote(ctx.settings, name)
        if r is None:
            raise not_found(f"remote node {name!r}")
        return r

    def audit(event: str, request: Request, p: Principal, **kw: Any) -> None:
        if ctx.audit is not None:
            ctx.audit.record(event, principal=p, protocol="API", source_address=request.scope.get("openpacs.client", ""),
                             **kw)

    def search(name: str, level: str, request: Request, p: Principal, path: dict[str, str]) -> Response:
        r = remote(name)
        try:
            q = remote_qr.build_query(level, list(request.query_params.multi_items()), path)
        except remote_qr.RemoteQueryError as e:
            raise HTTPException(400, str(e)) from None
        try:
            found, more = remote_qr.query(ctx.settings, r, q)
        except remote_qr.RemoteUnavailable as e:
            audit("Query", request, p, outcome=4, destination=r.name, query=str(request.url.query)[:1000],
                  detail=f"remote {level.lower()} query on {r.name} failed: {e}")
            raise HTTPException(504 if e.timeout else 502, f"{r.name} ({r.describe()}): {e}") from None
        audit("Query", request, p, destination=r.name, query=str(request.url.query)[:1000],
              detail=f"remote {level.lower()} query on {r.name} ({r.protocol}): {len(found)} match(es)")
        headers = {"X-Result-Truncated": "true"} if more else {}
        return JSONResponse(found, headers=headers)

    q_responses: dict[int | str, dict[str, Any]] = {
        400: {"description": "invalid query key or value"}, 404: {"description": "unknown node"},
        502: {"description": "the remote failed or cannot be reached"}, 504: {"description": "the remote timed out"}}

    @router.get("/remote-archives", response_model=list[RemoteArchiveOut],
                summary="Remote archives that can be queried: DICOM nodes and DICOMweb peers")
    def remote_archives(p: Principal = READER) -> list[RemoteArchiveOut]:
        return [RemoteArchiveOut(name=r.name, protocol=r.protocol, address=r.describe(), methods=list(r.methods))
                for r in remote_qr.remotes(ctx.settings).values()]

    @router.get("/nodes/{name}/patients", summary="C-FIND (Patient Root) on a remote node: DICOM JSON",
                responses=q_responses)
    def remote_patients(name: str, request: Request, p: Principal = READER) -> Response:
        return search(name, "PATIENT", request, p, {})

    @router.get("/nodes/{name}/studies", summary="Studies on a remote node (C-FIND or QIDO-RS), QIDO-RS keys: DICOM JSON",
                responses=q_responses)
    def remote_studies(name: str, request: Request, p: Principal = READER) -> Response:
        return search(name, "STUDY", request, p, {})

    @router.get("/nodes/{name}/studies/{study}/series", summary="Series of a study on a remote node: DICOM JSON",
                responses=q_responses)
    def remote_series(name: str, study: str, request: Request, p: Principal = READER) -> Response:
        return search(name, "SERIES", request, p, {"StudyInstanceUID": study})

    @router.get("/nodes/{name}/studies/{study}/series/{series}/instances",
                summary="Instances of a series on a remote node: DICOM JSON", responses=q_responses)
    def remote_instances(name: str, study: str, series: str, request: Request, p: Principal = READER) -> Response:
        return search(name, "IMAGE", request, p, {"StudyInstanceUID": study, "SeriesInstanceUID": series})

    @router.post("/nodes/{name}/retrieve", response_model=JobOut, status_code=202,
                 summary="Retrieve from a remote node into this archive (C-MOVE, C-GET or WADO-RS): a job",
                 responses={400: {"description": "invalid request"}, 404: {"description": "unknown node"}})
    def retrieve(name: str, body: RetrieveIn, request: Request, p: Principal = ADMINISTRATOR) -> JobOut:
        r = remote(name)
        level = body.level.upper()
        uids = list(body.uids)
        single = {"PATIENT": body.PatientID, "STUDY": body.StudyInstanceUID, "SERIES": body.SeriesInstanceUID}
        if not uids and single.get(level):
            uids = [str(single[level])]
        try:
            req = remote_qr.validate_request(r, level, uids, body.StudyInstanceUID or "", body.SeriesInstanceUID or "",
                                             body.method)
        except remote_qr.RemoteQueryError as e:
            raise HTTPException(400, str(e)) from None
        if ctx.jobs is None:
            raise HTTPException(503, "the job queue is not available on this node")
        job = remote_qr.submit_retrieve(ctx.jobs, r, req, priority=body.priority, user=p.name)
        audit("BeginTransferring", request, p, source_aet=r.ae.aet if r.ae is not None else "",
              destination=ctx.settings.aet,
              study_uids=req.uids if req.level == "STUDY" else ([req.study] if req.study else []),
              patient_id=req.uids[0] if req.level == "PATIENT" else "",
              detail=f"retrieve job {job.id}: {req.level.lower()} {', '.join(req.uids[:3])} from {r.name} by "
                     f"{req.method}")
        return JobOut(**{k: getattr(job, k) for k in JobOut.model_fields})

    return router
