"""Login and logout pages: password login into a session cookie (HttpOnly, SameSite=Strict, Secure on HTTPS).

Login CSRF is stopped with a double-submit token (cookie + form field); logout needs the session's CSRF token.
Failed logins are throttled per user name and source address, and every attempt is audited.
"""

from __future__ import annotations

import html
import secrets
from typing import Any
from urllib.parse import urlsplit

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from ..services.auth import csrf_ok
from .auth import SESSION_COOKIE, LoginThrottle, principal_of

LOGIN_CSRF_COOKIE = "openpacs_login_csrf"
DEFAULT_NEXT = "/ui/studies"
MAX_FORM = 16 * 1024


def safe_next(target: str | None) -> str:
    """Only a local absolute path: no scheme, no host, no ``//`` or ``/\\`` (open-redirect tricks)."""
    if not target or not target.startswith("/") or target.startswith(("//", "/\\")) or "\\" in target:
        return DEFAULT_NEXT
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or any(ord(c) < 32 for c in target):
        return DEFAULT_NEXT
    return target


def _page(title: str, body: str, nonce: str) -> str:
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f'<title>{html.escape(title)} · OpenPACS</title><style nonce="{nonce}">'
        "body{font-family:system-ui,sans-serif;background:#10151c;color:#e6e6e6;display:flex;justify-content:center;"
        "padding-top:12vh}form{background:#1b2330;padding:2em;border-radius:8px;min-width:18em}"
        "label{display:block;margin:.6em 0 .2em}input{width:100%;padding:.4em;box-sizing:border-box}"
        "button{margin-top:1em;padding:.5em 1.2em}.err{color:#ff8080}</style></head><body>"
        f"{body}</body></html>"
    )


def _headers(nonce: str) -> dict[str, str]:
    return {
        "Content-Security-Policy": f"default-src 'none'; style-src 'nonce-{nonce}'; form-action 'self'; "
        "base-uri 'none'; frame-ancestors 'none'",
        "Cache-Control": "no-store",
        "X-Frame-Options": "DENY",
    }


def _secure(request: Request) -> bool:
    return bool(request.scope.get("openpacs.https")) or request.url.scheme == "https"


def login_routes(ctx: Any) -> list[BaseRoute]:
    throttle = LoginThrottle(max_failures=ctx.settings.login_max_failures)

    def audit(request: Request, user: str, outcome: int, event_type: str, detail: str, role: str = "") -> None:
        if ctx.audit is not None:
            ctx.audit.record(
                "UserAuthentication",
                user=user,
                role=role,
                outcome=outcome,
                event_type=event_type,
                protocol="HTTP",
                source_address=request.scope.get("openpacs.client", ""),
                detail=detail,
            )

    def form_page(request: Request, error: str = "", status: int = 200, username: str = "") -> Response:
        nonce = secrets.token_urlsafe(12)
        token = secrets.token_urlsafe(24)
        nxt = safe_next(request.query_params.get("next") or request.scope.get("openpacs.next"))
        if not ctx.settings.auth_enabled:
            body = (
                "<form><h1>OpenPACS</h1><p>Authentication is off (development mode, loopback only).</p>"
                f'<p><a href="{html.escape(nxt)}">Continue</a></p></form>'
            )
            return HTMLResponse(_page("Login", body, nonce), headers=_headers(nonce))
        err = f'<p class="err" role="alert">{html.escape(error)}</p>' if error else ""
        body = (
            '<form method="post" action="/login"><h1>OpenPACS</h1>'
            + err
            + f'<input type="hidden" name="csrf_token" value="{html.escape(token)}">'
            f'<input type="hidden" name="next" value="{html.escape(nxt)}">'
            '<label for="u">User name</label>'
            f'<input id="u" name="username" autocomplete="username" required value="{html.escape(username)}">'
            '<label for="p">Password</label>'
            '<input id="p" name="password" type="password" autocomplete="current-password" required>'
            '<button type="submit">Sign in</button></form>'
        )
        resp = HTMLResponse(_page("Login", body, nonce), status_code=status, headers=_headers(nonce))
        resp.set_cookie(
            LOGIN_CSRF_COOKIE,
            token,
            max_age=3600,
            path="/login",
            httponly=True,
            samesite="strict",
            secure=_secure(request),
        )
        return resp

    async def login(request: Request) -> Response:
        if request.method in ("GET", "HEAD"):
            return form_page(request)
        if int(request.headers.get("content-length") or 0) > MAX_FORM:
            return HTMLResponse("request too large", status_code=413)
        form = await request.form(max_files=0, max_fields=10)
        username = str(form.get("username") or "")[:128]
        password = str(form.get("password") or "")[:1024]
        request.scope["openpacs.next"] = str(form.get("next") or "")
        address = request.scope.get("openpacs.client", "")
        if not ctx.settings.auth_enabled:
            return form_page(request)
        if not csrf_ok(request.cookies.get(LOGIN_CSRF_COOKIE, ""), str(form.get("csrf_token") or "")):
            audit(request, username or "unknown", 4, "110122", "login form without a valid CSRF token")
            return form_page(request, "The form expired; please sign in again.", 400, username)
        if throttle.blocked(username, address):
            audit(request, username, 4, "110122", "login refused: too many failures")
            resp = form_page(request, "Too many failed attempts; try again later.", 429, username)
            resp.headers["Retry-After"] = str(int(throttle.window))
            return resp
        principal = await run_in_threadpool(ctx.auth.authenticate, username, password)
        if principal is None:
            throttle.failed(username, address)
            audit(request, username or "unknown", 4, "110122", "login failed: wrong user name or password")
            return form_page(request, "Wrong user name or password.", 401, username)
        throttle.succeeded(username, address)
        cookie, _csrf = await run_in_threadpool(ctx.auth.create_session, principal, address)
        audit(request, principal.name, 0, "110122", "login", role=principal.role)
        resp = RedirectResponse(safe_next(str(form.get("next") or "")), status_code=303)
        resp.set_cookie(
            SESSION_COOKIE,
            cookie,
            max_age=int(ctx.auth.session_ttl.total_seconds()),
            path="/",
            httponly=True,
            samesite="strict",
            secure=_secure(request),
        )
        resp.delete_cookie(LOGIN_CSRF_COOKIE, path="/login")
        return resp

    async def logout(request: Request) -> Response:
        p = principal_of(request)
        nonce = secrets.token_urlsafe(12)
        if request.method in ("GET", "HEAD"):
            if p.method != "session":
                return RedirectResponse("/login", status_code=303)
            body = (
                '<form method="post" action="/logout"><h1>Sign out</h1>'
                f'<input type="hidden" name="csrf_token" value="{html.escape(p.csrf_token)}">'
                f'<p>Signed in as {html.escape(p.name)}.</p><button type="submit">Sign out</button></form>'
            )
            return HTMLResponse(_page("Sign out", body, nonce), headers=_headers(nonce))
        if p.method == "session":
            form = await request.form(max_files=0, max_fields=5)
            given = str(form.get("csrf_token") or "") or request.headers.get("x-csrf-token", "")
            if not csrf_ok(p.csrf_token, given):
                return HTMLResponse("missing or wrong CSRF token", status_code=403)
            await run_in_threadpool(ctx.auth.end_session, request.cookies.get(SESSION_COOKIE, ""))
            audit(request, p.name, 0, "110123", "logout", role=p.role)
        resp = RedirectResponse("/login", status_code=303)
        resp.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict", secure=_secure(request))
        return resp

    return [
        Route("/login", login, methods=["GET", "HEAD", "POST"]),
        Route("/logout", logout, methods=["GET", "HEAD", "POST"]),
    ]
