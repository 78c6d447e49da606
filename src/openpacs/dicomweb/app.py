"""Assembles the DICOMweb routes mounted at /dicom-web."""

from __future__ import annotations

from starlette.applications import Starlette

from ..context import Context
from . import capabilities, qido, stow, wado


def build_dicomweb(ctx: Context) -> Starlette:
    app = Starlette(routes=[*capabilities.routes(), *qido.routes(ctx), *wado.routes(ctx), *stow.routes(ctx)])
    app.state.ctx = ctx
    return app
