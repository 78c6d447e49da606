"""The web console at ``/ui/``: one page of static HTML, CSS and JavaScript that talks only to the REST API.

Everything is built into the package (no CDN, no framework): a hospital network cut off from the internet serves it
as it is. Pages live in ``static/pages/*.js``, one per console section, each registering itself with ``OP.page``
(``static/app.js``). DOM is built with ``OP.h`` (text nodes only, never ``innerHTML``), so every DICOM value is
escaped by construction, and the Content-Security-Policy allows scripts from this origin only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import FileResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

CONSOLE_PATH = "/ui/"
STATIC = Path(__file__).with_name("static")
CONSOLE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
    "object-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml",
          ".html": "text/html; charset=utf-8", ".png": "image/png"}


def console_routes(ctx: Any) -> list[BaseRoute]:
    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", media_type=_TYPES[".html"],
                            headers={"Content-Security-Policy": CONSOLE_CSP, "Cache-Control": "no-cache"})

    async def bare(request: Request) -> Response:
        return RedirectResponse(CONSOLE_PATH, status_code=307)

    async def static(request: Request) -> Response:
        rel = request.path_params["path"]
        target = (STATIC / rel).resolve()
        if STATIC.resolve() not in target.parents or not target.is_file() or target.suffix not in _TYPES:
            return Response("not found", status_code=404, media_type="text/plain")
        return FileResponse(target, media_type=_TYPES[target.suffix],
                            headers={"Content-Security-Policy": CONSOLE_CSP, "Cache-Control": "no-cache"})

    return [
        Route("/ui", bare, methods=["GET", "HEAD"]),
        Route(CONSOLE_PATH, index, methods=["GET", "HEAD"]),
        Route("/ui/static/{path:path}", static, methods=["GET", "HEAD"]),
    ]
