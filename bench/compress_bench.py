"""Compression at rest (issue 14): does background compression lower the concurrent ingest rate? Target: by no more
than 25 %.

ingest_4 (N 512 KB CT instances dealt over 4 parallel DCMTK storescu, as in compare.py / route_bench.py) into two
servers that both hold the same backlog of B natively encoded instances:
  off   compress = ""                  nothing runs in the background;
  on    compress = "jpeg-ls-lossless"  (compress_after_days = 0, checked every second): a compress job over the
        backlog is running when the timed ingest starts, and the new instances are queued for compression as they
        arrive (the job's encode + pixel-exact verification runs in its own niced process).
The compressor yields to ingest (services/compression.py ``Compressor``: it waits while stores are being
acknowledged), so it compresses slowly during the ingest and catches up afterwards. Rounds alternate the two sides on
fresh data directories. Also reported: the compression rate during the ingest
and the saving over the backlog.

Run:  .venv/bin/python bench/compress_bench.py [--rounds 3] [--instances 1000] [--backlog 600]
      [--shared /work/shared/bench] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from helpers.server import OpenPACSServer, stop_cleanly  # noqa: E402
from route_bench import dataset, http, storescu_parallel  # noqa: E402


def compression(s, base: str) -> dict:
    return s.get(f"{base}/api/storage/compression", timeout=60).json()


def running_compress(s, base: str) -> bool:
    jobs = s.get(f"{base}/api/jobs", params={"kind": "compress", "state": "running"}, timeout=60).json()["items"]
    return bool(jobs)


def one_round(tmp: Path, backlog: list[str], files: list[str], on: bool) -> dict[str, float]:
    data = tmp / ("on" if on else "off")
    settings: dict[str, object] = {"scrub_interval_hours": 0, "retention_interval_hours": 0}
    srv = OpenPACSServer(data, settings=dict(settings))
    srv.start()
    storescu_parallel(srv.dicom_port, srv.aet, backlog)  # the backlog, stored before compression is on
    stop_cleanly(srv)
    if on:
        settings.update({"compress": "jpeg-ls-lossless", "compress_after_days": 0, "storage_check_seconds": 1,
                         "compress_batch": 100000})
    srv = OpenPACSServer(data, settings=settings)  # the same data directory, new ports
    srv.start()
    base = f"http://127.0.0.1:{srv.http_port}"
    s = http()
    out: dict[str, float] = {}
    try:
        if on:
            deadline = time.monotonic() + 120
            while not running_compress(s, base):
                if time.monotonic() > deadline:
                    raise RuntimeError("no compress job started\n" + srv.log_tail(3000))
                time.sleep(0.2)
            time.sleep(1.0)  # the worker process is up and encoding
            before = compression(s, base)["compressed"]
        dt = storescu_parallel(srv.dicom_port, srv.aet, files)
        out["ingest_inst_s"] = len(files) / dt
        if on:
            after = compression(s, base)
            out["compressed_during_ingest"] = after["compressed"] - before
            out["compress_inst_s"] = (after["compressed"] - before) / dt
            out["still_compressing"] = running_compress(s, base)
            out["saving_ratio"] = after["ratio"] or 0.0
    finally:
        stop_cleanly(srv)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--instances", type=int, default=1000)
    p.add_argument("--backlog", type=int, default=600)
    p.add_argument("--shared", default="/work/shared/bench")
    p.add_argument("--json")
    a = p.parse_args()
    cache = Path(tempfile.gettempdir()) / "pacs-bench-data"
    allfiles = dataset(Path(a.shared), cache, a.instances + a.backlog)
    backlog, files = allfiles[: a.backlog], allfiles[a.backlog:]
    results: dict[str, list[dict[str, float]]] = {"off": [], "on": []}
    for r in range(a.rounds):
        order = (False, True) if r % 2 == 0 else (True, False)
        for on in order:
            with tempfile.TemporaryDirectory(prefix="openpacs-compress-bench-") as tmp:
                res = one_round(Path(tmp), backlog, files, on)
            results["on" if on else "off"].append(res)
            print(f"round {r + 1} compress {'on ' if on else 'off'}: " + ", ".join(f"{k} {v:.2f}" if isinstance(
                v, float) else f"{k} {v}" for k, v in res.items()), flush=True)
    off = statistics.median(x["ingest_inst_s"] for x in results["off"])
    on = statistics.median(x["ingest_inst_s"] for x in results["on"])
    ratio = on / off
    summary = {"ingest_4_off_inst_s": round(off, 1), "ingest_4_on_inst_s": round(on, 1),
               "ratio": round(ratio, 3), "lowered_by_percent": round(100 * (1 - ratio), 1),
               "target": "lowered by <= 25 %", "met": ratio >= 0.75,
               "compress_inst_s_during_ingest": round(statistics.median(
                   x["compress_inst_s"] for x in results["on"]), 1), "rounds": results}
    print(json.dumps({k: v for k, v in summary.items() if k != "rounds"}, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
