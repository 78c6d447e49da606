"""A lean reader for the few header tags the index needs, for the ingest hot path.

It walks the top-level data set without building pydicom objects, skips values by length (nested sequences of
undefined length by walking their items) and stops after the highest tag it needs, so a large image costs the same
as a small one. It handles the common little-endian transfer syntaxes and character sets; anything else (deflate,
big endian, ISO 2022 character sets) returns None and the caller uses pydicom.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

_LONG_VRS = {b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"UC", b"UR", b"OD", b"OL", b"OV", b"SV", b"UV"}
_U16 = struct.Struct("<H")
_TAG = struct.Struct("<HH")
_U32 = struct.Struct("<I")
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
DEFLATED = "1.2.840.10008.1.2.1.99"
BIG_ENDIAN = "1.2.840.10008.1.2.2"
_SIMPLE_CHARSETS = {"", "ISO_IR 6", "ISO_IR 100", "ISO_IR 192", "ISO 2022 IR 6"}
_ENCODING = {"ISO_IR 100": "latin-1", "ISO_IR 192": "utf-8"}
_BINARY_VRS = {"US": "<H", "SS": "<h", "UL": "<I", "SL": "<i"}
MAX_INFLATED = 1 << 31
SEQ_TAG = 0x00400275  # RequestAttributesSequence: its first item's attributes are indexed at the series level


class _Unsupported(Exception):
    pass


class Malformed(ValueError):
    """The data set is damaged whatever reader is used: lengths run past its bytes, or an invalid VR code."""


Truncated = Malformed


class NeedMore(Exception):
    """Parsing a prefix (``total`` given): the elements to read or check go past it; parse the whole data."""


@dataclass
class FastHeader:
    transfer_syntax_uid: str
    values: dict[int, str]  # tag -> DICOM string form (multi-values joined by backslash); binary numbers as text
    item_values: dict[int, str]  # first item of RequestAttributesSequence
    dataset_offset: int


def parse(
    data: bytes | memoryview, wanted: dict[int, str], item_wanted: dict[int, str], total: int | None = None
) -> FastHeader | None:
    """``wanted``/``item_wanted`` map tag -> VR. None when this reader can't handle the input (use pydicom).

    ``total``: ``data`` is the first bytes of a data set of that many bytes (the rest is in other buffers). Its top
    level is walked by element lengths, so a value that runs past the prefix (pixel data) is checked against
    ``total`` without being read. Raises NeedMore when the prefix is not enough.
    """
    mv = memoryview(data)
    if total is not None and total <= len(mv):
        mv, total = mv[:total], None
    try:
        return _parse(mv, wanted, item_wanted, total)
    except (Truncated, NeedMore, struct.error) as e:
        if total is not None:  # whatever it is, the whole data decides
            raise NeedMore() from None
        if isinstance(e, struct.error):  # an element header cut short
            raise Truncated(f"data ends inside an element header: {e}") from e
        raise
    except (_Unsupported, UnicodeDecodeError, IndexError, ValueError):
        return None


def _parse(mv: memoryview, wanted: dict[int, str], item_wanted: dict[int, str], total: int | None) -> FastHeader | None:
    if bytes(mv[128:132]) != b"DICM":
        return None
    off = 132
    ts = ""
    n = len(mv)
    while off + 8 <= n:
        group, elem = _TAG.unpack_from(mv, off)
        if group != 0x0002:
            break
        meta_vr = bytes(mv[off + 4 : off + 6])
        if meta_vr in _LONG_VRS:
            length = _U32.unpack_from(mv, off + 8)[0]
            voff = off + 12
        else:
            length = _U16.unpack_from(mv, off + 6)[0]
            voff = off + 8
        if elem == 0x0010:
            ts = bytes(mv[voff : voff + length]).decode("ascii").rstrip("\0 ")
        off = voff + length
    if ts == BIG_ENDIAN or not ts:
        return None
    explicit = ts != IMPLICIT_LE
    ds_off = off
    if ts == DEFLATED:
        if total is not None:
            raise NeedMore()
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        inflated = inflater.decompress(mv[off:], MAX_INFLATED)
        if inflater.unconsumed_tail:
            raise Truncated(f"deflated data set inflates beyond {MAX_INFLATED} bytes")
        if not inflater.eof:
            raise Truncated("deflated data set is cut short")
        mv, off, n = memoryview(inflated), 0, len(inflated)
    raw: dict[int, tuple[str, bytes]] = {}
    item_raw: dict[int, tuple[str, bytes]] = {}
    last = max(wanted) if wanted else 0
    # Walk every top-level element to the end: values past the last wanted tag are skipped by length, but a
    # data set whose lengths overrun its bytes (truncated in transit, corrupted) is refused, not archived.
    while off + 8 <= n:
        group, elem = _TAG.unpack_from(mv, off)
        tag = (group << 16) | elem
        off, vr, voff, length = _element(mv, off, explicit, wanted)
        if length == 0xFFFFFFFF:
            if tag == SEQ_TAG:
                off = _sequence(mv, voff, explicit, item_wanted, item_raw)
            else:
                off = _sequence(mv, voff, explicit, None, None)
            continue
        if voff + length > n:
            if total is None or voff + length > total or (tag <= last and tag in wanted):
                raise Truncated(f"element ({group:04X},{elem:04X}) claims {length} bytes, {n - voff} remain")
            off = voff + length  # a value past the prefix that is not read: only its length is checked
            break
        if tag <= last and tag in wanted:
            if tag == SEQ_TAG:
                _sequence_defined(mv, voff, voff + length, explicit, item_wanted, item_raw)
            else:
                raw[tag] = (wanted[tag] if vr in ("", "UN") else vr, bytes(mv[voff : voff + length]))
        off = voff + length
    if total is not None:
        if off != total:  # elements go on past the prefix
            raise NeedMore()
    elif off != n and any(bytes(mv[off:n])):
        raise Truncated(f"{n - off} stray bytes after the last element")
    # every value counts: "\\ISO 2022 IR 87" (first value empty = ASCII) switches to JIS through escape sequences
    charsets = [c.strip() for c in raw.get(0x00080005, ("CS", b""))[1].decode("ascii").strip("\0 ").split("\\")]
    if any(c not in _SIMPLE_CHARSETS for c in charsets):
        return None
    charset = charsets[0]
    enc = _ENCODING.get(charset, "ascii")
    return FastHeader(ts, _decode_all(raw, enc), _decode_all(item_raw, enc), ds_off)


def _element(mv: memoryview, off: int, explicit: bool, wanted: dict[int, str]) -> tuple[int, str, int, int]:
    """Returns (offset of the element, VR or '', value offset, value length)."""
    if explicit:
        vr = bytes(mv[off + 4 : off + 6])
        if vr in _LONG_VRS:
            return off, vr.decode("ascii"), off + 12, _U32.unpack_from(mv, off + 8)[0]
        if not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
            raise Malformed(f"invalid VR code {vr!r} at offset {off}")
        return off, vr.decode("ascii"), off + 8, _U16.unpack_from(mv, off + 6)[0]
    return off, "", off + 8, _U32.unpack_from(mv, off + 4)[0]


def _sequence(mv: memoryview, off: int, explicit: bool, want: dict[int, str] | None,
              out: dict[int, tuple[str, bytes]] | None) -> int:
    """Skip (or read the first item of) a sequence of undefined length starting at its first item; return the end."""
    n = len(mv)
    first = True
    while off + 8 <= n:
        group, elem = _TAG.unpack_from(mv, off)
        length = _U32.unpack_from(mv, off + 4)[0]
        off += 8
        if (group, elem) == (0xFFFE, 0xE0DD):
            return off
        if (group, elem) != (0xFFFE, 0xE000):
            raise _Unsupported("bad item")
        if length == 0xFFFFFFFF:
            off = _item_undefined(mv, off, explicit, want if first else None, out)
        else:
            if first and want is not None and out is not None:
                _sequence_items_body(mv, off, off + length, explicit, want, out)
            off += length
        first = False
    raise Truncated("sequence runs past the end of the data")


def _item_undefined(mv: memoryview, off: int, explicit: bool, want: dict[int, str] | None,
                    out: dict[int, tuple[str, bytes]] | None) -> int:
    n = len(mv)
    while off + 8 <= n:
        group, elem = _TAG.unpack_from(mv, off)
        if (group, elem) == (0xFFFE, 0xE00D):
            return off + 8
        _, vr, voff, length = _element(mv, off, explicit, {})
        tag = (group << 16) | elem
        if length == 0xFFFFFFFF:
            off = _sequence(mv, voff, explicit, None, None)
            continue
        if want is not None and out is not None and tag in want:
            out[tag] = (want[tag] if vr in ("", "UN") else vr, bytes(mv[voff : voff + length]))
        off = voff + length
    raise Truncated("item runs past the end of the data")


def _sequence_items_body(mv: memoryview, off: int, end: int, explicit: bool, want: dict[int, str],
                         out: dict[int, tuple[str, bytes]]) -> None:
    while off + 8 <= end:
        group, elem = _TAG.unpack_from(mv, off)
        _, vr, voff, length = _element(mv, off, explicit, {})
        if length == 0xFFFFFFFF:
            off = _sequence(mv, voff, explicit, None, None)
            continue
        tag = (group << 16) | elem
        if tag in want:
            out[tag] = (want[tag] if vr in ("", "UN") else vr, bytes(mv[voff : voff + length]))
        off = voff + length


def _sequence_defined(mv: memoryview, off: int, end: int, explicit: bool, want: dict[int, str],
                      out: dict[int, tuple[str, bytes]]) -> None:
    if off + 8 > end:
        return
    group, elem = _TAG.unpack_from(mv, off)
    if (group, elem) != (0xFFFE, 0xE000):
        raise _Unsupported("bad item")
    length = _U32.unpack_from(mv, off + 4)[0]
    if length == 0xFFFFFFFF:
        _item_undefined(mv, off + 8, explicit, want, out)
    else:
        _sequence_items_body(mv, off + 8, min(end, off + 8 + length), explicit, want, out)


def _decode_all(raw: dict[int, tuple[str, bytes]], enc: str) -> dict[int, str]:
    out: dict[int, str] = {}
    for tag, (vr, value) in raw.items():
        fmt = _BINARY_VRS.get(vr)
        if fmt is not None:
            size = struct.calcsize(fmt)
            nums = [struct.unpack_from(fmt, value, i)[0] for i in range(0, len(value) - size + 1, size)]
            out[tag] = "\\".join(str(x) for x in nums)
            continue
        if vr in ("SQ", "OB", "OW", "UN"):
            continue
        text = value.decode(enc if vr in ("PN", "LO", "SH", "LT", "ST", "UT", "UC") else "ascii")
        out[tag] = text.rstrip("\0 ") if vr != "UI" else text.rstrip("\0").strip()
        if vr not in ("LT", "ST", "UT", "UI"):
            out[tag] = "\\".join(v.strip() for v in out[tag].split("\\"))
    return out
