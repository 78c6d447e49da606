"""Reading just the header tags the index needs, and writing the File Meta Information of a received data set."""

from __future__ import annotations

import io
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import pydicom.config
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID

from ..index.schema import ATTRIBUTES, REQUEST_ATTRIBUTES
from . import fastheader

# Received data are stored as they came; validation warnings while reading headers are noise, not errors.
# Query results are built from values already archived; validating them again on every DataElement costs more than
# the query itself.
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE

IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.10.1461.1"  # OpenPACS implementation class (private root)
IMPLEMENTATION_VERSION_NAME = "OPENPACS_010"



def _even(b: bytes, pad: bytes = b"\0") -> bytes:
    return b + pad if len(b) % 2 else b


def file_meta_bytes(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str, source_aet: str = "") -> bytes:
    """Preamble + 'DICM' + group 0002 in Explicit VR Little Endian (PS3.10 7.1), without pydicom's overhead."""

    def ui(tag_elem: int, value: str) -> bytes:
        v = _even(value.encode("ascii"))
        return struct.pack("<HH2sH", 0x0002, tag_elem, b"UI", len(v)) + v

    body = struct.pack("<HH2sHI", 0x0002, 0x0001, b"OB", 0, 2) + b"\x00\x01"
    body += ui(0x0002, sop_class_uid) + ui(0x0003, sop_instance_uid) + ui(0x0010, transfer_syntax_uid)
    body += ui(0x0012, IMPLEMENTATION_CLASS_UID)
    ver = _even(IMPLEMENTATION_VERSION_NAME.encode("ascii"), b" ")
    body += struct.pack("<HH2sH", 0x0002, 0x0013, b"SH", len(ver)) + ver
    if source_aet:
        aet = _even(source_aet.strip().encode("ascii", "replace"), b" ")
        body += struct.pack("<HH2sH", 0x0002, 0x0016, b"AE", len(aet)) + aet
    group_len = struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(body))
    return b"\0" * 128 + b"DICM" + group_len + body


def dataset_offset(data: bytes | memoryview) -> int:
    """Where the data set starts in a Part 10 byte string (after preamble and File Meta Information)."""
    mv = memoryview(data)
    off = 132 if bytes(mv[128:132]) == b"DICM" else (4 if bytes(mv[:4]) == b"DICM" else 0)
    while off + 8 <= len(mv):
        group, elem = struct.unpack_from("<HH", mv, off)
        if group != 0x0002:
            break
        vr = bytes(mv[off + 4 : off + 6])
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"UC", b"UR", b"OD", b"OL", b"OV", b"SV", b"UV"):
            (length,) = struct.unpack_from("<I", mv, off + 8)
            off += 12 + length
        else:
            (length,) = struct.unpack_from("<H", mv, off + 6)
            off += 8 + length
    return min(off, len(mv))


def read_header(data: bytes | memoryview, tags: Iterable[int] | None = None) -> Dataset:
    """Parse a Part 10 byte string up to the pixel data. Raises on unparsable input."""
    fp = io.BytesIO(data)
    return dcmread(fp, stop_before_pixels=True, specific_tags=list(tags) if tags is not None else None)


def as_text(ds: Dataset, tag: int) -> str | None:
    """The value of ``tag`` as its DICOM string form (multi-values joined by backslash), or None if absent."""
    elem = ds.get(tag)
    if elem is None:
        return None
    value = elem.value
    if value is None or value == "":
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join("" if v is None else str(v) for v in value)
    if isinstance(value, bytes):
        return value.decode("latin-1").rstrip("\0 ")
    return str(value)


# Tags the ingest path reads from every instance (tag -> VR): all indexed attributes plus what validation needs.
WANTED: dict[int, str] = {a.tag: a.vr for a in ATTRIBUTES.values() if not a.computed}
WANTED.update({0x00080005: "CS", 0x00080016: "UI", 0x00080018: "UI", 0x0020000D: "UI", 0x0020000E: "UI",
               0x00400275: "SQ"})
