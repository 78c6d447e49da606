"""DICOM waveforms (PS3.3 C.10.9 Waveform module): decode the multiplex groups of a 12-lead / general / ambulatory
ECG, hemodynamic and other waveform objects, and draw them on standard ECG paper as PNG or SVG.

Decoding: each item of WaveformSequence is a multiplex group of ``NumberOfWaveformChannels`` interleaved channels of
``NumberOfWaveformSamples`` samples (WaveformBitsAllocated 8/16/32/64, WaveformSampleInterpretation SB/UB/SS/US/SV/UV);
a sample in channel units is ``raw * ChannelSensitivity * ChannelSensitivityCorrectionFactor + ChannelBaseline``
(C.10.9.1.4.3). Units come from ChannelSensitivityUnitsSequence (UCUM: uV, mV, V, mmHg, ...), lead labels from
ChannelSourceSequence ("Lead I (Einthoven)", ...) or ChannelLabel.

Paper (the layout tests can compute): 25 mm/s, 10 mm/mV, a 1 mm grid with a 5 mm major grid, ``px_per_mm`` pixels
per millimetre (4 by default). From the left: a label column (``LABEL_MM``), a calibration column (``CAL_MM``, the
1 mV x 200 ms pulse), then the traces, ``duration * 25`` mm wide, then ``RIGHT_MM``. From the top: the header
(``HEADER_MM``: title, duration, sampling rate, measurements of WaveformAnnotationSequence, statements), one row of
``ROW_MM`` per channel with its baseline in the row's middle, then ``BOTTOM_MM``. Traces are drawn in ``TRACE_RGB``
(black), nothing else in the trace area is that dark; non-voltage channels (pressure, ...) are scaled to fit 80 % of
their row, the scale is written under the label.
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass, field
from typing import Any
from xml.sax.saxutils import escape

import numpy as np
from pydicom.dataset import Dataset

WAVEFORM_PREFIX = "1.2.840.10008.5.1.4.1.1.9."  # PS3.4 B.5: every waveform storage SOP class
NAMES = {
    "1.2.840.10008.5.1.4.1.1.9.1.1": "12-lead ECG",
    "1.2.840.10008.5.1.4.1.1.9.1.2": "General ECG",
    "1.2.840.10008.5.1.4.1.1.9.1.3": "Ambulatory ECG",
    "1.2.840.10008.5.1.4.1.1.9.1.4": "General 32-bit ECG",
    "1.2.840.10008.5.1.4.1.1.9.2.1": "Hemodynamic waveform",
    "1.2.840.10008.5.1.4.1.1.9.3.1": "Cardiac electrophysiology waveform",
    "1.2.840.10008.5.1.4.1.1.9.4.1": "Basic voice audio",
    "1.2.840.10008.5.1.4.1.1.9.4.2": "General audio waveform",
    "1.2.840.10008.5.1.4.1.1.9.5.1": "Arterial pulse waveform",
    "1.2.840.10008.5.1.4.1.1.9.6.1": "Respiratory waveform",
    "1.2.840.10008.5.1.4.1.1.9.6.2": "Multichannel respiratory waveform",
    "1.2.840.10008.5.1.4.1.1.9.7.1": "Routine scalp EEG",
    "1.2.840.10008.5.1.4.1.1.9.7.2": "EMG",
    "1.2.840.10008.5.1.4.1.1.9.7.3": "EOG",
    "1.2.840.10008.5.1.4.1.1.9.7.4": "Sleep EEG",
    "1.2.840.10008.5.1.4.1.1.9.8.1": "Body position waveform",
}

MM_PER_S = 25.0
MM_PER_MV = 10.0
DEFAULT_PX_PER_MM = 4.0
MIN_PX_PER_MM, MAX_PX_PER_MM = 1.0, 12.0
LABEL_MM, CAL_MM, RIGHT_MM = 14.0, 8.0, 4.0
HEADER_MM, ROW_MM, BOTTOM_MM = 24.0, 25.0, 4.0
MIN_WIDTH_MM = 200.0
MAX_CHANNELS = 64  # rows drawn at most (a 64-channel EEG is already very tall)
MAX_SECONDS = 60.0  # seconds drawn at most (an ambulatory record of hours is cut)
MAX_PIXELS = 40_000_000  # a drawing larger than this is refused (WaveformTooLarge): ask for fewer px_per_mm

PAPER_RGB = (255, 255, 255)
MINOR_RGB = (252, 213, 213)
MAJOR_RGB = (236, 150, 150)
TRACE_RGB = (0, 0, 0)
TEXT_RGB = (70, 30, 30)

_DTYPES = {(8, "SB"): "i1", (8, "UB"): "u1", (8, "MB"): "u1", (8, "AB"): "u1", (16, "SS"): "<i2",
           (16, "US"): "<u2", (32, "SL"): "<i4", (32, "UL"): "<u4", (64, "SV"): "<i8", (64, "UV"): "<u8"}
_VOLT = {"uV": 1e-3, "mV": 1.0, "V": 1e3, "nV": 1e-6}


class WaveformError(ValueError):
    """The object has no decodable waveform (or not the group asked for)."""


class WaveformTooLarge(WaveformError):
    """The drawing at the scale asked for would exceed MAX_PIXELS."""


def is_waveform_class(sop_class_uid: str | None) -> bool:
    return bool(sop_class_uid) and str(sop_class_uid).startswith(WAVEFORM_PREFIX)


@dataclass
class Channel:
    label: str  # "Lead I (Einthoven)"
    short: str  # "I"
    units: str  # UCUM code: "uV"
    values: np.ndarray  # float64, in ``units``
    source_code: str = ""

    @property
    def mv_per_unit(self) -> float | None:
        """Millivolts per unit for a voltage channel, else None."""
        return _VOLT.get(self.units)


@dataclass
class Group:
    label: str
    frequency: float
    samples: int
    originality: str
    channels: list[Channel] = field(default_factory=list)

    @property
    def duration(self) -> float:
        return self.samples / self.frequency if self.frequency > 0 else 0.0


def _num(v: Any, default: float) -> float:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return default
    return x if math.isfinite(x) else default


def _code(seq: Any) -> tuple[str, str]:
    """(CodeValue, CodeMeaning) of the first item of a code sequence."""
    try:
        item = seq[0]
    except (TypeError, IndexError):
        return "", ""
    return str(getattr(item, "CodeValue", "") or ""), str(getattr(item, "CodeMeaning", "") or "")


def short_label(label: str) -> str:
    """"Lead I (Einthoven)" -> "I", "Lead aVR" -> "aVR"; other labels are kept (cut to 10 characters)."""
    s = re.sub(r"\s*\(.*?\)\s*", "", label).strip()
    s = re.sub(r"^lead\s+", "", s, flags=re.I)
    return (s or label)[:10]


def _law_decode(raw: np.ndarray, law: str) -> np.ndarray:
    """G.711 mu-law (MB) / A-law (AB) 8-bit samples to 16-bit linear values."""
    u = (~raw.astype(np.uint8)).astype(np.int32) if law == "MB" else (raw.astype(np.int32) ^ 0x55)
    sign = u & 0x80
    exponent = (u >> 4) & 0x07
    mantissa = u & 0x0F
    if law == "MB":
        mag = (((mantissa << 3) + 0x84) << exponent) - 0x84
    else:
        mag = np.where(exponent == 0, (mantissa << 4) + 8, ((mantissa << 4) + 0x108) << (exponent - 1))
    return np.where(sign != 0, -mag, mag) if law == "MB" else np.where(sign != 0, mag, -mag)


def decode_group(item: Dataset, index: int = 0, max_seconds: float | None = None) -> Group:
    """One multiplex group: every channel's samples in its units (sensitivity, correction factor and baseline);
    ``max_seconds``: only the samples of that many first seconds are converted (``samples`` stays the group's)."""
    try:
        n_ch = int(item.NumberOfWaveformChannels)
        n_s = int(item.NumberOfWaveformSamples)
        bits = int(item.WaveformBitsAllocated)
        interp = str(item.WaveformSampleInterpretation)
        data = bytes(item.WaveformData)
    except (AttributeError, TypeError, ValueError) as e:
        raise WaveformError(f"multiplex group {index + 1}: incomplete waveform attributes ({e})") from None
    dtype = _DTYPES.get((bits, interp))
    if dtype is None:
        raise WaveformError(f"multiplex group {index + 1}: unsupported sample format {bits} bits {interp}")
    if n_ch <= 0 or n_s <= 0:
        raise WaveformError(f"multiplex group {index + 1}: {n_ch} channels x {n_s} samples")
    need = n_ch * n_s * (bits // 8)
    if len(data) < need:
        raise WaveformError(f"multiplex group {index + 1}: WaveformData has {len(data)} bytes, {need} expected")
    raw = np.frombuffer(data[:need], dtype=dtype).reshape(n_s, n_ch)
    freq = _num(getattr(item, "SamplingFrequency", None), 0.0)
    if max_seconds is not None and freq > 0:
        raw = raw[:max(1, int(math.ceil(max_seconds * freq)))]
    if interp in ("MB", "AB"):
        raw = _law_decode(raw, interp)
    defs = list(getattr(item, "ChannelDefinitionSequence", None) or [])
    channels = []
    for c in range(n_ch):
        d = defs[c] if c < len(defs) else Dataset()
        code, meaning = _code(getattr(d, "ChannelSourceSequence", None))
        label = meaning or str(getattr(d, "ChannelLabel", "") or "") or f"Channel {c + 1}"
        units, _ = _code(getattr(d, "ChannelSensitivityUnitsSequence", None))
        sens = _num(getattr(d, "ChannelSensitivity", None), 1.0)
        corr = _num(getattr(d, "ChannelSensitivityCorrectionFactor", None), 1.0)
        base = _num(getattr(d, "ChannelBaseline", None), 0.0)
        values = raw[:, c].astype(np.float64) * (sens * corr) + base
        channels.append(Channel(label, short_label(label), units, values, code))
    return Group(str(getattr(item, "MultiplexGroupLabel", "") or f"Group {index + 1}"), freq, n_s,
                 str(getattr(item, "WaveformOriginality", "") or ""), channels)


def decode(ds: Dataset, max_seconds: float | None = None) -> list[Group]:
    groups = list(getattr(ds, "WaveformSequence", None) or [])
    if not groups:
        raise WaveformError("no WaveformSequence")
    return [decode_group(g, i, max_seconds) for i, g in enumerate(groups)]


# -- annotations and the summary ---------------------------------------------------------------------------------

_SHORT_NAMES = {"RR Interval": "RR", "PP Interval": "PP", "PR Interval": "PR", "QRS Duration": "QRS",
                "QT Interval": "QT", "QTc Interval": "QTc", "P Axis": "P axis", "QRS Axis": "QRS axis",
                "T Axis": "T axis", "Heart Rate": "HR", "Ventricular Heart Rate": "HR"}
_UNIT_TEXT = {"ms": "ms", "deg": "°", "/min": "bpm", "{beats}/min": "bpm", "bpm": "bpm", "uV": "µV", "mV": "mV"}


def measurements(ds: Dataset) -> list[dict[str, Any]]:
    """The numeric annotations (WaveformAnnotationSequence items with a NumericValue and a concept name), in order;
    a heart rate derived from the RR interval is added when none is carried."""
    out: list[dict[str, Any]] = []
    for a in getattr(ds, "WaveformAnnotationSequence", None) or []:
        if "NumericValue" not in a:
            continue
        _, name = _code(getattr(a, "ConceptNameCodeSequence", None))
        unit, _ = _code(getattr(a, "MeasurementUnitsCodeSequence", None))
        value = _num(a.NumericValue, math.nan)
        if not name or math.isnan(value):
            continue
        out.append({"name": name, "short": _SHORT_NAMES.get(name, name), "value": value, "unit": unit})
    if not any(m["short"] == "HR" for m in out):
        rr = next((m for m in out if m["short"] == "RR" and m["unit"] == "ms" and m["value"] > 0), None)
        if rr is not None:
            out.append({"name": "Heart Rate (from RR)", "short": "HR", "value": round(60000.0 / rr["value"]),
                        "unit": "/min", "derived": True})
    return out


def statements(ds: Dataset) -> list[str]:
    """The text annotations (UnformattedTextValue), e.g. an interpretation "SINUS RHYTHM"."""
    return [str(a.UnformattedTextValue) for a in getattr(ds, "WaveformAnnotationSequence", None) or []
            if "UnformattedTextValue" in a and str(a.UnformattedTextValue).strip()]


def _fmt(x: float) -> str:
    return f"{x:.0f}" if abs(x - round(x)) < 0.05 else f"{x:.1f}"


def measurement_text(m: dict[str, Any]) -> str:
    unit = _UNIT_TEXT.get(m["unit"], m["unit"])
    return f"{m['short']} {_fmt(m['value'])}{'' if unit == '°' else ' '}{unit}".strip()


def waveform_summary(ds: Dataset) -> dict[str, Any]:
    """What the console shows beside an ECG: ``text`` ("12-lead ECG, 10 s, 1000 Hz"), the groups (label, channels,
    samples, frequency, duration, lead labels), the measurements and the statements. Reads no sample data."""
    uid = str(getattr(ds, "SOPClassUID", "") or "")
    name = NAMES.get(uid, "Waveform")
    groups: list[dict[str, Any]] = []
    for i, g in enumerate(getattr(ds, "WaveformSequence", None) or []):
        freq = _num(getattr(g, "SamplingFrequency", None), 0.0)
        samples = int(_num(getattr(g, "NumberOfWaveformSamples", None), 0))
        defs = list(getattr(g, "ChannelDefinitionSequence", None) or [])
        leads = [_code(getattr(d, "ChannelSourceSequence", None))[1] or str(getattr(d, "ChannelLabel", "") or "")
                 for d in defs]
        groups.append({"index": i + 1, "label": str(getattr(g, "MultiplexGroupLabel", "") or ""),
                       "channels": int(_num(getattr(g, "NumberOfWaveformChannels", None), len(defs))),
                       "samples": samples, "frequency": freq,
                       "duration": samples / freq if freq > 0 else 0.0, "leads": leads})
    parts = [name]
    if groups:
        g0 = groups[0]
        if name == "General ECG" and g0["channels"]:
            parts[0] = f"{g0['channels']}-lead ECG"
        if g0["duration"]:
            parts += [f"{_fmt(g0['duration'])} s", f"{_fmt(g0['frequency'])} Hz"]
    ms = measurements(ds)
    return {"kind": name, "text": ", ".join(parts), "groups": groups, "measurements": ms,
            "measurement_text": ", ".join(measurement_text(m) for m in ms), "statements": statements(ds)}


# -- layout and drawing ------------------------------------------------------------------------------------------


@dataclass
class Layout:
    """Where everything is, in pixels; ``baseline(i)`` is the y of channel i's zero line."""

    px_per_mm: float
    channels: int
    duration: float

    @property
    def trace_x0(self) -> float:
        return (LABEL_MM + CAL_MM) * self.px_per_mm

    @property
    def trace_width(self) -> float:
        return self.duration * MM_PER_S * self.px_per_mm

    @property
    def width(self) -> int:  # at least MIN_WIDTH_MM: room for the header of a short (median beat) group
        return int(math.ceil(max(self.trace_x0 + self.trace_width + RIGHT_MM * self.px_per_mm,
                                 MIN_WIDTH_MM * self.px_per_mm)))

    @property
    def height(self) -> int:
        return int(math.ceil((HEADER_MM + ROW_MM * self.channels + BOTTOM_MM) * self.px_per_mm))

    def baseline(self, i: int) -> float:
        return (HEADER_MM + ROW_MM * (i + 0.5)) * self.px_per_mm

    def x(self, seconds: np.ndarray | float) -> Any:
        return self.trace_x0 + np.asarray(seconds) * MM_PER_S * self.px_per_mm


def layout_for(group: Group, px_per_mm: float = DEFAULT_PX_PER_MM) -> Layout:
    return Layout(px_per_mm, min(len(group.channels), MAX_CHANNELS), min(group.duration, MAX_SECONDS))


def px_per_mm_for_width(group: Group, width: int) -> float:
    """The scale at which the drawing of ``group`` is ``width`` pixels wide (clamped to the allowed range)."""
    mm = max(LABEL_MM + CAL_MM + min(group.duration, MAX_SECONDS) * MM_PER_S + RIGHT_MM, MIN_WIDTH_MM)
    return max(MIN_PX_PER_MM, min(MAX_PX_PER_MM, width / mm))


def _gain(ch: Channel) -> tuple[float, str]:
    """mm per channel unit, and how the scale reads."""
    mv = ch.mv_per_unit
    if mv is not None:
        return mv * MM_PER_MV, f"{_fmt(MM_PER_MV)} mm/mV"
    finite = ch.values[np.isfinite(ch.values)]
    ptp = float(finite.max() - finite.min()) if finite.size else 0.0
    if ptp <= 0:
        return 1.0, f"1 mm/{ch.units or 'unit'}"
    gain = 0.8 * ROW_MM / ptp
    return gain, f"{ptp / (0.8 * ROW_MM) * 10:.3g} {ch.units or 'units'}/cm"


def _trace_points(lay: Layout, group: Group, i: int) -> tuple[np.ndarray, np.ndarray]:
    ch = group.channels[i]
    n = min(len(ch.values), int(round(MAX_SECONDS * group.frequency)) if group.frequency > 0 else len(ch.values))
    v = ch.values[:n]
    gain, _ = _gain(ch)
    if ch.mv_per_unit is None:  # centred in its row
        finite = v[np.isfinite(v)]
        v = v - ((finite.max() + finite.min()) / 2 if finite.size else 0.0)
    xs = lay.x(np.arange(n) / group.frequency)
    ys = lay.baseline(i) - np.nan_to_num(v) * gain * lay.px_per_mm
    top, bottom = HEADER_MM * lay.px_per_mm, lay.height - 1 - BOTTOM_MM * lay.px_per_mm
    return xs, np.clip(ys, top, bottom)


def _decimate(xs: np.ndarray, ys: np.ndarray) -> list[tuple[float, float]]:
    """At most four points per pixel column (first, min, max, last in time order): peaks survive, SVGs stay small."""
    cols = np.floor(xs).astype(np.int64)
    out: list[tuple[float, float]] = []
    start = 0
    n = len(xs)
    bounds = np.flatnonzero(np.diff(cols)) + 1
    for end in [*bounds.tolist(), n]:
        seg = ys[start:end]
        if len(seg) <= 4:
            out.extend(zip(xs[start:end].tolist(), seg.tolist(), strict=True))
        else:
            lo, hi = int(np.argmin(seg)), int(np.argmax(seg))
            idx = sorted({0, lo, hi, len(seg) - 1})
            out.extend((float(xs[start + k]), float(seg[k])) for k in idx)
        start = end
    return out


def _header_lines(ds: Dataset, group: Group, index: int, n_groups: int) -> list[str]:
    s = waveform_summary(ds)
    g = f"group {index + 1}/{n_groups}: {group.label}" if n_groups > 1 else group.label
    lines = [f"{s['kind']} - {g} - {_fmt(group.duration)} s, {_fmt(group.frequency)} Hz, "
             f"{len(group.channels)} channels"
             + (f" (first {len(group.channels[:MAX_CHANNELS])}, {_fmt(MAX_SECONDS)} s drawn)"
                if len(group.channels) > MAX_CHANNELS or group.duration > MAX_SECONDS else ""),
             f"{_fmt(MM_PER_S)} mm/s, {_fmt(MM_PER_MV)} mm/mV"]
    if s["measurement_text"]:
        lines.append(s["measurement_text"])
    if s["statements"]:
        lines.append("; ".join(s["statements"]))
    return lines


def render_png(ds: Dataset, group_index: int = 0, px_per_mm: float = DEFAULT_PX_PER_MM) -> bytes:
    from PIL import Image, ImageDraw, ImageFont

    groups = decode(ds, MAX_SECONDS)
    group = _pick(groups, group_index)
    lay = layout_for(group, px_per_mm)
    _check_size(lay)
    ppm = lay.px_per_mm
    img = Image.new("RGB", (lay.width, lay.height), PAPER_RGB)
    d = ImageDraw.Draw(img)
    top, bottom = HEADER_MM * ppm, lay.height - 1
    n_x, n_y = int((lay.width - 1) / ppm), int((bottom - top) / ppm)
    for k in range(n_x + 1):  # minor lines first, major lines over them
        if k % 5:
            d.line([(k * ppm, top), (k * ppm, bottom)], fill=MINOR_RGB)
    for k in range(n_y + 1):
        if k % 5:
            d.line([(0, top + k * ppm), (lay.width - 1, top + k * ppm)], fill=MINOR_RGB)
    for k in range(0, n_x + 1, 5):
        d.line([(k * ppm, top), (k * ppm, bottom)], fill=MAJOR_RGB)
    for k in range(0, n_y + 1, 5):
        d.line([(0, top + k * ppm), (lay.width - 1, top + k * ppm)], fill=MAJOR_RGB)
    font = ImageFont.load_default(size=max(8, round(3 * ppm)))
    small = ImageFont.load_default(size=max(7, round(2.2 * ppm)))
    for k, line in enumerate(_header_lines(ds, group, group_index, len(groups))):
        d.text((2 * ppm, (1.5 + 5 * k) * ppm), line, fill=TEXT_RGB, font=font if k == 0 else small)
    width = max(1, round(ppm / 2))
    for i in range(lay.channels):
        ch = group.channels[i]
        y0 = lay.baseline(i)
        d.text((1.5 * ppm, y0 - 4.5 * ppm), ch.short, fill=TEXT_RGB, font=font)
        gain_text = _gain(ch)[1]
        if ch.mv_per_unit is None:
            d.text((1.5 * ppm, y0 + 1.5 * ppm), gain_text, fill=TEXT_RGB, font=small)
        else:  # calibration pulse: 1 mV (10 mm) for 200 ms (5 mm)
            cx = LABEL_MM * ppm + 1.0 * ppm
            up = y0 - MM_PER_MV * ppm
            d.line([(cx, y0), (cx + ppm, y0), (cx + ppm, up), (cx + 6 * ppm, up), (cx + 6 * ppm, y0),
                    (cx + 7 * ppm, y0)], fill=TRACE_RGB, width=width)
        xs, ys = _trace_points(lay, group, i)
        d.line(list(zip(xs.tolist(), ys.tolist(), strict=True)), fill=TRACE_RGB, width=width, joint="curve")
    out = io.BytesIO()
    img.save(out, "PNG", optimize=False)
    return out.getvalue()


def _rgb(c: tuple[int, int, int]) -> str:
    return "#" + "".join(f"{v:02x}" for v in c)


def render_svg(ds: Dataset, group_index: int = 0, px_per_mm: float = DEFAULT_PX_PER_MM) -> bytes:
    groups = decode(ds, MAX_SECONDS)
    group = _pick(groups, group_index)
    lay = layout_for(group, px_per_mm)
    _check_size(lay)
    ppm = lay.px_per_mm
    w, h = lay.width, lay.height
    top, bottom = HEADER_MM * ppm, h - 1
    minor: list[str] = []
    major: list[str] = []
    for k in range(int((w - 1) / ppm) + 1):
        (major if k % 5 == 0 else minor).append(f"M{k * ppm:.2f} {top:.2f}V{bottom:.2f}")
    for k in range(int((bottom - top) / ppm) + 1):
        (major if k % 5 == 0 else minor).append(f"M0 {top + k * ppm:.2f}H{w - 1}")
    fs, fs_small = max(8, round(3 * ppm)), max(7, round(2.2 * ppm))
    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
         f'data-px-per-mm="{ppm:g}" font-family="sans-serif">',
         f"<title>{escape(waveform_summary(ds)['text'])}</title>",
         f'<rect width="{w}" height="{h}" fill="{_rgb(PAPER_RGB)}"/>',
         f'<path class="grid-minor" d="{"".join(minor)}" stroke="{_rgb(MINOR_RGB)}" stroke-width="1" fill="none"/>',
         f'<path class="grid-major" d="{"".join(major)}" stroke="{_rgb(MAJOR_RGB)}" stroke-width="1" fill="none"/>']
    for k, line in enumerate(_header_lines(ds, group, group_index, len(groups))):
        o.append(f'<text class="header" x="{2 * ppm:.2f}" y="{(1.5 + 5 * k) * ppm + (fs if k == 0 else fs_small):.2f}"'
                 f' font-size="{fs if k == 0 else fs_small}" fill="{_rgb(TEXT_RGB)}">{escape(line)}</text>')
    sw = max(1, round(ppm / 2))
    for i in range(lay.channels):
        ch = group.channels[i]
        y0 = lay.baseline(i)
        o.append(f'<g class="lead" data-lead="{escape(ch.label, {chr(34): "&quot;"})}" data-baseline="{y0:.2f}">')
        o.append(f'<text class="label" x="{1.5 * ppm:.2f}" y="{y0 - 1.5 * ppm:.2f}" font-size="{fs}" '
                 f'fill="{_rgb(TEXT_RGB)}">{escape(ch.short)}</text>')
        if ch.mv_per_unit is None:
            o.append(f'<text class="scale" x="{1.5 * ppm:.2f}" y="{y0 + 1.5 * ppm + fs_small:.2f}" '
                     f'font-size="{fs_small}" fill="{_rgb(TEXT_RGB)}">{escape(_gain(ch)[1])}</text>')
        else:
            cx, up = LABEL_MM * ppm + ppm, y0 - MM_PER_MV * ppm
            o.append(f'<polyline class="calibration" fill="none" stroke="{_rgb(TRACE_RGB)}" stroke-width="{sw}" '
                     f'points="{cx:.2f},{y0:.2f} {cx + ppm:.2f},{y0:.2f} {cx + ppm:.2f},{up:.2f} '
                     f'{cx + 6 * ppm:.2f},{up:.2f} {cx + 6 * ppm:.2f},{y0:.2f} {cx + 7 * ppm:.2f},{y0:.2f}"/>')
        xs, ys = _trace_points(lay, group, i)
        pts = " ".join(f"{x:.2f},{y:.2f}" for x, y in _decimate(xs, ys))
        o.append(f'<polyline class="trace" fill="none" stroke="{_rgb(TRACE_RGB)}" stroke-width="{sw}" '
                 f'stroke-linejoin="round" points="{pts}"/></g>')
    o.append("</svg>")
    return ("\n".join(o) + "\n").encode()


def _check_size(lay: Layout) -> None:
    if lay.width * lay.height > MAX_PIXELS:
        raise WaveformTooLarge(f"{lay.width}x{lay.height} pixels at {lay.px_per_mm:g} px/mm is more than "
                               f"{MAX_PIXELS:,}: ask for fewer px_per_mm")


def _pick(groups: list[Group], index: int) -> Group:
    if not 0 <= index < len(groups):
        raise WaveformError(f"multiplex group {index + 1} does not exist (the object has {len(groups)})")
    group = groups[index]
    if group.frequency <= 0:
        raise WaveformError(f"multiplex group {index + 1}: no sampling frequency")
    return group
