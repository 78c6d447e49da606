"""PS3.15 E.1 Basic Application Level Confidentiality Profile and its options: what is removed, emptied, replaced
and kept; UIDs consistently mapped; a de-identified copy stored through ingest as a new study; the export File-set."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Any

import pytest
from core_factory import instance, store
from pydicom import Dataset, dcmread
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import generate_uid

from openpacs.services import export as exportsvc
from openpacs.services.deidentify import Deidentifier, DeidentifyError, DeidOptions, deidentify_study
from openpacs.services.types import Query


def _rich(study: str | None = None, series: str | None = None) -> Dataset:
    ds = instance(study_uid=study, series_uid=series, patient_id="MRN-778899", patient_name="Smith^Jane^Q",
                  PatientBirthDate="19610203", PatientSex="F", PatientAddress="1 Main Street", PatientAge="062Y",
                  OtherPatientIDs="OLD-1", AccessionNumber="ACC42", StudyDate="20240105", StudyTime="101500",
                  SeriesDate="20240105", AcquisitionDate="20240105", ContentDate="20240105",
                  ReferringPhysicianName="House^Gregory", InstitutionName="St Elsewhere",
                  OperatorsName="Tech^One", StationName="CT01", DeviceSerialNumber="SN123",
                  StudyDescription="CT chest Smith 2024-01-05 follow-up", SeriesDescription="axial MRN-778899",
                  ProtocolName="Chest routine", StudyID="S1", FrameOfReferenceUID=generate_uid(),
                  BodyPartExamined="CHEST", SliceThickness="1.25")
    ds.add_new(0x00091010, "LO", "private vendor stuff")
    ref = Dataset()
    ref.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ref.ReferencedSOPInstanceUID = generate_uid()
    ds.ReferencedImageSequence = DicomSequence([ref])
    return ds


def test_basic_profile_removes_replaces_and_keeps() -> None:
    src = _rich()
    ds = Deidentifier(DeidOptions()).apply(_rich(str(src.StudyInstanceUID), str(src.SeriesInstanceUID)))
    assert str(ds.PatientName) == "ANONYMOUS" and str(ds.PatientID).startswith("ANON")
    assert str(ds.PatientID) != "MRN-778899"
    for kw in ("PatientAddress", "PatientAge", "OtherPatientIDs", "InstitutionName", "OperatorsName", "StationName",
               "DeviceSerialNumber", "StudyDescription", "SeriesDescription", "ProtocolName", "SeriesDate",
               "AcquisitionDate"):
        assert kw not in ds, kw
    for kw in ("PatientBirthDate", "StudyDate", "StudyTime", "AccessionNumber", "ReferringPhysicianName", "StudyID",
               "PatientSex", "ContentDate"):
        assert kw in ds and not ds[kw].value, kw  # Z: present, empty
    assert 0x00091010 not in ds  # private
    assert str(ds.StudyInstanceUID) != str(src.StudyInstanceUID)
    assert str(ds.SOPClassUID) == "1.2.840.10008.5.1.4.1.1.2"  # a standard UID stays
    assert str(ds.ReferencedImageSequence[0].ReferencedSOPClassUID) == "1.2.840.10008.5.1.4.1.1.2"
    assert ds.BodyPartExamined == "CHEST" and ds.Modality == "CT" and ds.PixelData  # not identifying: kept
    assert ds.PatientIdentityRemoved == "YES" and ds.LongitudinalTemporalInformationModified == "REMOVED"
    assert [c.CodeValue for c in ds.DeidentificationMethodCodeSequence] == ["113100"]
    assert b"Smith" not in ds.to_json().encode() and "778899" not in ds.to_json()


def test_options_retain_dates_uids_clean_descriptors() -> None:
    src = _rich()
    o = DeidOptions(retain_dates=True, retain_uids=True, clean_descriptors=True)
    ds = Deidentifier(o).apply(_rich(str(src.StudyInstanceUID), str(src.SeriesInstanceUID)))
    assert ds.StudyDate == "20240105" and ds.PatientBirthDate == "19610203" and ds.SeriesDate == "20240105"
    assert str(ds.StudyInstanceUID) == str(src.StudyInstanceUID)
    assert "Smith" not in ds.StudyDescription and "CT chest" in ds.StudyDescription and "2024" not in ds.StudyDescription
    assert "778899" not in ds.SeriesDescription and "axial" in ds.SeriesDescription
    assert ds.ProtocolName == "Chest routine"
    assert ds.LongitudinalTemporalInformationModified == "UNMODIFIED"
    assert [c.CodeValue for c in ds.DeidentificationMethodCodeSequence] == ["113100", "113106", "113110", "113105"]
    assert str(ds.PatientName) == "ANONYMOUS" and "PatientAddress" not in ds


def test_uids_mapped_consistently_within_an_operation() -> None:
    study, series = generate_uid(), generate_uid()
    d = Deidentifier(DeidOptions())
    a, b = d.apply(_rich(study, series)), d.apply(_rich(study, series))
    assert a.StudyInstanceUID == b.StudyInstanceUID and a.SeriesInstanceUID == b.SeriesInstanceUID
    assert a.SOPInstanceUID != b.SOPInstanceUID and a.PatientID == b.PatientID
    other = Deidentifier(DeidOptions()).apply(_rich(study, series))
    assert other.StudyInstanceUID != a.StudyInstanceUID  # another operation: another map (no linkage)


def test_deidentify_into_a_new_study(ctx: Any) -> None:
    study, series = generate_uid(), generate_uid()
    for _ in range(3):
        assert store(ctx, _rich(study, series)).ok
    out = deidentify_study(ctx, study, DeidOptions(retain_dates=True), actor="tester")
    assert out["stored"] == 3 and out["study_instance_uid"] != study
    q = Query(level="STUDY", filters={"StudyInstanceUID": out["study_instance_uid"]})
    q.return_keys += ["PatientName", "PatientID", "StudyDate", "NumberOfStudyRelatedInstances"]
    (st,) = list(ctx.query.find(q))
    assert str(st.PatientName) == "ANONYMOUS" and int(st.NumberOfStudyRelatedInstances) == 3
    assert st.StudyDate == "20240105"
    assert len(ctx.retrieve.list_instances(study)) == 3  # the original is untouched
    with pytest.raises(DeidentifyError):
        deidentify_study(ctx, study, DeidOptions(retain_uids=True))


def test_export_zip_with_dicomdir_deidentified(ctx: Any, tmp_path: Path) -> None:
    study = generate_uid()
    for _ in range(2):
        assert store(ctx, _rich(study)).ok
    res = exportsvc.export(ctx, [study], "zip", deidentify={"clean_descriptors": True}, actor="tester")
    with zipfile.ZipFile(res.path) as z:
        names = z.namelist()
        assert "DICOMDIR" in names and res.instances == 2
        dicomdir = dcmread(io.BytesIO(z.read("DICOMDIR")))
        types = [r.DirectoryRecordType for r in dicomdir.DirectoryRecordSequence]
        assert types.count("IMAGE") == 2 and "PATIENT" in types and "STUDY" in types
        for n in names:
            if n != "DICOMDIR":
                ds = dcmread(io.BytesIO(z.read(n)))
                assert str(ds.PatientName) == "ANONYMOUS" and str(ds.StudyInstanceUID) != study
    folder = exportsvc.export(ctx, [study], "folder", folder="unit-export")
    assert (Path(folder.path) / "DICOMDIR").is_file()
    with pytest.raises(exportsvc.ExportError):
        exportsvc.export(ctx, [study], "folder", folder="../escape")
    with pytest.raises(exportsvc.ExportError):
        exportsvc.export(ctx, [generate_uid()], "zip")