ITEM_WANTED: dict[int, str] = {a.tag: a.vr for a in REQUEST_ATTRIBUTES.values()}


@dataclass
class HeaderInfo:
    """What ingest needs from a header: the transfer syntax and the indexed values as DICOM strings."""

    transfer_syntax_uid: str
    values: dict[int, str]
    item_values: dict[int, str]
    dataset_offset: int


def header_info(data: bytes | memoryview) -> HeaderInfo:
    """Fast path for the common syntaxes and character sets, pydicom for everything else. Raises if unparsable."""
    fast = fastheader.parse(data, WANTED, ITEM_WANTED)
    if fast is not None:
        return HeaderInfo(fast.transfer_syntax_uid, fast.values, fast.item_values, fast.dataset_offset)
    ds = read_header(data, WANTED)
    values = {tag: v for tag in WANTED if tag != 0x00400275 and (v := as_text(ds, tag)) is not None}
    items: dict[int, str] = {}
    seq = ds.get(0x00400275)
    if seq is not None and seq.VR == "SQ" and len(seq.value):
        items = {tag: v for tag in ITEM_WANTED if (v := as_text(seq.value[0], tag)) is not None}
    ts = str(ds.file_meta.get("TransferSyntaxUID", "") or "")
    return HeaderInfo(ts, values, items, dataset_offset(data))


HEAD_BYTES = 64 * 1024  # what header_info_chunks joins first: every header short of pixel data fits in it


def header_info_chunks(chunks: Sequence[bytes | memoryview]) -> HeaderInfo:
    """header_info of the concatenation of ``chunks`` without making it when the header fits in the first
    HEAD_BYTES (pixel data and other values past them are skipped by length, not read)."""
    if len(chunks) == 1:
        return header_info(chunks[0])
    total = sum(len(c) for c in chunks)
    head: list[bytes | memoryview] = []
    size = 0
    for c in chunks:
        head.append(c)
        size += len(c)
        if size >= HEAD_BYTES:
            break
    if size < total:
        prefix = b"".join(head)
        try:
            fast = fastheader.parse(prefix, WANTED, ITEM_WANTED, total=total)
        except fastheader.NeedMore:
            fast = None
        if fast is not None:
            return HeaderInfo(fast.transfer_syntax_uid, fast.values, fast.item_values, fast.dataset_offset)
    return header_info(b"".join(chunks))


def index_values(info: HeaderInfo) -> dict[str, dict[str, object]]:
    """Column values per level for the index."""
    out: dict[str, dict[str, object]] = {"PATIENT": {}, "STUDY": {}, "SERIES": {}, "IMAGE": {}}
    values = info.values
    for attr in _STORED:
        v = values.get(attr.tag)
        if v is None:
            continue
        if attr.vr == "US":
            try:
                out[attr.level][attr.column] = int(v.split("\\")[0]) if v else None
            except ValueError:
                out[attr.level][attr.column] = None
            continue
        if "\0" in v:  # PostgreSQL refuses NUL in text, and it is never meaningful inside a DICOM string
            v = v.replace("\0", "")
        if attr.vr == "DA":
            v = v.replace(".", "")
        elif attr.vr == "TM":
            v = v.replace(":", "")
        out[attr.level][attr.column] = v
        if attr.column in _NORMALIZED:
            out[attr.level][attr.column + "_norm"] = v.upper()
    for attr in REQUEST_ATTRIBUTES.values():
        v = info.item_values.get(attr.tag)
        if v:
            out["SERIES"][attr.column] = v.replace("\0", "")
    return out


_STORED = [a for a in ATTRIBUTES.values() if not a.computed]
_NORMALIZED = {"patient_name", "referring_physician_name"}


def is_valid_uid(value: str | None) -> bool:
    return bool(value) and UID(value).is_valid  # type: ignore[arg-type]
