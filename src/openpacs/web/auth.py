"""HTTP security: who is calling (session cookie, bearer API token, OIDC JWT), what they may do, and the audit trail.

One pure-ASGI middleware in front of every route of the node:

- identifies the principal and puts it in ``request.state.principal`` (routes read it with :func:`principal_of`;
  department scope for the one query engine via :func:`departments_of`);
- enforces the coarse right of each route family (read / store / delete / admin / audit) before the route runs, and
  for resource paths naming a study, that the study is in the principal's departments (404 otherwise, so a study's
  existence is not revealed); routes narrow searches with ``Query.departments``;
- checks CSRF for cookie-authenticated state-changing requests, adds security headers (CSP, nosniff,
  frame-ancestors, HSTS on HTTPS);
- records the ATNA audit events of every request (Query, DICOM Instances Accessed/Transferred, Study Deleted,
  Security Alert, ...), after the response, from the route and the status.

Development mode (``Settings.auth_enabled`` false: loopback only) acts as an administrator and still audits.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import parse_qsl, quote

from sqlalchemy import select
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..index.schema import studies
from ..services import auth as authsvc
from ..services.auth import ANONYMOUS, DEVELOPMENT, Principal

log = logging.getLogger("openpacs.web.auth")

SESSION_COOKIE = "openpacs_session"
CSRF_HEADER = "x-csrf-token"
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/login", "/logout", "/favicon.ico"})
# Public as far as the middleware goes; the handler itself asks for a token unless the caller is on loopback.
SELF_CHECKED_PATHS = frozenset({"/metrics"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Paths whose own handlers check the CSRF form field (HTML forms cannot send a header).
FORM_CSRF_PATHS = ("/logout",)

DEFAULT_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
# object-src: OHIF's dicom-pdf viewport shows the PDF (a blob: URL of the fetched bulk data) in an <object>
VIEWER_CSP = "frame-ancestors 'self'; base-uri 'self'; object-src 'self' blob:"

_UNKNOWN = (0, "not in memory")  # SecurityMiddleware._check(cached=True): the index must be asked
_STUDY_IN_PATH = re.compile(r"/studies/([0-9.]{1,64})(?:/|$)")


class Forbidden(HTTPException):
    """Raised by routes through :func:`require`; any Starlette app turns it into the response."""


def principal_of(request: Request | Scope) -> Principal:
    scope = request.scope if isinstance(request, Request) else request
    p = scope.get("openpacs.principal")
    return p if isinstance(p, Principal) else ANONYMOUS


def departments_of(request: Request | Scope) -> tuple[str, ...] | None:
    """The department scope for ``Query.departments`` / ``RetrieveService(departments=)``: None = everything."""
    return principal_of(request).departments


def require(request: Request, right: str) -> Principal:
    """The route-level check: 401 for anonymous, 403 (audited as a Security Alert) for a missing right."""
    p = principal_of(request)
    if right in p.rights:
        return p
    status = 401 if not p.authenticated else 403
    request.scope["openpacs.denied"] = f"{right} right required"
    raise Forbidden(
        status,
        "authentication required" if status == 401 else f"the {right!r} right is required",
        headers={"WWW-Authenticate": 'Bearer realm="openpacs"'} if status == 401 else None,
    )


@dataclass(frozen=True)
class RoutePolicy:
    right: str | None  # None: public
    audit: str | None  # audit event name for a request of this kind, or None


def route_policy(path: str, method: str) -> RoutePolicy:
    """The right a request needs and the audit event it makes, by route family (default: read, not public)."""
    if path in PUBLIC_PATHS or path in SELF_CHECKED_PATHS:
        return RoutePolicy(None, None)
    if path.startswith("/api/") or path == "/api":
        return api_policy(path[len("/api") :], method)
    if path.startswith("/dicom-web/") or path == "/dicom-web":
        sub = path[len("/dicom-web") :]
        if method == "OPTIONS":  # Retrieve Capabilities: what the service offers, no patient data
            return RoutePolicy(authsvc.READ, None)
        if method == "POST":
            return RoutePolicy(authsvc.STORE, "InstancesTransferred")
        if method == "DELETE":
            return RoutePolicy(authsvc.DELETE, "StudyDeleted")
        if sub.rstrip("/").rsplit("/", 1)[-1] in ("studies", "series", "instances"):
            return RoutePolicy(authsvc.READ, "Query")  # QIDO-RS: a resource collection
        if sub.endswith("/metadata") or "/rendered" in sub or "/thumbnail" in sub:
            return RoutePolicy(authsvc.READ, "InstancesAccessed")
        return RoutePolicy(authsvc.READ, "InstancesTransferred")
    if path == "/wado" or path.startswith("/wado/"):
        return RoutePolicy(authsvc.READ, "InstancesTransferred")
    if path.startswith("/ui/studies"):
        return RoutePolicy(authsvc.READ, "Query")
    if path.startswith("/admin/audit") or path.startswith("/audit"):
        return RoutePolicy(authsvc.AUDIT, "AuditLogUsed")
    if path.startswith("/admin"):
        return RoutePolicy(authsvc.ADMIN, None)
    return RoutePolicy(authsvc.READ, None)  # viewer, study list, anything added later: signed-in readers


def api_policy(sub: str, method: str) -> RoutePolicy:
    """Rights and audit events of the REST API (``sub`` is the path below ``/api``)."""
    parts = [p for p in sub.split("/") if p]
    head = parts[0] if parts else ""
    if sub == "/me":  # who am I: any caller, signed in or not (an auditor has no read right, and needs the console)
        return RoutePolicy(None, None)
    if head in ("storage", "retention", "rejections") or (head == "studies" and parts[-1] in ("protect", "unprotect",
                                                                                          "reject")):
        return RoutePolicy(authsvc.ADMIN, None)  # storage management (web/api/storage_usage.py audits its changes)
    if head in ("users", "tokens", "departments", "nodes", "jobs", "config", "log", "hl7", "qc") or sub.startswith("/system/"):
        # nodes and jobs may be read by readers of the console; changing them is administration
        if head in ("nodes", "jobs") and method in SAFE_METHODS:
            return RoutePolicy(authsvc.READ, None)
        return RoutePolicy(authsvc.ADMIN, None)
    if head == "worklist":  # entries made by hand (no RIS): store right; the router audits them (Order Record)
        return RoutePolicy(authsvc.READ if method in SAFE_METHODS else authsvc.STORE, None)
    if head == "audit":
        return RoutePolicy(authsvc.AUDIT, "AuditLogUsed")
    if head in ("patients", "studies", "series", "instances"):
        if method == "PATCH" or (method == "POST" and parts[-1] in ("merge", "split", "move")):
            return RoutePolicy(authsvc.ADMIN, None)  # QC edits (web/api/qc_edit.py audits them: Patient Record)
        if method == "DELETE":
            return RoutePolicy(authsvc.DELETE, "StudyDeleted")
        if method == "POST":
            return RoutePolicy(authsvc.STORE, "InstancesTransferred")
        last = parts[-1]
        if len(parts) == 1 or last in ("studies", "series", "instances"):
            return RoutePolicy(authsvc.READ, "Query")  # a list: a search
        if last in ("download", "archive", "file"):
            return RoutePolicy(authsvc.EXPORT, "InstancesTransferred")
        return RoutePolicy(authsvc.READ, "InstancesAccessed")  # one resource, its tags or its thumbnail
    return RoutePolicy(authsvc.READ, None)  # me, stats, system, openapi.json, docs


class LoginThrottle:
    """Failed logins per (user name, address) and per address in a sliding window; in memory, per node."""

    def __init__(self, max_failures: int = 5, window: float = 900.0, per_address: int = 50) -> None:
        self.max_failures = max_failures
        self.window = window
        self.per_address = per_address
        self._fails: dict[str, list[float]] = {}

    def _recent(self, key: str, now: float) -> list[float]:
        times = [t for t in self._fails.get(key, ()) if now - t < self.window]
        if times:
            self._fails[key] = times
        else:
            self._fails.pop(key, None)
        return times

    def blocked(self, username: str, address: str) -> bool:
        now = time.monotonic()
        return (
            len(self._recent(f"u:{username.lower()}|{address}", now)) >= self.max_failures
            or len(self._recent(f"a:{address}", now)) >= self.per_address
        )

    def failed(self, username: str, address: str) -> None:
        now = time.monotonic()
        if len(self._fails) > 100000:
            self._fails.clear()
        for key in (f"u:{username.lower()}|{address}", f"a:{address}"):
            self._fails.setdefault(key, []).append(now)

    def succeeded(self, username: str, address: str) -> None:
        self._fails.pop(f"u:{username.lower()}|{address}", None)


class SecurityMiddleware:
    def __init__(self, app: ASGIApp, ctx: Any) -> None:
        self.app = app
        self.ctx = ctx
        s = ctx.settings
        self.enabled = bool(s.auth_enabled)
        self.auth = ctx.auth
        self.audit = ctx.audit
        self.trusted = _networks(s.trusted_proxies)
        self.https_direct = bool(s.tls_cert) and bool(getattr(s, "http_tls", True))
        self.throttle = LoginThrottle(max_failures=s.login_max_failures)
        self._study_dept: dict[str, tuple[float, str | None, bool]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        address, https = self._client(scope)
        scope["openpacs.client"] = address
        scope["openpacs.https"] = https
        if https and scope.get("scheme") == "http":
            scope["scheme"] = "https"
        path: str = scope.get("path", "")
        method: str = scope.get("method", "GET")
        policy = route_policy(path, method)
        if self.enabled:  # token/session/JWKS lookups may touch the index or the IdP: never on the event loop,
            # but a caller known to the in-memory caches (a viewer's hundreds of frame requests) is decided here
            decided = self._decide(scope, policy, path, method, cached=True)
            if decided is None:
                decided = await run_in_threadpool(self._decide, scope, policy, path, method)
            assert decided is not None  # not cached: always an answer
            principal, auth_error, denial = decided
        else:
            principal, auth_error, denial = DEVELOPMENT, "", None
        scope["openpacs.principal"] = principal
        scope.setdefault("state", {})["principal"] = principal

        status_box = [0]
        send_wrapped = self._headers_send(send, path, https, status_box)

        if auth_error and policy.right is not None:
            self._audit(
                "UserAuthentication", principal, scope, address, outcome=4, event_type="110122", detail=auth_error
            )
            await _plain(
                send_wrapped,
                401,
                "invalid or expired credentials",
                {"www-authenticate": 'Bearer realm="openpacs", error="invalid_token"'},
            )
            return
        if policy.right is not None:
            if denial is not None:
                code, why = denial
                if code == 401 and method in SAFE_METHODS and "text/html" in _header(scope, b"accept"):
                    target = path + ("?" + scope["query_string"].decode("latin-1") if scope.get("query_string") else "")
                    await _redirect(send_wrapped, "/login?next=" + quote(target, safe=""))
                    return
                if code in (401, 403, 404):
                    self._denied(principal, scope, address, f"{method} {path} denied: {why}")
                hdrs = {"www-authenticate": 'Bearer realm="openpacs"'} if code == 401 else {}
                await _plain(send_wrapped, code, why if code != 404 else "not found", hdrs)
                return
        if method == "DELETE" and self.audit is not None:  # the patient must be known before the study is gone
            uids = _studies_named(path, b"")
            if uids:
                try:
                    scope["openpacs.patient"] = next(iter(self.audit.patients_of(uids).values()), None)
                except Exception:
                    log.debug("patient lookup for the audit failed", exc_info=True)
        try:
            await self.app(scope, receive, send_wrapped)
        finally:
            status = status_box[0]
            if policy.audit and status:
                self._audit_request(policy.audit, principal, scope, address, path, method, status)
            elif status in (401, 403) and scope.get("openpacs.denied"):
                self._denied(principal, scope, address, f"{method} {path} denied: {scope['openpacs.denied']}")

    # -- identity --------------------------------------------------------------------------------------------
    def _decide(
        self, scope: Scope, policy: RoutePolicy, path: str, method: str, cached: bool = False
    ) -> tuple[Principal, str, tuple[int, str] | None] | None:
        """(principal, authentication error, denial). ``cached``: from memory only, None when the index or the
        identity provider must be asked."""
        identified = self._identify(scope, cached)
        if identified is None:
            return None
        principal, error = identified
        if error or policy.right is None:
            return principal, error, None
        denial = self._check(scope, principal, policy, path, method, cached)
        if denial is _UNKNOWN:
            return None
        return principal, "", denial

    def _identify(self, scope: Scope, cached: bool = False) -> tuple[Principal, str] | None:
        """(principal, error): a bad bearer credential is an error (401), never a silent fallback to anonymous.
        ``cached``: None when the answer is not in memory."""
        if not self.enabled:
            return DEVELOPMENT, ""
        authz = _header(scope, b"authorization")
        if authz:
            kind, _, cred = authz.partition(" ")
            cred = cred.strip()
            if kind.lower() != "bearer" or not cred:
                return ANONYMOUS, "unsupported authorization scheme"
            if self.auth.oidc is not None and self.auth.oidc.looks_like_jwt(cred):
                if cached:
                    return None
                p = self.auth.oidc.validate(cred)
            else:
                known, p = self._lookup("token", cred, cached)
                if not known:
                    return None
            return (p, "") if p is not None else (ANONYMOUS, "invalid, expired or revoked bearer token")
        cookie = _cookie(scope, SESSION_COOKIE)
        if cookie:
            known, p = self._lookup("session", cookie, cached)
            if not known:
                return None
            if p is not None:
                return p, ""
        return ANONYMOUS, ""

    def _lookup(self, kind: str, cred: str, cached: bool) -> tuple[bool, Principal | None]:
        """(known, principal) for a token or session: from memory only when ``cached`` (known False on a miss),
        else through the index."""
        if cached:
            return self.auth.cached_principal(kind, cred)
        if kind == "token":
            return True, self.auth.principal_for_token(cred)
        return True, self.auth.principal_for_session(cred)

    def _check(self, scope: Scope, p: Principal, policy: RoutePolicy, path: str, method: str,
               cached: bool = False) -> tuple[int, str] | None:
        assert policy.right is not None
        if not p.authenticated:
            return 401, "authentication required"
        if policy.right not in p.rights:
            return 403, f"the {policy.right!r} right is required"
        if p.method == "session" and method not in SAFE_METHODS and not path.startswith(FORM_CSRF_PATHS):
            if not authsvc.csrf_ok(p.csrf_token, _header(scope, CSRF_HEADER.encode()) or None):
                return 403, "missing or wrong CSRF token"
        if p.departments is not None:
            for uid in _studies_named(path, scope.get("query_string", b"")):
                visible = self._visible(uid, p, cached)
                if visible is None:
                    return _UNKNOWN
                if not visible:
                    return 404, f"study {uid} is outside the user's departments"
        return None

    def _visible(self, study_uid: str, p: Principal, cached: bool = False) -> bool | None:
        now = time.monotonic()
        hit = self._study_dept.get(study_uid)
        if hit is None or hit[0] < now:
            if cached:
                return None
            with self.ctx.index.engine.connect() as c:
                row = c.execute(select(studies.c.department).where(studies.c.study_instance_uid == study_uid)).first()
            if len(self._study_dept) > 50000:
                self._study_dept.clear()
            # an unknown study may be about to be stored (STOW to /studies/{uid}): not cached for long
            hit = (now + (30.0 if row is not None else 1.0), row[0] if row is not None else None, row is not None)
            self._study_dept[study_uid] = hit
        _, dept, exists = hit
        if not exists:
            return True  # nothing to reveal; the route answers 404 (or stores a new study)
        return p.sees(dept)

    def _client(self, scope: Scope) -> tuple[str, bool]:
        client = scope.get("client")
        host = client[0] if client else ""
        https = scope.get("scheme") == "https" or self.https_direct
        if host and self.trusted and _in(host, self.trusted):
            fwd = _header(scope, b"x-forwarded-for")
            if fwd:
                # the right-most address not belonging to a trusted proxy is the client
                for hop in reversed([h.strip() for h in fwd.split(",") if h.strip()]):
                    host = hop
                    if not _in(hop, self.trusted):
                        break
            proto = _header(scope, b"x-forwarded-proto")
            if proto:
                https = proto.split(",")[0].strip().lower() == "https"
        return host, https

    # -- responses -------------------------------------------------------------------------------------------
    def _headers_send(self, send: Send, path: str, https: bool, status_box: list[int]) -> Send:
        viewer = path.startswith("/ohif") or path == "/viewer"

        async def wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_box[0] = int(message["status"])
                headers = list(message.get("headers", []))
                have = {k.lower() for k, _ in headers}
                add = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"same-origin")]
                if b"content-security-policy" not in have:
                    add.append((b"content-security-policy", (VIEWER_CSP if viewer else DEFAULT_CSP).encode()))
                if b"x-frame-options" not in have:
                    add.append((b"x-frame-options", b"SAMEORIGIN" if viewer else b"DENY"))
                if https:
                    add.append((b"strict-transport-security", b"max-age=31536000"))
                headers += [(k, v) for k, v in add if k not in have]
                message = {**message, "headers": headers}
            await send(message)

        return wrapped

    # -- audit -----------------------------------------------------------------------------------------------
    def _audit(self, event: str, p: Principal, scope: Scope, address: str, **kw: Any) -> None:
        if self.audit is None:
            return
        try:
            self.audit.record(
                event, user=p.name or "anonymous", role=p.role, protocol="HTTP", source_address=address, **kw
            )
        except Exception:
            log.exception("audit record failed")

    def _denied(self, p: Principal, scope: Scope, address: str, detail: str) -> None:
        """A refused request: Security Alert, use of a restricted function (DCM 110132)."""
        self._audit("SecurityAlert", p, scope, address, outcome=4, event_type="110132", detail=detail)

    def _audit_request(
        self, event: str, p: Principal, scope: Scope, address: str, path: str, method: str, status: int
    ) -> None:
        outcome = 0 if status < 400 else 4 if status < 500 else 8
        qs = scope.get("query_string", b"").decode("latin-1")
        uids = _studies_named(path, scope.get("query_string", b""))
        for uid in scope.get("openpacs.audit_studies") or ():  # what a route reports it touched (STOW)
            if uid not in uids:
                uids.append(uid)
        kw: dict[str, Any] = dict(outcome=outcome, study_uids=uids, detail=f"{method} {path} -> {status}")
        patient = scope.get("openpacs.patient")
        if patient:
            kw.update(patient_id=patient[0], patient_name=patient[1])
        if event == "Query":
            kw["query"] = qs
        elif event == "InstancesTransferred" and method == "POST":
            kw["action"] = "C"
        if status in (401, 403):
            self._audit(
                "SecurityAlert",
                p,
                scope,
                address,
                outcome=4,
                event_type="110132",
                detail=f"{method} {path} denied: {scope.get('openpacs.denied') or status}",
            )
            return
        self._audit(event, p, scope, address, **kw)


def _studies_named(path: str, query_string: bytes) -> list[str]:
    out = []
    m = _STUDY_IN_PATH.search(path)
    if m:
        out.append(m.group(1))
    if query_string:  # decoded as the handlers decode it: "%73tudyUID" is studyUID to them, so to the check too
        for k, v in parse_qsl(query_string.decode("latin-1")):
            if k.lower() == "studyuid" and v:
                out.append(v.strip())
    return out


def _header(scope: Scope, name: bytes) -> str:
    for k, v in scope.get("headers", ()):
        if k == name:
            return str(v.decode("latin-1"))
    return ""


def _cookie(scope: Scope, name: str) -> str:
    raw = _header(scope, b"cookie")
    if not raw or name not in raw:
        return ""
    c: SimpleCookie = SimpleCookie()
    try:
        c.load(raw)
    except Exception:
        return ""
    m = c.get(name)
    return m.value if m is not None else ""


def _networks(spec: str) -> list[Any]:
    out = []
    for part in (spec or "").split(","):
        part = part.strip()
        if part:
            out.append(ipaddress.ip_network(part, strict=False))
    return out


def _in(host: str, nets: list[Any]) -> bool:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(ip in n for n in nets)


async def _plain(send: Send, status: int, text: str, headers: dict[str, str] | None = None) -> None:
    body = text.encode()
    h = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
    ]
    h += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": h})
    await send({"type": "http.response.body", "body": body})


async def _redirect(send: Send, location: str) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 303,
            "headers": [
                (b"location", location.encode("latin-1")),
                (b"content-length", b"0"),
                (b"cache-control", b"no-store"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": b""})


Handler = Callable[[Scope, Receive, Send], Awaitable[None]]


def audit_routes(ctx: Any) -> list[Any]:
    """``GET /admin/audit``: search the audit trail (``event``, ``user``, ``study``, ``patient``, ``since``,
    ``until``, ``limit``, ``offset``) as JSON or, with ``format=xml``, as PS3.15 A.5.1 audit messages. Needs the
    ``audit`` right; the access itself is audited (Audit Log Used) by the middleware."""
    from datetime import datetime

    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    from ..services.audit import export_xml

    async def audit_search(request: Request) -> Response:
        require(request, authsvc.AUDIT)
        qp = request.query_params

        def when(name: str) -> datetime | None:
            v = qp.get(name)
            if not v:
                return None
            try:
                return datetime.fromisoformat(v)
            except ValueError:
                raise HTTPException(400, f"{name}: expected an ISO 8601 date/time") from None

        try:
            limit = min(int(qp.get("limit", "1000")), 100000)
            offset = int(qp.get("offset", "0"))
        except ValueError:
            raise HTTPException(400, "limit/offset must be integers") from None
        from starlette.concurrency import run_in_threadpool

        events = await run_in_threadpool(
            lambda: ctx.audit.search(
                event=qp.get("event") or None,
                user=qp.get("user") or None,
                study_uid=qp.get("study") or None,
                patient_id=qp.get("patient") or None,
                since=when("since"),
                until=when("until"),
                limit=limit,
                offset=offset,
            )
        )
        if qp.get("format") == "xml":
            return StreamingResponse(
                export_xml(events), media_type="application/xml; charset=utf-8", headers={"Cache-Control": "no-store"}
            )
        return JSONResponse(
            [
                {
                    "id": e.id,
                    "at": e.at.isoformat() if e.at else None,
                    "event": e.event,
                    "event_type": e.event_type,
                    "action": e.action,
                    "outcome": e.outcome,
                    "user": e.user,
                    "role": e.role,
                    "protocol": e.protocol,
                    "source_address": e.source_address,
                    "source_aet": e.source_aet,
                    "destination": e.destination,
                    "study_uids": e.study_uids,
                    "patient_id": e.patient_id,
                    "query": e.query,
                    "detail": e.detail,
                    "node": e.node,
                }
                for e in events
            ],
            headers={"Cache-Control": "no-store"},
        )

    return [Route("/admin/audit", audit_search, methods=["GET"])]
