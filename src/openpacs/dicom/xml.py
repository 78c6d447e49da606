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
