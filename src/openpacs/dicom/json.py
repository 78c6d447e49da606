"""The DICOM JSON Model (PS3.18 Annex F): pydicom Dataset <-> JSON-ready dicts, typed exactly as the standard says.

Why not ``Dataset.to_json_dict``: it is several times slower (QIDO encodes thousands of elements per request), it
does not know where our bulk data lives, and it writes IS/DS values it cannot parse as invalid numbers. Here:

- PN is an object with ``Alphabetic`` / ``Ideographic`` / ``Phonetic`` groups (empty trailing groups left out);
- IS, DS, US, SS, UL, SL, FL, FD, SV, UV are JSON numbers (a value that is not a number, e.g. a corrupt DS, stays a
  string rather than breaking the response; SV/UV beyond 2^53 are strings as F.2.3.1 allows);
- AT is an 8-hex-digit string; SQ items are nested objects;
- OB, OD, OF, OL, OV, OW, UN are ``BulkDataURI`` when a URI builder is given, else ``InlineBinary`` (base64);
- an empty value has no ``Value``; an empty value inside a multi-valued attribute is ``null``;
- group lengths (gggg,0000) are left out (F.2.1).
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.valuerep import IS, DSfloat

# A BulkDataURI builder gets the path of the element: (tag,) at the top level, (seq_tag, item_index, tag, ...) inside
# sequences, and returns the URI. Absolute URIs are the caller's business (it knows the request's base URL).
BulkURIBuilder = Callable[[tuple[int, ...]], str]
# A bulk data loader (decoder side) gets a BulkDataURI and returns its bytes.
BulkLoader = Callable[[str], bytes]

JSONDict = dict[str, Any]

BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
_STRING_VRS = frozenset({"AE", "AS", "CS", "DA", "DT", "LO", "LT", "SH", "ST", "TM", "UC", "UI", "UR", "UT"})
_INT_VRS = frozenset({"US", "SS", "UL", "SL"})
_BIG_INT_VRS = frozenset({"SV", "UV"})
_FLOAT_VRS = frozenset({"FL", "FD"})
_PN_GROUPS = ("Alphabetic", "Ideographic", "Phonetic")
_MAX_SAFE_INT = 2**53

_tag_keys: dict[int, str] = {}


def tag_key(tag: int) -> str:
    key = _tag_keys.get(tag)
    if key is None:
        key = _tag_keys[tag] = f"{tag:08X}"
    return key


def _vr_of(elem: DataElement) -> str:
    vr = elem.VR
    if len(vr) != 2:  # an ambiguous VR pydicom could not resolve ("US or SS", "OB or OW", ...)
        vr = vr[:2]
    return vr


def _values(value: Any) -> list[Any]:
    if isinstance(value, MultiValue | list | tuple):
        return list(value)
    return [value]


def _is_empty(value: Any) -> bool:
    return value is None or (isinstance(value, str | bytes | MultiValue | list | tuple) and not value)


def _str_value(v: Any) -> str | None:
    if v is None or v == "":
        return None
    return v if type(v) is str else str(v)


def _pn_value(v: Any) -> dict[str, str] | None:
    if v is None:
        return None
    s = str(v)
    if not s:
        return None
    groups = s.split("=")
    out: dict[str, str] = {}
    for name, text in zip(_PN_GROUPS, groups, strict=False):
        if text:
            out[name] = text
    return out or None


def _is_value(v: Any) -> int | float | str | None:
    if v is None or v == "":
        return None
    if type(v) is int:
        return v
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    if not math.isfinite(f):
        return str(v)
    i = int(f)
    return i if i == f else f


def _ds_value(v: Any) -> int | float | str | None:
    if v is None or v == "":
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    if not math.isfinite(f):
        return str(v)
    if f.is_integer() and abs(f) < _MAX_SAFE_INT:
        text = str(v)
        if "." not in text and "e" not in text and "E" not in text:
            return int(f)
    return f


def _int_value(v: Any) -> int | None:
    if v is None or v == "":
        return None
    return int(v)


def _big_int_value(v: Any) -> int | str | None:
    if v is None or v == "":
        return None
    i = int(v)
    return i if -_MAX_SAFE_INT < i < _MAX_SAFE_INT else str(i)


def _float_value(v: Any) -> float | str | None:
    if v is None or v == "":
        return None
    f = float(v)
    if not math.isfinite(f):
        return str(f)  # JSON has no NaN/Infinity; a string is the least lossy choice
    return f


def _at_value(v: Any) -> str | None:
    if v is None or v == "":
        return None
    return f"{int(v):08X}"


_CONVERTERS: dict[str, Callable[[Any], Any]] = {vr: _str_value for vr in _STRING_VRS}
_CONVERTERS.update({vr: _int_value for vr in _INT_VRS})
_CONVERTERS.update({vr: _big_int_value for vr in _BIG_INT_VRS})
_CONVERTERS.update({vr: _float_value for vr in _FLOAT_VRS})
_CONVERTERS.update({"PN": _pn_value, "IS": _is_value, "DS": _ds_value, "AT": _at_value})


def element_to_json(
    elem: DataElement,
    bulk_uri: BulkURIBuilder | None = None,
    bulk_threshold: int = 0,
    path: tuple[int, ...] = (),
) -> JSONDict:
    """One element as ``{"vr": ..., "Value"|"InlineBinary"|"BulkDataURI": ...}``."""
    vr = _vr_of(elem)
    value = elem.value
    out: JSONDict = {"vr": vr}
    if vr == "SQ":
        if value:
            out["Value"] = [
                dataset_to_json(item, bulk_uri, bulk_threshold, path + (elem.tag, i)) for i, item in enumerate(value)
            ]
        return out
    if _is_empty(value):
        return out
    if vr in BINARY_VRS:
        if isinstance(value, list | tuple | MultiValue):  # e.g. a fragment list someone put in; join as stored bytes
            value = b"".join(value)
        if isinstance(value, str):
            value = value.encode("latin-1")
        if bulk_uri is not None and len(value) > bulk_threshold:
            out["BulkDataURI"] = bulk_uri(path + (elem.tag,))
        else:
            out["InlineBinary"] = base64.b64encode(value).decode("ascii")
        return out
    conv = _CONVERTERS.get(vr)
    if conv is None:  # an unknown VR: keep its text
        conv = _str_value
    if vr in ("LT", "ST", "UT", "UR"):  # never multi-valued: a backslash is part of the text
        out["Value"] = [conv(value)]
        return out
    if isinstance(value, MultiValue | list | tuple):
        vals = [conv(v) for v in value]
        if any(v is not None for v in vals):
            out["Value"] = vals
    else:
        v = conv(value)
        if v is not None:
            out["Value"] = [v]
    return out


def dataset_to_json(
    ds: Dataset,
    bulk_uri: BulkURIBuilder | None = None,
    bulk_threshold: int = 0,
    path: tuple[int, ...] = (),
) -> JSONDict:
    """A dataset as a DICOM JSON object (keys in tag order). File meta (group 0002) is not part of ``ds``."""
    out: JSONDict = {}
    elems = ds._dict  # direct access: Dataset.__iter__/__getitem__ cost more than the encoding itself
    for tag in sorted(elems, key=int):
        if not tag & 0xFFFF:  # group length
            continue
        elem = elems[tag]
        if type(elem) is not DataElement:  # a RawDataElement not yet converted (charset-aware conversion)
            elem = ds[tag]
        vr = elem.VR
        value = elem.value
        # fast path: the single-valued strings that make up most of a query response
        tv = type(value)
        if tv is str and vr in _STRING_VRS:
            out[tag_key(tag)] = {"vr": vr, "Value": [value]} if value else {"vr": vr}
            continue
        if (tv is int or tv is IS) and (vr in _INT_VRS or vr == "IS"):
            out[tag_key(tag)] = {"vr": vr, "Value": [int(value)]}
            continue
        out[tag_key(tag)] = element_to_json(elem, bulk_uri, bulk_threshold, path)
    return out


def dumps(obj: Any) -> bytes:
    """Compact UTF-8 JSON bytes of an encoded dataset or list of them."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")


