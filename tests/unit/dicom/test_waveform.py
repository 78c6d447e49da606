"""Waveform decoding (multiplex groups, sensitivity/correction/baseline, sample formats, lead labels, annotations) and
the ECG paper drawing (PNG pixels at the computed rows, SVG structure) on pydicom's waveform_ecg.dcm and synthetic
groups."""

from __future__ import annotations

import copy
import io
import xml.etree.ElementTree as ET

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from openpacs.dicom import waveform as wf

LEADS = ["Lead I (Einthoven)", "Lead II", "Lead III", "Lead aVR", "Lead aVL", "Lead aVF",
         "Lead V1", "Lead V2", "Lead V3", "Lead V4", "Lead V5", "Lead V6"]
SHORT = ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"]
SVG_NS = "{http://www.w3.org/2000/svg}"


@pytest.fixture(scope="module")
def ecg() -> Dataset:
    return pydicom.dcmread(get_testdata_file("waveform_ecg.dcm"))


def _code(value: str, meaning: str, scheme: str = "UCUM") -> Sequence:
    c = Dataset()
    c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning = value, scheme, meaning
    return Sequence([c])


def synthetic(raw: np.ndarray, bits: int, interp: str, units: str = "uV", sens: float = 1.0, corr: float = 1.0,
              base: float = 0.0, freq: float = 500.0, label: str | None = None) -> Dataset:
    """A one-group waveform data set of ``raw`` (samples x channels)."""
    g = Dataset()
    n_s, n_ch = raw.shape
    g.NumberOfWaveformChannels, g.NumberOfWaveformSamples = n_ch, n_s
    g.SamplingFrequency, g.WaveformBitsAllocated, g.WaveformSampleInterpretation = str(freq), bits, interp
    g.MultiplexGroupLabel = "TEST"
    defs = []
    for c in range(n_ch):
        d = Dataset()
        if label is None:
            d.ChannelSourceSequence = _code(f"c{c}", f"Lead V{c + 1}", "SCPECG")
        else:
            d.ChannelLabel = label
        d.ChannelSensitivity, d.ChannelSensitivityCorrectionFactor, d.ChannelBaseline = str(sens), str(corr), str(base)
        d.ChannelSensitivityUnitsSequence = _code(units, units)
        defs.append(d)
    g.ChannelDefinitionSequence = Sequence(defs)
    g.WaveformData = raw.astype(wf._DTYPES[(bits, interp)]).tobytes()
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.9.1.2"
    ds.WaveformSequence = Sequence([g])
    return ds


# -- decoding ---------------------------------------------------------------------------------------------------


def test_groups_channels_samples_labels(ecg: Dataset) -> None:
    groups = wf.decode(ecg)
    assert [(g.label, len(g.channels), g.samples, g.frequency) for g in groups] == [
        ("RHYTHM", 12, 10000, 1000.0), ("MEDIAN BEAT", 12, 1200, 1000.0)]
    assert groups[0].duration == 10.0 and groups[1].duration == pytest.approx(1.2)
    assert [c.label for c in groups[0].channels] == LEADS
    assert [c.short for c in groups[0].channels] == SHORT
    assert all(c.units == "uV" and c.mv_per_unit == 1e-3 for c in groups[0].channels)
    assert all(len(c.values) == g.samples for g in groups for c in g.channels)


def test_units_scaling_known_values(ecg: Dataset) -> None:
    """Channel sensitivity 1.25 uV per count: the raw int16 samples (read here independently) times 1.25."""
    g0 = ecg.WaveformSequence[0]
    raw = np.frombuffer(g0.WaveformData, dtype="<i2").reshape(10000, 12)
    assert raw[0, 0] == 80 and raw[0, 3] == -85  # lead I 100 uV, aVR -106.25 uV at t=0
    groups = wf.decode(ecg)
    assert groups[0].channels[0].values[0] == 100.0
    assert groups[0].channels[3].values[0] == -106.25
    for i in range(2):  # the same as pydicom's own decoder, every sample of every channel
        ref = ecg.waveform_array(i)
        got = np.stack([c.values for c in groups[i].channels], axis=1)
        assert np.array_equal(got, ref)
    assert max(c.values.max() for c in groups[0].channels) == 1962.5  # V5's R wave, ~2 mV


