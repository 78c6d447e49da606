"""``/admin/api``: users, API tokens, departments and department rules over HTTP (JSON), for administrators.

The middleware requires the ``admin`` right for every ``/admin`` path and a CSRF header for cookie sessions; each
change is recorded as a Security Alert in the audit trail, like the same change made with ``openpacs user``.
"""

from __future__ import annotations

from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from ..services import auth as authsvc
from ..services.auth import AuthError, generate_password
from .auth import principal_of, require

MAX_BODY = 64 * 1024


def security_admin_routes(ctx: Any) -> list[BaseRoute]:
    def alert(request: Request, detail: str, event_type: str = "110137") -> None:
        p = principal_of(request)
        if ctx.audit is not None:
            ctx.audit.record(
                "SecurityAlert",
                user=p.name,
                role=p.role,
                protocol="HTTP",
                event_type=event_type,
                source_address=request.scope.get("openpacs.client", ""),
                detail=detail,
            )

    async def body(request: Request) -> dict[str, Any]:
        require(request, authsvc.ADMIN)
        raw = await request.body()
        if len(raw) > MAX_BODY:
            raise AuthError("request too large")
        if not raw:
            return {}
        import json

        try:
            doc = json.loads(raw)
        except ValueError as e:
            raise AuthError(f"invalid JSON: {e}") from None
        if not isinstance(doc, dict):
            raise AuthError("expected a JSON object")
        return doc

    def fail(e: Exception) -> Response:
        return JSONResponse({"error": str(e)}, status_code=400)

    async def users(request: Request) -> Response:
        if request.method == "GET":
            require(request, authsvc.ADMIN)
            rows = await run_in_threadpool(ctx.auth.list_users)
            return JSONResponse(
                [
                    {
                        "username": u.username,
                        "role": u.role,
                        "departments": u.departments,
                        "disabled": u.disabled,
                        "last_login_at": u.last_login_at and u.last_login_at.isoformat(),
                    }
                    for u in rows
                ]
            )
        try:
            doc = await body(request)
            password = doc.get("password") or None
            generated = password is None and not doc.get("no_password")
            if generated:
                password = generate_password()
            await run_in_threadpool(
                ctx.auth.add_user,
                str(doc.get("username", "")),
                password,
                str(doc.get("role", "")),
                doc.get("departments"),
                str(doc.get("display_name", "")),
            )
        except (AuthError, ValueError) as e:
            return fail(e)
        alert(request, f"user {doc.get('username')!r} created with role {doc.get('role')}")
        out: dict[str, Any] = {"username": doc.get("username")}
        if generated:
            out["password"] = password
        return JSONResponse(out, status_code=201, headers={"Cache-Control": "no-store"})

    async def user(request: Request) -> Response:
        name = request.path_params["username"]
        try:
            doc = await body(request)
            if "role" in doc or "departments" in doc:
                role = doc.get("role") or next((u.role for u in ctx.auth.list_users() if u.username == name), "")
                await run_in_threadpool(ctx.auth.set_role, name, role, doc.get("departments"))
                alert(request, f"user {name!r} now {role} (departments {doc.get('departments') or 'all'})", "110136")
            if "disabled" in doc:
                await run_in_threadpool(ctx.auth.set_disabled, name, bool(doc["disabled"]))
                alert(request, f"user {name!r} {'disabled' if doc['disabled'] else 'enabled'}")
            if doc.get("password"):
                await run_in_threadpool(ctx.auth.set_password, name, str(doc["password"]))
                alert(request, f"password of {name!r} changed")
        except (AuthError, ValueError) as e:
            return fail(e)
        return JSONResponse({"username": name})

    async def tokens(request: Request) -> Response:
        name = request.path_params["username"]
        try:
            doc = await body(request)
            days = doc.get("days")
            tid, token = await run_in_threadpool(
                ctx.auth.create_token, name, str(doc.get("name", "")), float(days) if days is not None else None
            )
        except (AuthError, ValueError, TypeError) as e:
            return fail(e)
        alert(request, f"API token {tid} created for {name!r}")
        return JSONResponse({"id": tid, "token": token}, status_code=201, headers={"Cache-Control": "no-store"})

    async def token(request: Request) -> Response:
        require(request, authsvc.ADMIN)
        tid = _row_id(request.path_params["token_id"])
        if tid is None:
            return fail(ValueError("token id must be an integer from 1 to 2^63-1"))
        ok = await run_in_threadpool(ctx.auth.revoke_token, tid)
        alert(request, f"API token {tid} revoked")
        return Response(status_code=204 if ok else 404)

    async def departments(request: Request) -> Response:
        if request.method == "GET":
            require(request, authsvc.ADMIN)
            deps = await run_in_threadpool(ctx.departments.list_departments)
            rules = await run_in_threadpool(ctx.departments.rules)
            return JSONResponse(
                {"departments": [{"code": c, "name": n} for c, n in deps], "rules": [r.__dict__ for r in rules]}
            )
        try:
            doc = await body(request)
            await run_in_threadpool(ctx.departments.add_department, str(doc.get("code", "")), str(doc.get("name", "")))
        except (AuthError, ValueError) as e:
            return fail(e)
        except Exception as e:  # unique code taken
            return fail(ValueError(f"cannot add department: {e.__class__.__name__}"))
        alert(request, f"department {doc.get('code')!r} added", "110129")
        return JSONResponse({"code": doc.get("code")}, status_code=201)

    async def rules(request: Request) -> Response:
        try:
            doc = await body(request)
            rid = await run_in_threadpool(
                lambda: ctx.departments.add_rule(
                    str(doc.get("department", "")),
                    priority=int(doc.get("priority", 100)),
                    modality=doc.get("modality"),
                    calling_aet=doc.get("calling_aet"),
                    institution_name=doc.get("institution_name"),
                    institutional_department_name=doc.get("institutional_department_name"),
                )
            )
        except (AuthError, ValueError, TypeError) as e:
            return fail(e)
        alert(request, f"department rule {rid} added for {doc.get('department')!r}", "110129")
        return JSONResponse({"id": rid}, status_code=201)

    async def rule(request: Request) -> Response:
        require(request, authsvc.ADMIN)
        rid = _row_id(request.path_params["rule_id"])
        if rid is None:
            return fail(ValueError("rule id must be an integer from 1 to 2^63-1"))
        await run_in_threadpool(ctx.departments.delete_rule, rid)
        alert(request, f"department rule {rid} deleted", "110129")
        return Response(status_code=204)

    async def reapply(request: Request) -> Response:
        require(request, authsvc.ADMIN)
        n = await run_in_threadpool(ctx.departments.reapply)
        alert(request, f"department rules re-applied: {n} studies changed", "110129")
        return JSONResponse({"changed": n})

    return [
        Route("/admin/api/users", users, methods=["GET", "POST"]),
        Route("/admin/api/users/{username}", user, methods=["POST"]),
        Route("/admin/api/users/{username}/tokens", tokens, methods=["POST"]),
        Route("/admin/api/tokens/{token_id}", token, methods=["DELETE"]),
        Route("/admin/api/departments", departments, methods=["GET", "POST"]),
        Route("/admin/api/departments/rules", rules, methods=["POST"]),
        Route("/admin/api/departments/rules/{rule_id}", rule, methods=["DELETE"]),
        Route("/admin/api/departments/reapply", reapply, methods=["POST"]),
    ]


def _row_id(raw: str) -> int | None:
    """A database row id from a URL, or None: not an integer, or beyond what SQLite and PostgreSQL can hold."""
    try:
        n = int(raw)
    except ValueError:
        return None
    return n if 1 <= n < 2**63 else None