def datasets_to_json_bytes(datasets: Iterable[Dataset], bulk_uri: BulkURIBuilder | None = None) -> bytes:
    return dumps([dataset_to_json(ds, bulk_uri) for ds in datasets])


# ---------------------------------------------------------------------------------------------------------------------
# Decoding


class DicomJSONError(ValueError):
    """The JSON is not a valid DICOM JSON Model object."""


def _pn_from_json(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, str):  # lenient: some writers send PN as a plain string
        return v
    if not isinstance(v, Mapping):
        raise DicomJSONError(f"PN value must be an object, not {type(v).__name__}")
    groups = [v.get(name) or "" for name in _PN_GROUPS]
    for g in groups:
        if not isinstance(g, str):
            raise DicomJSONError("PN component groups must be strings")
    while groups and not groups[-1]:
        groups.pop()
    return "=".join(groups)


def _number_text(v: Any, vr: str) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        raise DicomJSONError(f"{vr} value must be a number")
    if isinstance(v, str):
        return v.strip()
    if vr == "IS":
        if isinstance(v, float):
            if not v.is_integer():
                raise DicomJSONError(f"IS value {v!r} is not an integer")
            v = int(v)
        if not isinstance(v, int):
            raise DicomJSONError(f"IS value must be a number, not {type(v).__name__}")
        return str(v)
    if not isinstance(v, int | float):
        raise DicomJSONError(f"DS value must be a number, not {type(v).__name__}")
    text = repr(v) if isinstance(v, float) else str(v)
    if len(text) > 16:
        text = str(DSfloat(v, auto_format=True))
    return text


