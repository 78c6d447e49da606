"""REST API for studies, series, instances and patients: keyset search, detail, tags, zip download, delete.

Search uses the matching rules of the one query engine (index.matching through index.browse); department scope is
the caller's, as for QIDO-RS. Deletes go through ``ingest.delete``, the DICOMweb DELETE's path.
"""

from __future__ import annotations

import io
import os
import tempfile
import zipfile
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse, Response
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from sqlalchemy import select
from starlette.background import BackgroundTask

from ...dicom.waveform import is_waveform_class, waveform_summary
from ...index.browse import SORTS, browse_studies
from ...index.matching import MatchError
from ...index.query import visible
from ...index.schema import instances, patients, series, studies
from ...services import summaries
from ...services.auth import Principal
from ...services.types import Source
from ..auth import departments_of
from .common import bad, decode_cursor, encode_cursor, limit_param, need, not_found

READ = Depends(need("read"))
EXPORT = Depends(need("export"))
DELETE = Depends(need("delete"))


_DICOMDIR_KEYS = {"PatientID": "UNKNOWN", "StudyDate": "19000101", "StudyTime": "000000", "StudyID": "1",
                  "SeriesNumber": "1", "InstanceNumber": "1"}


def _iso(v: Any) -> Any:
    return v.isoformat() if isinstance(v, datetime) else v


def _study_json(r: Any) -> dict[str, Any]:
    return {
        "uid": r["study_instance_uid"], "date": r["study_date"], "time": r["study_time"],
        "accession": r["accession_number"], "description": r["study_description"],
        "referring_physician": r["referring_physician_name"],
        "modalities": [m for m in (r["modalities_in_study"] or "").split("\\") if m],
        "kinds": summaries.kinds_of(r.get("sop_classes_in_study"), r["modalities_in_study"]),
        "department": r["department"], "num_series": r["num_series"], "num_instances": r["num_instances"],
        "size_bytes": r["size_bytes"], "received_at": _iso(r["created_at"]), "updated_at": _iso(r["updated_at"]),
        "patient": {"id": r["patient_id"], "name": r["patient_name"], "birth_date": r["patient_birth_date"],
                    "sex": r["patient_sex"]},
    }


def _element_json(ds: Dataset) -> list[dict[str, Any]]:
    out = []
    for el in ds:
        item: dict[str, Any] = {"tag": f"{el.tag.group:04X},{el.tag.element:04X}", "keyword": el.keyword or "",
                                "vr": el.VR}
        if el.VR == "SQ":
            item["items"] = [_element_json(i) for i in el.value]
        elif el.VR in ("OB", "OW", "OF", "OD", "OL", "OV", "UN") or el.tag == 0x7FE00010:
            n = len(el.value) if el.value is not None and hasattr(el.value, "__len__") else 0
            item["value"] = f"({n} bytes of binary data)"
            item["bulk"] = True
        else:
            v = el.value
            if isinstance(v, bytes | bytearray):
                item["value"] = f"({len(v)} bytes)"
            else:
                try:
                    s = "\\".join(str(x) for x in v) if isinstance(v, list | MultiValue) else str(v)
                except Exception:
                    s = repr(v)
                item["value"] = s[:1024] + ("…" if len(s) > 1024 else "")
        out.append(item)
    return out


