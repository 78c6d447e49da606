"""REST API for radiation therapy views: an RT Dose grid drawn over the images of its frame of reference
(services/rt_dose.py), for the console's study view.

Reads go through the retrieve service (department scope, coercion on retrieval) like every other retrieval path.
"""

from __future__ import annotations

import io
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from pydicom import dcmread
from pydicom.dataset import Dataset

from ...services import rt_dose, summaries
from ...services.auth import Principal
from ...services.types import InstanceRef
from ..auth import departments_of
from .common import bad, need, not_found

READ = Depends(need("read"))
MAX_IMAGES = 2000


def build_router(ctx: Any) -> APIRouter:
    router = APIRouter(tags=["radiation therapy"])

    def _dose(study: str, dose_uid: str, request: Request) -> InstanceRef:
        refs = ctx.retrieve.list_instances(study, sop_uid=dose_uid, departments=departments_of(request))
        if not refs or refs[0].sop_class_uid != rt_dose.RTDOSE:
            raise not_found(f"RT Dose {dose_uid} in study {study}")
        return refs[0]  # type: ignore[no-any-return]

    def _read(ref: InstanceRef) -> Dataset:
        return dcmread(io.BytesIO(ctx.retrieve.read_file(ref)), force=True)

    @router.get("/studies/{study}/rt-dose/{dose_uid}/images",
                summary="The images an RT Dose grid can be drawn over (same frame of reference), by position")
    def dose_images(study: str, dose_uid: str, request: Request, p: Principal = READ) -> dict[str, Any]:
        ref = _dose(study, dose_uid, request)
        dose = summaries.read_header(ctx.store, ref.blob_key)
        if dose is None:
            raise not_found(f"readable RT Dose {dose_uid}")
        frame_of_ref = str(getattr(dose, "FrameOfReferenceUID", "") or "")
        items = []
        for r in ctx.retrieve.list_instances(study, departments=departments_of(request))[:MAX_IMAGES]:
            if r.sop_class_uid == rt_dose.RTDOSE:
                continue
            h = summaries.read_header(ctx.store, r.blob_key)
            if h is None or str(getattr(h, "FrameOfReferenceUID", "") or "") != frame_of_ref or \
                    "ImagePositionPatient" not in h or "ImageOrientationPatient" not in h or not getattr(h, "Rows", 0):
                continue
            iop = [float(v) for v in h.ImageOrientationPatient]
            normal = [iop[1] * iop[5] - iop[2] * iop[4], iop[2] * iop[3] - iop[0] * iop[5],
                      iop[0] * iop[4] - iop[1] * iop[3]]
            pos = [float(v) for v in h.ImagePositionPatient]
            items.append({"uid": r.sop_instance_uid, "series": r.series_instance_uid,
                          "modality": str(getattr(h, "Modality", "") or ""),
                          "position": round(sum(a * b for a, b in zip(pos, normal, strict=True)), 3)})
        items.sort(key=lambda i: (i["series"], i["position"]))
        return {"dose": dose_uid, "frame_of_reference": frame_of_ref, "units": str(getattr(dose, "DoseUnits", "")),
                "items": items}

    @router.get("/studies/{study}/rt-dose/{dose_uid}/overlay", summary="An image with the RT Dose over it (PNG)",
                response_class=Response, responses={200: {"content": {"image/png": {}}}})
    def dose_overlay(study: str, dose_uid: str, request: Request,
                     image: str = Query(..., description="SOPInstanceUID of an image on the dose's frame of reference"),
                     alpha: float = Query(0.45, ge=0.0, le=1.0), p: Principal = READ) -> Response:
        ref = _dose(study, dose_uid, request)
        images = ctx.retrieve.list_instances(study, sop_uid=image, departments=departments_of(request))
        if not images:
            raise not_found(f"image {image} in study {study}")
        try:
            png = rt_dose.overlay_png(_read(images[0]), _read(ref), alpha=alpha)
        except rt_dose.DoseOverlayError as e:
            raise bad(str(e)) from None
        return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=60"})

    return router
