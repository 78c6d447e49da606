"""Rendering of one frame to a consumer image (JPEG/PNG), as PS3.18 8.3.5 (rendered resources) describes.

Grayscale: Modality LUT (rescale or LUT), then VOI (the ``window`` parameter, else the data's VOI LUT or window, else
the frame's min/max), then MONOCHROME1 inversion. Colour: YBR converted to RGB, palette colour expanded, samples scaled
to 8 bits. Then the ``viewport`` (scale to fit, optional source region) and the encoder's quality.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset

from .frames import FrameReader

MEDIA_TYPES = {"image/jpeg": "JPEG", "image/png": "PNG", "image/gif": "GIF"}
VOI_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")


class RenderError(ValueError):
    """Bad rendering parameters (HTTP 400) or an instance that cannot be rendered."""


@dataclass(frozen=True)
class Window:
    center: float
    width: float
    function: str = "LINEAR"


@dataclass(frozen=True)
class Viewport:
    width: int
    height: int
    sx: int | None = None
    sy: int | None = None
    sw: int | None = None
    sh: int | None = None


@dataclass(frozen=True)
class RenderParams:
    media_type: str = "image/jpeg"
    window: Window | None = None
    viewport: Viewport | None = None
    quality: int = 90


def parse_window(value: str) -> Window:
    parts = [p.strip() for p in value.split(",")]
    if len(parts) not in (2, 3):
        raise RenderError("window must be center,width[,function]")
    try:
        center, width = float(parts[0]), float(parts[1])
    except ValueError as exc:
        raise RenderError("window center and width must be numbers") from exc
    if not (math.isfinite(center) and math.isfinite(width)) or width <= 0:
        raise RenderError("window width must be a positive number")
    function = parts[2].upper() if len(parts) == 3 and parts[2] else "LINEAR"
    if function not in VOI_FUNCTIONS:
        raise RenderError(f"window function must be one of {', '.join(VOI_FUNCTIONS)}")
    if function == "LINEAR" and width < 1:
        raise RenderError("window width must be >= 1 for LINEAR")
    return Window(center, width, function)


def parse_viewport(value: str) -> Viewport:
    parts = [p.strip() for p in value.split(",")]
    if len(parts) not in (2, 6):
        raise RenderError("viewport must be vw,vh or vw,vh,sx,sy,sw,sh")
    try:
        nums = [int(p) if p else None for p in parts]
    except ValueError as exc:
        raise RenderError("viewport values must be integers") from exc
    vw, vh = nums[0], nums[1]
    if vw is None or vh is None or not (0 < vw <= 8192 and 0 < vh <= 8192):
        raise RenderError("viewport width and height must be in 1..8192")
    if len(nums) == 6:
        return Viewport(vw, vh, nums[2], nums[3], nums[4], nums[5])
    return Viewport(vw, vh)


def parse_quality(value: str) -> int:
    try:
        q = int(value)
    except ValueError as exc:
        raise RenderError("quality must be an integer 1..100") from exc
    if not 1 <= q <= 100:
        raise RenderError("quality must be an integer 1..100")
    return q


def _frame_item(ds: Dataset, index: int, sequence: str) -> Dataset | None:
    """An item of an Enhanced multi-frame functional group macro: per-frame first, then shared."""
    for group, idx in (("PerFrameFunctionalGroupsSequence", index), ("SharedFunctionalGroupsSequence", 0)):
        seq = ds.get(group)
        if seq and len(seq) > idx and sequence in seq[idx] and seq[idx][sequence].value:
            item: Dataset = seq[idx][sequence].value[0]
            return item
    return None


def _first(value: object) -> float:
    if isinstance(value, list | tuple) or hasattr(value, "__getitem__") and not isinstance(value, str | bytes):
        value = value[0]  # type: ignore[index]
    return float(value)  # type: ignore[arg-type]


def modality_lut(arr: np.ndarray, ds: Dataset, index: int = 0) -> np.ndarray:
    item = _frame_item(ds, index, "PixelValueTransformationSequence")
    source = item if item is not None else ds
    if "ModalityLUTSequence" in ds and item is None:
        from pydicom.pixels import apply_modality_lut

        return np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
    slope = float(source.get("RescaleSlope", 1) or 1)
    intercept = float(source.get("RescaleIntercept", 0) or 0)
    out = arr.astype(np.float64)
    if slope != 1:
        out *= slope
    if intercept:
        out += intercept
    return out


def data_window(ds: Dataset, index: int = 0) -> Window | None:
    item = _frame_item(ds, index, "FrameVOILUTSequence")
    source = item if item is not None else ds
    if "WindowCenter" in source and "WindowWidth" in source:
        try:
            center, width = _first(source.WindowCenter), _first(source.WindowWidth)
        except (TypeError, ValueError, IndexError):
            return None
        if width > 0:
            function = str(source.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
            return Window(center, width, function if function in VOI_FUNCTIONS else "LINEAR")
    return None


def apply_window(values: np.ndarray, window: Window) -> np.ndarray:
    """PS3.3 C.11.2.1.2 windowing to the output range 0..255 (float)."""
    c, w = window.center, window.width
    if window.function == "SIGMOID":
        return 255.0 / (1.0 + np.exp(-4.0 * (values - c) / w))
    if window.function == "LINEAR_EXACT":
        return np.clip((values - (c - w / 2)) / w, 0, 1) * 255.0
    lo, hi = c - 0.5 - (w - 1) / 2, c - 0.5 + (w - 1) / 2
    scaled = ((values - (c - 0.5)) / (w - 1) + 0.5) if w > 1 else (values > c - 0.5).astype(np.float64)
    out = np.clip(scaled, 0, 1) * 255.0
    out[values <= lo] = 0
    out[values > hi] = 255
    return out


def to_display(arr: np.ndarray, ds: Dataset, index: int, window: Window | None, photometric: str) -> np.ndarray:
    """The frame as uint8 luminance (H×W) or RGB (H×W×3)."""
    samples = int(ds.get("SamplesPerPixel", 1))
    if photometric == "PALETTE COLOR" and samples == 1:
        from pydicom.pixels import apply_color_lut

        rgb = apply_color_lut(arr, ds)
        top = float(rgb.max()) if rgb.size else 0
        scale = 255.0 / 65535.0 if top > 255 else 1.0
        return np.clip(rgb.astype(np.float64) * scale, 0, 255).astype(np.uint8)
    if samples == 3 or arr.ndim == 3:
        bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 8)))
        if arr.dtype == np.uint8 or bits <= 8:
            return arr.astype(np.uint8, copy=False)
        return (arr.astype(np.float64) * (255.0 / ((1 << bits) - 1))).clip(0, 255).astype(np.uint8)

    values = modality_lut(arr, ds, index)
    if window is None:
        window = None if "VOILUTSequence" in ds else data_window(ds, index)
        if window is None and "VOILUTSequence" in ds:
            out = _voi_lut_sequence(arr, ds)
            if out is not None:
                return _maybe_invert(out, photometric)
    if window is None:
        lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
        window = Window((lo + hi) / 2, max(hi - lo, 1.0), "LINEAR_EXACT")
    return _maybe_invert(apply_window(values, window).astype(np.uint8), photometric)


def _voi_lut_sequence(arr: np.ndarray, ds: Dataset) -> np.ndarray | None:
    try:
        from pydicom.pixels import apply_voi_lut

        mapped = np.asarray(
            apply_voi_lut(np.asarray(modality_lut(arr, ds)).astype(np.int64), ds, index=0, prefer_lut=True),
            dtype=np.float64,
        )
        item = ds.VOILUTSequence[0]
        bits = int(item.LUTDescriptor[2])
        top = float((1 << bits) - 1) if 8 <= bits <= 16 else float(mapped.max() or 1)
        return np.clip(mapped * (255.0 / top), 0, 255).astype(np.uint8)
    except Exception:
        return None


def _maybe_invert(img: np.ndarray, photometric: str) -> np.ndarray:
    return 255 - img if photometric == "MONOCHROME1" else img


def _apply_viewport(image: Image.Image, viewport: Viewport | None) -> Image.Image:
    if viewport is None:
        return image
    if viewport.sw is not None or viewport.sx is not None:
        sx = viewport.sx or 0
        sy = viewport.sy or 0
        sw = viewport.sw if viewport.sw is not None else image.width - sx
        sh = viewport.sh if viewport.sh is not None else image.height - sy
        flip_x, flip_y = sw < 0, sh < 0
        left, right = (sx + sw, sx) if flip_x else (sx, sx + sw)
        top, bottom = (sy + sh, sy) if flip_y else (sy, sy + sh)
        box = (max(0, left), max(0, top), min(image.width, right), min(image.height, bottom))
        if box[2] <= box[0] or box[3] <= box[1]:
            raise RenderError("viewport source region is outside the image")
        image = image.crop(box)
        if flip_x:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if flip_y:
            image = image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    scale = min(viewport.width / image.width, viewport.height / image.height)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    if size != image.size:
        image = image.resize(
            size,
            Image.Resampling.BILINEAR if scale < 1 else Image.Resampling.BICUBIC,
            reducing_gap=2.0 if scale < 0.5 else None,
        )
    return image


def encode_image(img: np.ndarray, params: RenderParams) -> bytes:
    image = Image.fromarray(img)
    image = _apply_viewport(image, params.viewport)
    fmt = MEDIA_TYPES.get(params.media_type)
    if fmt is None:
        raise RenderError(f"unsupported rendered media type {params.media_type}")
    buf = io.BytesIO()
    if fmt == "JPEG":
        image.save(buf, "JPEG", quality=params.quality)
    elif fmt == "PNG":
        image.save(buf, "PNG", compress_level=1 if params.quality >= 90 else 6)
    else:
        image.save(buf, fmt)
    return buf.getvalue()


def render_frame(reader: FrameReader, number: int, params: RenderParams) -> bytes:
    """Render frame ``number`` (1-based) of the instance read by ``reader``."""
    arr = reader.array(number)
    photometric = reader.decoded_photometric()
    if arr.ndim == 3 and arr.shape[-1] != 3:  # single frame read back with an unexpected sample axis
        arr = arr[..., 0]
    img = to_display(arr, reader.ds, number - 1, params.window, photometric)
    return encode_image(img, params)


def thumbnail(reader: FrameReader, params: RenderParams | None = None) -> bytes:
    """A small rendering of the middle frame (JPEG, fit within 128×128 unless a viewport is given)."""
    params = params or RenderParams()
    if params.viewport is None:
        params = RenderParams(params.media_type, params.window, Viewport(128, 128), params.quality)
    middle = (reader.number_of_frames + 1) // 2
    return render_frame(reader, middle, params)
