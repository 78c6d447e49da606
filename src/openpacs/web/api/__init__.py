"""The REST API at ``/api`` (FastAPI): the one interface the web console calls, documented by OpenAPI 3.

Rights and audit are the security middleware's (web/auth.py ``route_policy`` maps ``/api`` paths to a right and an
audit event, as for every other route); each endpoint also states its right with :func:`common.need`, so that the
OpenAPI document and the code say the same. Errors are JSON objects with a readable ``detail``: bad parameters 400,
unknown resources 404, and an unexpected error a logged 500 with a JSON body (never a stack trace).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

from ... import __version__

log = logging.getLogger("openpacs.web.api")


def build_api(ctx: Any) -> FastAPI:
    from . import (
        admin,
        docs,
        hl7,
        iocm,
        jobs,
        me,
        nodes,
        qc,
        qc_edit,  # QC edits, merges, splits, moves, history and undo
        reports,
        routes,
        rt,  # radiation therapy: RT Dose over its images
        storage_usage,  # storage management: usage, compression, retention, scrub
        studies,
        system,
        tiering,
        worklist,
    )

    app = FastAPI(
        title="OpenPACS API",
        version=__version__,
        description="REST API of an OpenPACS node: studies, patients, remote nodes, jobs, users, departments, "
        "audit, statistics and system information. The web console at /ui/ uses only this API.",
        openapi_url="/openapi.json",
        docs_url=None,  # served by docs.py from local assets (no CDN)
        redoc_url=None,
    )
    app.state.ctx = ctx

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err.get("loc", ()) if p not in ("query", "path", "body"))
            parts.append(f"{loc}: {err.get('msg', 'invalid')}" if loc else str(err.get("msg", "invalid")))
        return JSONResponse({"detail": "; ".join(parts) or "invalid request"}, status_code=400)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("API %s %s failed", request.method, request.url.path)
        return JSONResponse({"detail": f"internal error ({exc.__class__.__name__}); see the server log"},
                            status_code=500)

    for module in (me, studies, nodes, jobs, routes, admin, system, hl7, worklist, reports, qc, qc_edit, tiering, storage_usage, iocm, rt, docs):
        app.include_router(module.build_router(ctx))
    return app
