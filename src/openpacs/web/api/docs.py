"""``/api/docs``: a browsable reference of the OpenAPI 3.1 document, from assets in the package (no CDN, works on a
network cut off from the internet). Swagger UI 4 cannot read OpenAPI 3.1; this small renderer lists every
operation by tag with its parameters, request body, responses and the right it needs, and can try GET requests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter
from starlette.responses import FileResponse, Response

STATIC = Path(__file__).parent / "docs_static"
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
       "frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
HEADERS = {"Content-Security-Policy": CSP, "Cache-Control": "no-cache"}


def build_router(ctx: Any) -> APIRouter:
    router = APIRouter(include_in_schema=False)

    @router.get("/docs")
    def docs() -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8", headers=HEADERS)

    @router.get("/docs/{asset}")
    def asset(asset: str) -> Response:
        kinds = {"docs.js": "text/javascript; charset=utf-8", "docs.css": "text/css; charset=utf-8"}
        if asset not in kinds:
            return Response('{"detail":"not found"}', status_code=404, media_type="application/json")
        return FileResponse(STATIC / asset, media_type=kinds[asset], headers=HEADERS)

    return router
