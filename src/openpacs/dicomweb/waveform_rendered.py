"""WADO-RS rendered for waveform instances (ECG, hemodynamic, ...): the instance drawn on ECG paper (dicom/waveform.py).

``…/instances/{i}/rendered`` draws the first multiplex group; ``…/frames/{n}/rendered`` the n-th (a waveform has no
frames: its multiplex groups stand for them). ``image/png`` (the default for ``*/*`` and ``image/*``) or
``image/svg+xml``, by Accept or the ``accept`` query parameter. Scale: ``px_per_mm`` (1 to 12, default 4), or
``viewport=w[,h]`` (the width in pixels the drawing is fitted to). 404 for a group that does not exist, 406 for
another media type or several groups at once, 400 for a bad parameter, 422 for an undecodable waveform.
"""

from __future__ import annotations

import math
from typing import Any

import pydicom
from starlette.requests import Request
from starlette.responses import Response

from ..dicom import waveform as wf
from ..services.types import InstanceRef

MEDIA = ("image/png", "image/svg+xml")


def _media(request: Request) -> str:
    from .common import accept_values
    from .wado import HTTPError, parse_accept

    for r in parse_accept(accept_values(request)):
        if r.multipart:
            continue
        if r.type in MEDIA:
            return r.type
        if r.type in ("*/*", "image/*"):
            return "image/png"
    raise HTTPError(406, "a waveform is rendered as image/png or image/svg+xml (one multiplex group per image)")


def _scale(request: Request, group: wf.Group) -> float:
    from .wado import HTTPError

    q = request.query_params
    try:
        if q.get("px_per_mm"):
            v = float(q["px_per_mm"])
            if not (math.isfinite(v) and wf.MIN_PX_PER_MM <= v <= wf.MAX_PX_PER_MM):
                raise ValueError
            return v
        if q.get("viewport"):
            w = int(q["viewport"].split(",")[0])
            if not 16 <= w <= 20000:
                raise ValueError
            return wf.px_per_mm_for_width(group, w)
    except ValueError:
        raise HTTPError(400, f"px_per_mm: {wf.MIN_PX_PER_MM:g} to {wf.MAX_PX_PER_MM:g}; viewport: width[,height] "
                             "in pixels (16 to 20000)") from None
    return wf.DEFAULT_PX_PER_MM


def render_response(rs: Any, request: Request, ref: InstanceRef, frames: list[int] | None) -> Response:
    """The rendered waveform (run in a worker thread); raises wado.HTTPError for the caller's error response."""
    from .wado import HTTPError

    media = _media(request)
    if frames is not None and len(frames) != 1:
        raise HTTPError(406, "a waveform is rendered one multiplex group (frame number) at a time")
    index = (frames[0] if frames else 1) - 1
    try:
        ds = pydicom.dcmread(rs._source(ref), force=True)
        groups = wf.decode(ds, max_seconds=0)  # the groups' facts; the drawing converts its own samples
    except wf.WaveformError as e:
        raise HTTPError(422, f"cannot render the waveform of {ref.sop_instance_uid}: {e}") from e
    except Exception as e:
        raise HTTPError(422, f"cannot read {ref.sop_instance_uid}: {e.__class__.__name__}") from e
    if not 0 <= index < len(groups):
        raise HTTPError(404, f"frame (multiplex group) {index + 1} does not exist (the waveform has {len(groups)})")
    ppm = _scale(request, groups[index])
    try:
        body = wf.render_svg(ds, index, ppm) if media == "image/svg+xml" else wf.render_png(ds, index, ppm)
    except wf.WaveformTooLarge as e:
        raise HTTPError(400, str(e)) from e
    except wf.WaveformError as e:
        raise HTTPError(422, f"cannot render the waveform of {ref.sop_instance_uid}: {e}") from e
    return Response(body, media_type=media, headers={"X-Waveform-Px-Per-Mm": f"{ppm:g}"})
