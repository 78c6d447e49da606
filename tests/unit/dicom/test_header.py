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
        assert tag in header.WANTED


def test_read_header_stops_before_pixels():
    from pydicom.data import get_testdata_file

    data = open(get_testdata_file("CT_small.dcm"), "rb").read()
    ds = header.read_header(data, [0x00100010, 0x7FE00010])
    assert "PixelData" not in ds and str(ds.PatientName) == "CompressedSamples^CT1"


def test_read_header_raises_on_garbage():
    from pydicom.errors import InvalidDicomError

    with pytest.raises(InvalidDicomError):
        header.read_header(b"definitely not DICOM" * 10)


# -- the lean header reader must agree with pydicom -----------------------------------------------------------------


def _pydicom_info(data, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(header.fastheader, "parse", lambda *a, **k: None)
        return header.header_info(data)


def _norm(values):
    return {t: "\\".join(x.strip() for x in v.split("\\")) for t, v in values.items()}


def _part10(ds, ts=ExplicitVRLittleEndian):
    from pydicom.dataset import FileMetaDataset

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ts
    meta.MediaStorageSOPClassUID = ds.get("SOPClassUID", "1.2.3")
    meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID", "1.2.3.4")
    ds.file_meta = meta
    ds.preamble = b"\0" * 128
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True, implicit_vr=ts == "1.2.840.10008.1.2", little_endian=True)
    return buf.getvalue()


def _rich(charset, name, ts=ExplicitVRLittleEndian, undefined_seq=False):
    ds = Dataset()
    ds.SpecificCharacterSet = charset
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = name
    ds.PatientID = "ID 1"
    ds.StudyDate = "20240101"
    ds.StudyTime = "10:11:12"
    ds.ModalitiesInStudy = ["CT", "MR"]
    ds.InstanceNumber = "7"
    ds.Rows = 512
    ds.Columns = 256
    ds.StudyDescription = name.split("=")[0] + " desc "
    inner = Dataset()
    inner.CodeValue = "X"
    ds.ProcedureCodeSequence = [inner, inner]  # a sequence to skip before the wanted tags
    item = Dataset()
    item.ScheduledProcedureStepID = "SPS9"
    item.RequestedProcedureID = "RP9"
    ds.RequestAttributesSequence = [item]
    data = _part10(ds, ts)
    if undefined_seq:
        ds.ProcedureCodeSequence.is_undefined_length = True
        ds.RequestAttributesSequence.is_undefined_length = True
        for s in (ds.ProcedureCodeSequence, ds.RequestAttributesSequence):
            for it in s:
                it.is_undefined_length_sequence_item = True
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True, implicit_vr=ts == "1.2.840.10008.1.2", little_endian=True)
        data = buf.getvalue()
    return data


@pytest.mark.parametrize("charset,name", [
    ("ISO_IR 100", "Müller^Jörg"),
    ("ISO_IR 192", "Çelik^Ayşe=チェリク"),
    ("", "Plain^Ascii"),
    (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう"),
    ("ISO_IR 144", "Люкceмбypг^Иван"),
    ("GB18030", "Wang^XiaoDong=王^小東"),
])
@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, "1.2.840.10008.1.2"], ids=["explicit", "implicit"])
@pytest.mark.parametrize("undefined", [False, True], ids=["defined", "undefined"])
def test_fast_header_agrees_with_pydicom(monkeypatch, charset, name, ts, undefined):
    data = _rich(charset, name, ts, undefined)
    fast = header.header_info(data)
    slow = _pydicom_info(data, monkeypatch)
    assert _norm(fast.values) == _norm(slow.values)
    assert fast.item_values == slow.item_values == {0x00400009: "SPS9", 0x00401001: "RP9"}
    assert fast.transfer_syntax_uid == slow.transfer_syntax_uid == ts
    assert fast.dataset_offset == slow.dataset_offset
    assert fast.values[0x00100010] == name


@pytest.mark.parametrize("fname", ["CT_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "rtplan.dcm",
                                   "emri_small.dcm", "JPEG2000.dcm", "image_dfl.dcm", "test-SR.dcm", "rtdose.dcm",
                                   "waveform_ecg.dcm", "liver.dcm", "SC_rgb_jpeg_dcmtk.dcm"])
def test_fast_header_agrees_with_pydicom_on_test_files(monkeypatch, fname):
    from pydicom.data import get_testdata_file

    path = get_testdata_file(fname)
    if path is None:
        pytest.skip(f"{fname} not in this pydicom")
    data = open(path, "rb").read()
    fast = header.header_info(data)
    slow = _pydicom_info(data, monkeypatch)
    assert _norm(fast.values) == _norm(slow.values)
    assert fast.item_values == slow.item_values
    assert fast.transfer_syntax_uid == slow.transfer_syntax_uid
    assert fast.dataset_offset == slow.dataset_offset


# -- header_info of a data set in pieces (STOW-RS parts and C-STORE PDVs are not joined for it) -----------------------


def _big_ct(extra_header: int = 0) -> bytes:
    from core_factory import instance

    ds = instance(patient_id="P-CHUNK", patient_name="Chunk^Test", pixels=120_000)  # pixel data past HEAD_BYTES
    if extra_header:  # a large value before the pixel data: the header no longer fits in HEAD_BYTES
        ds.add_new(0x00091010, "OB", b"\x01" * extra_header)
    return _part10(ds)


def _pieces(data: bytes, size: int) -> list[memoryview]:
    return [memoryview(data)[i : i + size] for i in range(0, len(data), size)]


@pytest.mark.parametrize("extra", [0, 100_000], ids=["header-in-prefix", "header-past-prefix"])
@pytest.mark.parametrize("size", [7, 1000, 65536, 200_000])
def test_header_info_of_pieces_equals_whole(extra, size):
    data = _big_ct(extra)
    whole = header.header_info(data)
    parts = header.header_info_chunks(_pieces(data, size))
    assert parts == whole
    assert parts.values[0x00100020] == "P-CHUNK"


def test_header_info_of_pieces_reads_only_the_prefix(monkeypatch):
    data = _big_ct()
    expected = header.header_info(data)
    monkeypatch.setattr(header, "header_info", lambda d: pytest.fail("the whole data set was joined"))
    assert header.header_info_chunks(_pieces(data, 16384)) == expected


@pytest.mark.parametrize("fname", ["CT_small.dcm", "JPEG2000.dcm", "image_dfl.dcm", "MR_small_bigendian.dcm",
                                   "SC_rgb_jpeg_dcmtk.dcm"])
def test_header_info_of_pieces_of_test_files(fname):
    from pydicom.data import get_testdata_file

    path = get_testdata_file(fname)
    if path is None:
        pytest.skip(f"{fname} not in this pydicom")
    data = open(path, "rb").read()
    for size in (100, 4096):
        assert header.header_info_chunks(_pieces(data, size)) == header.header_info(data)


def test_header_info_of_pieces_refuses_what_the_whole_refuses():
    data = _big_ct()
    cut = data[:-1000]  # pixel data cut short in transit
    with pytest.raises(header.fastheader.Malformed):
        header.header_info(cut)
    with pytest.raises(header.fastheader.Malformed):
        header.header_info_chunks(_pieces(cut, 65536))
    padded = data + b"\0" * 4  # trailing padding is tolerated, as for the whole
    assert header.header_info_chunks(_pieces(padded, 65536)) == header.header_info(padded)
    junk = data + b"\x01\x02\x03\x04\x05\x06\x07\x08\x09"
    with pytest.raises(header.fastheader.Malformed):
        header.header_info_chunks(_pieces(junk, 65536))
