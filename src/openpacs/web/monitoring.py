"""HTTP side of monitoring: the request middleware (metrics, request ids, WADO bytes), ``/readyz`` and ``/metrics``.

``/metrics`` is open to callers on loopback (a Prometheus beside the server) and asks everybody else for
``Authorization: Bearer <metrics_token>`` or an administrator's API token. A request that came through a trusted
proxy counts as coming from the proxy's client (web/auth.py resolves it), so a proxy on loopback does not open it.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import itertools
import os
import re
import time
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import logs
from ..services import auth as authsvc
from ..services.metrics import exposition

PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"
_NUMERIC = re.compile(r"^[0-9][0-9.]*$")
_IDS = itertools.count(1)
_PREFIX = f"{os.getpid() % 0x10000:04x}"
_QIDO_LAST = frozenset({"studies", "series", "instances"})


def route_label(path: str) -> str:
    """A bounded label for a path: UIDs and numbers become ``{uid}`` / ``{n}``; below the protocol roots only the
    resource names are kept (``/dicom-web/studies/{uid}/series/{uid}/metadata``, ``/api/nodes/{id}/echo``)."""
    parts = [p for p in path.split("/") if p]
    if not parts:
        return "/"
    root = parts[0]
    if root in ("dicom-web", "wado"):
        out = [root]
        for p in parts[1:8]:
            out.append(("{uid}" if "." in p else "{n}") if _NUMERIC.match(p) else p if p.isalpha() else "{x}")
        return "/" + "/".join(out)
    if root == "api":
        out = ["api"]
        for i, p in enumerate(parts[1:4]):
            out.append(p if i % 2 == 0 and p.replace("-", "").replace("_", "").isalpha() else "{id}")
        return "/" + "/".join(out)
    if root in ("healthz", "readyz", "metrics", "login", "logout", "ui", "viewer", "ohif", "admin", "audit"):
        return "/" + root
    return "/other"


def _is_wado(path: str, method: str) -> bool:
    if method != "GET":
        return False
    if path == "/wado" or path.startswith("/wado/"):
        return True
    if not path.startswith("/dicom-web/"):
        return False
    last = path.rstrip("/").rsplit("/", 1)[-1]
    return last not in _QIDO_LAST


class MonitoringMiddleware:
    """Counts every HTTP request (route, status, time to the last byte) and the body bytes of WADO responses; gives
    each request an id (``X-Request-Id``) that its log lines carry."""

    def __init__(self, app: ASGIApp, ctx: Any) -> None:
        self.app = app
        self.monitor = ctx.monitor

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.monitor is None:
            await self.app(scope, receive, send)
            return
        rid = f"{_PREFIX}-{next(_IDS)}"
        token = logs.request_id.set(rid)
        path: str = scope.get("path", "")
        wado = _is_wado(path, scope.get("method", "GET"))
        status = [500]
        sent = [0]
        started = time.perf_counter()
        self.monitor.http_started()

        async def send_wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", rid.encode())]
            elif message["type"] == "http.response.body" and wado:
                sent[0] += len(message.get("body", b""))
            elif message["type"] == "http.response.pathsend" and wado:  # zero-copy file responses
                try:
                    sent[0] += os.path.getsize(message["path"])
                except OSError:
                    pass
            await send(message)

        try:
            await self.app(scope, receive, send_wrapped)
        finally:
            self.monitor.http(route_label(path), status[0], time.perf_counter() - started)
            if wado and status[0] < 400 and sent[0]:
                self.monitor.retrieved("wado", sent[0], instances=0)
            logs.request_id.reset(token)


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def monitoring_routes(ctx: Any) -> list[Route]:
    async def readyz(request: Request) -> JSONResponse:
        def check() -> list[str]:
            problems = []
            try:
                from sqlalchemy import text

                with ctx.index.write_engine.connect() as c:
                    c.execute(text("SELECT 1"))
            except Exception as e:  # noqa: BLE001 - the reason is the answer
                problems.append(f"index unreachable: {e.__class__.__name__}: {str(e)[:200]}")
            probe = getattr(ctx.store, "probe", None)
            if probe is not None:
                try:
                    probe()
                except OSError as e:
                    problems.append(f"storage not writable: {e}")
            usage = getattr(ctx.store, "usage", None)
            if usage is not None:
                try:
                    _, free = usage()
                    if free is not None and free < 64 * 1024 * 1024:
                        problems.append(f"storage almost full: {free} bytes free")
                except OSError as e:
                    problems.append(f"storage unreadable: {e}")
            return problems

        try:
            problems = await asyncio.wait_for(run_in_threadpool(check), timeout=10)
        except TimeoutError:
            problems = ["index or storage did not answer within 10 s"]
        if problems:
            return JSONResponse({"status": "not-ready", "reasons": problems}, status_code=503)
        return JSONResponse({"status": "ready", "aet": ctx.settings.aet})

    async def metrics(request: Request) -> Response:
        client = request.scope.get("openpacs.client") or (request.client.host if request.client else "")
        if not _loopback(client) or request.headers.get("x-forwarded-for"):
            kind, _, cred = request.headers.get("authorization", "").partition(" ")
            cred = cred.strip()
            token = ctx.settings.metrics_token
            ok = kind.lower() == "bearer" and bool(cred) and (
                (bool(token) and hmac.compare_digest(cred.encode(), token.encode()))
                or await run_in_threadpool(_admin_token, ctx, cred))  # a token lookup reads the index
            if not ok:
                return JSONResponse({"detail": "metrics need a bearer token (metrics_token or an administrator's "
                                     "API token) when not called from loopback"}, status_code=401,
                                    headers={"www-authenticate": 'Bearer realm="openpacs-metrics"'})
        body = await run_in_threadpool(exposition, ctx.figures)
        return Response(body, media_type=PROMETHEUS_TEXT)

    return [Route("/readyz", readyz), Route("/metrics", metrics)]


def _admin_token(ctx: Any, cred: str) -> bool:
    if ctx.auth is None:
        return False
    p = ctx.auth.principal_for_token(cred)
    return p is not None and authsvc.ADMIN in p.rights
