"""RT Dose shown as an overlay on its CT: the dose grid sampled at one CT slice, drawn as a colour wash with isodose
lines over the windowed CT, as one PNG.

OHIF 3.13 can show an RT Dose grid as its own series, but adding it as a viewport foreground over a CT crashes the
viewer (RangeError in its slice-progress scrollbar), so the console's study view draws the overlay from here.

The dose is sampled in patient coordinates: each CT pixel's position (Image Position / Orientation / Pixel Spacing) is
mapped into the dose grid (its own position, orientation, spacing and Grid Frame Offset Vector), with linear
interpolation between the two nearest dose planes and bilinear interpolation in plane. Values are Gy (Dose Grid
Scaling applied). Only grids and images that share a Frame of Reference are combined.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

RTDOSE = "1.2.840.10008.5.1.4.1.1.481.2"
# isodose levels drawn as lines, in percent of the maximum dose, with their colours (a common TPS convention)
ISODOSE = [(95, (255, 0, 0)), (80, (255, 128, 0)), (50, (255, 255, 0)), (30, (0, 200, 0)), (10, (0, 120, 255))]
WASH_FROM = 0.10  # doses below 10 % of the maximum are not washed


class DoseOverlayError(ValueError):
    """The two objects cannot be combined (other frame of reference, not a dose grid, not an image)."""


@dataclass
class DoseGrid:
    dose: np.ndarray  # (frames, rows, cols) in Gy
    origin: np.ndarray  # first plane's Image Position (Patient)
    row_dir: np.ndarray  # direction of increasing column index
    col_dir: np.ndarray  # direction of increasing row index
    normal: np.ndarray
    spacing: tuple[float, float]  # (between rows, between columns)
    offsets: np.ndarray  # plane offsets along the normal, ascending
    units: str

    @property
    def max(self) -> float:
        return float(self.dose.max()) if self.dose.size else 0.0


def load_grid(ds: Dataset) -> DoseGrid:
    if str(getattr(ds, "SOPClassUID", "")) != RTDOSE or "PixelData" not in ds:
        raise DoseOverlayError("not an RT Dose grid with pixel data")
    arr = ds.pixel_array.astype(np.float64)
    if arr.ndim == 2:
        arr = arr[None]
    arr *= float(getattr(ds, "DoseGridScaling", 1.0) or 1.0)
    iop = [float(v) for v in ds.ImageOrientationPatient]
    row_dir, col_dir = np.array(iop[:3]), np.array(iop[3:])
    offsets = np.array([float(v) for v in getattr(ds, "GridFrameOffsetVector", None) or [0.0] * arr.shape[0]])
    if len(offsets) != arr.shape[0]:
        raise DoseOverlayError(f"Grid Frame Offset Vector has {len(offsets)} values for {arr.shape[0]} planes")
    order = np.argsort(offsets)
    ps = [float(v) for v in ds.PixelSpacing]
    return DoseGrid(arr[order], np.array([float(v) for v in ds.ImagePositionPatient]), row_dir, col_dir,
                    np.cross(row_dir, col_dir), (ps[0], ps[1]), offsets[order], str(getattr(ds, "DoseUnits", "GY")))


def sample_at_image(grid: DoseGrid, image: Dataset) -> np.ndarray:
    """The dose (Gy) at every pixel of ``image`` (rows × columns), 0 outside the grid."""
    iop = [float(v) for v in image.ImageOrientationPatient]
    r_dir, c_dir = np.array(iop[:3]), np.array(iop[3:])
    ps = [float(v) for v in image.PixelSpacing]
    rows, cols = int(image.Rows), int(image.Columns)
    jj, ii = np.meshgrid(np.arange(cols), np.arange(rows))
    pos = (np.array([float(v) for v in image.ImagePositionPatient])[None, None, :]
           + jj[..., None] * ps[1] * r_dir + ii[..., None] * ps[0] * c_dir)
    rel = pos - grid.origin
    u = rel @ grid.row_dir / grid.spacing[1]  # fractional column in the dose grid
    v = rel @ grid.col_dir / grid.spacing[0]  # fractional row
    w = rel @ grid.normal  # offset along the normal
    frames, grows, gcols = grid.dose.shape
    out = np.zeros((rows, cols))
    inside = (u >= 0) & (u <= gcols - 1) & (v >= 0) & (v <= grows - 1) & \
        (w >= grid.offsets[0] - 1e-3) & (w <= grid.offsets[-1] + 1e-3)
    if not inside.any():
        return out
    u, v, w = u[inside], v[inside], w[inside]
    k1 = np.clip(np.searchsorted(grid.offsets, w), 1, max(frames - 1, 1)) if frames > 1 else np.zeros_like(u, int)
    if frames > 1:
        k0 = k1 - 1
        span = grid.offsets[k1] - grid.offsets[k0]
        t = np.where(span > 0, (w - grid.offsets[k0]) / np.where(span > 0, span, 1), 0.0)
    else:
        k0, t = k1, np.zeros_like(u)
    u0, v0 = np.floor(u).astype(int), np.floor(v).astype(int)
    u1, v1 = np.minimum(u0 + 1, gcols - 1), np.minimum(v0 + 1, grows - 1)
    fu, fv = u - u0, v - v0

    def plane(k: np.ndarray) -> np.ndarray:
        d = grid.dose
        return ((1 - fu) * (1 - fv) * d[k, v0, u0] + fu * (1 - fv) * d[k, v0, u1]
                + (1 - fu) * fv * d[k, v1, u0] + fu * fv * d[k, v1, u1])

    out[inside] = (1 - t) * plane(k0) + t * plane(k1)
    return out


def _first(v: object) -> float:
    return float(v[0]) if isinstance(v, list | tuple | MultiValue) else float(v)  # type: ignore[arg-type]


def _windowed(image: Dataset) -> np.ndarray:
    px = image.pixel_array.astype(np.float64) * float(getattr(image, "RescaleSlope", 1) or 1) \
        + float(getattr(image, "RescaleIntercept", 0) or 0)
    wc, ww = getattr(image, "WindowCenter", None), getattr(image, "WindowWidth", None)
    if wc is not None and ww is not None:
        wc, ww = _first(wc), _first(ww)
    else:
        lo, hi = np.percentile(px, [1, 99])
        wc, ww = (lo + hi) / 2, max(hi - lo, 1.0)
    g = np.clip((px - (wc - ww / 2)) / ww, 0, 1) * 255
    return g.astype(np.uint8)


def _jet(x: np.ndarray) -> np.ndarray:
    """0..1 -> RGB (blue, cyan, green, yellow, red)."""
    r = np.clip(1.5 - np.abs(4 * x - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * x - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * x - 1), 0, 1)
    return np.stack([r, g, b], axis=-1) * 255


def overlay_png(image: Dataset, dose_ds: Dataset, alpha: float = 0.45, max_dose: float | None = None) -> bytes:
    """The CT slice with the dose wash (10 %..100 % of the grid's maximum) and isodose lines, as PNG."""
    img_for = str(getattr(image, "FrameOfReferenceUID", "") or "")
    dose_for = str(getattr(dose_ds, "FrameOfReferenceUID", "") or "")
    if not img_for or img_for != dose_for:
        raise DoseOverlayError("the image and the dose grid are not on the same frame of reference")
    if "PixelData" not in image or "ImagePositionPatient" not in image:
        raise DoseOverlayError("the image has no pixels or no position")
    grid = load_grid(dose_ds)
    dose = sample_at_image(grid, image)
    top = max_dose or grid.max or 1.0
    base = np.repeat(_windowed(image)[..., None], 3, axis=2).astype(np.float64)
    frac = dose / top
    wash = frac >= WASH_FROM
    colours = _jet(np.clip((frac - WASH_FROM) / (1 - WASH_FROM), 0, 1))
    base[wash] = (1 - alpha) * base[wash] + alpha * colours[wash]
    for pct, rgb in ISODOSE:  # a line where the dose crosses the level between neighbouring pixels
        above = frac >= pct / 100.0
        edge = np.zeros_like(above)
        edge[:-1, :] |= above[:-1, :] != above[1:, :]
        edge[:, :-1] |= above[:, :-1] != above[:, 1:]
        base[edge & above] = rgb
    out = io.BytesIO()
    Image.fromarray(base.astype(np.uint8), "RGB").save(out, format="PNG", compress_level=3)
    return out.getvalue()
