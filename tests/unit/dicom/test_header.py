"""dicom.header: the File Meta Information we prefix, where the data set starts, string forms of values, UIDs."""

from __future__ import annotations

import io

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from openpacs.dicom import header


def test_file_meta_bytes_is_valid_part10_meta():
    sop, cls = generate_uid(), "1.2.840.10008.5.1.4.1.1.2"
    meta = header.file_meta_bytes(cls, sop, ExplicitVRLittleEndian, "STORESCU")
    ds = Dataset()
    ds.PatientID = "X"
    body = io.BytesIO()
    ds.save_as(body, implicit_vr=False, little_endian=True)
    parsed = pydicom.dcmread(io.BytesIO(meta + body.getvalue()))
    fm = parsed.file_meta
    assert fm.MediaStorageSOPClassUID == cls and fm.MediaStorageSOPInstanceUID == sop
    assert fm.TransferSyntaxUID == ExplicitVRLittleEndian
    assert fm.ImplementationClassUID == header.IMPLEMENTATION_CLASS_UID
    assert fm.SourceApplicationEntityTitle == "STORESCU"
    assert fm.FileMetaInformationVersion == b"\x00\x01"
    assert fm.FileMetaInformationGroupLength == len(meta) - 132 - 12
    assert parsed.PatientID == "X"
    assert len(meta) % 2 == 0


@pytest.mark.parametrize("aet", ["", "A", "ODD", "SIXTEEN_CHARS_AE"])
def test_file_meta_bytes_even_lengths(aet):
    meta = header.file_meta_bytes("1.2.3", "1.2.33", "1.2.840.10008.1.2", aet)  # odd-length UIDs
    assert header.dataset_offset(meta + b"\x08\x00\x05\x00") == len(meta)
    fm = pydicom.dcmread(io.BytesIO(meta), force=True).file_meta
    assert fm.MediaStorageSOPInstanceUID == "1.2.33"
    assert ("SourceApplicationEntityTitle" in fm) == bool(aet)


def test_dataset_offset_of_files(tmp_path):
    from pydicom.data import get_testdata_file

    for name in ("CT_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "rtplan.dcm"):
        data = open(get_testdata_file(name), "rb").read()
        off = header.dataset_offset(data)
        ds = pydicom.dcmread(io.BytesIO(data))
        assert data[off - 12 : off] != b"" and off > 132
        # what follows the meta is the first data set element (group > 2)
        assert int.from_bytes(data[off : off + 2], "big" if "bigendian" in name else "little") > 2
        assert ds.file_meta.FileMetaInformationGroupLength == off - 132 - 12


def test_dataset_offset_without_meta_or_preamble():
    assert header.dataset_offset(b"\x08\x00\x05\x00CS\x00\x00") == 0
    assert header.dataset_offset(b"") == 0
    assert header.dataset_offset(b"DICM") == 4
    # a meta element whose declared length runs past the end never points beyond the data
    data = b"\0" * 128 + b"DICM" + b"\x02\x00\x01\x00OB\x00\x00\xff\xff\xff\x7f"
    assert header.dataset_offset(data) <= len(data)


def test_as_text():
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = "Müller^Jörg"
    ds.ModalitiesInStudy = ["CT", "MR"]
    ds.StudyDate = ""
    ds.SeriesNumber = 3
    ds.add_new(0x00091001, "OB", b"ab\0")
    assert header.as_text(ds, 0x00100010) == "Müller^Jörg"
    assert header.as_text(ds, 0x00080061) == "CT\\MR"
    assert header.as_text(ds, 0x00080020) == ""
    assert header.as_text(ds, 0x00100020) is None
    assert header.as_text(ds, 0x00200011) == "3"
    assert header.as_text(ds, 0x00091001) == "ab"


@pytest.mark.parametrize("value,ok", [
    ("1.2.840.10008.1.2", True), ("1.2.3", True), ("", False), (None, False), ("1.2.03", False),
    ("1..2", False), ("1.2.", False), ("1.2.a", False), ("1." + "1" * 63, False), ("1." + "1" * 62, True),
])
def test_is_valid_uid(value, ok):
    assert header.is_valid_uid(value) is ok


def test_index_tags_cover_validation_tags():
    for tag in (0x00080016, 0x00080018, 0x0020000D, 0x0020000E, 0x00080005):
        assert tag in header.INDEX_TAGS


def test_read_header_stops_before_pixels():
    from pydicom.data import get_testdata_file

    data = open(get_testdata_file("CT_small.dcm"), "rb").read()
    ds = header.read_header(data, [0x00100010, 0x7FE00010])
    assert "PixelData" not in ds and str(ds.PatientName) == "CompressedSamples^CT1"


def test_read_header_raises_on_garbage():
    from pydicom.errors import InvalidDicomError

    with pytest.raises(InvalidDicomError):
        header.read_header(b"definitely not DICOM" * 10)
