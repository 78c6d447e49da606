"""Malformed DICOM files and PDUs for the hostile-input tests."""

from __future__ import annotations

import io
import random
import struct
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from .dicomdata import CT_IMAGE, MR_IMAGE, small_image

_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}


@dataclass
class Element:
    tag: int
    offset: int  # start of the element header
    value_offset: int
    length: int
    length_offset: int
    length_size: int  # 2 or 4


def walk(data: bytes) -> list[Element]:
    """Top-level elements of an explicit VR little endian data set without sequences."""
    out, off = [], 0
    while off < len(data):
        group, elem = struct.unpack_from("<HH", data, off)
        vr = data[off + 4:off + 6]
        if vr in _LONG_VRS:
            length = struct.unpack_from("<I", data, off + 8)[0]
            out.append(Element(group << 16 | elem, off, off + 12, length, off + 8, 4))
            off += 12 + length
        else:
            length = struct.unpack_from("<H", data, off + 6)[0]
            out.append(Element(group << 16 | elem, off, off + 8, length, off + 6, 2))
            off += 8 + length
    return out


def encode(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    write_dataset(_fp(buf), ds)
    return buf.getvalue()


def _fp(buf):
    from pydicom.filebase import DicomFileLike

    fp = DicomFileLike(buf)
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    return fp


def write_raw(path: Path, sop_class: str, sop_instance: str, body: bytes) -> Path:
    """A Part 10 file with a valid file meta (what the C-STORE command will say) and arbitrary data set bytes."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = "1.2.826.0.1.3680043.9.7433.1.1"
    buf = io.BytesIO()
    buf.write(b"\0" * 128 + b"DICM")
    from pydicom.filewriter import write_file_meta_info

    write_file_meta_info(_fp(buf), meta, enforce_standard=True)
    buf.write(body)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return path


def base_dataset(study: str, patient_id: str = "HOSTILE") -> Dataset:
    ds = small_image(rows=16, cols=16)
    ds.PatientID = patient_id
    ds.PatientName = "Hostile^Input"
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CT"
    ds.StudyDate = "20240101"
    ds.InstanceNumber = 1
    return ds


@dataclass
class Malformed:
    kind: str
    path: Path
    command_sop_class: str
    command_sop_instance: str
    note: str = ""


def malformed_files(directory: Path, rng: random.Random, study: str, patient_id: str = "HOSTILE") -> list[Malformed]:
    """200+ files, each wrong in one way; all claim the same PatientID."""
    out: list[Malformed] = []
    n = 0

    def add(kind: str, ds_bytes: bytes, sop_class: str, sop_instance: str, note: str = "") -> None:
        nonlocal n
        n += 1
        out.append(Malformed(kind, write_raw(directory / f"{n:04d}-{kind}.dcm", sop_class, sop_instance, ds_bytes),
                             sop_class, sop_instance, note))

    for _ in range(60):  # truncated inside an element value (never at an element boundary)
        ds = base_dataset(study, patient_id)
        data = encode(ds)
        elems = [e for e in walk(data) if e.length >= 2 and e.tag > 0x00080018]
        e = rng.choice(elems)
        cut = e.value_offset + rng.randrange(1, e.length)
        add("truncated", data[:cut], ds.SOPClassUID, ds.SOPInstanceUID)
    for _ in range(15):  # truncated inside an element header
        ds = base_dataset(study, patient_id)
        data = encode(ds)
        e = rng.choice([e for e in walk(data) if e.tag > 0x00080018])
        add("truncated-header", data[: e.offset + rng.randrange(1, 8)], ds.SOPClassUID, ds.SOPInstanceUID)
    for _ in range(40):  # an element whose length runs past the end of the data set
        ds = base_dataset(study, patient_id)
        data = bytearray(encode(ds))
        e = rng.choice([e for e in walk(bytes(data)) if e.length_size == 4 or e.tag > 0x00080018])
        remaining = len(data) - e.value_offset
        if e.length_size == 2:
            struct.pack_into("<H", data, e.length_offset, min(0xFFFE, remaining + rng.randrange(2, 5000)) & ~1)
            if struct.unpack_from("<H", data, e.length_offset)[0] <= remaining:
                continue
        else:
            struct.pack_into("<I", data, e.length_offset, remaining + rng.choice([2, 1000, 0x7FFFFFF0 - remaining]))
        add("overrun-length", bytes(data), ds.SOPClassUID, ds.SOPInstanceUID)
    for kw in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID"):
        for _ in range(5):  # a required UID missing from the data set
            ds = base_dataset(study, patient_id)
            sop_class, sop_instance = ds.SOPClassUID, ds.SOPInstanceUID
            delattr(ds, kw)
            add(f"missing-{kw}", encode(ds), sop_class, sop_instance)
    bad_uids = ["1.2.abc", "1..2.3", ".1.2.3", "1.2.3.", "1.2.3 4", "abc", "1.2.840.x", "1.2\\3.4",
                "1." + "2" * 70, "1.2.3-4"]
    for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        for bad in bad_uids:  # syntactically invalid UIDs
            ds = base_dataset(study, patient_id)
            sop_class, sop_instance = ds.SOPClassUID, ds.SOPInstanceUID
            setattr(ds, kw, bad)
            add(f"invalid-{kw}", encode(ds), sop_class, sop_instance, note=bad)
    for _ in range(25):  # garbage data set bytes
        ds_bytes = rng.randbytes(rng.randrange(1, 4000))
        add("garbage", ds_bytes, CT_IMAGE, generate_uid())
    for _ in range(5):  # empty data set / only padding
        add("empty", b"" if _ == 0 else b"\0" * rng.randrange(1, 64), CT_IMAGE, generate_uid())
    for _ in range(15):  # the command's SOP class differs from the data set's
        ds = base_dataset(study, patient_id)
        add("sop-class-mismatch", encode(ds), MR_IMAGE, ds.SOPInstanceUID)
    for _ in range(10):  # the command's SOP instance differs from the data set's
        ds = base_dataset(study, patient_id)
        add("sop-instance-mismatch", encode(ds), ds.SOPClassUID, generate_uid())
    for _ in range(10):  # an invalid VR code in the header of an element
        ds = base_dataset(study, patient_id)
        data = bytearray(encode(ds))
        e = rng.choice([e for e in walk(bytes(data)) if e.length_size == 2 and e.tag > 0x00080018])
        data[e.offset + 4:e.offset + 6] = b"\x00\x01"
        add("bad-vr", bytes(data), ds.SOPClassUID, ds.SOPInstanceUID)
    return out


# -------------------------------------------------------------------------------------------------------------------
# PDUs

APP_CONTEXT = "1.2.840.10008.3.1.1.1"
VERIFICATION = "1.2.840.10008.1.1"


def _ae(title: str) -> bytes:
    return title.encode().ljust(16)[:16]


def _item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def associate_rq(called: str = "OPENPACS", calling: str = "HOSTILE", contexts=None, max_pdu: int = 16384) -> bytes:
    contexts = contexts or [(1, VERIFICATION, ["1.2.840.10008.1.2"])]
    body = struct.pack(">HH", 1, 0) + _ae(called) + _ae(calling) + b"\0" * 32
    body += _item(0x10, APP_CONTEXT.encode())
    for pcid, abstract, syntaxes in contexts:
        sub = _item(0x30, abstract.encode()) + b"".join(_item(0x40, ts.encode()) for ts in syntaxes)
        body += _item(0x20, bytes([pcid, 0, 0, 0]) + sub)
    user = _item(0x51, struct.pack(">I", max_pdu)) + _item(0x52, b"1.2.826.0.1.3680043.9.7433.1.1")
    body += _item(0x50, user)
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def echo_command(message_id: int = 1) -> bytes:
    """C-ECHO-RQ command set, implicit VR little endian."""

    def el(group: int, elem: int, value: bytes) -> bytes:
        return struct.pack("<HHI", group, elem, len(value)) + value

    uid = VERIFICATION.encode()
    if len(uid) % 2:
        uid += b"\0"
    rest = (el(0, 0x0002, uid) + el(0, 0x0100, struct.pack("<H", 0x0030)) + el(0, 0x0110, struct.pack("<H", message_id))
            + el(0, 0x0800, struct.pack("<H", 0x0101)))
    return el(0, 0x0000, struct.pack("<I", len(rest))) + rest


def p_data(pcid: int, payload: bytes, control: int = 0x03) -> bytes:
    pdv = struct.pack(">IBB", len(payload) + 2, pcid, control) + payload
    return struct.pack(">BBI", 0x04, 0, len(pdv)) + pdv


RELEASE_RQ = struct.pack(">BBI", 0x05, 0, 4) + b"\0\0\0\0"
