"""Frame extraction from stored Part 10 files, without decoding whenever the stored bytes can be served as they are.

Native (uncompressed little endian) frames are sliced at computed offsets; encapsulated frames are found through the
Extended or Basic Offset Table or the fragments (pydicom.encaps.get_frame). Only the pixel data of the requested frame is
read from the file. Decoding (for another syntax, big endian, bit-packed frames not on a byte boundary, or rendering)
goes through pydicom's pixel API one frame at a time.
"""

from __future__ import annotations

import io
import os
from typing import IO, Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.tag import Tag
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from .transcode import NATIVE, TranscodeError, can_decode, transcode_dataset

PIXEL_DATA = 0x7FE00010
_PIXEL_MODULE = (
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "PlanarConfiguration",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
)


# JPEG baseline/extended, MPEG-2/4 and HEVC video: never lossless
_LOSSY_ONLY = frozenset(
    ["1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51"] + [f"1.2.840.10008.1.2.4.{n}" for n in range(100, 109)]
)
# JPEG-LS near-lossless, JPEG 2000, JPEG 2000 Part 2, HTJ2K: lossless only with NEAR=0 / a reversible wavelet
_MAYBE_LOSSY = frozenset(
    ["1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.93", "1.2.840.10008.1.2.4.203"]
)


class FrameError(ValueError):
    """The instance has no such frame or no pixel data."""