@pytest.mark.parametrize("bits,interp", [(8, "SB"), (8, "UB"), (16, "SS"), (16, "US"), (32, "SL"), (32, "UL")])
def test_sample_formats_and_correction(bits: int, interp: str) -> None:
    raw = np.array([[0, 10], [1, 20], [2, 30], [100, 40]])
    ds = synthetic(raw, bits, interp, units="mV", sens=2.0, corr=0.5, base=-3.0)
    g = wf.decode(ds)[0]
    assert np.array_equal(g.channels[0].values, raw[:, 0] * 2.0 * 0.5 - 3.0)
    assert np.array_equal(g.channels[1].values, raw[:, 1] * 1.0 - 3.0)
    assert g.channels[0].label == "Lead V1" and g.channels[0].mv_per_unit == 1.0


def test_mu_law() -> None:
    ds = synthetic(np.zeros((4, 1)), 8, "MB")
    ds.WaveformSequence[0].WaveformData = bytes([0xFF, 0x7F, 0x80, 0x00])  # G.711: 0, 0, +32124, -32124
    assert wf.decode(ds)[0].channels[0].values.tolist() == [0.0, 0.0, 32124.0, -32124.0]


def test_bad_waveforms_raise_waveform_error(ecg: Dataset) -> None:
    short = copy.deepcopy(ecg)
    short.WaveformSequence[0].WaveformData = short.WaveformSequence[0].WaveformData[:100]
    with pytest.raises(wf.WaveformError, match="100 bytes"):
        wf.decode(short)
    odd = synthetic(np.zeros((3, 1)), 16, "SS")
    odd.WaveformSequence[0].WaveformSampleInterpretation = "UB"
    with pytest.raises(wf.WaveformError, match="unsupported"):
        wf.decode(odd)
    with pytest.raises(wf.WaveformError, match="no WaveformSequence"):
        wf.decode(Dataset())
    with pytest.raises(wf.WaveformError, match="group 3 does not exist"):
        wf.render_png(ecg, 2)


def test_summary_and_measurements(ecg: Dataset) -> None:
    s = wf.waveform_summary(ecg)
    assert s["text"] == "12-lead ECG, 10 s, 1000 Hz"
    assert [(g["label"], g["channels"], g["samples"], g["duration"]) for g in s["groups"]] == [
        ("RHYTHM", 12, 10000, 10.0), ("MEDIAN BEAT", 12, 1200, 1.2)]
    assert s["groups"][0]["leads"] == LEADS
    m = {x["short"]: (x["value"], x["unit"]) for x in s["measurements"]}
    assert m["QT"] == (368.0, "ms") and m["PR"] == (161.0, "ms") and m["QRS"] == (75.0, "ms")
    assert m["QTc"] == (370.0, "ms") and m["QRS axis"] == (52.0, "deg")
    assert m["HR"] == (61, "/min")  # 60000 / RR 982 ms (the object carries no heart rate)
    assert "QT 368 ms" in s["measurement_text"] and "HR 61 bpm" in s["measurement_text"]
    assert s["statements"] == ["RITMO SINUSALE", "ECG NORMALE"]
    assert wf.is_waveform_class(ecg.SOPClassUID) and not wf.is_waveform_class("1.2.840.10008.5.1.4.1.1.2")


# -- drawing ----------------------------------------------------------------------------------------------------


def _dark(img: Image.Image) -> np.ndarray:
    a = np.asarray(img.convert("RGB")).astype(int)
    return (a.max(axis=2) < 60)


def expected_geometry(ppm: float, n: int, seconds: float) -> tuple[list[float], float, float]:
    """Baselines and trace x range from the documented paper layout, computed here, not by the module."""
    baselines = [(24 + 25 * (i + 0.5)) * ppm for i in range(n)]
    x0 = (14 + 8) * ppm
    return baselines, x0, x0 + seconds * 25 * ppm