def build_router(ctx: Any) -> APIRouter:
    router = APIRouter(tags=["studies"])
    index = ctx.index

    def _scope_ok(request: Request, dept: str | None) -> bool:
        d = departments_of(request)
        return d is None or dept in d

    @router.get("/studies", summary="Search studies (keyset pagination)")
    def search(
        request: Request,
        patient_name: str = Query("", description="wildcards * ?, case-insensitive"),
        patient_id: str = "", accession: str = "", date_from: str = "", date_to: str = "",
        modality: str = "", department: str = "", referring_physician: str = "", description: str = "",
        sort: str = Query("-date", description="date, patient, accession, received, updated; '-' for descending"),
        limit: int = limit_param(), cursor: str | None = None, p: Principal = READ,
    ) -> dict[str, Any]:
        desc = sort.startswith("-")
        key = sort.lstrip("-")
        if key not in SORTS:
            raise bad(f"sort: one of {', '.join(SORTS)} (prefix '-' for descending)")
        after = decode_cursor(cursor, 2)
        if after is not None and key in ("received", "updated") and isinstance(after[0], str):
            try:
                after[0] = datetime.fromisoformat(after[0])
            except ValueError:
                raise bad("cursor: not a cursor returned by this API") from None
        if after is not None and not isinstance(after[1], int):
            raise bad("cursor: not a cursor returned by this API")
        filters = {"PatientName": patient_name, "PatientID": patient_id, "AccessionNumber": accession,
                   "StudyDescription": description, "ReferringPhysicianName": referring_physician,
                   "ModalitiesInStudy": modality.upper(), "Department": department}
        if date_from or date_to:
            filters["StudyDate"] = f"{date_from.replace('-', '')}-{date_to.replace('-', '')}"
        try:
            with index.engine.connect() as conn:
                items, nxt = browse_studies(conn, filters, departments_of(request), key, desc, limit, after)
        except MatchError as e:
            raise bad(str(e)) from None
        return {"items": [_study_json(r) for r in items], "next": encode_cursor(nxt) if nxt else None}

    def _study_row(conn: Any, uid: str, request: Request) -> Any:
        r = conn.execute(select(*[c for c in studies.c], patients.c.patient_id, patients.c.patient_name,
                                patients.c.patient_birth_date, patients.c.patient_sex)
                         .select_from(studies.join(patients, studies.c.patient_fk == patients.c.id))
                         .where(studies.c.study_instance_uid == uid, visible("STUDY"))).mappings().first()
        if r is None or not _scope_ok(request, r["department"]):
            raise not_found(f"study {uid}")
        return r

    def _series_list(conn: Any, study_id: int, study_uid: str) -> list[dict[str, Any]]:
        rows = conn.execute(select(series).where(series.c.study_fk == study_id, visible("SERIES"))).mappings().all()
        per_series: dict[int, list[Any]] = {}
        for i in conn.execute(select(instances.c.series_fk, instances.c.sop_class_uid, instances.c.number_of_frames,
                                     instances.c.rows, instances.c.columns, instances.c.blob_key,
                                     instances.c.instance_number, instances.c.sop_instance_uid)
                              .where(instances.c.series_fk.in_([s["id"] for s in rows]), visible("IMAGE"))
                              .order_by(instances.c.id)):
            per_series.setdefault(i.series_fk, []).append(i)
        out = []
        for s in sorted(rows, key=lambda s: (int(s["series_number"]) if (s["series_number"] or "").lstrip("-").isdigit()
                                            else 1 << 30, s["id"])):
            out.append({"uid": s["series_instance_uid"], "number": s["series_number"], "modality": s["modality"],
                        "description": s["series_description"], "body_part": s["body_part_examined"],
                        "num_instances": s["num_instances"], "size_bytes": s["size_bytes"],
                        "summary": _summary(s["modality"], per_series.get(s["id"], [])),
                        "first_instance": next((i.sop_instance_uid for i in per_series.get(s["id"], [])), None),
                        "thumbnail": f"/dicom-web/studies/{study_uid}/series/{s['series_instance_uid']}/thumbnail"})
            wav = [i for i in per_series.get(s["id"], []) if is_waveform_class(i.sop_class_uid)][:8]
            if wav:  # ECG / hemodynamic objects: the console shows each drawn on ECG paper (dicom/waveform.py)
                out[-1]["waveforms"] = [_waveform(study_uid, s["series_instance_uid"], i) for i in wav]
        return out

    def _waveform(study_uid: str, series_uid: str, row: Any) -> dict[str, Any]:
        header = summaries.read_header(ctx.store, row.blob_key)
        try:
            summary = waveform_summary(header) if header is not None else None
        except Exception:
            summary = None
        return {"uid": row.sop_instance_uid, "number": row.instance_number, "summary": summary,
                "rendered": f"/dicom-web/studies/{study_uid}/series/{series_uid}/instances/{row.sop_instance_uid}"
                            "/rendered"}

    def _summary(modality: str | None, rows: list[Any]) -> dict[str, Any]:
        def frames(v: Any) -> int:
            try:
                return max(1, int(v))
            except (TypeError, ValueError):
                return 1
        facts = summaries.SeriesFacts(modality or "", [(r.sop_class_uid, frames(r.number_of_frames), r.rows,
                                                         r.columns) for r in rows])
        header = None
        if rows and summaries.needs_header(facts):
            pick = next((r for r in rows if r.sop_class_uid == summaries.WSI), rows[0])
            header = summaries.read_header(ctx.store, pick.blob_key)
        out: dict[str, Any] = dict(summaries.summarize(facts, header))
        plan = summaries.rt_plan_details(header)
        if plan is not None:
            out["rt_plan"] = plan
        return out

    @router.get("/studies/{uid}", summary="One study with its patient and series")
    def study(uid: str, request: Request, p: Principal = READ) -> dict[str, Any]:
        with index.engine.connect() as conn:
            r = _study_row(conn, uid, request)
            out = _study_json(r)
            out["series"] = _series_list(conn, r["id"], uid)
        out["viewer"] = f"/ohif/viewer?StudyInstanceUIDs={uid}"
        out["download"] = f"/api/studies/{uid}/download"
        return out

    @router.get("/studies/{uid}/series", summary="Series of a study")
    def study_series(uid: str, request: Request, p: Principal = READ) -> dict[str, Any]:
        with index.engine.connect() as conn:
            r = _study_row(conn, uid, request)
            return {"items": _series_list(conn, r["id"], uid), "next": None}

    def _series_row(conn: Any, uid: str, request: Request) -> Any:
        r = conn.execute(select(series.c.id, series.c.series_instance_uid, studies.c.study_instance_uid,
                                studies.c.department)
                         .select_from(series.join(studies, series.c.study_fk == studies.c.id))
                         .where(series.c.series_instance_uid == uid)).mappings().first()
        if r is None or not _scope_ok(request, r["department"]):
            raise not_found(f"series {uid}")
        return r

    @router.get("/series/{uid}/instances", summary="Instances of a series")
    def series_instances(uid: str, request: Request, p: Principal = READ) -> dict[str, Any]:
        with index.engine.connect() as conn:
            s = _series_row(conn, uid, request)
            rows = conn.execute(select(instances).where(instances.c.series_fk == s["id"],
                                                        visible("IMAGE"))).mappings().all()
        def num(r: Any) -> tuple[int, int]:
            n = r["instance_number"] or ""
            return (int(n) if n.lstrip("-").isdigit() else 1 << 30, r["id"])
        return {"study": s["study_instance_uid"], "items": [
            {"uid": r["sop_instance_uid"], "sop_class": r["sop_class_uid"], "number": r["instance_number"],
             "rows": r["rows"], "columns": r["columns"], "frames": r["number_of_frames"],
             "transfer_syntax": r["transfer_syntax_uid"], "size_bytes": r["size_bytes"],
             "received_at": _iso(r["received_at"])} for r in sorted(rows, key=num)], "next": None}

    def _instance_row(conn: Any, uid: str, request: Request) -> Any:
        r = conn.execute(select(instances.c.blob_key, studies.c.department, studies.c.study_instance_uid)
                         .select_from(instances.join(series, instances.c.series_fk == series.c.id)
                                      .join(studies, series.c.study_fk == studies.c.id))
                         .where(instances.c.sop_instance_uid == uid, visible("IMAGE"))).mappings().first()
        if r is None or not _scope_ok(request, r["department"]):
            raise not_found(f"instance {uid}")
        return r

    @router.get("/instances/{uid}/tags", summary="Every element of an instance as a tree (bulk data summarized)")
    def tags(uid: str, request: Request, p: Principal = READ) -> dict[str, Any]:
        with index.engine.connect() as conn:
            r = _instance_row(conn, uid, request)
        try:  # through the retrieve service: the patient module as every retrieval path shows it (ADT coercion)
            refs = ctx.retrieve.list_instances(r["study_instance_uid"], sop_uid=uid)
            data = ctx.retrieve.read_file(refs[0]) if refs else ctx.store.read(r["blob_key"])
            ds = dcmread(io.BytesIO(data), defer_size=4096, force=True)
        except Exception as e:
            raise not_found(f"readable data set for instance {uid} ({e.__class__.__name__})") from None
        if True:
            meta = _element_json(ds.file_meta) if getattr(ds, "file_meta", None) is not None else []
            body = _element_json(ds)
        return {"uid": uid, "study": r["study_instance_uid"], "meta": meta, "elements": body}

    @router.get("/patients", summary="Search patients")
    def patient_list(request: Request, name: str = "", id: str = "", limit: int = limit_param(),
                     cursor: str | None = None, p: Principal = READ) -> dict[str, Any]:
        from ...index.matching import compile_match
        after = decode_cursor(cursor, 1)
        if after is not None and not isinstance(after[0], int):
            raise bad("cursor: not a cursor returned by this API")
        conds: list[Any] = []
        try:
            for col, vr, v in ((patients.c.patient_name_norm, "PN", name.upper()), (patients.c.patient_id, "LO", id)):
                c = compile_match(col, vr, "PatientName" if vr == "PN" else "PatientID", v, case_insensitive_pn=False)
                if c is not None:
                    conds.append(c)
        except MatchError as e:
            raise bad(str(e)) from None
        d = departments_of(request)
        if d is not None:
            conds.append(patients.c.id.in_(select(studies.c.patient_fk).where(studies.c.department.in_(d))))
        if after is not None:
            conds.append(patients.c.id > after[0])
        with index.engine.connect() as conn:
            rows = conn.execute(select(patients).where(*conds).order_by(patients.c.id).limit(limit + 1)).mappings().all()
        items = [{"id": r["patient_id"], "issuer": r["issuer_of_patient_id"], "name": r["patient_name"],
                  "birth_date": r["patient_birth_date"], "sex": r["patient_sex"], "num_studies": r["num_studies"],
                  "num_instances": r["num_instances"]} for r in rows[:limit]]
        return {"items": items, "next": encode_cursor([rows[limit - 1]["id"]]) if len(rows) > limit else None}

    @router.get("/patients/{pid}", summary="One patient with their studies")
    def patient(pid: str, request: Request, p: Principal = READ) -> dict[str, Any]:
        with index.engine.connect() as conn:
            prow = conn.execute(select(patients).where(patients.c.patient_id == pid)).mappings().first()
            if prow is None:
                raise not_found(f"patient {pid}")
            with_studies, _ = browse_studies(conn, {"PatientID": pid}, departments_of(request), "date", True, 500, None)
        if not with_studies and departments_of(request) is not None:
            raise not_found(f"patient {pid}")
        return {"id": prow["patient_id"], "name": prow["patient_name"], "birth_date": prow["patient_birth_date"],
                "sex": prow["patient_sex"], "studies": [_study_json(r) for r in with_studies]}

    @router.get("/studies/{uid}/download", summary="The study as a zip with a DICOMDIR")
    def download(uid: str, request: Request, p: Principal = EXPORT) -> Response:
        from pydicom.fileset import FileSet
        with index.engine.connect() as conn:
            _study_row(conn, uid, request)  # 404 when unknown or outside the caller's departments
        refs = ctx.retrieve.list_instances(uid)  # read_file: the current patient module (ADT coercion)
        tmp = tempfile.mkdtemp(prefix="openpacs-zip-")
        fs = FileSet()
        src_dir = os.path.join(tmp, "src")
        os.makedirs(src_dir)
        for i, ref in enumerate(refs):
            path = os.path.join(src_dir, f"{i}.dcm")
            with open(path, "wb") as out:
                out.write(ctx.retrieve.read_file(ref))
            ds = dcmread(path)
            missing = {kw: v for kw, v in _DICOMDIR_KEYS.items() if not ds.get(kw)}
            if missing:  # pydicom's directory records need these non-empty: filled in the exported copy only
                for kw, v in missing.items():
                    setattr(ds, kw, v)
                ds.save_as(path)
            fs.add(path)
        out_dir = os.path.join(tmp, "fs")
        fs.write(out_dir)
        zpath = os.path.join(tmp, "study.zip")
        with zipfile.ZipFile(zpath, "w", zipfile.ZIP_STORED) as z:
            for root, _dirs, files in os.walk(out_dir):
                for name in files:
                    full = os.path.join(root, name)
                    z.write(full, os.path.relpath(full, out_dir))

        def cleanup() -> None:
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)

        return FileResponse(zpath, media_type="application/zip", filename=f"{uid}.zip", background=BackgroundTask(cleanup))

    @router.delete("/studies/{uid}", status_code=204, summary="Delete a study (delete right)")
    def delete_study(uid: str, request: Request, p: Principal = DELETE) -> Response:
        with index.engine.connect() as conn:
            _study_row(conn, uid, request)
        ctx.ingest.delete("STUDY", uid, Source("API", user=p.name))
        return Response(status_code=204)

    @router.delete("/series/{uid}", status_code=204, summary="Delete a series (delete right)")
    def delete_series(uid: str, request: Request, p: Principal = DELETE) -> Response:
        with index.engine.connect() as conn:
            _series_row(conn, uid, request)
        ctx.ingest.delete("SERIES", uid, Source("API", user=p.name))
        return Response(status_code=204)

    return router

