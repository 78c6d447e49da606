"""The ASGI application of a node: health, DICOMweb, WADO-URI, the OHIF viewer, the study list."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse
from starlette.routing import BaseRoute, Mount, Route

from ..context import Context


def build_app(ctx: Context) -> Starlette:
    from ..dicomweb.app import build_dicomweb
    from ..dicomweb.wado import wado_uri_route
    from .console import CONSOLE_PATH
    from .studylist import studylist_routes
    from .viewer import viewer_routes

    async def healthz(request: Request) -> JSONResponse:
        ok = ctx.index.ping()
        return JSONResponse({"status": "ok" if ok else "index-unavailable", "aet": ctx.settings.aet},
                            status_code=200 if ok else 503)

    async def home(request: Request) -> RedirectResponse:
        return RedirectResponse(CONSOLE_PATH, status_code=307)

    from .monitoring import MonitoringMiddleware, monitoring_routes

    routes: list[BaseRoute] = [Route("/healthz", healthz), Route("/", home), *monitoring_routes(ctx)]
    routes.append(wado_uri_route(ctx))
    routes += studylist_routes(ctx)
    routes += viewer_routes(ctx, wado_uri_path="/wado")
    routes.append(Mount("/dicom-web", app=build_dicomweb(ctx)))
    from .api import build_api
    from .console import console_routes

    routes += console_routes(ctx)
    routes.append(Mount("/api", app=build_api(ctx)))
    if ctx.auth is not None:
        from .auth import SecurityMiddleware, audit_routes
        from .login import login_routes
        from .security_admin import security_admin_routes

        routes += login_routes(ctx) + audit_routes(ctx) + security_admin_routes(ctx)
    app = Starlette(routes=routes)
    app.state.ctx = ctx
    from ..dicomweb.wado import FramesFastPath

    app.add_middleware(FramesFastPath, ctx=ctx)  # inside the security middleware: a viewer's frames, past the routers
    if ctx.auth is not None:  # outermost: every route, mounted apps included, is behind it
        app.add_middleware(SecurityMiddleware, ctx=ctx)
    if getattr(ctx, "monitor", None) is not None:  # outermost of all: refused requests are counted too
        app.add_middleware(MonitoringMiddleware, ctx=ctx)
    return app