@pytest.mark.parametrize("ppm", [4.0, 2.0])
def test_png_rows_and_extent(ecg: Dataset, ppm: float) -> None:
    img = Image.open(io.BytesIO(wf.render_png(ecg, 0, ppm)))
    assert img.format == "PNG"
    baselines, x0, x1 = expected_geometry(ppm, 12, 10.0)
    assert img.size == (int(np.ceil(x1 + 4 * ppm)), int(np.ceil((24 + 12 * 25 + 4) * ppm)))
    dark = _dark(img)
    trace = dark[:, int(x0) + 1:int(x1) - 1]
    for i, y0 in enumerate(baselines):  # the most-inked pixel row of each band is the lead's baseline
        band = trace[int(y0 - 12.5 * ppm):int(y0 + 12.5 * ppm)]
        peak = int(y0 - 12.5 * ppm) + int(np.argmax(band.sum(axis=1)))
        assert abs(peak - y0) <= max(2, 0.8 * ppm), (SHORT[i], peak, y0)
        cols = np.flatnonzero(dark[int(y0 - 12.5 * ppm):int(y0 + 12.5 * ppm), int(x0):].any(axis=0))
        assert abs(cols[-1] + int(x0) - x1) <= 2, (SHORT[i], cols[-1] + int(x0), x1)  # 10 s at 25 mm/s
    # the calibration pulse: 10 mm (1 mV) high in the calibration column of row 1
    cal = dark[:, int(14 * ppm):int(x0)]
    rows = np.flatnonzero(cal[int(baselines[0] - 12.5 * ppm):int(baselines[0] + 1 * ppm)].any(axis=1))
    height = rows[-1] - rows[0]
    assert abs(height - 10 * ppm) <= 2
    # the grid: minor lines every mm, in the paper colours
    a = np.asarray(img)
    assert tuple(a[int(baselines[0]) + 3 * int(ppm) + 1, int(x0) + 1]) in ((255, 255, 255), wf.MINOR_RGB)


def test_png_median_beat_group(ecg: Dataset) -> None:
    img = Image.open(io.BytesIO(wf.render_png(ecg, 1)))
    baselines, x0, x1 = expected_geometry(4.0, 12, 1.2)
    assert img.size[0] == 200 * 4  # the minimum paper width (room for the header)
    dark = _dark(img)
    cols = np.flatnonzero(dark[int(baselines[1] - 50):int(baselines[1] + 50), int(x0):].any(axis=0))
    assert abs(cols[-1] + int(x0) - x1) <= 2


def test_svg_structure(ecg: Dataset) -> None:
    svg = wf.render_svg(ecg, 0, 4.0)
    root = ET.fromstring(svg)
    baselines, x0, x1 = expected_geometry(4.0, 12, 10.0)
    assert root.tag == f"{SVG_NS}svg" and root.get("width") == str(int(np.ceil(x1 + 16)))
    leads = root.findall(f"{SVG_NS}g[@class='lead']")
    assert [g.get("data-lead") for g in leads] == LEADS
    assert [g.find(f"{SVG_NS}text[@class='label']").text for g in leads] == SHORT
    for g, y0 in zip(leads, baselines, strict=True):
        assert float(g.get("data-baseline")) == pytest.approx(y0)
        pts = [tuple(map(float, p.split(","))) for p in g.find(f"{SVG_NS}polyline[@class='trace']").get("points").split()]
        xs = [p[0] for p in pts]
        assert min(xs) == pytest.approx(x0) and max(xs) == pytest.approx(x1 - 25 * 4 / 1000, abs=0.01)
        assert len(pts) <= 4 * 1000 + 4  # decimated to at most 4 points per pixel column
        ys = np.array([p[1] for p in pts])
        assert abs(float(np.median(ys)) - y0) < 2 * 4  # the trace sits on its baseline (within 2 mm)
        assert g.find(f"{SVG_NS}polyline[@class='calibration']") is not None
    # the R wave peak of V5 (1962.5 uV) survives decimation: 19.6 mm above its baseline
    v5 = leads[10].find(f"{SVG_NS}polyline[@class='trace']").get("points").split()
    top = min(float(p.split(",")[1]) for p in v5)
    assert top == pytest.approx(baselines[10] - 19.625 * 4, abs=0.01)
    header = " ".join(t.text or "" for t in root.findall(f"{SVG_NS}text[@class='header']"))
    assert "10 s, 1000 Hz" in header and "QT 368 ms" in header and "PR 161 ms" in header and "HR 61 bpm" in header
    assert "25 mm/s, 10 mm/mV" in header


