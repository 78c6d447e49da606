"""Assembles the DICOMweb routes mounted at /dicom-web."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.routing import BaseRoute

from ..context import Context


def build_dicomweb(ctx: Context) -> Starlette:
    routes: list[BaseRoute] = []
    for module in ("qido", "wado", "stow"):
        try:
            mod = __import__(f"openpacs.dicomweb.{module}", fromlist=["routes"])
        except ModuleNotFoundError as exc:
            if exc.name != f"openpacs.dicomweb.{module}":
                raise
            continue
        routes.extend(mod.routes(ctx))
    app = Starlette(routes=routes)
    app.state.ctx = ctx
    return app
