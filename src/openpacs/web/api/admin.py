"""API router: users, API tokens, departments and their rules, and the audit trail (search, CSV and PS3.15 XML).

The same service calls as ``/admin/api`` (web/security_admin.py, kept as an alias); each change is recorded as a
Security Alert, as there. Audit reads need the ``audit`` right and are themselves audited (Audit Log Used).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from pydantic import BaseModel, ConfigDict
from sqlalchemy import select
from starlette.responses import Response, StreamingResponse

from ...index.security_schema import audit_events
from ...services import auth as authsvc
from ...services.audit import EVENTS, AuditEvent, export_xml
from ...services.audit import _from_row as audit_from_row
from ...services.auth import ROLES, AuthError, Principal, generate_password
from .common import Page, bad, decode_cursor, encode_cursor, limit_param, need, not_found

ADMINISTRATOR = Depends(need(authsvc.ADMIN))
AUDITOR = Depends(need(authsvc.AUDIT))
MAX_EXPORT = 100000


class UserOut(BaseModel):
    username: str
    role: str
    departments: list[str] | None
    display_name: str
    disabled: bool
    created_at: datetime | None
    last_login_at: datetime | None


class UserIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    username: str
    role: str
    departments: list[str] | None = None
    display_name: str = ""
    password: str | None = None
    no_password: bool = False  # an account for OIDC or tokens only


class UserChange(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: str | None = None
    departments: list[str] | None = None
    disabled: bool | None = None


class PasswordIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    password: str | None = None  # absent: a generated one, returned once


class TokenIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = ""
    days: float | None = None


class DepartmentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    code: str
    name: str = ""


class RuleIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    department: str
    priority: int = 100
    modality: str | None = None
    calling_aet: str | None = None
    institution_name: str | None = None
    institutional_department_name: str | None = None


class AuditOut(BaseModel):
    id: int | None
    at: datetime | None
    event: str
    event_type: str | None
    action: str | None
    outcome: int
    user: str
    role: str
    protocol: str
    source_address: str
    source_aet: str
    destination: str
    study_uids: list[str]
    patient_id: str
    patient_name: str
    query: str
    detail: str
    node: str


def _user(u: Any) -> UserOut:
    return UserOut(username=u.username, role=u.role, departments=list(u.departments) if u.departments is not None
                   else None, display_name=u.display_name, disabled=u.disabled, created_at=u.created_at,
                   last_login_at=u.last_login_at)


def _row_id(n: int, what: str) -> int:
    if not 1 <= n < 2**63:
        raise bad(f"{what}: an integer from 1 to 2^63-1")
    return n


def _audit_out(e: AuditEvent) -> AuditOut:
    return AuditOut(id=e.id, at=e.at, event=e.event, event_type=e.event_type, action=e.action, outcome=e.outcome,
                    user=e.user, role=e.role, protocol=e.protocol, source_address=e.source_address,
                    source_aet=e.source_aet, destination=e.destination, study_uids=e.study_uids,
                    patient_id=e.patient_id, patient_name=e.patient_name, query=e.query, detail=e.detail, node=e.node)


CSV_COLUMNS = ("id", "at", "event", "event_type", "action", "outcome", "user", "role", "protocol", "source_address",
               "source_aet", "destination", "study_uids", "patient_id", "patient_name", "query", "detail", "node")


def _csv_cell(v: Any) -> str:
    s = "" if v is None else "\\".join(v) if isinstance(v, list) else v.isoformat() if isinstance(v, datetime) else str(v)
    return "'" + s if s[:1] in ("=", "+", "-", "@", "\t", "\r") else s  # no formula injection in spreadsheets


def build_router(ctx: Any) -> APIRouter:
    router = APIRouter(tags=["administration"])

    def alert(request: Request, p: Principal, detail: str, event_type: str = "110137") -> None:
        if ctx.audit is not None:
            ctx.audit.record("SecurityAlert", user=p.name, role=p.role, protocol="HTTP", event_type=event_type,
                             source_address=request.scope.get("openpacs.client", ""), detail=detail)

    def auth() -> Any:
        if ctx.auth is None:
            raise HTTPException(404, "user management is not available")
        return ctx.auth

    def find_user(name: str) -> Any:
        u = next((u for u in auth().list_users() if u.username == name), None)
        if u is None:
            raise not_found(f"user {name!r}")
        return u

    # -- users -------------------------------------------------------------------------------------------------
    @router.get("/users", response_model=list[UserOut], summary="Users")
    def list_users(p: Principal = ADMINISTRATOR) -> list[UserOut]:
        return [_user(u) for u in auth().list_users()]

    @router.post("/users", status_code=201, summary="Create a user (a generated password is returned once)")
    def create_user(body: UserIn, request: Request, p: Principal = ADMINISTRATOR) -> dict[str, Any]:
        password = body.password or None
        generated = password is None and not body.no_password
        if generated:
            password = generate_password()
        if body.role not in ROLES:
            raise bad(f"role: one of {', '.join(ROLES)}")
        try:
            auth().add_user(body.username, password, body.role, body.departments, body.display_name)
        except AuthError as e:
            raise HTTPException(409 if "exists" in str(e) else 400, str(e)) from None
        alert(request, p, f"user {body.username!r} created with role {body.role}")
        out: dict[str, Any] = {"username": body.username.strip()}
        if generated:
            out["password"] = password
        return out

    @router.get("/users/{username}", response_model=UserOut, summary="One user")
    def get_user(username: str, p: Principal = ADMINISTRATOR) -> UserOut:
        return _user(find_user(username))

    @router.patch("/users/{username}", response_model=UserOut, summary="Change role, departments, or disable")
    def change_user(username: str, body: UserChange, request: Request, p: Principal = ADMINISTRATOR) -> UserOut:
        u = find_user(username)
        fields = body.model_dump(exclude_unset=True)
        try:
            if "role" in fields or "departments" in fields:
                role = body.role or u.role
                deps = body.departments if "departments" in fields else u.departments
                auth().set_role(username, role, deps)
                alert(request, p, f"user {username!r} now {role} (departments {deps or 'all'})", "110136")
            if body.disabled is not None:
                auth().set_disabled(username, body.disabled)
                alert(request, p, f"user {username!r} {'disabled' if body.disabled else 'enabled'}")
        except AuthError as e:
            raise bad(str(e)) from None
        return _user(find_user(username))

    @router.post("/users/{username}/password", summary="Set (or generate) a user's password")
    def set_password(username: str, body: PasswordIn, request: Request, p: Principal = ADMINISTRATOR) -> dict[str, Any]:
        find_user(username)
        password = body.password or generate_password()
        try:
            auth().set_password(username, password)
        except AuthError as e:
            raise bad(str(e)) from None
        alert(request, p, f"password of {username!r} changed")
        return {"username": username, **({} if body.password else {"password": password})}

    # -- tokens ------------------------------------------------------------------------------------------------
    @router.get("/users/{username}/tokens", summary="A user's API tokens (never the secret)")
    def list_tokens(username: str, p: Principal = ADMINISTRATOR) -> list[dict[str, Any]]:
        find_user(username)
        return [{**t, "created_at": t["created_at"] and t["created_at"].isoformat(),
                 "expires_at": t["expires_at"] and t["expires_at"].isoformat()} for t in auth().list_tokens(username)]

    @router.post("/users/{username}/tokens", status_code=201, summary="Create an API token (returned once)")
    def create_token(username: str, body: TokenIn, request: Request, p: Principal = ADMINISTRATOR) -> dict[str, Any]:
        find_user(username)
        if body.days is not None and not -1 <= body.days <= 3650:
            raise bad("days: from 0 to 3650")
        try:
            tid, token = auth().create_token(username, body.name[:128], body.days)
        except AuthError as e:
            raise bad(str(e)) from None
        alert(request, p, f"API token {tid} created for {username!r}")
        return {"id": tid, "token": token}

    @router.delete("/tokens/{token_id}", status_code=204, summary="Revoke an API token")
    def revoke_token(token_id: int, request: Request, p: Principal = ADMINISTRATOR) -> Response:
        ok = auth().revoke_token(_row_id(token_id, "token_id"))
        if not ok:
            raise not_found(f"token {token_id} (or already revoked)")
        alert(request, p, f"API token {token_id} revoked")
        return Response(status_code=204)

    # -- departments -------------------------------------------------------------------------------------------
    def deps() -> Any:
        if ctx.departments is None:
            raise HTTPException(404, "departments are not available")
        return ctx.departments

    @router.get("/departments", summary="Departments and the rules that assign studies to them")
    def list_departments(p: Principal = ADMINISTRATOR) -> dict[str, Any]:
        return {"departments": [{"code": c, "name": n} for c, n in deps().list_departments()],
                "rules": [r.__dict__ for r in deps().rules()]}

    @router.post("/departments", status_code=201, summary="Add a department")
    def add_department(body: DepartmentIn, request: Request, p: Principal = ADMINISTRATOR) -> dict[str, Any]:
        code = body.code.strip().lower()
        if code in {c for c, _ in deps().list_departments()}:
            raise HTTPException(409, f"department {code!r} exists")
        try:
            deps().add_department(code, body.name)
        except ValueError as e:
            raise bad(str(e)) from None
        alert(request, p, f"department {code!r} added", "110129")
        return {"code": code}

    @router.get("/departments/rules", summary="Department rules, by priority")
    def list_rules(p: Principal = ADMINISTRATOR) -> list[dict[str, Any]]:
        deps().reload()
        return [r.__dict__ for r in deps().rules()]

    @router.post("/departments/rules", status_code=201, summary="Add a department rule")
    def add_rule(body: RuleIn, request: Request, p: Principal = ADMINISTRATOR) -> dict[str, Any]:
        if not -(2**31) <= body.priority < 2**31:
            raise bad("priority: a 32-bit integer")
        try:
            rid = deps().add_rule(body.department, priority=body.priority, modality=body.modality,
                                  calling_aet=body.calling_aet, institution_name=body.institution_name,
                                  institutional_department_name=body.institutional_department_name)
        except ValueError as e:
            raise bad(str(e)) from None
        alert(request, p, f"department rule {rid} added for {body.department!r}", "110129")
        return {"id": rid}

    @router.delete("/departments/rules/{rule_id}", status_code=204, summary="Delete a department rule")
    def delete_rule(rule_id: int, request: Request, p: Principal = ADMINISTRATOR) -> Response:
        rid = _row_id(rule_id, "rule_id")
        deps().reload()
        if all(r.id != rid for r in deps().rules()):
            raise not_found(f"rule {rid}")
        deps().delete_rule(rid)
        alert(request, p, f"department rule {rid} deleted", "110129")
        return Response(status_code=204)

    @router.post("/departments/reapply", summary="Re-apply the rules to every study")
    def reapply(request: Request, p: Principal = ADMINISTRATOR) -> dict[str, int]:
        n = deps().reapply()
        alert(request, p, f"department rules re-applied: {n} studies changed", "110129")
        return {"changed": n}

    # -- audit -------------------------------------------------------------------------------------------------
    def audit_stmt(user: str | None, patient: str | None, study: str | None, event: str | None,
                   event_type: str | None, outcome: int | None, since: datetime | None, until: datetime | None) -> Any:
        if event and event not in EVENTS:
            raise bad(f"event: one of {', '.join(EVENTS)}")
        if outcome is not None and outcome not in (0, 4, 8, 12):
            raise bad("outcome: 0 (success), 4 (minor failure), 8 (serious failure) or 12 (major failure)")
        t = audit_events.c
        stmt = select(audit_events)
        for col, v in ((t.user, user), (t.patient_id, patient), (t.event, event), (t.event_type, event_type)):
            if v:
                stmt = stmt.where(col == v)
        if study:
            stmt = stmt.where(t.study_uids.contains(study, autoescape=True))
        if outcome is not None:
            stmt = stmt.where(t.outcome == outcome)
        if since:
            stmt = stmt.where(t.at >= since)
        if until:
            stmt = stmt.where(t.at < until)
        return stmt

    F_USER = Query(None, max_length=256, description="user name (exact)")
    F_PATIENT = Query(None, max_length=256, description="patient ID (exact)")
    F_STUDY = Query(None, max_length=64, description="Study Instance UID")
    F_EVENT = Query(None, description="event name: " + ", ".join(EVENTS))
    F_TYPE = Query(None, max_length=16, description="event type code, e.g. 110122 (Login)")
    F_OUTCOME = Query(None, description="0, 4, 8 or 12")
    F_SINCE = Query(None, description="ISO 8601 date-time (inclusive)")
    F_UNTIL = Query(None, description="ISO 8601 date-time (exclusive)")

    @router.get("/audit", response_model=Page, summary="Search the audit trail, newest first (keyset pages)")
    def audit_search(
        user: str | None = F_USER, patient: str | None = F_PATIENT, study: str | None = F_STUDY,
        event: str | None = F_EVENT, event_type: str | None = F_TYPE, outcome: int | None = F_OUTCOME,
        since: datetime | None = F_SINCE, until: datetime | None = F_UNTIL,
        limit: int = limit_param(100), cursor: str | None = Query(None), p: Principal = AUDITOR,
    ) -> Page:
        stmt = audit_stmt(user, patient, study, event, event_type, outcome, since, until)
        key = decode_cursor(cursor, 1)
        if key is not None:
            if not isinstance(key[0], int):
                raise bad("cursor: not a cursor returned by this API")
            stmt = stmt.where(audit_events.c.id < key[0])
        if ctx.audit is not None:
            ctx.audit.flush(timeout=2.0)
        with ctx.index.engine.connect() as c:
            rows = c.execute(stmt.order_by(audit_events.c.id.desc()).limit(limit + 1)).all()
        items = [_audit_out(audit_from_row(r)) for r in rows[:limit]]
        return Page(items=items, next=encode_cursor([items[-1].id]) if len(rows) > limit else None)

    @router.get("/audit/export", summary="Export the matching audit events as CSV or PS3.15 A.5.1 XML",
                responses={200: {"content": {"text/csv": {}, "application/xml": {}}}})
    def audit_export(
        format: str = Query("csv", pattern="^(csv|xml)$", description="csv or xml (PS3.15 audit messages)"),
        user: str | None = F_USER, patient: str | None = F_PATIENT, study: str | None = F_STUDY,
        event: str | None = F_EVENT, event_type: str | None = F_TYPE, outcome: int | None = F_OUTCOME,
        since: datetime | None = F_SINCE, until: datetime | None = F_UNTIL, p: Principal = AUDITOR,
    ) -> Response:
        stmt = audit_stmt(user, patient, study, event, event_type, outcome, since, until)
        if ctx.audit is not None:
            ctx.audit.flush(timeout=2.0)
        with ctx.index.engine.connect() as c:
            events = [audit_from_row(r) for r in c.execute(stmt.order_by(audit_events.c.id).limit(MAX_EXPORT))]
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        if format == "xml":
            return StreamingResponse(export_xml(events), media_type="application/xml; charset=utf-8", headers={
                "Cache-Control": "no-store", "Content-Disposition": f'attachment; filename="audit-{stamp}.xml"'})

        def rows() -> Iterator[str]:
            buf = io.StringIO()
            w = csv.writer(buf)
            w.writerow(CSV_COLUMNS)
            for e in events:
                d = _audit_out(e).model_dump()
                w.writerow([_csv_cell(d[k]) for k in CSV_COLUMNS])
                if buf.tell() > 65536:
                    yield buf.getvalue()
                    buf.seek(0)
                    buf.truncate()
            yield buf.getvalue()

        return StreamingResponse(rows(), media_type="text/csv; charset=utf-8", headers={
            "Cache-Control": "no-store", "Content-Disposition": f'attachment; filename="audit-{stamp}.csv"'})

    return router