def test_non_voltage_channel_is_fitted_to_its_row() -> None:
    t = np.arange(1000) / 100.0
    pressure = (80 + 40 * np.sin(2 * np.pi * t)).round()[:, None]  # mmHg, 80 +- 40
    ds = synthetic(pressure, 16, "SS", units="mm[Hg]", freq=100.0, label="Aortic pressure")
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.9.2.1"
    assert wf.waveform_summary(ds)["text"] == "Hemodynamic waveform, 10 s, 100 Hz"
    root = ET.fromstring(wf.render_svg(ds))
    g = root.find(f"{SVG_NS}g[@class='lead']")
    assert g.get("data-lead") == "Aortic pressure"
    assert g.find(f"{SVG_NS}polyline[@class='calibration']") is None
    ys = [float(p.split(",")[1]) for p in g.find(f"{SVG_NS}polyline[@class='trace']").get("points").split()]
    y0 = (24 + 12.5) * 4
    assert max(ys) - min(ys) == pytest.approx(0.8 * 25 * 4, abs=0.5)  # 80 % of the 25 mm row
    assert (max(ys) + min(ys)) / 2 == pytest.approx(y0, abs=0.5)
    Image.open(io.BytesIO(wf.render_png(ds))).verify()


def test_scale_for_width(ecg: Dataset) -> None:
    g = wf.decode(ecg)[0]
    ppm = wf.px_per_mm_for_width(g, 1104)  # (14 + 8 + 250 + 4) mm x 4
    assert ppm == pytest.approx(4.0)
    assert wf.px_per_mm_for_width(g, 10) == wf.MIN_PX_PER_MM
    assert Image.open(io.BytesIO(wf.render_png(ecg, 0, ppm))).size[0] == 1104


def test_long_record_is_cut_and_huge_drawings_refused(ecg: Dataset, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = np.tile(np.array([0, 100, 0, -100]), 3000)[:, None]  # 120 s at 100 Hz
    ds = synthetic(raw, 16, "SS", freq=100.0)
    g = wf.decode(ds, max_seconds=wf.MAX_SECONDS)[0]
    assert g.samples == 12000 and len(g.channels[0].values) == 6000 and g.duration == 120.0
    root = ET.fromstring(wf.render_svg(ds, 0, 1.0))
    xs = [float(p.split(",")[0]) for p in root.find(f".//{SVG_NS}polyline[@class='trace']").get("points").split()]
    assert max(xs) == pytest.approx(22 + (60 - 0.01) * 25, abs=0.01)  # 60 s drawn, at 25 mm/s
    assert int(root.get("width")) == int(np.ceil(22 + 60 * 25 + 4))
    monkeypatch.setattr(wf, "MAX_PIXELS", 1_000_000)
    with pytest.raises(wf.WaveformTooLarge, match="fewer px_per_mm"):
        wf.render_png(ecg, 0, 4.0)


def test_hostile_labels_are_escaped_in_svg() -> None:
    label = '<script>alert("x")</script>&'
    ds = synthetic(np.zeros((50, 1)), 16, "SS", label=label)
    ds.WaveformSequence[0].MultiplexGroupLabel = "<b>G</b>"
    root = ET.fromstring(wf.render_svg(ds))  # well-formed: every value escaped
    g = root.find(f"{SVG_NS}g[@class='lead']")
    assert g.get("data-lead") == label
    assert root.find(f".//{SVG_NS}script") is None and root.find(f".//{SVG_NS}b") is None
    assert "<b>G</b>" in root.find(f"{SVG_NS}text[@class='header']").text
