"""The ASGI application of a node: health, DICOMweb, viewer, and (later) the admin console and REST API."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from ..context import Context


def build_app(ctx: Context) -> Starlette:
    from ..dicomweb.app import build_dicomweb

    async def healthz(request: Request) -> JSONResponse:
        ok = ctx.index.ping()
        return JSONResponse({"status": "ok" if ok else "index-unavailable", "aet": ctx.settings.aet},
                            status_code=200 if ok else 503)

    routes = [
        Route("/healthz", healthz),
        Mount("/dicom-web", app=build_dicomweb(ctx)),
    ]
    app = Starlette(routes=routes)
    app.state.ctx = ctx
    return app
