"""DICOM XML: the Native DICOM Model of PS3.19 A.1, written from a DICOM JSON object (PS3.18 F).

The two models carry the same information, so QIDO-RS results and WADO-RS metadata are built once as DICOM JSON and
turned into XML only when a client asks for ``multipart/related; type="application/dicom+xml"``. Values go through
ElementTree (escaped), and characters XML 1.0 cannot carry (C0 controls in a hostile value) become U+FFFD.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from typing import Any

from pydicom.datadict import keyword_for_tag

NAMESPACE = "http://dicom.nema.org/PS3.19/models/NativeDICOM"
_XML_SPACE = "{http://www.w3.org/XML/1998/namespace}space"
_PN_GROUPS = ("Alphabetic", "Ideographic", "Phonetic")
_PN_COMPONENTS = ("FamilyName", "GivenName", "MiddleName", "NamePrefix", "NameSuffix")
_NOT_XML = re.compile("[^\u0009\u000a\u000d\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _text(value: Any) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        value = int(value)
    return _NOT_XML.sub("\ufffd", str(value))


def _person_name(parent: ET.Element, number: int, value: Any) -> None:
    pn = ET.SubElement(parent, "PersonName", number=str(number))
    groups = value if isinstance(value, Mapping) else {"Alphabetic": str(value)}
    for group in _PN_GROUPS:
        text = groups.get(group)
        if not text:
            continue
        g = ET.SubElement(pn, group)
        for name, part in zip(_PN_COMPONENTS, str(text).split("^"), strict=False):
            if part:
                ET.SubElement(g, name).text = _text(part)


def _private_creator(obj: Mapping[str, Any], tag: int) -> str | None:
    """The Private Creator of a private data element (gggg,xxee): the value of (gggg,00xx) in the same data set.
    None for standard and Private Creator elements, and when the data set lacks the creator (the tag then stays
    whole, as the only way to keep the block)."""
    group, element = tag >> 16, tag & 0xFFFF
    if not group & 1 or element < 0x1000:
        return None
    creator = obj.get(f"{group:04X}{element >> 8:04X}")
    values = creator.get("Value") if isinstance(creator, Mapping) else None
    if isinstance(values, list) and values and isinstance(values[0], str):
        return values[0]
    return None


def _attributes(parent: ET.Element, obj: Mapping[str, Any]) -> None:
    for key in sorted(obj):
        attr = obj[key]
        tag = int(key, 16)
        vr = str(attr.get("vr", "UN"))
        creator = _private_creator(obj, tag)
        if creator is not None:  # PS3.19 Table A.1.5-2: gggg00ee, the block named by privateCreator instead
            el = ET.SubElement(parent, "DicomAttribute", {"tag": f"{tag & 0xFFFF00FF:08X}", "vr": vr,
                                                          "privateCreator": _text(creator)})
        else:
            el = ET.SubElement(parent, "DicomAttribute", {"tag": key.upper(), "vr": vr})
        keyword = keyword_for_tag(tag)
        if keyword:
            el.set("keyword", keyword)
        if "Value" in attr:
            for i, v in enumerate(attr["Value"], start=1):
                if vr == "SQ":
                    item = ET.SubElement(el, "Item", number=str(i))
                    _attributes(item, v or {})
                elif vr == "PN":
                    if v is None:  # an empty value keeps its place among the others
                        ET.SubElement(el, "PersonName", number=str(i))
                    else:
                        _person_name(el, i, v)
                else:
                    ET.SubElement(el, "Value", number=str(i)).text = None if v is None else _text(v)
        elif "InlineBinary" in attr:
            ET.SubElement(el, "InlineBinary").text = str(attr["InlineBinary"])
        elif "BulkDataURI" in attr:
            ET.SubElement(el, "BulkData", uri=str(attr["BulkDataURI"]))


def json_to_xml(obj: Mapping[str, Any]) -> bytes:
    """One DICOM JSON object as a NativeDicomModel document (UTF-8, with the XML declaration)."""
    root = ET.Element("NativeDicomModel", {"xmlns": NAMESPACE, _XML_SPACE: "preserve"})
    _attributes(root, obj)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


# -- reading (STOW-RS of XML metadata) ----------------------------------------------------------------------------

MAX_DEPTH = 64  # nested Items: far beyond any IOD, short of Python's recursion limit


class DicomXMLError(ValueError):
    """A NativeDicomModel document that cannot be turned into a data set."""


def _local(tag: str) -> str:
    return tag.rpartition("}")[2]


def xml_to_json(data: bytes) -> dict[str, Any]:
    """A PS3.19 NativeDicomModel document as the DICOM JSON object of the same data set (PS3.18 F): STOW-RS of XML
    metadata then takes the JSON path. Private tags written gggg00ee are put back in the block their privateCreator
    holds in that data set. Raises DicomXMLError."""
    try:
        root = ET.fromstring(data)  # expat: no external entities, bounded entity expansion
    except (ET.ParseError, ValueError, LookupError) as e:  # also unknown or multi-byte declared encodings
        raise DicomXMLError(f"not well-formed XML: {e}") from None
    if _local(root.tag) != "NativeDicomModel":
        raise DicomXMLError(f"the root element is {_local(root.tag)!r}, not NativeDicomModel")
    return _object(root, 0)


def _object(parent: ET.Element, depth: int) -> dict[str, Any]:
    if depth > MAX_DEPTH:
        raise DicomXMLError(f"Items nested more than {MAX_DEPTH} deep")
    attrs = [a for a in parent if _local(a.tag) == "DicomAttribute"]
    tags = [_tag_of(a) for a in attrs]
    blocks: dict[tuple[int, str], int] = {}  # (group, Private Creator) -> block, from (gggg,0010-00FF)
    for a, tag in zip(attrs, tags, strict=True):
        # a Private Creator element (gggg,0010-00FF); a private data element written gggg00ee names its creator
        if tag >> 16 & 1 and 0x10 <= tag & 0xFFFF <= 0xFF and a.get("privateCreator") is None:
            v = a.find("{*}Value")
            if v is not None and v.text:
                blocks[(tag >> 16, v.text.strip())] = tag & 0xFF
    out: dict[str, Any] = {}
    for a, tag in zip(attrs, tags, strict=True):
        creator = a.get("privateCreator")
        if creator is not None and tag >> 16 & 1 and tag & 0xFF00 == 0:  # gggg00ee: element ee of the named block
            block = blocks.get((tag >> 16, creator.strip()))
            if block is None:
                raise DicomXMLError(f"({tag:08X}) names private creator {creator!r}, which the data set does not hold")
            tag = (tag & 0xFFFF0000) | block << 8 | tag & 0xFF
        key = f"{tag:08X}"
        if key in out:
            raise DicomXMLError(f"({key}) is given twice")
        out[key] = _attribute(a, tag, depth)
    return out


def _tag_of(a: ET.Element) -> int:
    raw = a.get("tag", "")
    if len(raw) != 8:
        raise DicomXMLError(f"DicomAttribute tag {raw!r} is not 8 hex digits")
    try:
        return int(raw, 16)
    except ValueError:
        raise DicomXMLError(f"DicomAttribute tag {raw!r} is not 8 hex digits") from None


def _attribute(a: ET.Element, tag: int, depth: int) -> dict[str, Any]:
    vr = a.get("vr", "")
    if len(vr) != 2 or not vr.isalpha() or not vr.isupper():
        raise DicomXMLError(f"({tag:08X}) has no valid vr")
    attr: dict[str, Any] = {"vr": vr}
    values: list[tuple[int, Any]] = []
    for c in a:
        kind = _local(c.tag)
        if kind in ("Value", "PersonName", "Item"):
            try:
                number = int(c.get("number", str(len(values) + 1)))
            except ValueError:
                raise DicomXMLError(f"({tag:08X}) {kind} number {c.get('number')!r} is not an integer") from None
            if kind == "Item":
                values.append((number, _object(c, depth + 1)))
            elif kind == "PersonName":
                values.append((number, _person_name_json(c)))
            else:
                values.append((number, c.text if c.text else None))
        elif kind == "BulkData":
            uri = c.get("uri")
            if not uri:
                raise DicomXMLError(f"({tag:08X}) BulkData without a uri (uuid references are not taken)")
            attr["BulkDataURI"] = uri
        elif kind == "InlineBinary":
            attr["InlineBinary"] = "".join((c.text or "").split())
    if values:
        attr["Value"] = [v for _, v in sorted(values, key=lambda nv: nv[0])]
    return attr


def _person_name_json(pn: ET.Element) -> dict[str, str] | None:
    out: dict[str, str] = {}
    for group in pn:
        name = _local(group.tag)
        if name not in _PN_GROUPS:
            continue
        parts = {_local(c.tag): c.text or "" for c in group}
        text = "^".join(parts.get(n, "") for n in _PN_COMPONENTS).rstrip("^")
        if text:
            out[name] = text
    return out or None
