"""Transfer syntax conversion of whole Part 10 files (bytes in, bytes out).

Decoding goes through pydicom's pixel API (backends: pylibjpeg, pyjpegls, pillow); lossless encoding through pydicom's
encoders, and HTJ2K through imagecodecs (OpenJPH) since pydicom has no HTJ2K encoder. Every attribute other than the
pixel description is kept, including the SOP Instance UID: a lossless transcoding is the same instance (PS3.5 8.2).
Lossy targets are refused unless ``allow_lossy`` is given, and no lossy encoder is wired in today.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

NATIVE_LE: frozenset[str] = frozenset({ImplicitVRLittleEndian, ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian})
NATIVE: frozenset[str] = NATIVE_LE | {ExplicitVRBigEndian}

# Targets we can produce. Native ones always; encoders are lossless only.
LOSSLESS_ENCODED: frozenset[str] = frozenset({JPEGLSLossless, JPEG2000Lossless, RLELossless, HTJ2KLossless})
WRITABLE: frozenset[str] = NATIVE_LE | LOSSLESS_ENCODED

_SWAP_WIDTH = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}


class TranscodeError(ValueError):
    """The data cannot be converted to the requested transfer syntax (unsupported syntax or pixel format)."""


def is_native(ts: str) -> bool:
    return ts in NATIVE


def is_lossless_target(ts: str) -> bool:
    return ts in WRITABLE


def can_decode(ts: str) -> bool:
    """Whether pixel data in ``ts`` can be decoded by an installed backend."""
    if ts in NATIVE:
        return True
    try:
        from pydicom.pixels import get_decoder

        return bool(get_decoder(UID(ts)).is_available)
    except Exception:
        return False


def can_transcode(source_ts: str, target_ts: str) -> bool:
    """Cheap check on the syntaxes alone (the pixel format of an instance may still refuse, see TranscodeError)."""
    if source_ts == target_ts:
        return True
    return target_ts in WRITABLE and can_decode(source_ts)


def read_dataset(file_bytes: bytes | bytearray | memoryview) -> FileDataset:
    return pydicom.dcmread(io.BytesIO(file_bytes), force=True)


def transcode(file_bytes: bytes, target_ts: str, *, allow_lossy: bool = False) -> bytes:
    """Return the Part 10 file ``file_bytes`` re-encoded in ``target_ts``.

    Raises TranscodeError when the target is unsupported, lossy without ``allow_lossy``, or when the pixel format
    cannot be represented in it (e.g. 32-bit samples in JPEG-LS).
    """
    target = UID(target_ts)
    ds = read_dataset(file_bytes)
    source = _source_ts(ds)
    if source == target:
        return bytes(file_bytes)
    transcode_dataset(ds, target, allow_lossy=allow_lossy)
    return write_part10(ds)


def transcode_dataset(ds: Dataset, target_ts: str, *, allow_lossy: bool = False) -> None:
    """In-place version of :func:`transcode` for a dataset already read (file_meta included)."""
    target = UID(target_ts)
    if target not in WRITABLE:
        if not allow_lossy:
            raise TranscodeError(f"cannot encode to {target.name or target}: not a supported lossless target")
        raise TranscodeError(f"no encoder for {target.name or target}")
    source = _source_ts(ds)
    if source == target:
        return
    has_pixels = "PixelData" in ds
    if source not in NATIVE and not can_decode(source):
        raise TranscodeError(f"no decoder for {source.name or source}")

    try:
        if source == ExplicitVRBigEndian:
            _big_to_little(ds)
        elif source not in NATIVE and has_pixels:
            # YBR data from JPEG is converted to RGB (Photometric Interpretation updated); keep the instance UID.
            ds.decompress(generate_instance_uid=False, as_rgb=True)
        elif source not in NATIVE:
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian

        if target in NATIVE_LE or not has_pixels:
            ds.file_meta.TransferSyntaxUID = target
        elif target == HTJ2KLossless:
            _compress_htj2k(ds)
        else:
            if int(ds.get("BitsAllocated", 0)) == 1:
                raise TranscodeError("1-bit pixel data cannot be encapsulated")
            kwargs: dict[str, Any] = {}
            if target == JPEG2000Lossless and ds.get("SamplesPerPixel", 1) == 3:
                kwargs["use_mct"] = False  # keep the Photometric Interpretation truthful (RGB, not YBR_RCT)
            ds.compress(target, generate_instance_uid=False, **kwargs)
    except TranscodeError:
        raise
    except Exception as exc:  # pydicom raises ValueError/RuntimeError/NotImplementedError from many backends
        raise TranscodeError(f"cannot transcode {source.name or source} to {target.name or target}: {exc}") from exc


def write_part10(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ts = UID(ds.file_meta.TransferSyntaxUID)
    ds.file_meta.pop("FileMetaInformationGroupLength", None)
    pydicom.dcmwrite(
        buf, ds, implicit_vr=ts.is_implicit_VR, little_endian=ts.is_little_endian, enforce_file_format=True
    )
    return buf.getvalue()


def _source_ts(ds: Dataset) -> UID:
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if not ts:
        raise TranscodeError("file has no Transfer Syntax UID in its file meta")
    return UID(ts)


def _compress_htj2k(ds: Dataset) -> None:
    import imagecodecs

    bits = int(ds.BitsAllocated)
    if bits == 1 or bits > 16:
        raise TranscodeError(f"HTJ2K encoding of {bits}-bit samples is not supported")
    if int(ds.get("BitsStored", bits)) != bits and int(ds.get("PixelRepresentation", 0)) == 1:
        # Signed samples with high bits unused: the decoded array is sign-extended by pydicom, fine for J2K.
        pass
    arr = ds.pixel_array
    nframes = int(ds.get("NumberOfFrames", 1) or 1)
    frames: Iterable[np.ndarray] = arr if nframes > 1 else [arr]
    encoded = []
    for frame in frames:
        frame = np.ascontiguousarray(frame)
        encoded.append(bytes(imagecodecs.htj2k_encode(frame, reversible=True, rgb=False)))
    ds.PixelData = encapsulate(encoded)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    if ds.get("SamplesPerPixel", 1) > 1:
        ds.PlanarConfiguration = 0
    ds.file_meta.TransferSyntaxUID = HTJ2KLossless


def _big_to_little(ds: Dataset) -> None:
    """Re-encode a dataset read as Explicit VR Big Endian so that it can be written little endian.

    Numbers (US, SS, FL, ...) are decoded values and re-encode themselves; OW/OF/OL/OD/OV bytes need swapping, and
    Pixel Data is rebuilt from the decoded array (which also handles 8-bit data stored in OW words).
    """
    has_pixels = "PixelData" in ds
    arr = ds.pixel_array if has_pixels else None

    def swap(d: Dataset) -> None:
        for elem in d:
            if elem.VR == "SQ":
                for item in elem.value:
                    swap(item)
            elif elem.tag != 0x7FE00010 and elem.VR in _SWAP_WIDTH and elem.value:
                width = _SWAP_WIDTH[elem.VR]
                raw = bytes(elem.value)
                usable = len(raw) - len(raw) % width
                swapped = np.frombuffer(raw[:usable], dtype=f">u{width}").astype(f"<u{width}").tobytes()
                elem.value = swapped + raw[usable:]

    swap(ds)
    if arr is not None:
        if int(ds.BitsAllocated) == 1:
            from pydicom.pixels import pack_bits

            ds.PixelData = pack_bits(arr)
        else:
            ds.PixelData = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        ds["PixelData"].VR = "OB" if int(ds.BitsAllocated) <= 8 else "OW"
    ds.set_original_encoding(False, True, ds.get("SpecificCharacterSet"))
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
