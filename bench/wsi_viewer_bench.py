"""Opening a 50,000-tile slide in the browser: OHIF's microscopy mode in Debian's headless Chromium, timed.

    .venv/bin/python bench/wsi_viewer_bench.py [--across 224] [--rounds 3]

The slide is a pyramid whose base level has 224 x 224 = 50,176 JPEG tiles of 256 x 256 (tests/helpers/wsi.py,
levels halving down to one tile; each level its own colour), stored over DICOM (storescu) on a fresh
`openpacs serve`. Each round opens it in a fresh browser context (nothing cached by the browser): from the start of
the navigation to the study's microscopy URL until the centre of the viewport is tiles of one level with no blank
left (screenshots of the viewport, polled; their cost bounds the resolution, ~0.1 s); then again in the same context
(OHIF from the browser's cache, as for every slide after a user's first). After each open, one pan (a 600 x 400
pixel drag) until the new view has no blank tile. The first open runs on a server that has just started (nothing
of the slide cached); the others on a warm one. "DICOMweb wait" is the time, until the viewport was filled, during
which at least one DICOMweb request (QIDO, metadata, frames) was in flight: what the server can take out of the
open; the rest is the browser's own work. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from helpers import dcmtk, wsi  # noqa: E402
from helpers.browser import CHROMIUM_ARGS, chromium, ohif_dir  # noqa: E402
from helpers.server import OpenPACSServer  # noqa: E402

TIMEOUT = 60.0


def filled(page: Any, n_levels: int) -> tuple[bool, dict[int | None, float]]:
    """Whether the viewport's centre shows tiles of one level (> 80 %) and no blank (< 2 %)."""
    from PIL import Image

    skip = page.get_by_text("Skip all", exact=True)
    if skip.count() and skip.first.is_visible():
        skip.first.click()
    shot = page.locator(".ol-viewport").first.screenshot()
    img = np.asarray(Image.open(io.BytesIO(shot)).convert("RGB"), dtype=np.float64)
    h, w, _ = img.shape
    shares = wsi.levels_in(img[h // 4: 3 * h // 4, w // 3: 2 * w // 3], n_levels)
    best = max((v for k, v in shares.items() if k is not None), default=0.0)
    return best > 0.8 and shares.get(None, 0.0) < 0.02, shares


def wait_filled(page: Any, n_levels: int, t0: float) -> float:
    deadline = t0 + TIMEOUT
    while time.perf_counter() < deadline:
        ok, shares = filled(page, n_levels)
        if ok:
            return time.perf_counter() - t0
        time.sleep(0.05)
    raise SystemExit(f"the viewport was not filled within {TIMEOUT} s: {shares}")


def one_open(page: Any, url: str, n_levels: int) -> dict[str, float]:
    tiles = [0]
    started: dict[Any, float] = {}
    spans: list[tuple[float, float]] = []  # DICOMweb requests in flight: the time the viewer waited on the server

    def on_request(r: Any) -> None:
        tiles[0] += "/frames/" in r.url
        if "/dicom-web/" in r.url:
            started[r] = time.perf_counter()

    def on_done(r: Any) -> None:
        if r in started:
            spans.append((started.pop(r), time.perf_counter()))

    page.on("request", on_request)
    page.on("requestfinished", on_done)
    page.on("requestfailed", on_done)
    t0 = time.perf_counter()
    page.goto(url)
    page.locator(".ol-viewport").first.wait_for(state="visible", timeout=TIMEOUT * 1000)
    t_viewport = time.perf_counter() - t0
    t_open = wait_filled(page, n_levels, t0)
    opened_tiles = tiles[0]
    waited = union_length([sp for sp in spans if sp[0] < t0 + t_open], t0 + t_open)
    box = page.locator(".ol-viewport").first.bounding_box()
    assert box is not None
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(cx, cy)
    page.mouse.down()
    page.mouse.move(cx - 600, cy - 400, steps=8)
    page.mouse.up()
    t1 = time.perf_counter()
    t_pan = wait_filled(page, n_levels, t1)
    for event, handler in (("request", on_request), ("requestfinished", on_done), ("requestfailed", on_done)):
        page.remove_listener(event, handler)
    return {"viewport_s": t_viewport, "open_s": t_open, "open_tile_requests": opened_tiles,
            "dicomweb_wait_s": waited, "pan_s": t_pan}


def union_length(spans: list[tuple[float, float]], end: float) -> float:
    """Seconds covered by at least one of ``spans`` (cut at ``end``)."""
    total, reach = 0.0, float("-inf")
    for a, b in sorted(spans):
        b = min(b, end)
        if b > reach:
            total += b - max(a, reach)
            reach = b
    return total


def opens(browser: Any, url: str, n_levels: int) -> list[dict[str, float]]:
    """The slide opened in a new browser context (nothing in the browser's cache: OHIF's 17 MB application and
    the microscopy viewer downloaded and compiled), then again in that context (the application from the cache, as
    for every slide after a user's first)."""
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    try:
        page = context.new_page()
        return [{**one_open(page, url, n_levels), "browser_cache": b} for b in (0.0, 1.0)]
    finally:
        context.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--across", type=int, default=224, help="base level tiles across and down (224: 50,176)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    ohif_dir()
    tmp = Path(tempfile.mkdtemp(prefix="wsi-viewer-bench-"))
    srv = None
    try:
        n_levels = max(1, (args.across - 1).bit_length() + 1)  # halving down to a single tile
        slide = wsi.Slide(seed="openpacs-wsi-viewer-bench", width=args.across * wsi.TILE,
                          height=args.across * wsi.TILE, n_levels=n_levels, distinct=False)
        t0 = time.perf_counter()
        files = slide.write(tmp / "files", offset_tables={0: "none"}, sparse=False)
        total = sum(level.n_tiles for level in slide.levels())
        print(f"slide: {n_levels} levels, {slide.levels()[0].n_tiles} tiles at the base, {total} in all, "
              f"written in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        srv = OpenPACSServer(tmp / "data").start()
        res = dcmtk.store(srv.dicom_port, files, "-R", "-xy")
        assert res.returncode == 0, res.output[-2000:]
        srv.stop()
        srv.start()  # cold: nothing of the slide cached in the server
        url = f"http://127.0.0.1:{srv.http_port}/ohif/microscopy?StudyInstanceUIDs={slide.study_uid}"
        rounds: list[dict[str, float]] = []
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS)
            try:
                for _ in range(args.rounds):
                    rounds += opens(browser, url, min(n_levels, len(wsi.LEVEL_COLORS)))
            finally:
                browser.close()
        print(f"{'server':>7} {'browser cache':>14} {'viewport s':>11} {'open s':>8} {'tiles':>6} "
              f"{'DICOMweb wait s':>16} {'pan s':>7}")
        for i, r in enumerate(rounds):
            print(f"{('cold' if i == 0 else 'warm'):>7} {('cached' if r['browser_cache'] else 'empty'):>14} "
                  f"{r['viewport_s']:>11.2f} {r['open_s']:>8.2f} {r['open_tile_requests']:>6.0f} "
                  f"{r['dicomweb_wait_s']:>16.2f} {r['pan_s']:>7.2f}")
        out = {"base_tiles": slide.levels()[0].n_tiles, "levels": n_levels, "rounds": rounds}
        for cached in (0.0, 1.0):
            mine = [r for r in rounds if r["browser_cache"] == cached]
            key = "cached" if cached else "empty"
            out[f"open_s_median_{key}"] = statistics.median(r["open_s"] for r in mine)
            out[f"pan_s_median_{key}"] = statistics.median(r["pan_s"] for r in mine)
        print(json.dumps(out))
        return 0
    finally:
        if srv is not None and srv.running:
            srv.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
