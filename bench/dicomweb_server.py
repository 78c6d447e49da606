#!/usr/bin/env python3
"""Server-side DICOMweb figures, Orthanc vs OpenPACS, alternating fresh servers (what compare.py's client hides).

compare.py's STOW client builds every request body inside the timed loop, and its WADO client is a fresh `requests`
process timed over 5 requests: in that regime the client itself (glibc growing its heap for 2 x 26 MB per request)
costs ~50-65 ms per series, about what either server needs. This script takes the client out of the figure:
  stow_ms     one 50-instance (26 MB) STOW-RS request, body built beforehand (median over 20 distinct requests)
  wado_ms     WADO-RS of one 50-instance series with a warmed-up `requests` session (median of 15, after 5 warm-up)
  wado_curl_ms  the same with curl (median of 15)
usage: bench/dicomweb_server.py [--rounds 3] [--dataset /tmp/pacs-bench-data/ct-1000] [--shared ../shared/bench]
The dataset comes from compare.py's cache (or ../shared/bench/gen_dataset.py OUT 10 2 50).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import requests
from pydicom import dcmread

HERE = os.path.dirname(os.path.abspath(__file__))
ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
BOUNDARY = b"benchboundary"


def bodies(files: list[str], batch: int = 50) -> list[bytes]:
    out = []
    for i in range(0, len(files), batch):
        parts = [b"--" + BOUNDARY + b"\r\nContent-Type: application/dicom\r\n\r\n" + open(f, "rb").read() + b"\r\n"
                 for f in files[i:i + batch]]
        out.append(b"".join(parts) + b"--" + BOUNDARY + b"--\r\n")
    return out


def ms(fn) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1000


def measure(web: str, posts: list[bytes], study: str, series: str) -> dict[str, float]:
    s = requests.Session()
    ctype = f'multipart/related; type="application/dicom"; boundary={BOUNDARY.decode()}'

    def post(body: bytes) -> None:
        r = s.post(web + "/studies", data=body, headers={"Content-Type": ctype, "Accept": "application/dicom+json"})
        r.raise_for_status()

    stow = [ms(lambda b=b: post(b)) for b in posts]  # type: ignore[misc]
    url = f"{web}/studies/{study}/series/{series}"

    def get() -> None:
        r = s.get(url, headers={"Accept": ACCEPT})
        r.raise_for_status()
        assert len(r.content) > 1_000_000

    for _ in range(5):
        get()
    wado = [ms(get) for _ in range(15)]
    curl = []
    for _ in range(15):
        out = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{time_total}", "-H", f"Accept: {ACCEPT}", url],
                             capture_output=True, text=True, check=True)
        curl.append(float(out.stdout) * 1000)
    return {"stow_ms": statistics.median(stow), "wado_ms": statistics.median(wado),
            "wado_curl_ms": statistics.median(curl)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dataset", default="/tmp/pacs-bench-data/ct-1000")
    p.add_argument("--shared", default=os.path.join(HERE, "..", "..", "shared", "bench"))
    openpacs = os.path.join(os.path.dirname(sys.executable), "openpacs")
    p.add_argument("--project-cmd", default=f"{openpacs} serve --data-dir {{data}} "
                   "--dicom-port {dicom_port} --http-port {http_port} --aet {aet}")
    a = p.parse_args()
    sys.path.insert(0, os.path.abspath(a.shared))
    from compare import Server  # the same server set-up as the shared benchmark

    files = sorted(os.path.join(a.dataset, f) for f in os.listdir(a.dataset))
    posts = bodies(files)
    first = dcmread(files[0], stop_before_pixels=True)
    results: dict[str, list[dict[str, float]]] = {"orthanc": [], "project": []}
    for _ in range(a.rounds):
        for kind in results:
            with Server(kind, a.project_cmd) as srv:
                results[kind].append(measure(srv.web, posts, first.StudyInstanceUID, first.SeriesInstanceUID))
    summary = {}
    for key in ("stow_ms", "wado_ms", "wado_curl_ms"):
        o = statistics.median(r[key] for r in results["orthanc"])
        q = statistics.median(r[key] for r in results["project"])
        summary[key] = {"orthanc": round(o, 1), "project": round(q, 1), "better_x": round(o / q, 2)}
        print(f"{key:14} orthanc {o:8.1f}  openpacs {q:8.1f}  better x {o / q:5.2f}")
    print(json.dumps({"rounds": results, "summary": summary}))


if __name__ == "__main__":
    main()