class FrameReader:
    """Random access to the frames of one stored instance.

    ``source`` is a local file path (preferred: nothing but the header and the frame is read), the file's bytes, or a
    seekable binary file object.
    """

    def __init__(self, source: str | os.PathLike[str] | bytes | bytearray | memoryview | IO[bytes]) -> None:
        self._owned = False
        if isinstance(source, str | os.PathLike):
            self._fp: IO[bytes] = open(source, "rb")  # noqa: SIM115 - closed by close()
            self._owned = True
        elif isinstance(source, bytes | bytearray | memoryview):
            self._fp = io.BytesIO(source)
        else:
            self._fp = source
        try:
            self.ds: Dataset = pydicom.dcmread(self._fp, defer_size=1024, force=True)
            meta = getattr(self.ds, "file_meta", None)
            self.transfer_syntax = UID((meta.get("TransferSyntaxUID") if meta else None) or ImplicitVRLittleEndian)
            if self.transfer_syntax == DeflatedExplicitVRLittleEndian:
                # Offsets in a deflated file refer to the inflated stream: load it all (rare syntax, small files).
                self._fp.seek(0)
                self.ds = pydicom.dcmread(self._fp, force=True)
            self._raw: Any = self.ds._dict.get(Tag(PIXEL_DATA)) if PIXEL_DATA in self.ds else None
        except Exception:
            self.close()
            raise

    def __enter__(self) -> FrameReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._owned:
            self._fp.close()

    @property
    def has_pixels(self) -> bool:
        return self._raw is not None

    @property
    def number_of_frames(self) -> int:
        try:
            return max(1, int(self.ds.get("NumberOfFrames", 1) or 1))
        except (TypeError, ValueError):
            return 1

    @property
    def is_native(self) -> bool:
        return self.transfer_syntax in NATIVE

    @property
    def lossy(self) -> bool:
        """The stored pixel data is (or may be) lossy compressed: Lossy Image Compression "01", a lossy-only syntax,
        or a syntax that may be either (JPEG 2000, HTJ2K, JPEG-LS near-lossless) not marked "00"."""
        flag = str(self.ds.get("LossyImageCompression", "") or "").strip()
        if flag == "01":
            return True
        if self.transfer_syntax in _LOSSY_ONLY:
            return True
        return self.transfer_syntax in _MAYBE_LOSSY and flag != "00"

    def _check(self, number: int) -> None:
        if not self.has_pixels:
            raise FrameError("instance has no pixel data")
        if not 1 <= number <= self.number_of_frames:
            raise FrameError(f"frame {number} out of range 1..{self.number_of_frames}")

    def native_frame_length(self) -> int:
        ds = self.ds
        return int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * int(ds.BitsAllocated) // 8

    def stored_frame(self, number: int) -> tuple[bytes, str]:
        """Frame ``number`` (1-based) as stored, and the syntax it is in.

        Native frames are returned little endian uncompressed (Explicit VR Little Endian); big endian or bit-packed
        frames that do not start on a byte boundary are decoded and re-packed for that.
        """
        self._check(number)
        ds = self.ds
        if self.is_native:
            bits = int(ds.BitsAllocated)
            n_samples = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1))
            if self.transfer_syntax == ExplicitVRBigEndian and bits > 8 or bits == 1 and n_samples % 8:
                return self.frame_as(number, ExplicitVRLittleEndian), ExplicitVRLittleEndian
            length = n_samples * bits // 8
            start = (number - 1) * length
            if self.transfer_syntax == DeflatedExplicitVRLittleEndian or self._raw.value is not None:
                value = self.ds.PixelData
                return bytes(value[start : start + length]), ExplicitVRLittleEndian
            self._fp.seek(self._raw.value_tell + start)
            data = self._fp.read(length)
            if len(data) != length:
                raise FrameError(f"pixel data truncated: frame {number} incomplete")
            return data, ExplicitVRLittleEndian
        return self._encapsulated_frame(number - 1), self.transfer_syntax

    def _encapsulated_frame(self, index: int) -> bytes:
        ext: tuple[bytes, bytes] | None = None
        if "ExtendedOffsetTable" in self.ds and "ExtendedOffsetTableLengths" in self.ds:
            ext = (bytes(self.ds.ExtendedOffsetTable), bytes(self.ds.ExtendedOffsetTableLengths))
        try:
            if self._raw.value is not None:
                return get_frame(
                    bytes(self._raw.value), index, extended_offsets=ext, number_of_frames=self.number_of_frames
                )
            self._fp.seek(self._raw.value_tell)
            return get_frame(self._fp, index, extended_offsets=ext, number_of_frames=self.number_of_frames)
        except ValueError as exc:
            raise FrameError(str(exc)) from exc

    def array(self, number: int, *, as_rgb: bool = True) -> np.ndarray:
        """The decoded frame (YBR converted to RGB unless ``as_rgb`` is False)."""
        self._check(number)
        if not can_decode(self.transfer_syntax):
            raise TranscodeError(f"no decoder for {self.transfer_syntax.name or self.transfer_syntax}")
        ds = self._full_dataset()
        from pydicom.pixels import get_decoder

        options: Any = {"as_rgb": as_rgb}
        arr, _ = get_decoder(self.transfer_syntax).as_array(ds, index=number - 1, **options)
        return arr

    def _full_dataset(self) -> Dataset:
        """The dataset with pixel data loaded (deferred read of the pixel data only)."""
        if self._raw is not None and self._raw.value is None:
            _ = self.ds.PixelData  # loads the deferred value from the open file
            self._raw = self.ds._dict[Tag(PIXEL_DATA)]
        return self.ds

    def decoded_photometric(self) -> str:
        pi = str(self.ds.get("PhotometricInterpretation", "MONOCHROME2"))
        if pi.startswith("YBR") and int(self.ds.get("SamplesPerPixel", 1)) == 3:
            return "RGB"  # what array(as_rgb=True) returns
        return pi

    def frame_as(self, number: int, target_ts: str) -> bytes:
        """Frame ``number`` encoded in ``target_ts`` (native = little endian uncompressed bytes)."""
        target = UID(target_ts)
        if target == self.transfer_syntax and not self.is_native:
            self._check(number)
            return self._encapsulated_frame(number - 1)
        if target in NATIVE and self.is_native and self.transfer_syntax != ExplicitVRBigEndian:
            data, _ = self.stored_frame(number)
            return data
        arr = self.array(number)
        mini = self._single_frame_dataset(arr)
        if target in NATIVE:
            return bytes(mini.PixelData)
        transcode_dataset(mini, target)
        return get_frame(bytes(mini.PixelData), 0, number_of_frames=1)

    def _single_frame_dataset(self, arr: np.ndarray) -> Dataset:
        mini = Dataset()
        mini.file_meta = pydicom.dataset.FileMetaDataset()
        mini.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        for kw in _PIXEL_MODULE:
            if kw in self.ds:
                setattr(mini, kw, self.ds[kw].value)
        mini.PhotometricInterpretation = self.decoded_photometric()
        if int(mini.get("SamplesPerPixel", 1)) > 1:
            mini.PlanarConfiguration = 0
        mini.NumberOfFrames = 1
        if int(mini.BitsAllocated) == 1:
            from pydicom.pixels import pack_bits

            mini.PixelData = pack_bits(arr)
        else:
            mini.PixelData = np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        mini["PixelData"].VR = "OB" if int(mini.BitsAllocated) <= 8 else "OW"
        mini.set_original_encoding(False, True)
        return mini


def frame_info(ds: Dataset) -> dict[str, Any]:
    """A few pixel-module values for headers and rendering decisions."""
    return {kw: ds.get(kw) for kw in _PIXEL_MODULE}
