"""A readable document of a Structured Report's content tree (PS3.3 C.17.3): HTML (escaped) or plain text.

The tree is walked from the document's Content Sequence; each content item shows its concept name and its value by
value type (CONTAINER, TEXT, CODE, NUM with units, PNAME, DATE, TIME, DATETIME, UIDREF, IMAGE / COMPOSITE / WAVEFORM
references, SCOORD / SCOORD3D / TCOORD, by-reference items). Depth and item count are bounded, so a hostile report
makes a cut document, not a runaway.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import UID

MAX_DEPTH = 50
MAX_ITEMS = 20_000


class SRError(ValueError):
    pass


@dataclass
class Item:
    relationship: str
    value_type: str
    name: str
    value: str = ""
    children: list[Item] = field(default_factory=list)


def _s(value: Any) -> str:
    return "" if value is None else str(value).strip()


def code_text(seq: Any) -> str:
    """'meaning' of the first item of a code sequence ('(value, scheme)' when it has no meaning)."""
    if not seq:
        return ""
    try:
        code = seq[0]
    except (TypeError, IndexError):
        return ""
    meaning = _s(code.get("CodeMeaning"))
    if meaning:
        return meaning
    value = _s(code.get("CodeValue")) or _s(code.get("LongCodeValue")) or _s(code.get("URNCodeValue"))
    scheme = _s(code.get("CodingSchemeDesignator"))
    return f"({value}, {scheme})" if value else ""


def _sop_name(uid: str) -> str:
    try:
        name = UID(uid).name
    except Exception:
        return uid
    return name if name and name != uid else uid


def _num(item: Dataset) -> str:
    mv = item.get("MeasuredValueSequence")
    if not mv:
        qualifier = code_text(item.get("NumericValueQualifierCodeSequence"))
        return qualifier or "(no value)"
    m = mv[0]
    value = _s(m.get("NumericValue"))
    units = m.get("MeasurementUnitsCodeSequence")
    unit = ""
    if units:
        code = _s(units[0].get("CodeValue"))
        meaning = _s(units[0].get("CodeMeaning"))
        unit = code if code and code != "1" and len(code) <= len(meaning or code) else meaning
        if code == "1" or unit.lower() in ("no units", "unity"):
            unit = ""
    return f"{value} {unit}".strip()


def _reference(item: Dataset) -> str:
    refs = item.get("ReferencedSOPSequence")
    if not refs:
        return "(no reference)"
    ref = refs[0]
    text = f"{_sop_name(_s(ref.get('ReferencedSOPClassUID')))} {_s(ref.get('ReferencedSOPInstanceUID'))}".strip()
    frames = ref.get("ReferencedFrameNumber")
    if frames is not None and _s(frames):
        numbers = frames if isinstance(frames, list | tuple) or hasattr(frames, "__iter__") and not isinstance(
            frames, str) else [frames]
        text += " frame " + ", ".join(_s(f) for f in numbers)
    return text


def _coords(item: Dataset) -> str:
    kind = _s(item.get("GraphicType"))
    data = item.get("GraphicData")
    if data is None:
        return kind
    points = list(data) if hasattr(data, "__iter__") else [data]
    shown = ", ".join(f"{float(v):g}" for v in points[:24]) + (" ..." if len(points) > 24 else "")
    return f"{kind} [{shown}]".strip()


def item_value(item: Dataset) -> str:
    vt = _s(item.get("ValueType")).upper()
    if vt == "TEXT":
        return _s(item.get("TextValue"))
    if vt == "CODE":
        return code_text(item.get("ConceptCodeSequence"))
    if vt == "NUM":
        return _num(item)
    if vt == "PNAME":
        return _s(item.get("PersonName")).replace("^", " ").strip()
    if vt == "DATE":
        return _date(_s(item.get("Date")))
    if vt == "TIME":
        return _s(item.get("Time"))
    if vt == "DATETIME":
        return _s(item.get("DateTime"))
    if vt == "UIDREF":
        return _s(item.get("UID"))
    if vt in ("IMAGE", "COMPOSITE", "WAVEFORM"):
        return _reference(item)
    if vt in ("SCOORD", "SCOORD3D"):
        return _coords(item)
    if vt == "TCOORD":
        return _s(item.get("TemporalRangeType"))
    if vt == "CONTAINER":
        return ""
    return _s(item.get("TextValue"))


def _date(value: str) -> str:
    if len(value) == 8 and value.isdigit():
        return f"{value[:4]}-{value[4:6]}-{value[6:]}"
    return value


def walk(ds: Dataset) -> Item:
    """The content tree of ``ds`` (the document root is a CONTAINER named by its Concept Name)."""
    if "ContentSequence" not in ds and "ValueType" not in ds:
        raise SRError("not a structured report (no Content Sequence)")
    count = [0]

    def node(item: Dataset, depth: int) -> Item:
        count[0] += 1
        referenced = item.get("ReferencedContentItemIdentifier")
        out = Item(
            relationship=_s(item.get("RelationshipType")),
            value_type=_s(item.get("ValueType")).upper() or ("REFERENCE" if referenced is not None else ""),
            name=code_text(item.get("ConceptNameCodeSequence")),
            value=item_value(item),
        )
        if referenced is not None and not out.value:
            ids = referenced if hasattr(referenced, "__iter__") and not isinstance(referenced, str) else [referenced]
            out.value = "see item " + ".".join(_s(v) for v in ids)
        children = item.get("ContentSequence") or []
        if depth >= MAX_DEPTH:
            if children:
                out.children.append(Item("", "", "", "(deeper content omitted)"))
            return out
        for child in children:
            if count[0] >= MAX_ITEMS:
                out.children.append(Item("", "", "", "(further content omitted)"))
                break
            out.children.append(node(child, depth + 1))
        return out

    root = node(ds, 0)
    root.relationship = ""
    return root


def header(ds: Dataset) -> list[tuple[str, str]]:
    rows = [
        ("Patient", _s(ds.get("PatientName")).replace("^", " ").strip()),
        ("Patient ID", _s(ds.get("PatientID"))),
        ("Study date", _date(_s(ds.get("StudyDate")))),
        ("Accession", _s(ds.get("AccessionNumber"))),
        ("Content date", f"{_date(_s(ds.get('ContentDate')))} {_s(ds.get('ContentTime'))}".strip()),
        ("Completion", _s(ds.get("CompletionFlag"))),
        ("Verification", _s(ds.get("VerificationFlag"))),
        ("Document", _sop_name(_s(ds.get("SOPClassUID")))),
    ]
    return [(k, v) for k, v in rows if v]


def title(root: Item) -> str:
    return root.name or "Structured report"


def to_text(ds: Dataset) -> str:
    root = walk(ds)
    lines = [title(root), "=" * len(title(root))]
    lines += [f"{k}: {v}" for k, v in header(ds)]
    lines.append("")

    def emit(item: Item, depth: int) -> None:
        label = item.name or item.value_type.title()
        text = f"{label}: {item.value}" if item.value and label else (item.value or label)
        indent = "  " * depth + ("- " if depth else "")
        lines.append(indent + text.replace("\n", "\n" + " " * len(indent)))
        for child in item.children:
            emit(child, depth + 1)

    for child in root.children:
        emit(child, 0)
    return "\n".join(lines) + "\n"


_CSS = (
    "body{font-family:sans-serif;margin:24px;color:#111;background:#fff;max-width:60em}"
    "h1{font-size:1.5em;border-bottom:2px solid #333;padding-bottom:4px}"
    "table.hdr td{padding:1px 12px 1px 0}table.hdr td:first-child{color:#555}"
    "ul{list-style:none;padding-left:1.4em;border-left:1px solid #ccc}li{margin:3px 0}"
    ".n{font-weight:bold}.vt{color:#888;font-size:.75em;margin-left:.5em}.c>.n{font-size:1.1em}"
)


def to_html(ds: Dataset, nonce: str | None = None) -> str:
    """The report as a standalone page; ``nonce``: the style element's CSP nonce (its one inline resource)."""
    root = walk(ds)
    e = html.escape
    style_attr = f" nonce='{e(nonce)}'" if nonce else ""
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{e(title(root))}</title><style{style_attr}>{_CSS}</style></head><body>",
        f"<h1>{e(title(root))}</h1><table class='hdr'>",
    ]
    parts += [f"<tr><td>{e(k)}</td><td>{e(v)}</td></tr>" for k, v in header(ds)]
    parts.append("</table>")

    def emit(item: Item) -> None:
        cls = " class='c'" if item.value_type == "CONTAINER" else ""
        parts.append(f"<li{cls}>")
        label = item.name or (item.value_type.title() if item.value_type not in ("CONTAINER", "REFERENCE") else "")
        if label:
            parts.append(f"<span class='n'>{e(label)}</span>")
            if item.value:
                parts.append(": ")
        if item.value:
            parts.append(f"<span class='v'>{e(item.value)}</span>")
        if item.value_type and item.value_type != "CONTAINER":
            parts.append(f"<span class='vt'>{e(item.value_type)}</span>")
        if item.children:
            parts.append("<ul>")
            for child in item.children:
                emit(child)
            parts.append("</ul>")
        parts.append("</li>")

    parts.append("<ul>")
    for child in root.children:
        emit(child)
    parts.append("</ul></body></html>")
    return "".join(parts)
