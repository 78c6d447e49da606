"""Lossless transcoding must be pixel-exact and keep every other attribute."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
)

from openpacs.dicom.transcode import TranscodeError, can_transcode, transcode

warnings.filterwarnings("ignore", module="pydicom")

SOURCES = [
    "CT_small.dcm",  # 16-bit signed CT
    "MR_small.dcm",  # 16-bit signed MR
    "MR_small_implicit.dcm",
    "MR_small_bigendian.dcm",  # big endian source
    "emri_small.dcm",  # multi-frame 16-bit unsigned
    "emri_small_jpeg_ls_lossless.dcm",
    "emri_small_jpeg_2k_lossless.dcm",
    "emri_small_RLE.dcm",
    "MR_small_jp2klossless.dcm",
    "JPEG-LL.dcm",  # JPEG lossless process 14 SV1
    "US1_UNCR.dcm",  # 8-bit RGB
    "SC_rgb_2frame.dcm",  # multi-frame RGB
    "SC_rgb_16bit_2frame.dcm",
    "OBXXXX1A_2frame.dcm",  # palette colour multi-frame US
    "image_dfl.dcm",  # deflated
    "693_J2KR.dcm",
]
TARGETS = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGLSLossless,
    JPEG2000Lossless,
    RLELossless,
    HTJ2KLossless,
]


def _read(data: bytes) -> pydicom.FileDataset:
    return pydicom.dcmread(io.BytesIO(data))


def _load(name: str) -> bytes:
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"{name} not available")
    with open(path, "rb") as f:
        return f.read()


@pytest.mark.parametrize("target", TARGETS, ids=lambda u: u.name.split(" ")[0] + u[-4:])
@pytest.mark.parametrize("name", SOURCES)
def test_lossless_round_trip_is_pixel_exact(name: str, target: str) -> None:
    data = _load(name)
    src = _read(data)
    expected = src.pixel_array
    out = transcode(data, target)
    got = _read(out)
    assert got.file_meta.TransferSyntaxUID == target
    assert got.SOPInstanceUID == src.SOPInstanceUID
    assert got.file_meta.MediaStorageSOPInstanceUID == src.SOPInstanceUID
    assert got.StudyInstanceUID == src.StudyInstanceUID
    assert got.get("PatientName") == src.get("PatientName")
    np.testing.assert_array_equal(got.pixel_array, expected)
    # and back to explicit little endian, still exact
    back = _read(transcode(out, ExplicitVRLittleEndian))
    np.testing.assert_array_equal(back.pixel_array, expected)


def test_other_attributes_kept() -> None:
    data = _load("CT_small.dcm")
    src = _read(data)
    got = _read(transcode(data, JPEGLSLossless))
    for elem in src:
        if elem.tag.group == 0x0028 or elem.tag == 0x7FE00010:
            continue
        assert elem.tag in got, elem
        assert got[elem.tag].value == elem.value, elem


def test_same_syntax_returns_input_unchanged() -> None:
    data = _load("CT_small.dcm")
    assert transcode(data, ExplicitVRLittleEndian) == data


def test_jpeg_baseline_decodes_but_is_never_encoded() -> None:
    data = _load("SC_rgb_jpeg_dcmtk.dcm")
    src = _read(data)
    got = _read(transcode(data, ExplicitVRLittleEndian))
    assert got.PhotometricInterpretation == "RGB"
    assert got.pixel_array.shape == src.pixel_array.shape
    assert np.abs(got.pixel_array.astype(int) - src.pixel_array.astype(int)).max() <= 2
    with pytest.raises(TranscodeError):
        transcode(_load("CT_small.dcm"), JPEGBaseline8Bit)


def test_multiframe_jpeg_baseline_to_jpegls() -> None:
    data = _load("examples_ybr_color.dcm")
    src = _read(data)
    out = _read(transcode(data, JPEGLSLossless))
    assert int(out.NumberOfFrames) == int(src.NumberOfFrames)
    np.testing.assert_array_equal(out.pixel_array, _read(transcode(data, ExplicitVRLittleEndian)).pixel_array)


def test_unencodable_pixel_format_raises() -> None:
    with pytest.raises(TranscodeError):
        transcode(_load("rtdose.dcm"), JPEGLSLossless)  # 32-bit samples


def test_big_endian_not_a_target() -> None:
    assert not can_transcode(ExplicitVRLittleEndian, ExplicitVRBigEndian)
    assert can_transcode(JPEGBaseline8Bit, ExplicitVRLittleEndian)
    assert can_transcode(ExplicitVRLittleEndian, HTJ2KLossless)
