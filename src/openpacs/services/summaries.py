"""One line per series that says what a department's object is: "12-lead ECG, 10 s, 500 Hz", "WSI 40×, 6 levels",
"US cine, 120 frames at 30 fps", "RT Plan: 2 beams, 30 fractions, 60 Gy", "Encapsulated PDF, 3 pages".

The study list and the console's study view show it beside the thumbnail (or instead of it, for objects without
pixels). It comes from the index (SOP classes, frame counts, matrix sizes) and the header of one instance per series,
read without its bulk data (WADO-RS and C-GET serve the objects themselves).
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

from pydicom import dcmread
from pydicom.dataset import Dataset

# SOP classes by kind (PS3.4 B.5)
ECG = {
    "1.2.840.10008.5.1.4.1.1.9.1.1": "12-lead ECG",
    "1.2.840.10008.5.1.4.1.1.9.1.2": "General ECG",
    "1.2.840.10008.5.1.4.1.1.9.1.3": "Ambulatory ECG",
    "1.2.840.10008.5.1.4.1.1.9.2.1": "Hemodynamic waveform",
    "1.2.840.10008.5.1.4.1.1.9.3.1": "Cardiac electrophysiology waveform",
    "1.2.840.10008.5.1.4.1.1.9.4.1": "Basic voice audio",
    "1.2.840.10008.5.1.4.1.1.9.5.1": "Arterial pulse waveform",
    "1.2.840.10008.5.1.4.1.1.9.6.1": "Respiratory waveform",
}
WSI = "1.2.840.10008.5.1.4.1.1.77.1.6"
PDF = "1.2.840.10008.5.1.4.1.1.104.1"
CDA = "1.2.840.10008.5.1.4.1.1.104.2"
RT = {
    "1.2.840.10008.5.1.4.1.1.481.1": "RT Image",
    "1.2.840.10008.5.1.4.1.1.481.2": "RT Dose",
    "1.2.840.10008.5.1.4.1.1.481.3": "RT Structure Set",
    "1.2.840.10008.5.1.4.1.1.481.5": "RT Plan",
    "1.2.840.10008.5.1.4.1.1.481.8": "RT Ion Plan",
}
SEG = "1.2.840.10008.5.1.4.1.1.66.4"
VIDEO = {
    "1.2.840.10008.5.1.4.1.1.77.1.1.1": "Endoscopy video",
    "1.2.840.10008.5.1.4.1.1.77.1.2.1": "Microscopy video",
    "1.2.840.10008.5.1.4.1.1.77.1.4.1": "Photographic video",
}
SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
US_MULTI = "1.2.840.10008.5.1.4.1.1.3.1"
XA = {"1.2.840.10008.5.1.4.1.1.12.1": "XA", "1.2.840.10008.5.1.4.1.1.12.1.1": "Enhanced XA",
      "1.2.840.10008.5.1.4.1.1.12.2": "XRF"}
NM = "1.2.840.10008.5.1.4.1.1.20"
PET = {"1.2.840.10008.5.1.4.1.1.128": "PET", "1.2.840.10008.5.1.4.1.1.130": "Enhanced PET"}

# The kinds the console draws an icon for (a short label, styled by kind).
ICONS = {"ecg": "ECG", "wsi": "WSI", "pdf": "PDF", "sr": "SR", "rt": "RT", "seg": "SEG", "video": "VID",
         "cine": "CINE", "nm": "NM", "pet": "PET", "image": "IMG", "other": "DOC"}


@dataclass
class SeriesFacts:
    """What the index knows of a series: its modality, and per instance (SOP class, frames, rows, columns)."""

    modality: str
    instances: Sequence[tuple[str, int, int | None, int | None]]


def _num(v: Any) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _fmt(x: float) -> str:
    return f"{x:.0f}" if abs(x - round(x)) < 0.05 else f"{x:.1f}"


def open_blob(store: Any, key: str) -> BinaryIO:
    """A seekable file of a stored blob without reading it whole where the backend allows (local path, S3 ranges)."""
    path = store.path(key) if hasattr(store, "path") else None
    if path:
        return open(path, "rb")
    if hasattr(store, "open"):
        return store.open(key)  # type: ignore[no-any-return]
    return io.BytesIO(store.read(key))


def read_header(store: Any, key: str) -> Dataset | None:
    """The data set without pixel data, its other bulk values left unread (deferred)."""
    try:
        with open_blob(store, key) as f:
            # a deferred value is read again from the file by its name: only a local file has one (an object
            # store's reader is closed when this returns), so elsewhere the header is read whole
            local = isinstance(f, io.BufferedReader)
            return dcmread(f, defer_size=256 if local else None, stop_before_pixels=True, force=True)
    except Exception:
        return None


def _ecg(ds: Dataset | None, name: str) -> str:
    if ds is None or "WaveformSequence" not in ds or not ds.WaveformSequence:
        return name
    group = ds.WaveformSequence[0]
    channels = int(getattr(group, "NumberOfWaveformChannels", 0) or 0)
    samples = int(getattr(group, "NumberOfWaveformSamples", 0) or 0)
    freq = _num(getattr(group, "SamplingFrequency", None)) or 0.0
    parts = [name if name != "General ECG" or not channels else f"{channels}-lead ECG"]
    if freq > 0 and samples:
        parts.append(f"{_fmt(samples / freq)} s")
        parts.append(f"{_fmt(freq)} Hz")
    if len(ds.WaveformSequence) > 1:
        parts.append(f"{len(ds.WaveformSequence)} groups")
    return ", ".join(parts)


def _wsi(facts: SeriesFacts, ds: Dataset | None) -> str:
    volumes = [i for i in facts.instances if i[0] == WSI]
    parts = ["WSI"]
    power = None
    if ds is not None:
        for path in getattr(ds, "OpticalPathSequence", []) or []:
            power = _num(getattr(path, "ObjectiveLensPower", None)) or power
    if power:
        parts[0] = f"WSI {_fmt(power)}×"
    tiles = sum(i[1] for i in volumes)
    parts.append(f"{len(volumes)} level{'s' if len(volumes) != 1 else ''}")
    if tiles:
        parts.append(f"{tiles:,} tiles")
    if ds is not None:
        rows, cols = getattr(ds, "TotalPixelMatrixRows", None), getattr(ds, "TotalPixelMatrixColumns", None)
        if rows and cols:
            parts.append(f"{cols:,}×{rows:,} px")
    return ", ".join(parts)


def _rt_plan(ds: Dataset | None, name: str) -> str:
    if ds is None:
        return name
    label = str(getattr(ds, "RTPlanLabel", "") or "").strip()
    beams = getattr(ds, "BeamSequence", None) or getattr(ds, "IonBeamSequence", None) or []
    treatment = [b for b in beams if str(getattr(b, "TreatmentDeliveryType", "TREATMENT")) == "TREATMENT"]
    parts = [f"{name}{' ' + label if label else ''}: {len(treatment)} beam{'s' if len(treatment) != 1 else ''}"]
    fractions = 0
    for fg in getattr(ds, "FractionGroupSequence", []) or []:
        fractions += int(getattr(fg, "NumberOfFractionsPlanned", 0) or 0)
    if fractions:
        parts.append(f"{fractions} fractions")
    dose = None
    for ref in getattr(ds, "DoseReferenceSequence", []) or []:
        dose = _num(getattr(ref, "TargetPrescriptionDose", None)) or dose
    if dose:
        parts.append(f"{_fmt(dose)} Gy prescribed")
    return ", ".join(parts)


def _rt_struct(ds: Dataset | None, name: str) -> str:
    if ds is None:
        return name
    rois = [str(getattr(r, "ROIName", "") or "") for r in getattr(ds, "StructureSetROISequence", []) or []]
    text = f"{name}: {len(rois)} ROI{'s' if len(rois) != 1 else ''}"
    shown = [r for r in rois if r][:4]
    if shown:
        text += " (" + ", ".join(shown) + (", …" if len(rois) > len(shown) else "") + ")"
    return text


def _frame_rate(ds: Dataset | None) -> float | None:
    if ds is None:
        return None
    for kw in ("RecommendedDisplayFrameRate", "CineRate"):
        v = _num(getattr(ds, kw, None))
        if v:
            return v
    ft = _num(getattr(ds, "FrameTime", None))
    return 1000.0 / ft if ft else None


def _pdf(ds: Dataset | None) -> str:
    if ds is None:
        return "Encapsulated PDF"
    title = str(getattr(ds, "DocumentTitle", "") or "").strip()
    return "Encapsulated PDF" + (f": {title}" if title else "")


def _sr(ds: Dataset | None) -> str:
    if ds is None:
        return "Structured report"
    title = ""
    concept = getattr(ds, "ConceptNameCodeSequence", None)
    if concept:
        title = str(getattr(concept[0], "CodeMeaning", "") or "")
    status = str(getattr(ds, "CompletionFlag", "") or "").lower()
    return "Structured report" + (f": {title}" if title else "") + (f" ({status})" if status else "")


def summarize(facts: SeriesFacts, header: Dataset | None) -> dict[str, str]:
    """``{"kind", "icon", "text"}`` for a series, from its index facts and the header of its first instance."""
    classes = [i[0] for i in facts.instances]
    first = classes[0] if classes else ""
    n = len(facts.instances)
    frames = max((i[1] for i in facts.instances), default=1)
    kind, text = "image", ""
    if first in ECG:
        kind, text = "ecg", _ecg(header, ECG[first])
    elif WSI in classes:
        kind, text = "wsi", _wsi(facts, header)
    elif first == PDF:
        kind, text = "pdf", _pdf(header)
    elif first == CDA:
        kind, text = "other", "Encapsulated CDA document"
    elif first.startswith(SR_PREFIX):
        kind, text = "sr", _sr(header)
    elif first in RT:
        kind = "rt"
        name = RT[first]
        if first.endswith((".481.5", ".481.8")):
            text = _rt_plan(header, name)
        elif first.endswith(".481.3"):
            text = _rt_struct(header, name)
        elif first.endswith(".481.2"):
            units = str(getattr(header, "DoseUnits", "") or "") if header is not None else ""
            dtype = str(getattr(header, "DoseSummationType", "") or "").lower() if header is not None else ""
            text = f"RT Dose{' (' + dtype + ')' if dtype else ''}, {frames} planes{', ' + units if units else ''}"
        else:
            text = name
    elif first == SEG:
        segs = len(getattr(header, "SegmentSequence", []) or []) if header is not None else 0
        kind, text = "seg", f"Segmentation{f', {segs} segment' + ('s' if segs != 1 else '') if segs else ''}"
    elif first in VIDEO:
        rate = _frame_rate(header)
        secs = f", {_fmt(frames / rate)} s" if rate and frames > 1 else ""
        kind, text = "video", f"{VIDEO[first]}{secs}"
    elif first == NM or facts.modality == "NM":
        kind = "nm"
        detail = ""
        if header is not None:
            wins = len(getattr(header, "EnergyWindowInformationSequence", []) or [])
            dets = int(getattr(header, "NumberOfDetectors", 0) or 0)
            detail = "".join([f", {wins} energy window{'s' if wins != 1 else ''}" if wins else "",
                              f", {dets} detector{'s' if dets != 1 else ''}" if dets else ""])
        text = f"NM, {n} image{'s' if n != 1 else ''}, {frames} frames{detail}" if frames > 1 else \
            f"NM, {n} image{'s' if n != 1 else ''}{detail}"
    elif first in PET or facts.modality == "PT":
        kind = "pet"
        units = str(getattr(header, "Units", "") or "") if header is not None else ""
        suv = ""
        if header is not None and getattr(header, "RadiopharmaceuticalInformationSequence", None) and \
                getattr(header, "PatientWeight", None):
            suv = ", SUV"
        text = f"PET, {n} slices{', ' + units if units else ''}{suv}"
    elif frames > 1 and (first in (US_MULTI, *XA) or facts.modality in ("US", "XA", "RF", "IVUS")):
        kind = "cine"
        rate = _frame_rate(header)
        label = XA.get(first, facts.modality or "US")
        text = f"{label} cine, {frames} frames" + (f" at {_fmt(rate)} fps" if rate else "")
        if n > 1:
            text = f"{n} × {text}"
    else:
        mod = facts.modality or "?"
        rows_cols = next(((r, c) for _, _, r, c in facts.instances if r and c), None)
        text = f"{mod}, {n} image{'s' if n != 1 else ''}" + (f", {rows_cols[1]}×{rows_cols[0]}" if rows_cols else "")
        if frames > 1:
            text += f", {frames} frames"
    return {"kind": kind, "icon": ICONS.get(kind, "DOC"), "text": re.sub(r"\s+", " ", text).strip()}


def needs_header(facts: SeriesFacts) -> bool:
    """Whether the summary reads the first instance's header (plain image series are summarized from the index)."""
    first = facts.instances[0][0] if facts.instances else ""
    frames = max((i[1] for i in facts.instances), default=1)
    return bool(first in ECG or first == WSI or first in (PDF, SEG, NM) or first.startswith(SR_PREFIX)
                or first in RT or first in VIDEO or first in PET or facts.modality in ("NM", "PT")
                or frames > 1)


