"""Small DICOM instances for the core unit suites, and a C-STORE style store helper."""

from __future__ import annotations

import copy
from typing import Any

from helpers.dicomdata import part10_bytes
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from openpacs.context import Context
from openpacs.services.types import Source

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
SRC = Source(protocol="TEST", calling_aet="UNITSCU", address="127.0.0.1")


def instance(
    *,
    sop_class: str = CT,
    patient_id: str = "PID1",
    patient_name: str = "Doe^John",
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    modality: str = "CT",
    pixels: int = 64,
    **attrs: Any,
) -> Dataset:
    """A small image data set with the given attributes (keywords)."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.PatientID = patient_id
    ds.PatientName = patient_name
    ds.Modality = modality
    for k, v in attrs.items():
        setattr(ds, k, v)
    ds.Rows = 1
    ds.Columns = pixels // 2 or 1
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = bytes(range(256)) * (pixels // 256) + bytes(pixels % 256)
    return ds


def dataset_bytes(ds: Dataset, transfer_syntax: str = ExplicitVRLittleEndian) -> bytes:
    """The data set as it travels in a C-STORE (no File Meta Information)."""
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = transfer_syntax == "1.2.840.10008.1.2"
    write_dataset(fp, ds)
    return fp.getvalue()


def part10(ds: Dataset, transfer_syntax: str = ExplicitVRLittleEndian) -> bytes:
    return part10_bytes(copy.copy(ds), transfer_syntax)


def store(ctx: Context, ds: Dataset, ts: str = ExplicitVRLittleEndian) -> Any:
    """C-STORE style ingest of ``ds``."""
    return ctx.ingest.store_dataset([dataset_bytes(ds, ts)], ts, str(ds.SOPClassUID), str(ds.SOPInstanceUID), SRC)
