"""API router: remote DICOM nodes (index nodes editable, TOML ``[remote_aes.*]`` read-only), their activity, C-ECHO."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from pydantic import BaseModel, ConfigDict, StrictBool
from starlette.responses import Response

from ...services import auth as authsvc
from ...services.auth import Principal
from ...services.nodes import Node, NodeConflict, NodeError, NodesService
from .common import need, not_found

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

    return router
