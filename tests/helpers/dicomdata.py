"""Test data: selected pydicom/pydicom-data files, a synthetic query data set with known values, byte helpers."""

from __future__ import annotations

import io
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def split_meta(data: bytes) -> tuple[bytes, bytes]:
    """(preamble + file meta, data set bytes) of a DICOM file; the data set part is what went over the wire."""
    off = 132 if data[128:132] == b"DICM" else (4 if data[:4] == b"DICM" else 0)
    while off + 8 <= len(data):
        group = struct.unpack_from("<H", data, off)[0]
        if group != 0x0002:
            break
        vr = data[off + 4:off + 6]
        if vr in _LONG_VRS:
            off += 12 + struct.unpack_from("<I", data, off + 8)[0]
        else:
            off += 8 + struct.unpack_from("<H", data, off + 6)[0]
    return data[:off], data[off:]


def dataset_bytes(path: str | os.PathLike[str]) -> bytes:
    return split_meta(Path(path).read_bytes())[1]


def file_uids(path: str | os.PathLike[str]) -> tuple[str, str, str]:
    """(SOPInstanceUID, SOPClassUID, TransferSyntaxUID) from the file."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return str(ds.SOPInstanceUID), str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)


# (file name in pydicom's test files or pydicom-data, what it covers)
CONFORMANCE_FILES: list[tuple[str, str]] = [
    ("CT_small.dcm", "CT explicit VR little endian"),
    ("MR_small_implicit.dcm", "MR implicit VR little endian"),
    ("MR_small_bigendian.dcm", "MR explicit VR big endian"),
    ("emri_small.dcm", "enhanced MR multi-frame"),
    ("OBXXXX1A_rle_2frame.dcm", "US multi-frame RLE"),
    ("examples_ybr_color.dcm", "US multi-frame JPEG baseline"),
    ("US1_J2KR.dcm", "US JPEG 2000 lossless"),
    ("rtdose.dcm", "RT dose multi-frame"),
    ("rtdose_expb.dcm", "RT dose big endian"),
    ("rtplan.dcm", "RT plan"),
    ("test-SR.dcm", "comprehensive SR"),
    ("reportsi.dcm", "basic text SR"),
    ("liver.dcm", "segmentation"),
    ("waveform_ecg.dcm", "12-lead ECG waveform"),
    ("SC_rgb_jpeg_dcmtk.dcm", "JPEG baseline"),
    ("JPEG-lossy.dcm", "JPEG extended 12 bit"),
    ("JPEG-LL.dcm", "JPEG lossless SV1"),
    ("MR_small_jpeg_ls_lossless.dcm", "JPEG-LS lossless"),
    ("JPEGLSNearLossless_08.dcm", "JPEG-LS near lossless"),
    ("MR_small_jp2klossless.dcm", "JPEG 2000 lossless"),
    ("JPEG2000.dcm", "JPEG 2000 lossy"),
    ("MR_small_RLE.dcm", "RLE lossless"),
    ("image_dfl.dcm", "deflated explicit VR little endian"),
    ("693_UNCI.dcm", "CT 512 KB, several PDUs"),
]


def testdata_file(name: str) -> str:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    if path is None:
        raise FileNotFoundError(name)
    return str(path)


def write_rtstruct(path: Path, patient_id: str = "RTSTRUCT1") -> Path:
    """A small RT Structure Set (not among pydicom's test files)."""
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.481.3"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "RTSTRUCT"
    ds.PatientID = patient_id
    ds.PatientName = "Struct^Set"
    ds.StudyDate = "20230101"
    ds.StudyTime = "101010"
    ds.StructureSetLabel = "TEST"
    ds.StructureSetDate = "20230101"
    roi = Dataset()
    roi.ROINumber = 1
    roi.ROIName = "PTV"
    roi.ReferencedFrameOfReferenceUID = generate_uid()
    roi.ROIGenerationAlgorithm = "MANUAL"
    ds.StructureSetROISequence = [roi]
    contour = Dataset()
    contour.ContourGeometricType = "CLOSED_PLANAR"
    contour.NumberOfContourPoints = 3
    contour.ContourData = [0.0, 0.0, 0.0, 10.0, 0.0, 0.0, 10.0, 10.0, 0.0]
    rc = Dataset()
    rc.ReferencedROINumber = 1
    rc.ROIDisplayColor = [255, 0, 0]
    rc.ContourSequence = [contour]
    ds.ROIContourSequence = [rc]
    return write_part10(ds, path)


def part10_bytes(ds: Dataset, transfer_syntax: str = ExplicitVRLittleEndian) -> bytes:
    """``ds`` as a Part 10 file (File Meta set from its SOP UIDs; ``ds`` gets that meta and a zero preamble)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = transfer_syntax
    ds.file_meta = meta
    ds.preamble = b"\0" * 128
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True, little_endian=True, implicit_vr=transfer_syntax == "1.2.840.10008.1.2")
    return buf.getvalue()


def write_part10(ds: Dataset, path: Path, transfer_syntax: str = ExplicitVRLittleEndian) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(part10_bytes(ds, transfer_syntax))
    return path


def small_image(sop_class: str = CT_IMAGE, rows: int = 8, cols: int = 8, fill: int = 0) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = bytes([fill & 0xFF]) * (rows * cols * 2)
    return ds


# ---------------------------------------------------------------------------------------------------------------
# the synthetic query data set


@dataclass
class Instance:
    uid: str
    number: int
    sop_class: str
    path: Path | None = None


@dataclass
class Series:
    uid: str
    modality: str
    number: int
    description: str
    body_part: str
    instances: list[Instance] = field(default_factory=list)


@dataclass
class Study:
    uid: str
    date: str
    time: str
    accession: str
    study_id: str
    description: str
    referring: str
    procedure_code: str
    series: list[Series] = field(default_factory=list)

    @property
    def modalities(self) -> set[str]:
        return {s.modality for s in self.series}

    @property
    def instances(self) -> list[Instance]:
        return [i for s in self.series for i in s.instances]


@dataclass
class Patient:
    id: str
    name: str
    birth_date: str
    sex: str
    studies: list[Study] = field(default_factory=list)


@dataclass
class QueryDataSet:
    patients: list[Patient]
    files: list[Path]

    def studies(self) -> list[tuple[Patient, Study]]:
        return [(p, st) for p in self.patients for st in p.studies]

    def series(self) -> list[tuple[Patient, Study, Series]]:
        return [(p, st, se) for p in self.patients for st in p.studies for se in st.series]

    def instances(self) -> list[tuple[Patient, Study, Series, Instance]]:
        return [(p, st, se, i) for p in self.patients for st in p.studies for se in st.series for i in se.instances]

    def study(self, accession: str) -> tuple[Patient, Study]:
        return next((p, st) for p, st in self.studies() if st.accession == accession)


# patients: id, name, birth date, sex; studies: date, time, accession, id, description, referring, procedure code,
# [(modality, description, body part, number of instances)]
_SPEC = [
    ("QP001", "Doe^John", "19700101", "M", [
        ("20200115", "083000", "ACC100", "S1", "CT CHEST", "Welby^Marcus", "P-CT1",
         [("CT", "AXIAL 5mm", "CHEST", 3), ("CT", "CORONAL", "CHEST", 2)]),
        ("20210620", "141500.250", "ACC101", "S2", "MR BRAIN", "House^Gregory", "P-MR1",
         [("MR", "T1 SAG", "HEAD", 2), ("MR", "T2 AX", "HEAD", 2), ("SR", "REPORT", "HEAD", 1)]),
    ]),
    ("QP002", "doe^jane", "19851231", "F", [
        ("20200116", "235959", "ACC200", "S1", "CT ABDOMEN", "welby^marcus", "P-CT2",
         [("CT", "AXIAL 1mm", "ABDOMEN", 3)]),
    ]),
    ("QP003", "Smith^Anna", "20000229", "F", [
        ("20191231", "000000", "XR300", "S9", "CHEST XRAY", "Quinn^Michaela", "P-CR1",
         [("CR", "PA", "CHEST", 1)]),
        ("20220301", "120000", "ACC301", "S10", "US ABDOMEN", "", "P-US1",
         [("US", "LIVER", "ABDOMEN", 2)]),
    ]),
    ("QP004", "Smithson^Bob", "19450705", "M", [
        ("20230505", "093000", "ACC400", "S1", "PET CT", "House^Gregory", "P-PT1",
         [("PT", "WB", "WHOLEBODY", 2), ("CT", "CTAC", "WHOLEBODY", 1)]),
    ]),
]
_SOP = {"CT": CT_IMAGE, "MR": MR_IMAGE, "SR": "1.2.840.10008.5.1.4.1.1.88.11", "CR": "1.2.840.10008.5.1.4.1.1.1",
        "US": "1.2.840.10008.5.1.4.1.1.6.1", "PT": "1.2.840.10008.5.1.4.1.1.128"}


def build_query_dataset(directory: Path, prefix: str = "") -> QueryDataSet:
    """Write the synthetic patients/studies/series/instances as Part 10 files; ``prefix`` makes patient IDs and
    accession numbers unique when several copies share a server."""
    patients: list[Patient] = []
    files: list[Path] = []
    for pid, name, birth, sex, studies in _SPEC:
        p = Patient(prefix + pid, name, birth, sex)
        patients.append(p)
        for date, time_, acc, sid, desc, referring, code, series in studies:
            st = Study(generate_uid(), date, time_, prefix + acc, sid, desc, referring, code)
            p.studies.append(st)
            for n, (modality, sdesc, body, count) in enumerate(series, start=1):
                se = Series(generate_uid(), modality, n, sdesc, body)
                st.series.append(se)
                for k in range(1, count + 1):
                    sop = _SOP[modality]
                    inst = Instance(generate_uid(), k, sop)
                    se.instances.append(inst)
                    if modality == "SR":
                        ds = Dataset()
                        ds.SpecificCharacterSet = "ISO_IR 100"
                        ds.SOPClassUID = sop
                        ds.SOPInstanceUID = inst.uid
                        ds.ValueType = "CONTAINER"
                    else:
                        ds = small_image(sop, fill=k)
                        ds.SOPInstanceUID = inst.uid
                    ds.PatientID = p.id
                    ds.PatientName = p.name
                    ds.PatientBirthDate = p.birth_date
                    ds.PatientSex = p.sex
                    ds.StudyInstanceUID = st.uid
                    ds.StudyDate = st.date
                    ds.StudyTime = st.time
                    ds.AccessionNumber = st.accession
                    ds.StudyID = st.study_id
                    ds.StudyDescription = st.description
                    ds.ReferringPhysicianName = st.referring
                    code_item = Dataset()
                    code_item.CodeValue = st.procedure_code
                    code_item.CodingSchemeDesignator = "LOCAL"
                    code_item.CodeMeaning = st.description
                    ds.ProcedureCodeSequence = [code_item]
                    ds.SeriesInstanceUID = se.uid
                    ds.Modality = modality
                    ds.SeriesNumber = se.number
                    ds.SeriesDescription = se.description
                    ds.BodyPartExamined = se.body_part
                    ds.InstanceNumber = k
                    inst.path = write_part10(ds, directory / f"{inst.uid}.dcm")
                    files.append(inst.path)
    return QueryDataSet(patients, files)


@dataclass
class ConformanceFile:
    name: str
    description: str
    path: Path
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax: str
    study_uid: str
    series_uid: str


def prepare_conformance_files(directory: Path) -> list[ConformanceFile]:
    """The CONFORMANCE_FILES plus a synthetic RTSTRUCT. Files are used as shipped unless they repeat another file's SOP
    Instance UID or lack Study/Series/SOP UIDs: those are rewritten (same transfer syntax) with fresh UIDs."""
    out: list[ConformanceFile] = []
    seen: set[str] = set()
    directory.mkdir(parents=True, exist_ok=True)
    entries = [(n, d, Path(testdata_file(n))) for n, d in CONFORMANCE_FILES]
    entries.append(("rtstruct (synthetic)", "RT structure set", write_rtstruct(directory / "rtstruct.dcm")))
    for name, desc, path in entries:
        ds = pydicom.dcmread(path)
        changed = False
        for kw in ("StudyInstanceUID", "SeriesInstanceUID"):
            if not ds.get(kw):
                setattr(ds, kw, generate_uid())
                changed = True
        if not ds.get("PatientID"):
            ds.PatientID = "CONF-" + name.split(".")[0][:40]
            changed = True
        if not ds.get("SOPInstanceUID") or str(ds.SOPInstanceUID) in seen:
            ds.SOPInstanceUID = generate_uid()
            changed = True
        if changed:
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            path = directory / f"rewritten-{name}"
            ds.save_as(path, enforce_file_format=True)
            ds = pydicom.dcmread(path)
        seen.add(str(ds.SOPInstanceUID))
        out.append(ConformanceFile(name, desc, path, str(ds.SOPInstanceUID), str(ds.SOPClassUID),
                                   str(ds.file_meta.TransferSyntaxUID), str(ds.StudyInstanceUID),
                                   str(ds.SeriesInstanceUID)))
    return out


def department_instance(modality: str, patient_id: str, study: str | None = None, name_prefix: str = "SEC^",
                        study_date: str = "20240102") -> Dataset:
    """A minimal Secondary Capture instance (with File Meta) whose modality steers the department rules of the
    security tests; a new study unless ``study`` is given."""
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = patient_id
    ds.PatientName = name_prefix + patient_id
    ds.Modality = modality
    ds.StudyDate = study_date
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return ds
