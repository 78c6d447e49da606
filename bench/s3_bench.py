"""Ingest onto S3-compatible object storage vs onto the filesystem (issue 14: S3 >= 0.5x the filesystem).

N CT instances (512x512x16 bit, ~525 KB each, the shared gen_dataset.py) over 4 parallel DCMTK storescu processes into
a fresh `openpacs serve` (SQLite index) whose storage is (a) the filesystem store in its data dir, (b) moto's S3 server
(`ThreadedMotoServer`, in this process, on loopback over real HTTP; bucket emptied between rounds). Rounds alternate
the order of the two backends; the medians are reported. Every run checks that all N instances are indexed (and, on
S3, that the bucket holds N objects). CPU seconds of the server's process group and of moto (this process) are
reported per run: on a small machine the in-process S3 server competes with OpenPACS for the same cores, which a real
object store does not.

Run: .venv/bin/python bench/s3_bench.py [--rounds 3] [--instances 1000] [--shared /work/shared/bench] [--json OUT]
moto keeps objects in memory: about N x 0.5 MB of RAM per round.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from helpers.s3 import MotoS3  # noqa: E402
from helpers.server import OpenPACSServer  # noqa: E402
from route_bench import dataset, group_cpu, storescu_parallel  # noqa: E402


def indexed(srv: OpenPACSServer) -> int:
    r = requests.get(f"http://127.0.0.1:{srv.http_port}/api/stats", timeout=30)
    r.raise_for_status()
    body = r.json()
    return int(body.get("instances", body.get("counts", {}).get("instances", -1)))


def one_run(kind: str, files: list[str], moto: MotoS3, work: Path) -> dict:
    settings: dict[str, object] = {}
    bucket = ""
    if kind == "s3":
        bucket = moto.bucket()
        settings = {"storage_url": f"s3://{bucket}/bench", **moto.settings()}
    data = work / f"{kind}-{time.monotonic_ns()}"
    srv = OpenPACSServer(data / "data", settings=settings)
    srv.start()
    try:
        cpu0, own0 = group_cpu(srv.proc.pid), _own_cpu()
        dt = storescu_parallel(srv.dicom_port, srv.aet, files)
        cpu, moto_cpu = group_cpu(srv.proc.pid) - cpu0, _own_cpu() - own0
        n = indexed(srv)
        if n != len(files):
            raise RuntimeError(f"{kind}: {n} instances indexed of {len(files)}")
        if kind == "s3":
            objects = sum(p.get("KeyCount", 0) for p in moto.client().get_paginator("list_objects_v2")
                          .paginate(Bucket=bucket, Prefix="bench/"))
            if objects != len(files):
                raise RuntimeError(f"s3: {objects} objects for {len(files)} instances")
    finally:
        srv.stop()
        shutil.rmtree(data, ignore_errors=True)
        if kind == "s3":
            requests.post(f"{moto.url}/moto-api/reset", timeout=60)  # frees moto's memory
    return {"inst_s": round(len(files) / dt, 1), "seconds": round(dt, 2), "server_cpu_s": round(cpu, 1),
            "moto_cpu_s": round(moto_cpu, 1)}


def _own_cpu() -> float:
    """CPU seconds of this process: moto's server threads (the bench itself only waits for storescu)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--instances", type=int, default=1000)
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "bench")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    cache = Path(tempfile.gettempdir()) / "pacs-bench-data"
    files = dataset(a.shared, cache, a.instances)
    runs: dict[str, list[dict]] = {"fs": [], "s3": []}
    with MotoS3() as moto, tempfile.TemporaryDirectory(prefix="s3bench-") as tmp:
        for r in range(a.rounds):
            order = ("fs", "s3") if r % 2 == 0 else ("s3", "fs")
            for kind in order:
                res = one_run(kind, files, moto, Path(tmp))
                runs[kind].append(res)
                print(f"round {r + 1} {kind}: {res}", flush=True)
    med = {k: statistics.median(x["inst_s"] for x in v) for k, v in runs.items()}
    out = {"instances": a.instances, "associations": 4, "rounds": a.rounds, "runs": runs,
           "median_inst_s": med, "s3_over_fs": round(med["s3"] / med["fs"], 2)}
    print(json.dumps({"median_inst_s": med, "s3_over_fs": out["s3_over_fs"]}))
    if a.json:
        a.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
