"""A deterministic PET/CT study: a CT volume (body cylinder, a bone ring) and a PET volume on the same frame of
reference with SUV attributes (Units BQML, decay-corrected, injected dose, half-life, patient weight) and one hot
sphere at a known position. Written as Part 10 files for DCMTK's storescu."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pydicom.valuerep import DSfloat

from .dicomdata import write_part10

CT_CLASS = "1.2.840.10008.5.1.4.1.1.2"
PET_CLASS = "1.2.840.10008.5.1.4.1.1.128"

SLICES = 24
CT_SIZE, CT_SPACING = 96, 4.0  # 384 mm field of view
PT_SIZE, PT_SPACING = 48, 8.0
SLICE_GAP = 4.0
# The hot sphere, in patient coordinates (mm): right of the centre and anterior, on slice HOT_SLICE.
HOT_CENTRE = (-90.0, -60.0)  # x, y
HOT_SLICE = SLICES // 2
HOT_RADIUS = 28.0
WEIGHT_KG = 75.0
DOSE_BQ = 370e6
HALF_LIFE_S = 6586.2  # F-18


def _common(ds: Dataset, study: str, for_uid: str, patient: str) -> None:
    ds.StudyInstanceUID = study
    ds.FrameOfReferenceUID = for_uid
    ds.PatientName = "PETCT^FUSION"
    ds.PatientID = patient
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.PatientWeight = WEIGHT_KG
    ds.PatientSize = 1.7
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = "20250301"
    ds.StudyTime = "090000"
    ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = "100000"
    ds.AccessionNumber = "PETCT1"
    ds.StudyID = "1"
    ds.StudyDescription = "PET/CT whole body"
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.SliceThickness = SLICE_GAP
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15


def _grid(size: int, spacing: float) -> tuple[np.ndarray, np.ndarray, float]:
    origin = -(size - 1) * spacing / 2
    yy, xx = np.mgrid[0:size, 0:size]
    return origin + xx * spacing, origin + yy * spacing, origin


def write_study(directory: Path) -> tuple[list[Path], list[Path], str]:
    """(CT files, PET files, StudyInstanceUID)."""
    directory.mkdir(parents=True, exist_ok=True)
    study, for_uid = generate_uid(), generate_uid()
    ct_series, pt_series = generate_uid(), generate_uid()
    ct_files, pt_files = [], []
    x, y, origin = _grid(CT_SIZE, CT_SPACING)
    r = np.hypot(x, y)
    for i in range(SLICES):
        z = i * SLICE_GAP
        hu = np.full((CT_SIZE, CT_SIZE), -1000, np.int16)
        hu[r < 170] = 40
        hu[(r > 110) & (r < 125)] = 700
        ds = Dataset()
        _common(ds, study, for_uid, "PETCT-1")
        ds.SOPClassUID = CT_CLASS
        ds.SOPInstanceUID = generate_uid()
        ds.SeriesInstanceUID = ct_series
        ds.Modality = "CT"
        ds.SeriesNumber = 1
        ds.SeriesDescription = "CT attenuation"
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [origin, origin, z]
        ds.PixelSpacing = [CT_SPACING, CT_SPACING]
        ds.Rows = ds.Columns = CT_SIZE
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = 0
        ds.RescaleSlope = 1
        ds.WindowCenter = 40
        ds.WindowWidth = 400
        ds.PixelData = hu.tobytes()
        ct_files.append(write_part10(ds, directory / f"ct{i:02d}.dcm"))
    x, y, origin = _grid(PT_SIZE, PT_SPACING)
    body = np.hypot(x, y) < 170
    for i in range(SLICES):
        z = i * SLICE_GAP
        act = np.where(body, 5000.0, 0.0)  # Bq/ml background (SUV ~1)
        d = np.sqrt((x - HOT_CENTRE[0]) ** 2 + (y - HOT_CENTRE[1]) ** 2 + (z - HOT_SLICE * SLICE_GAP) ** 2)
        act[d < HOT_RADIUS] = 50000.0  # SUV ~10
        slope = 2.0
        ds = Dataset()
        _common(ds, study, for_uid, "PETCT-1")
        ds.SOPClassUID = PET_CLASS
        ds.SOPInstanceUID = generate_uid()
        ds.SeriesInstanceUID = pt_series
        ds.Modality = "PT"
        ds.SeriesNumber = 2
        ds.SeriesDescription = "PET AC"
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [origin, origin, z]
        ds.PixelSpacing = [PT_SPACING, PT_SPACING]
        ds.Rows = ds.Columns = PT_SIZE
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = 0
        ds.RescaleSlope = slope
        ds.Units = "BQML"
        ds.DecayCorrection = "START"
        ds.CorrectedImage = ["ATTN", "DECY"]
        ds.SeriesType = ["WHOLE BODY", "IMAGE"]
        ds.ImageIndex = i + 1
        ds.NumberOfSlices = SLICES
        ds.FrameReferenceTime = 0
        ds.ActualFrameDuration = 120000
        rp = Dataset()
        rp.Radiopharmaceutical = "Fluorodeoxyglucose"
        rp.RadiopharmaceuticalStartTime = "090000"
        rp.RadiopharmaceuticalStartDateTime = "20250301090000"
        rp.RadionuclideTotalDose = DOSE_BQ
        rp.RadionuclideHalfLife = HALF_LIFE_S
        rp.RadionuclidePositronFraction = 0.97
        ds.RadiopharmaceuticalInformationSequence = [rp]
        ds.PixelData = np.round(act / slope).astype(np.uint16).tobytes()
        pt_files.append(write_part10(ds, directory / f"pt{i:02d}.dcm"))
    return ct_files, pt_files, study


RTDOSE_CLASS = "1.2.840.10008.5.1.4.1.1.481.2"
DOSE_CENTRE = (70.0, 50.0)  # x, y (mm): left of the centre and posterior, on every plane
DOSE_SIGMA = 30.0
DOSE_MAX_GY = 60.0
DOSE_SIZE, DOSE_SPACING = 96, 4.0


def write_ct_with_dose(directory: Path) -> tuple[list[Path], Path, str]:
    """A CT (as write_study's) and an RT Dose grid on its frame of reference: a Gaussian dose cloud at DOSE_CENTRE
    (60 Gy peak) on every plane. Returns (CT files, the RT Dose file, StudyInstanceUID)."""
    from pydicom.tag import Tag

    ct, _pt, study = write_study(directory)
    ct_ds = [__import__("pydicom").dcmread(p) for p in ct]
    first = ct_ds[0]
    size, spacing = DOSE_SIZE, DOSE_SPACING
    x, y, origin = _grid(size, spacing)
    planes = []
    for _ in range(SLICES):
        dose = DOSE_MAX_GY * np.exp(-((x - DOSE_CENTRE[0]) ** 2 + (y - DOSE_CENTRE[1]) ** 2) / (2 * DOSE_SIGMA ** 2))
        planes.append(dose)
    scaling = DOSE_MAX_GY / 65000.0
    grid = np.round(np.stack(planes) / scaling).astype(np.uint16)
    ds = Dataset()
    _common(ds, study, first.FrameOfReferenceUID, first.PatientID)
    ds.SOPClassUID = RTDOSE_CLASS
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "RTDOSE"
    ds.SeriesNumber = 3
    ds.SeriesDescription = "Plan dose"
    ds.InstanceNumber = 1
    ds.ImagePositionPatient = [origin, origin, 0.0]
    ds.PixelSpacing = [spacing, spacing]
    ds.Rows = ds.Columns = size
    ds.NumberOfFrames = SLICES
    ds.FrameIncrementPointer = Tag(0x3004, 0x000C)
    ds.GridFrameOffsetVector = [float(i * SLICE_GAP) for i in range(SLICES)]
    ds.DoseUnits = "GY"
    ds.DoseType = "PHYSICAL"
    ds.DoseSummationType = "PLAN"
    # a valid DS (at most 16 characters, as a planning system writes it): str() of the float has 21, and its exact
    # 60/65000 made the peak exactly 60 Gy, an integer range for which Cornerstone decodes into 8 bits (all zeros)
    ds.DoseGridScaling = DSfloat(scaling, auto_format=True)
    ds.PixelRepresentation = 0
    ds.PixelData = grid.tobytes()
    for kw in ("WindowCenter", "WindowWidth", "RescaleSlope", "RescaleIntercept"):
        if kw in ds:
            delattr(ds, kw)
    path = write_part10(ds, directory / "rtdose.dcm")
    for p in _pt:
        p.unlink()
    return ct, path, study


SEG_CENTRE = (60.0, -70.0)  # x, y (mm): left, anterior
SEG_RADIUS = 40.0
SEG_SLICES = range(6, 18)  # the CT slices the segment covers
SEG_COLOUR_LAB = (88.0, -79.0, 81.0)  # CIELab of pure green (highdicom converts to DICOM's scaled values)


def write_ct_with_seg(directory: Path) -> tuple[list[Path], Path, str]:
    """A CT (as write_study's) and a DICOM SEG (highdicom, binary) of one cylinder segment "Lesion" on SEG_SLICES.
    Returns (CT files, the SEG file, StudyInstanceUID)."""
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    ct, pt, study = write_study(directory)
    for p in pt:
        p.unlink()
    sources = [pydicom.dcmread(p) for p in ct]
    x, y, _origin = _grid(CT_SIZE, CT_SPACING)
    disc = np.hypot(x - SEG_CENTRE[0], y - SEG_CENTRE[1]) < SEG_RADIUS
    mask = np.zeros((len(sources), CT_SIZE, CT_SIZE), dtype=bool)
    for i in SEG_SLICES:
        mask[i] = disc
    segment = hd.seg.SegmentDescription(
        segment_number=1, segment_label="Lesion",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Neoplasm,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        display_color=hd.color.CIELabColor(*SEG_COLOUR_LAB))
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=mask, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment], series_instance_uid=generate_uid(), series_number=4,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="OpenPACS tests",
        manufacturer_model_name="petct.py", software_versions="1", device_serial_number="1",
        series_description="Lesion segmentation")
    path = directory / "seg.dcm"
    seg.save_as(path)
    return ct, path, study
