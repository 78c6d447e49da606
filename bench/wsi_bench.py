"""Whole-slide imaging over WADO-RS: tiles/s for random 256x256 JPEG tiles of a 50,176-tile slide, OpenPACS vs Orthanc.

    .venv/bin/python bench/wsi_bench.py [--tiles 1000] [--connections 6] [--rounds 3] [--no-orthanc]

The slide (tests/helpers/wsi.py write_big_slide: one TILED_FULL level, 224 x 224 tiles, empty Basic Offset Table, so
the server has to find the fragments itself) is stored on a fresh `openpacs serve` and a fresh Orthanc (with its
DICOMweb plugin) over DICOM (storescu). Each round asks both servers, in alternating order, for the same 1,000 random
frames over 6 keep-alive HTTP/1.1 connections (one lean client thread each, `KeepAlive`), one frame per request, as
``multipart/related; type="application/octet-stream"; transfer-syntax=*`` (the stored JPEG bytes); every answer is
checked byte for byte against the tile. Also measured: the opening of the slide (cold server: series metadata, then
the first 20 tiles of a viewport, as a viewer does), and all frames of a 100-frame ultrasound cine (JPEG baseline,
640x480) in one request and frame by frame. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from helpers import dcmtk  # noqa: E402
from helpers.orthanc import Orthanc, find_dicomweb_plugin, find_orthanc  # noqa: E402
from helpers.server import OpenPACSServer  # noqa: E402
from helpers.wsi import TILE, Slide, encode_jpeg, uid, write_big_slide  # noqa: E402

ACCEPT = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'


def first_part(body: bytes, content_type: str) -> bytes:
    """The payload of the first part of a multipart/related body (or the body itself)."""
    if not content_type.startswith("multipart/"):
        return body
    boundary = None
    for p in content_type.split(";"):
        k, _, v = p.strip().partition("=")
        if k.lower() == "boundary":
            boundary = v.strip('"')
    assert boundary, content_type
    start = body.index(b"\r\n\r\n") + 4
    end = body.index(b"\r\n--" + boundary.encode(), start)
    return body[start:end]


class KeepAlive:
    """One keep-alive HTTP/1.1 connection with as little client work as a request can have (a request written
    whole, the status line and headers parsed from one buffer, the body read to its Content-Length or through
    its chunks): a load generator's own cost must stay below the server's (http.client parses every header block
    with the email package, which cost ~0.65 ms a request here, more than half of the server's)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.head = f"Host: 127.0.0.1:{port}\r\nAccept: {ACCEPT}\r\n\r\n".encode()

    def _fill(self) -> None:
        chunk = self.sock.recv(262144)
        if not chunk:
            raise ConnectionError("server closed the connection")
        self.buf += chunk

    def _take(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _line(self) -> bytes:
        while (i := self.buf.find(b"\r\n")) < 0:
            self._fill()
        out, self.buf = self.buf[:i], self.buf[i + 2:]
        return out

    def get(self, path: str) -> tuple[int, str, bytes]:
        """(status, Content-Type, body) of GET ``path``."""
        self.sock.sendall(b"GET " + path.encode() + b" HTTP/1.1\r\n" + self.head)
        while (end := self.buf.find(b"\r\n\r\n")) < 0:
            self._fill()
        lines = self.buf[:end].decode("latin-1").split("\r\n")
        self.buf = self.buf[end + 4:]
        status = int(lines[0].split(" ", 2)[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
        if "content-length" in headers:
            body = self._take(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            pieces = []
            while size := int(self._line().split(b";")[0], 16):
                pieces.append(self._take(size))
                self._take(2)
            while self._line():  # trailers, then the empty line
                pass
            body = b"".join(pieces)
        else:
            raise SystemExit(f"GET {path}: a response without a length ({headers})")
        return status, headers.get("content-type", ""), body

    def close(self) -> None:
        self.sock.close()


def fetch_tiles(port: int, base: str, frames: list[int], connections: int, expect: dict[int, bytes]) -> float:
    """Seconds to fetch ``frames`` over ``connections`` keep-alive connections; every body checked."""
    lock = threading.Lock()
    queue = list(frames)
    errors: list[str] = []

    def worker() -> None:
        conn = KeepAlive(port)
        try:
            while True:
                with lock:
                    if not queue:
                        return
                    n = queue.pop()
                status, ctype, body = conn.get(f"{base}/frames/{n}")
                if status != 200:
                    errors.append(f"frame {n}: HTTP {status} {body[:200]!r}")
                    return
                data = first_part(body, ctype)
                if data.rstrip(b"\0") != expect[n].rstrip(b"\0"):
                    errors.append(f"frame {n}: {len(data)} bytes differ from the tile ({len(expect[n])})")
                    return
        finally:
            conn.close()

    threads = [threading.Thread(target=worker) for _ in range(connections)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise SystemExit("tile check failed: " + "; ".join(errors[:5]))
    return elapsed


def get(port: int, path: str, accept: str) -> tuple[float, bytes, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    t0 = time.perf_counter()
    conn.request("GET", path, headers={"Accept": accept})
    r = conn.getresponse()
    body = r.read()
    dt = time.perf_counter() - t0
    conn.close()
    if r.status != 200:
        raise SystemExit(f"GET {path}: HTTP {r.status} {body[:300]!r}")
    return dt, body, r.getheader("Content-Type", "")


def write_cine(path: Path, n_frames: int = 100) -> list[bytes]:
    """A synthetic 100-frame US cine, JPEG baseline 640x480 YBR_FULL_422; returns the stored frames."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    frames = []
    y, x = np.mgrid[0:480, 0:640]
    for i in range(n_frames):
        img = np.zeros((480, 640, 3), np.uint8)
        img[..., 0] = (x + i * 6) % 256
        img[..., 1] = (y + i * 3) % 256
        img[..., 2] = ((x // 40 + y // 40 + i) % 2) * 200
        f = encode_jpeg(img, 85)
        frames.append(f + b"\0" if len(f) & 1 else f)
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.3.1"
    ds.SOPInstanceUID = uid("cine", "sop")
    ds.StudyInstanceUID = uid("cine", "study")
    ds.SeriesInstanceUID = uid("cine", "series")
    ds.PatientName, ds.PatientID, ds.Modality = "Cine^US", "US-CINE-1", "US"
    ds.StudyDate, ds.StudyTime = "20260101", "120000"
    ds.SeriesNumber = ds.InstanceNumber = 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "YBR_FULL_422", 0
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 480, 640, 8, 8, 7, 0
    ds.NumberOfFrames, ds.FrameTime, ds.FrameIncrementPointer = n_frames, 33.3, 0x00181063
    ds.LossyImageCompression = "01"
    ds.PixelData = encapsulate(frames, has_bot=True)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.file_meta = meta
    ds.save_as(path, enforce_file_format=True)
    return frames


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiles", type=int, default=1000)
    ap.add_argument("--connections", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--across", type=int, default=224, help="tiles across and down (224 -> 50,176 tiles)")
    ap.add_argument("--no-orthanc", action="store_true")
    ap.add_argument("--workers", type=int, default=0, help="openpacs serve --workers (0: its default)")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="wsi-bench-"))
    servers: list[object] = []
    try:
        slide_path = tmp / "slide.dcm"
        t0 = time.perf_counter()
        slide = write_big_slide(slide_path, tiles_across=args.across, tiles_down=args.across)
        n_tiles = args.across * args.across
        print(f"slide: {n_tiles} tiles, {slide_path.stat().st_size / 1e6:.0f} MB, written in "
              f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
        cine_path = tmp / "cine.dcm"
        cine_frames = write_cine(cine_path)

        expect = {n: slide.tile(0, (n - 1) % args.across, (n - 1) // args.across) for n in range(1, n_tiles + 1)}
        base = (f"/dicom-web/studies/{slide.study_uid}/series/{slide.series_uid}/instances/{slide.sop_uid(0)}")
        cine_base = f"/dicom-web/studies/{uid('cine', 'study')}/series/{uid('cine', 'series')}/instances/" + uid(
            "cine", "sop")

        settings: dict[str, object] = {}
        if args.workers:
            settings["workers"] = args.workers
        op = OpenPACSServer(tmp / "openpacs", settings=settings).start()
        servers.append(op)
        targets: dict[str, int] = {}
        res = dcmtk.store(op.dicom_port, [slide_path, cine_path], "-R", "-xy", aet="OPENPACS")
        assert res.returncode == 0, res.output if hasattr(res, "output") else res
        # a cold server opening the slide: restart, so nothing of the slide is cached
        op.stop()
        op.start()
        targets["openpacs"] = op.http_port
        if not args.no_orthanc and find_orthanc() and find_dicomweb_plugin():
            orth = Orthanc(tmp / "orthanc", dicomweb_plugin=find_dicomweb_plugin()).start()
            servers.append(orth)
            for p in (slide_path, cine_path):
                orth.upload(p.read_bytes())
            targets["orthanc"] = orth.http_port

        results: dict[str, dict[str, float]] = {k: {} for k in targets}
        for name, port in targets.items():
            r = results[name]
            series = f"/dicom-web/studies/{slide.study_uid}/series/{slide.series_uid}"
            dt_meta, body, _ = get(port, series + "/metadata", "application/dicom+json")
            r["open_metadata_s"] = dt_meta
            r["metadata_bytes"] = len(body)
            t0 = time.perf_counter()
            centre = args.across // 2
            viewport = [(centre + dr) * args.across + centre + dc + 1 for dr in range(-2, 2) for dc in range(-2, 3)]
            r["open_first_tiles_s"] = fetch_tiles(port, base, viewport, args.connections, expect)
            r["open_total_s"] = time.perf_counter() - t0 + dt_meta
            dt_cine, body, ctype = get(port, cine_base + "/frames/" + ",".join(str(i) for i in range(1, 101)), ACCEPT)
            r["cine_all_frames_one_request_s"] = dt_cine
            assert body.count(cine_frames[-1]) == 1 and body.count(cine_frames[0]) == 1, "cine frames missing"
            t0 = time.perf_counter()
            fetch_tiles(port, cine_base, list(range(1, 101)), args.connections,
                        {i + 1: f for i, f in enumerate(cine_frames)})
            r["cine_100_frames_6conn_s"] = time.perf_counter() - t0

        rng = random.Random(15)
        rates: dict[str, list[float]] = {k: [] for k in targets}
        for rnd in range(args.rounds):
            frames = [rng.randint(1, n_tiles) for _ in range(args.tiles)]
            order = list(targets) if rnd % 2 == 0 else list(targets)[::-1]
            for name in order:
                dt = fetch_tiles(targets[name], base, frames, args.connections, expect)
                rates[name].append(args.tiles / dt)
        for name in targets:
            results[name]["tiles_per_s"] = statistics.median(rates[name])
            results[name]["tiles_per_s_rounds"] = [round(x) for x in rates[name]]  # type: ignore[assignment]

        print(f"{'':32} " + " ".join(f"{k:>12}" for k in targets))
        for key in ("tiles_per_s", "open_metadata_s", "metadata_bytes", "open_first_tiles_s", "open_total_s",
                    "cine_all_frames_one_request_s", "cine_100_frames_6conn_s"):
            print(f"{key:32} " + " ".join(f"{results[k][key]:>12.3f}" for k in targets))
        out: dict[str, object] = {"tiles": n_tiles, "tile_size": TILE, "requests": args.tiles,
                                  "connections": args.connections, "results": results}
        if "orthanc" in results:
            out["ratio_tiles_per_s"] = results["openpacs"]["tiles_per_s"] / results["orthanc"]["tiles_per_s"]
            print(f"ratio tiles/s openpacs/orthanc: {out['ratio_tiles_per_s']:.2f}")
        print(json.dumps(out))
        return 0
    finally:
        for s in servers[::-1]:
            try:
                s.stop()  # type: ignore[attr-defined]
            except Exception as exc:  # noqa: BLE001
                print(f"stop: {exc}", file=sys.stderr)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    _ = Slide  # re-exported for interactive use
    sys.exit(main())
