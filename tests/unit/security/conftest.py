"""A real Context (SQLite index, filesystem blobs) with users of every role and studies in two departments."""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from openpacs.config import Settings
from openpacs.context import Context, build_context
from openpacs.services.types import Source

CT = "1.2.840.10008.5.1.4.1.1.2"
US = "1.2.840.10008.5.1.4.1.1.6.1"


def part10(
    modality: str,
    patient_id: str,
    patient_name: str = "DOE^JOHN",
    study_uid: str | None = None,
    description: str = "STUDY",
    institution: str = "GENERAL HOSPITAL",
) -> tuple[bytes, str, str, str]:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = US if modality == "US" else CT
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = patient_id
    ds.PatientName = patient_name
    ds.StudyDate = "20240131"
    ds.StudyDescription = description
    ds.SeriesDescription = description
    ds.AccessionNumber = "A" + patient_id[-6:]
    ds.Modality = modality
    ds.InstitutionName = institution
    ds.InstanceNumber = 1
    ds.Rows = ds.Columns = 4
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = bytes(range(16))
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    data = bytearray(buf.getvalue())
    data[:128] = b"MZ" + b"\x90" * 126  # a hostile preamble (PE polyglot): must never be served as is
    return bytes(data), ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID


ROLES = ("admin", "radiologist", "physician", "technologist", "viewer", "auditor")


@dataclass
class World:
    ctx: Context
    tokens: dict[str, str] = field(default_factory=dict)  # principal label -> bearer token
    passwords: dict[str, str] = field(default_factory=dict)
    studies: dict[str, tuple[str, str, str]] = field(default_factory=dict)  # department -> (study, series, sop)
    expired: str = ""
    revoked: str = ""


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def index_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh index per test (the security tables are not emptied by the core suites' truncation)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'index.sqlite'}"
    return str(request.getfixturevalue("pg_cluster").create_database("security"))


@pytest.fixture
def world(tmp_path: Path, index_url: str) -> Iterator[World]:
    """On SQLite and on PostgreSQL (``index_url`` from tests/unit/conftest.py)."""
    s = Settings(data_dir=tmp_path / "data", auth="on", index_url=index_url)
    ctx = build_context(s)
    assert ctx.auth is not None and ctx.departments is not None
    ctx.departments.ensure_standard()
    ctx.departments.add_rule("cardiology", modality="US,ECG,IVUS")
    ctx.departments.add_rule("radiology", modality="CT,MR,CR,DX", priority=200)
    w = World(ctx)
    for role in ROLES:
        pw = f"pw-{role}-0123456789"
        ctx.auth.add_user(role, pw, role)
        w.passwords[role] = pw
        w.tokens[role] = ctx.auth.create_token(role, "test")[1]
    ctx.auth.add_user("cardio", "pw-cardio-0123456789", "radiologist", "cardiology")
    w.tokens["cardio"] = ctx.auth.create_token("cardio")[1]
    w.passwords["cardio"] = "pw-cardio-0123456789"
    ctx.auth.add_user("cardioviewer", "pw-cv-0123456789", "viewer", "cardiology")
    w.tokens["cardioviewer"] = ctx.auth.create_token("cardioviewer")[1]
    ctx.auth.add_user("expired", "pw-expired-0123456789", "admin")
    w.expired = ctx.auth.create_token("expired", days=-1)[1]
    ctx.auth.add_user("revoked", "pw-revoked-0123456789", "admin")
    tid, w.revoked = ctx.auth.create_token("revoked")
    ctx.auth.revoke_token(tid)
    for dept, modality, pid in (("radiology", "CT", "RAD001"), ("cardiology", "US", "CARD01")):
        data, st, se, sop = part10(modality, pid, description=f"{dept} study")
        out = ctx.ingest.store_file(data, Source(protocol="TEST"))
        assert out.ok, out
        w.studies[dept] = (st, se, sop)
    yield w
    ctx.close()


def bearer(token: str) -> dict[str, Any]:
    return {"Authorization": f"Bearer {token}"}