def kinds_of(sop_classes: str | None, modalities: str | None) -> list[str]:
    """The department kinds of a study's objects (for the study list's icons), from the study row alone."""
    out: list[str] = []
    for uid in (sop_classes or "").split("\\"):
        kind = ("ecg" if uid in ECG else "wsi" if uid == WSI else "pdf" if uid == PDF else
                "sr" if uid.startswith(SR_PREFIX) else "rt" if uid in RT else "seg" if uid == SEG else
                "video" if uid in VIDEO else "nm" if uid == NM else "pet" if uid in PET else
                "cine" if uid == US_MULTI or uid in XA else "")
        if kind and kind not in out:
            out.append(kind)
    mods = set((modalities or "").split("\\"))
    if "NM" in mods and "nm" not in out:
        out.append("nm")
    if "PT" in mods and "pet" not in out:
        out.append("pet")
    return out


def rt_plan_details(ds: Dataset | None) -> dict[str, Any] | None:
    """An RT Plan's prescription, fractions and beams, for the study view's plan table (None for other objects)."""
    if ds is None or str(getattr(ds, "SOPClassUID", "")) not in ("1.2.840.10008.5.1.4.1.1.481.5",
                                                                 "1.2.840.10008.5.1.4.1.1.481.8"):
        return None
    meterset: dict[int, float | None] = {}
    fractions = 0
    for fg in getattr(ds, "FractionGroupSequence", []) or []:
        fractions += int(getattr(fg, "NumberOfFractionsPlanned", 0) or 0)
        for rb in getattr(fg, "ReferencedBeamSequence", []) or []:
            meterset[int(getattr(rb, "ReferencedBeamNumber", 0) or 0)] = _num(getattr(rb, "BeamMeterset", None))
    beams = []
    for b in getattr(ds, "BeamSequence", None) or getattr(ds, "IonBeamSequence", None) or []:
        cps = getattr(b, "ControlPointSequence", None) or getattr(b, "IonControlPointSequence", None) or []
        cp0 = cps[0] if cps else None
        number = int(getattr(b, "BeamNumber", 0) or 0)
        beams.append({
            "number": number, "name": str(getattr(b, "BeamName", "") or ""),
            "radiation": str(getattr(b, "RadiationType", "") or ""), "type": str(getattr(b, "BeamType", "") or ""),
            "delivery": str(getattr(b, "TreatmentDeliveryType", "") or ""),
            "energy": _num(getattr(cp0, "NominalBeamEnergy", None)) if cp0 is not None else None,
            "gantry_angle": _num(getattr(cp0, "GantryAngle", None)) if cp0 is not None else None,
            "control_points": len(cps), "meterset": meterset.get(number),
        })
    targets = []
    for ref in getattr(ds, "DoseReferenceSequence", []) or []:
        dose = _num(getattr(ref, "TargetPrescriptionDose", None))
        if dose is not None:
            targets.append({"description": str(getattr(ref, "DoseReferenceDescription", "") or ""), "dose_gy": dose})
    return {"label": str(getattr(ds, "RTPlanLabel", "") or ""), "name": str(getattr(ds, "RTPlanName", "") or ""),
            "intent": str(getattr(ds, "PlanIntent", "") or ""), "geometry": str(getattr(ds, "RTPlanGeometry", "") or ""),
            "fractions": fractions, "prescriptions": targets, "beams": beams}
