"""The training data set (``openpacs demo``): DICOM sample files shipped by pip packages (pydicom's test files and
``pydicom-data``), re-identified as fictitious patients, sent through the one ingest path, with departments, the rules
that classify them, and one demo user per role.

Re-identification is deterministic: every UID of a sample file is replaced by a UID derived from (study, old UID),
so the series of a study group correctly, references inside a study (RT plan -> structure set, SEG -> source) stay
consistent, and running the demo again stores nothing twice (the duplicates are recognised by ingest).
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Any

from .types import Source

log = logging.getLogger("openpacs.demo")

PASSWORD = "openpacs-demo"  # fixed, documented: a demo instance is a throw-away training instance
ISSUER = ""
PATIENT_PREFIX = "DEMO-"
INSTITUTION = "OpenPACS Training Hospital"

# username, role, departments (None: every department)
USERS: list[tuple[str, str, str | None]] = [
    ("admin", "admin", None),
    ("radiologist", "radiologist", None),
    ("physician", "physician", None),
    ("technologist", "technologist", None),
    ("viewer", "viewer", None),
    ("auditor", "auditor", None),
    ("cardiologist", "physician", "cardiology"),
]

PATIENTS: dict[str, tuple[str, str, str]] = {  # fictitious: id -> (name, birth date, sex)
    "DEMO-0001": ("NORDIN^ANNA", "19620314", "F"),
    "DEMO-0002": ("OKAFOR^BENJAMIN", "19750822", "M"),
    "DEMO-0003": ("SILVA^CARMEN", "19580105", "F"),
    "DEMO-0004": ("KOWALSKI^DANIEL", "19891130", "M"),
    "DEMO-0005": ("TANAKA^EMI", "19930617", "F"),
}


@dataclass(frozen=True)
class DemoStudy:
    key: str
    patient_id: str
    days_ago: int
    description: str
    files: tuple[str, ...]  # sample file names (pydicom test files / pydicom-data); the first decides the department
    unit: str  # InstitutionalDepartmentName written into the files
    referring: str = "HOUSE^GREGORY"


STUDIES: list[DemoStudy] = [
    DemoStudy("ct-chest", "DEMO-0001", 2, "CT CHEST WITHOUT CONTRAST", ("CT_small.dcm", "693_UNCR.dcm"), "Radiology"),
    DemoStudy("mr-head", "DEMO-0001", 9, "MR HEAD", ("MR_small.dcm", "MR2_UNCR.dcm", "emri_small.dcm"), "Radiology"),
    DemoStudy("ct-liver", "DEMO-0001", 20, "CT ABDOMEN LIVER SEGMENTATION",
              ("CT_small.dcm", "liver.dcm", "reportsi.dcm"), "Radiology", "QUINN^MICHAELA"),
    DemoStudy("cr-chest", "DEMO-0002", 1, "CR CHEST PA", ("RG1_UNCR.dcm",), "Radiology", "QUINN^MICHAELA"),
    DemoStudy("ecg-rest", "DEMO-0002", 5, "ECG 12-LEAD REST", ("waveform_ecg.dcm",), "Cardiology", "YANG^CRISTINA"),
    DemoStudy("us-echo", "DEMO-0002", 5, "ECHOCARDIOGRAPHY", ("examples_ybr_color.dcm",), "Cardiology",
              "YANG^CRISTINA"),
    DemoStudy("nm-bone", "DEMO-0003", 12, "NM WHOLE BODY BONE SCAN", ("JPEG2000_UNC.dcm", "JPEG-LL.dcm"),
              "Nuclear Medicine"),
    DemoStudy("rt-plan", "DEMO-0003", 26, "RT PLANNING PROSTATE", ("rtstruct.dcm", "rtplan.dcm", "rtdose.dcm"),
              "Radiation Oncology", "BAILEY^MIRANDA"),
    DemoStudy("us-obstetric", "DEMO-0004", 3, "US OBSTETRIC", ("OBXXXX1A_2frame.dcm",), "Radiology",
              "BAILEY^MIRANDA"),
    DemoStudy("mr-knee", "DEMO-0004", 30, "MR KNEE LEFT", ("MR_small.dcm",), "Radiology"),
    DemoStudy("ct-followup", "DEMO-0005", 7, "CT CHEST FOLLOW-UP", ("CT_small.dcm", "test-SR.dcm"), "Radiology",
              "QUINN^MICHAELA"),
]

# references the samples lack, made so that the demo's RT study hangs together: file -> (sequence, referenced file)
LINKS: dict[str, tuple[str, str]] = {
    "rtplan.dcm": ("ReferencedStructureSetSequence", "rtstruct.dcm"),
    "rtdose.dcm": ("ReferencedRTPlanSequence", "rtplan.dcm"),
}

# department code -> rules (priority, modality, institutional department name): the first match wins
RULES: list[tuple[str, int, str | None, str | None]] = [
    ("cardiology", 10, None, "CARDIO*"),
    ("cardiology", 100, "ECG,HD,IVUS,XA", None),
    ("nuclear-medicine", 100, "NM,PT", None),
    ("radiation-therapy", 100, "RTSTRUCT,RTPLAN,RTDOSE,RTIMAGE,RTRECORD", None),
    ("radiology", 200, "CT,MR,CR,DX,US,MG,SEG,SR,OT", None),
]

# what the demo set holds (the tests and the training tutorial rely on it)
MODALITIES = ("CT", "MR", "CR", "US", "NM", "RTSTRUCT", "RTPLAN", "RTDOSE", "SR", "SEG", "ECG")
DEPARTMENTS = ("radiology", "cardiology", "nuclear-medicine", "radiation-therapy")


class NotADemoInstance(Exception):
    """The index holds patients the demo did not create: it refuses to mix fictitious patients into real data."""


@dataclass
class DemoResult:
    stored: int = 0
    duplicates: int = 0
    failed: list[str] = field(default_factory=list)
    missing_files: list[str] = field(default_factory=list)
    studies: list[dict[str, Any]] = field(default_factory=list)
    users: list[dict[str, Any]] = field(default_factory=list)
    rules_added: int = 0


def sample_path(name: str) -> str | None:
    """A sample file's path in pydicom's test files or the pydicom-data package; never downloads."""
    from pydicom.data import get_testdata_file

    try:
        path = get_testdata_file(name, download=False)
    except Exception:  # noqa: BLE001 - pydicom raises on a missing optional data store
        return None
    return str(path) if path and os.path.exists(str(path)) else None


def _uid_for(study_key: str, old: str) -> str:
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=["openpacs-demo", study_key, old]))


def _remap_uids(ds: Any, study_key: str) -> None:
    """Every UID (any depth) that is not a standard one (1.2.840.10008.*: SOP classes, transfer syntaxes...)."""
    for elem in ds.iterall():
        if elem.VR != "UI" or elem.value in (None, ""):
            continue
        if elem.VM > 1:
            elem.value = [v if str(v).startswith("1.2.840.10008.") else _uid_for(study_key, str(v))
                          for v in elem.value]
        elif not str(elem.value).startswith("1.2.840.10008."):
            elem.value = _uid_for(study_key, str(elem.value))


def study_uid(study: DemoStudy) -> str:
    return _uid_for(study.key, "StudyInstanceUID")


def reidentify(path: str, study: DemoStudy, number: int) -> bytes:
    """The sample file as a Part 10 byte string of ``study``'s fictitious patient."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

    ds = pydicom.dcmread(path, force=True)
    ds.remove_private_tags()
    link = LINKS.get(os.path.basename(path))
    target = sample_path(link[1]) if link else None
    if link and target and link[0] in ds and len(ds[link[0]].value):
        # the original UID of the referenced sample: remapped below with the same map as that sample's own
        ds[link[0]].value[0].ReferencedSOPInstanceUID = pydicom.dcmread(target, force=True,
                                                                        stop_before_pixels=True).SOPInstanceUID
    name, birth, sex = PATIENTS[study.patient_id]
    study_date = (date.today() - timedelta(days=study.days_ago)).strftime("%Y%m%d")
    for elem in list(ds):  # patient module: only what we set
        if elem.tag.group == 0x0010 and elem.tag not in (0x00101020, 0x00101030):
            del ds[elem.tag]
    for elem in ds.iterall():  # other person names: fictitious staff
        if elem.VR == "PN" and elem.value:
            elem.value = "STAFF^DEMO"
    ds.PatientName = name
    ds.PatientID = study.patient_id
    ds.PatientBirthDate = birth
    ds.PatientSex = sex
    ds.ReferringPhysicianName = study.referring
    ds.AccessionNumber = f"DEMO{number:05d}"
    ds.StudyID = str(number)
    ds.StudyDescription = study.description
    ds.InstitutionName = INSTITUTION
    ds.InstitutionalDepartmentName = study.unit
    if "InstitutionAddress" in ds:
        del ds.InstitutionAddress
    ds.StudyDate = ds.SeriesDate = study_date
    for kw in ("AcquisitionDate", "ContentDate", "InstanceCreationDate"):
        if kw in ds:
            setattr(ds, kw, study_date)
    if "AcquisitionDateTime" in ds:
        ds.AcquisitionDateTime = study_date + "120000"
    _remap_uids(ds, study.key)
    ds.StudyInstanceUID = study_uid(study)  # sample files of one demo study come from different originals
    meta = getattr(ds, "file_meta", None)
    if meta is None or "TransferSyntaxUID" not in meta:
        meta = FileMetaDataset()
        meta.TransferSyntaxUID = ImplicitVRLittleEndian if getattr(ds, "is_implicit_VR", True) else ExplicitVRLittleEndian
        ds.file_meta = meta
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for k in ("SourceApplicationEntityTitle", "SendingApplicationEntityTitle"):
        if k in meta:
            del meta[k]
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def foreign_patients(index: Any) -> int:
    """How many patients of the index the demo did not create."""
    from sqlalchemy import func, select

    from ..index.schema import patients

    with index.engine.connect() as c:
        return int(c.execute(select(func.count()).select_from(patients)
                             .where(~patients.c.patient_id.startswith(PATIENT_PREFIX))).scalar_one())


