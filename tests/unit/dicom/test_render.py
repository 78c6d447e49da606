"""Rendering: VOI from the data or the parameter, MONOCHROME1, colour, viewport, formats."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from openpacs.dicom.frames import FrameReader
from openpacs.dicom.render import (
    RenderError,
    RenderParams,
    Viewport,
    Window,
    apply_window,
    parse_quality,
    parse_viewport,
    parse_window,
    render_frame,
    thumbnail,
)

warnings.filterwarnings("ignore", module="pydicom")


def _img(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def _reader(name: str) -> FrameReader:
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"{name} not available")
    return FrameReader(path)


def test_parse_parameters() -> None:
    assert parse_window("40,400") == Window(40, 400, "LINEAR")
    assert parse_window("40,400,sigmoid") == Window(40, 400, "SIGMOID")
    assert parse_viewport("256,128") == Viewport(256, 128)
    assert parse_viewport("256,128,0,0,64,-64").sh == -64
    assert parse_quality("75") == 75
    for bad in ("40", "a,b", "40,0", "40,400,CUBIC", "1,2,3,4"):
        with pytest.raises(RenderError):
            parse_window(bad)
    for bad in ("0,10", "10", "x,y", "99999,10"):
        with pytest.raises(RenderError):
            parse_viewport(bad)
    for bad in ("0", "101", "high"):
        with pytest.raises(RenderError):
            parse_quality(bad)


def test_linear_window_matches_standard() -> None:
    v = np.array([-1000.0, 39.5, 40.0, 240.0, 3000.0])
    out = apply_window(v, Window(40, 400))
    assert out[0] == 0 and out[-1] == 255
    assert 126 < out[2] < 129


def test_ct_png_uses_data_window_and_rescale() -> None:
    with _reader("CT_small.dcm") as r:
        png = _img(render_frame(r, 1, RenderParams("image/png")))
        assert png.format == "PNG" and png.size == (128, 128) and png.mode == "L"
        wide = np.asarray(_img(render_frame(r, 1, RenderParams("image/png", window=Window(0, 4000)))))
        narrow = np.asarray(_img(render_frame(r, 1, RenderParams("image/png", window=Window(40, 80)))))
    assert wide.std() != narrow.std()
    assert (narrow == 0).sum() + (narrow == 255).sum() > (wide == 0).sum() + (wide == 255).sum()


def test_monochrome1_is_inverted() -> None:
    with _reader("RG1_UNCR.dcm") as r:
        assert r.ds.PhotometricInterpretation == "MONOCHROME1"
        raw = r.array(1).astype(float)
        w = Window((raw.max() + raw.min()) / 2, np.ptp(raw), "LINEAR_EXACT")
        img = np.asarray(_img(render_frame(r, 1, RenderParams("image/png", window=w, viewport=Viewport(200, 200)))))
    # the brightest stored values must render dark
    assert img.shape[0] <= 200 and img.shape[1] <= 200
    small = np.asarray(
        Image.fromarray(((raw - raw.min()) / np.ptp(raw) * 255).astype(np.uint8)).resize(img.shape[::-1])
    )
    assert np.corrcoef(small.ravel(), img.ravel())[0, 1] < -0.9


def test_rgb_ybr_and_palette() -> None:
    with _reader("US1_UNCR.dcm") as r:
        im = _img(render_frame(r, 1, RenderParams("image/png")))
        assert im.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(im), r.array(1))
    with _reader("examples_ybr_color.dcm") as r:
        im = _img(render_frame(r, 30, RenderParams("image/jpeg", quality=95)))
        assert im.mode == "RGB" and im.size == (320, 240)
    with _reader("OBXXXX1A.dcm") as r:
        im = _img(render_frame(r, 1, RenderParams("image/png")))
        assert im.mode == "RGB"


def test_viewport_and_quality() -> None:
    with _reader("MR_small.dcm") as r:
        im = _img(render_frame(r, 1, RenderParams("image/jpeg", viewport=Viewport(32, 100))))
        assert im.size == (32, 32)
        big = render_frame(r, 1, RenderParams("image/jpeg", quality=100))
        small = render_frame(r, 1, RenderParams("image/jpeg", quality=10))
        assert len(small) < len(big)
        crop = _img(render_frame(r, 1, RenderParams("image/png", viewport=Viewport(16, 16, 0, 0, 16, 16))))
        assert crop.size == (16, 16)


def test_multiframe_and_thumbnail() -> None:
    with _reader("emri_small.dcm") as r:
        a = np.asarray(_img(render_frame(r, 1, RenderParams("image/png"))))
        b = np.asarray(_img(render_frame(r, 10, RenderParams("image/png"))))
        assert a.shape == b.shape == (64, 64) and not np.array_equal(a, b)
        t = _img(thumbnail(r))
        assert t.format == "JPEG" and max(t.size) <= 128
