"""API router: auto-routing rules (services/routing.py). Reading needs ``read``; adding, changing and removing a
rule needs ``admin`` and is a Security Alert / Network Configuration audit event (DCM 110128), as node changes are.
TOML ``[[routes]]`` rules are listed but read-only (409). The dry run shows which rules a stored study would trigger.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from pydantic import BaseModel, ConfigDict
from starlette.responses import Response

from ...services import auth as authsvc
from ...services.auth import Principal
from ...services.routing import RouteConflict, RouteError, RoutingService, Rule
from .common import need, not_found

READER = Depends(need(authsvc.READ))
ADMINISTRATOR = Depends(need(authsvc.ADMIN))


class RuleIn(BaseModel):
    """A rule (POST: name and destinations required; PUT: the fields given replace the stored ones)."""

    model_config = ConfigDict(extra="forbid")
    name: str | None = None
    enabled: bool | None = None
    destinations: list[str] | str | None = None
    conditions: list[dict[str, Any]] | None = None
    match: str | None = None
    trigger: str | None = None
    stable_seconds: float | None = None
    schedule: list[str] | str | None = None
    days: list[str] | str | None = None
    transfer_syntax: str | None = None
    commit: bool | None = None
    priority: int | None = None
    description: str | None = None
    # prefetch rules (kind = "prefetch")
    kind: str | None = None
    sources: list[str] | str | None = None
    on: list[str] | str | None = None
    prior_modalities: list[str] | str | None = None
    same_body_part: bool | None = None
    max_priors: int | None = None
    max_age_days: float | None = None
    method: str | None = None


class RuleOut(BaseModel):
    name: str
    kind: str = "route"
    enabled: bool
    destinations: list[str] = []
    conditions: list[dict[str, Any]]
    match: str
    trigger: str = "instance"
    stable_seconds: float = 0
    schedule: list[str] = []
    days: list[str] = []
    transfer_syntax: str = ""
    commit: bool = False
    priority: int
    description: str
    sources: list[str] = []
    on: list[str] = []
    prior_modalities: list[str] | str = []
    same_body_part: bool = False
    max_priors: int = 0
    max_age_days: float = 0
    method: str = ""
    source: str
    editable: bool
    updated_at: datetime | None
    updated_by: str | None


class RoutingOut(BaseModel):
    rules: list[RuleOut]
    cursor: dict[str, Any]
    waiting: list[dict[str, Any]]
    destinations: list[str]


class DryRunOut(BaseModel):
    study: str
    results: list[dict[str, Any]]


def rule_out(r: Rule) -> RuleOut:
    return RuleOut(name=r.name, enabled=r.enabled, source=r.source, editable=r.editable, updated_at=r.updated_at,
                   updated_by=r.updated_by, **r.spec())


def build_router(ctx: Any) -> APIRouter:
    router = APIRouter(tags=["routing"])

    def svc() -> RoutingService:
        if ctx.routing is None:
            raise HTTPException(404, "routing is not available on this node")
        return ctx.routing  # type: ignore[no-any-return]

    def alert(request: Request, p: Principal, detail: str) -> None:
        if ctx.audit is not None:
            ctx.audit.record("SecurityAlert", user=p.name, role=p.role, protocol="HTTP", event_type="110128",
                             source_address=request.scope.get("openpacs.client", ""), detail=detail)

    def describe(r: Rule) -> str:
        conds = " and ".join(f"{c.attribute} {c.op} {c.value}" for c in r.conditions) or "every instance"
        if r.kind == "prefetch":
            return f"prefetch on {','.join(r.on)} when {conds} from {','.join(r.sources)}"
        return f"{conds} -> {','.join(r.destinations)} ({r.trigger}{', off' if not r.enabled else ''})"

    @router.get("/routes", response_model=RoutingOut, summary="Routing rules, the router's position, waiting studies")
    def list_rules(p: Principal = READER) -> RoutingOut:
        s = svc()
        return RoutingOut(rules=[rule_out(r) for r in s.rules()], cursor=s.cursor(), waiting=s.pending(),
                          destinations=s.destinations())

    @router.get("/routes/dry-run", response_model=DryRunOut,
                summary="Which rules a stored study would trigger (nothing is sent)",
                responses={404: {"description": "unknown study"}})
    def dry_run(study: str = Query(..., min_length=1, max_length=64, pattern=r"^[0-9.]+$"),
                p: Principal = READER) -> DryRunOut:
        from ...services.routing import read_header

        try:
            results = svc().dry_run(study, reader=lambda key, full=False: read_header(ctx.store, key, full))
        except KeyError:
            raise not_found(f"study {study}") from None
        return DryRunOut(study=study, results=results)

    @router.post("/routes", response_model=RuleOut, status_code=201, summary="Add a routing rule",
                 responses={400: {"description": "invalid rule"}, 409: {"description": "name taken"}})
    def add_rule(spec: RuleIn, request: Request, p: Principal = ADMINISTRATOR) -> RuleOut:
        try:
            r = svc().create(spec.model_dump(exclude_unset=True), user=p.name)
        except RouteError as e:
            raise HTTPException(400, str(e)) from None
        except RouteConflict as e:
            raise HTTPException(409, str(e)) from None
        alert(request, p, f"routing rule {r.name!r} added: {describe(r)}")
        return rule_out(r)

    @router.get("/routes/{name}", response_model=RuleOut, summary="One routing rule")
    def get_rule(name: str, p: Principal = READER) -> RuleOut:
        r = svc().get(name)
        if r is None:
            raise not_found(f"routing rule {name!r}")
        return rule_out(r)

    @router.put("/routes/{name}", response_model=RuleOut, summary="Change a routing rule (TOML rules: 409)",
                responses={400: {"description": "invalid"}, 404: {"description": "unknown"},
                           409: {"description": "read-only"}})
    def put_rule(name: str, spec: RuleIn, request: Request, p: Principal = ADMINISTRATOR) -> RuleOut:
        try:
            r = svc().update(name, spec.model_dump(exclude_unset=True), user=p.name)
        except KeyError:
            raise not_found(f"routing rule {name!r}") from None
        except RouteError as e:
            raise HTTPException(400, str(e)) from None
        except RouteConflict as e:
            raise HTTPException(409, str(e)) from None
        alert(request, p, f"routing rule {name!r} changed: {describe(r)}")
        return rule_out(r)

    @router.delete("/routes/{name}", status_code=204, summary="Remove a routing rule (TOML rules: 409)",
                   responses={404: {"description": "unknown"}, 409: {"description": "read-only"}})
    def delete_rule(name: str, request: Request, p: Principal = ADMINISTRATOR) -> Response:
        try:
            svc().delete(name)
        except KeyError:
            raise not_found(f"routing rule {name!r}") from None
        except RouteConflict as e:
            raise HTTPException(409, str(e)) from None
        alert(request, p, f"routing rule {name!r} removed")
        return Response(status_code=204)

    return router