def _value_from_json(vr: str, values: list[Any], tag: int, bulk_loader: BulkLoader | None) -> Any:
    if vr == "SQ":
        items = DicomSequence()
        for item in values:
            if not isinstance(item, Mapping):
                raise DicomJSONError(f"({tag:08X}) SQ items must be objects")
            items.append(json_to_dataset(item, bulk_loader))
        return items
    if vr == "PN":
        conv: list[Any] = [_pn_from_json(v) for v in values]
    elif vr in ("IS", "DS"):
        conv = [_number_text(v, vr) for v in values]
    elif vr == "AT":
        try:
            conv = [int(v, 16) if isinstance(v, str) else int(v) for v in values]
        except (TypeError, ValueError) as exc:
            raise DicomJSONError(f"({tag:08X}) AT value is not an 8-hex-digit tag") from exc
    elif vr in _INT_VRS or vr in _BIG_INT_VRS:
        try:
            conv = [None if v is None else int(v) for v in values]
        except (TypeError, ValueError) as exc:
            raise DicomJSONError(f"({tag:08X}) {vr} value is not an integer") from exc
        if any(isinstance(v, bool) for v in values):
            raise DicomJSONError(f"({tag:08X}) {vr} value is not an integer")
    elif vr in _FLOAT_VRS:
        try:
            conv = [None if v is None else float(v) for v in values]
        except (TypeError, ValueError) as exc:
            raise DicomJSONError(f"({tag:08X}) {vr} value is not a number") from exc
    elif vr in BINARY_VRS:
        raise DicomJSONError(f"({tag:08X}) {vr} must use InlineBinary or BulkDataURI, not Value")
    else:
        for v in values:
            if v is not None and not isinstance(v, str):
                raise DicomJSONError(f"({tag:08X}) {vr} value must be a string, not {type(v).__name__}")
        conv = ["" if v is None else v for v in values]
        if vr in ("LT", "ST", "UT", "UR"):
            return conv[0] if conv else ""
    if not conv:
        return None
    if len(conv) == 1:
        return conv[0]
    return conv


def json_to_dataset(obj: Mapping[str, Any], bulk_loader: BulkLoader | None = None) -> Dataset:
    """A DICOM JSON object back to a Dataset. BulkDataURIs are resolved by ``bulk_loader`` (required if any)."""
    if not isinstance(obj, Mapping):
        raise DicomJSONError("a DICOM JSON data set must be an object")
    ds = Dataset()
    for key, attr in obj.items():
        if not isinstance(key, str) or len(key) != 8:
            raise DicomJSONError(f"attribute key {key!r} is not an 8-hex-digit tag")
        try:
            tag = int(key, 16)
        except ValueError as exc:
            raise DicomJSONError(f"attribute key {key!r} is not an 8-hex-digit tag") from exc
        if not isinstance(attr, Mapping):
            raise DicomJSONError(f"({key}) attribute must be an object")
        vr = attr.get("vr")
        if not isinstance(vr, str) or len(vr) != 2 or not vr.isupper():
            raise DicomJSONError(f"({key}) missing or invalid vr")
        value: Any
        if "Value" in attr:
            values = attr["Value"]
            if not isinstance(values, list):
                raise DicomJSONError(f"({key}) Value must be an array")
            value = _value_from_json(vr, values, tag, bulk_loader)
        elif "InlineBinary" in attr:
            data = attr["InlineBinary"]
            if not isinstance(data, str):
                raise DicomJSONError(f"({key}) InlineBinary must be a base64 string")
            try:
                value = base64.b64decode(data, validate=True)
            except ValueError as exc:
                raise DicomJSONError(f"({key}) InlineBinary is not valid base64") from exc
        elif "BulkDataURI" in attr:
            uri = attr["BulkDataURI"]
            if not isinstance(uri, str):
                raise DicomJSONError(f"({key}) BulkDataURI must be a string")
            if bulk_loader is None:
                raise DicomJSONError(f"({key}) BulkDataURI {uri!r} given but no bulk data is available")
            value = bulk_loader(uri)
        else:
            value = DicomSequence() if vr == "SQ" else None
        if vr == "SQ" and value is None:
            value = DicomSequence()
        ds.add(DataElement(tag, vr, value))
    return ds


def part10_from_json(obj: Mapping[str, Any], bulk_loader: BulkLoader | None = None) -> bytes:
    """A DICOM JSON object (STOW-RS metadata) as a Part 10 file in Explicit VR Little Endian."""
    from io import BytesIO

    from pydicom.dataset import FileMetaDataset
    from pydicom.filewriter import dcmwrite
    from pydicom.uid import ExplicitVRLittleEndian

    ds = json_to_dataset(obj, bulk_loader)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.get("SOPClassUID", "")
    meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID", "")
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    out = BytesIO()
    dcmwrite(out, ds, enforce_file_format=True)
    return out.getvalue()


def loads(data: bytes | str) -> list[Dataset]:
    """A JSON array of DICOM JSON objects (or one object) to Datasets."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise DicomJSONError(f"not JSON: {exc}") from exc
    if isinstance(doc, Mapping):
        doc = [doc]
    if not isinstance(doc, list):
        raise DicomJSONError("expected a JSON array of DICOM data sets")
    return [json_to_dataset(o) for o in doc]


def bulk_path_str(path: Sequence[int]) -> str:
    """A readable form of a bulk data path for URIs: ``7FE00010`` or ``00540016/0/00181072``."""
    return "/".join(f"{p:08X}" if i % 2 == 0 else str(p) for i, p in enumerate(path))