def ensure_departments(departments: Any) -> int:
    """The four departments of the demo and their classification rules (those not already there)."""
    departments.ensure_standard()
    departments.reload()
    have = {(r.department, r.priority, r.modality, r.institutional_department_name) for r in departments.rules()}
    added = 0
    for dept, priority, modality, unit in RULES:
        if (dept, priority, modality, unit) in have:
            continue
        departments.add_rule(dept, priority=priority, modality=modality, institutional_department_name=unit)
        added += 1
    return added


def ensure_users(auth: Any, password: str = PASSWORD) -> list[dict[str, Any]]:
    from .auth import AuthError

    existing = {u.username for u in auth.list_users()}
    out = []
    for username, role, deps in USERS:
        created = username not in existing
        if created:
            try:
                auth.add_user(username, password, role, departments=deps,
                              display_name=f"Demo {username.capitalize()}")
            except AuthError:
                created = False  # created meanwhile: leave it as it is
        out.append({"username": username, "role": role, "departments": deps, "created": created,
                    "password": password if created else None})
    return out


def fill(ctx: Any, *, force: bool = False, password: str = PASSWORD,
         on_progress: Callable[[str], None] | None = None) -> DemoResult:
    """Departments, rules, users and the studies, through ``ctx.ingest`` (the one ingest path)."""
    if not force:
        n = foreign_patients(ctx.index)
        if n:
            raise NotADemoInstance(f"the index holds {n} patient(s) the demo did not create (IDs not starting with "
                                   f"{PATIENT_PREFIX!r}): not adding fictitious patients to real data (--force to "
                                   "do it anyway)")
    result = DemoResult()
    if ctx.departments is not None:
        result.rules_added = ensure_departments(ctx.departments)
    if ctx.auth is not None:
        result.users = ensure_users(ctx.auth, password)
    source = Source(protocol="IMPORT", calling_aet="", address="local", user="demo")
    uids: set[str] = set()
    for number, study in enumerate(STUDIES, start=1):
        study_uid = ""
        stored = 0
        for name in study.files:
            path = sample_path(name)
            if path is None:
                result.missing_files.append(name)
                continue
            try:
                data = reidentify(path, study, number)
            except Exception as e:  # noqa: BLE001 - one bad sample must not stop the others
                result.failed.append(f"{name}: {e}")
                continue
            out = ctx.ingest.store_file(data, source)
            if not out.ok:
                result.failed.append(f"{name}: 0x{out.status:04X} {out.message}")
                continue
            study_uid = out.study_instance_uid
            uids.add(study_uid)
            if out.duplicate:
                result.duplicates += 1
            else:
                result.stored += 1
                stored += 1
        if study_uid:
            result.studies.append({"key": study.key, "study_instance_uid": study_uid, "patient_id": study.patient_id,
                                   "patient_name": PATIENTS[study.patient_id][0], "description": study.description,
                                   "accession": f"DEMO{number:05d}", "stored": stored})
        if on_progress:
            on_progress(study.description)
    if ctx.audit is not None:
        ctx.audit.record("Import", user="demo", protocol="IMPORT", source_address="local",
                         outcome=0 if not result.failed else 4, study_uids=sorted(uids),
                         detail=f"openpacs demo: {result.stored} stored, {result.duplicates} already there, "
                                f"{len(result.failed)} failed")
    return result
