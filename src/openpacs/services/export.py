"""Export a selection of studies: a zip holding a DICOM File-set with its DICOMDIR (PS3.10, written by pydicom's
``FileSet``; DCMTK ``dcmdump``/``dcmqridx`` read it), the same File-set written to a folder under
``<data_dir>/exports/``, or a send job to a remote node (services/jobs.submit_send). Any of them optionally
de-identified (services/deidentify.py; one UID map for the whole export, so references between studies hold).

A de-identified export to a node first makes a de-identified copy in this archive (through ingest) and sends that:
the send job reads stored instances only. Every export is audited (Export, 110106).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread

from .deidentify import Deidentifier, DeidOptions, deidentify_bytes, deidentify_study
from .jobs import JobError, submit_send

# pydicom's directory records need these non-empty: filled in the exported copy only (de-identification empties
# StudyDate and StudyID, and some modalities leave them out).
DICOMDIR_KEYS = {"PatientID": "UNKNOWN", "StudyDate": "19000101", "StudyTime": "000000", "StudyID": "1",
                 "SeriesNumber": "1", "InstanceNumber": "1"}
FORMATS = ("zip", "folder", "node")


class ExportError(ValueError):
    def __init__(self, message: str, kind: str = "invalid") -> None:
        super().__init__(message)
        self.kind = kind


@dataclass
class ExportResult:
    format: str
    instances: int
    path: str = ""  # zip file or folder
    tmp_dir: str = ""  # to remove once the zip is sent
    job_id: int | None = None
    studies: list[str] | None = None


def _refs(ctx: Any, study_uids: list[str], departments: tuple[str, ...] | None) -> list[Any]:
    refs = []
    for uid in study_uids:
        got = ctx.retrieve.list_instances(uid, departments=departments)
        if not got:
            raise ExportError(f"no stored instance in study {uid}", "unknown")
        refs += got
    return refs


def write_fileset(ctx: Any, refs: list[Any], out_dir: str, deid: Deidentifier | None) -> int:
    """The instances as a File-set with a DICOMDIR in ``out_dir`` (created); returns the number of instances."""
    from pydicom.fileset import FileSet

    work = tempfile.mkdtemp(prefix="openpacs-export-")
    try:
        fs = FileSet()
        for i, ref in enumerate(refs):
            data = ctx.retrieve.read_file(ref)
            if deid is not None:
                data = deidentify_bytes(deid, data)
            path = os.path.join(work, f"{i}.dcm")
            with open(path, "wb") as f:
                f.write(data)
            ds = dcmread(path)
            missing = {kw: v for kw, v in DICOMDIR_KEYS.items() if not ds.get(kw)}
            if missing:
                for kw, v in missing.items():
                    setattr(ds, kw, v)
                ds.save_as(path)
            fs.add(path)
        os.makedirs(out_dir, exist_ok=True)
        fs.write(out_dir)
        return len(refs)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def export(ctx: Any, study_uids: list[str], fmt: str, *, deidentify: dict[str, Any] | None = None,
           destination: str = "", folder: str = "", actor: str = "",
           departments: tuple[str, ...] | None = None) -> ExportResult:
    study_uids = [u.strip() for u in study_uids if u and u.strip()]
    if not study_uids:
        raise ExportError("studies: at least one Study Instance UID")
    if fmt not in FORMATS:
        raise ExportError(f"format: one of {', '.join(FORMATS)}")
    options = DeidOptions.from_json(deidentify) if deidentify is not None else None
    if fmt == "node":
        if not destination:
            raise ExportError("destination: the node to send to")
        uids = study_uids
        if options is not None:
            uids = [deidentify_study(ctx, u, options, actor=actor, departments=departments)["study_instance_uid"]
                    for u in study_uids]
        try:
            job = submit_send(ctx, destination, "STUDY", uids, departments=departments)
        except JobError as e:
            raise ExportError(str(e)) from None
        _audit(ctx, actor, study_uids, f"export of {len(study_uids)} study(ies) to {destination} (job {job.id})"
               f"{', de-identified' if options else ''}", destination)
        return ExportResult("node", job.total, job_id=job.id, studies=uids)
    refs = _refs(ctx, study_uids, departments)
    deid = Deidentifier(options) if options is not None else None
    if fmt == "folder":
        name = folder or "export"
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", name) or name.startswith("."):
            raise ExportError("folder: a name of letters, digits, '.', '_' and '-' (created under <data_dir>/exports)")
        out = Path(ctx.settings.data_dir) / "exports" / name
        if out.exists() and any(out.iterdir()):
            raise ExportError(f"folder {name} exists and is not empty", "conflict")
        n = write_fileset(ctx, refs, str(out), deid)
        _audit(ctx, actor, study_uids, f"export of {n} instances to folder {out}"
               f"{', de-identified' if deid else ''}", str(out))
        return ExportResult("folder", n, path=str(out), studies=study_uids)
    tmp = tempfile.mkdtemp(prefix="openpacs-zip-")
    try:
        fs_dir = os.path.join(tmp, "fs")
        n = write_fileset(ctx, refs, fs_dir, deid)
        zpath = os.path.join(tmp, "export.zip")
        with zipfile.ZipFile(zpath, "w", zipfile.ZIP_STORED) as z:
            for root, _dirs, files in os.walk(fs_dir):
                for fname in sorted(files):
                    full = os.path.join(root, fname)
                    z.write(full, os.path.relpath(full, fs_dir))
        shutil.rmtree(fs_dir, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _audit(ctx, actor, study_uids, f"export of {n} instances as a zip{', de-identified' if deid else ''}", "zip")
    return ExportResult("zip", n, path=zpath, tmp_dir=tmp, studies=study_uids)


def _audit(ctx: Any, actor: str, study_uids: list[str], detail: str, destination: str) -> None:
    if ctx.audit is not None:
        ctx.audit.record("Export", user=actor, protocol="HTTP", study_uids=study_uids, destination=destination,
                         detail=detail)
