#!/usr/bin/env python3
"""Small-instance ingest over several OpenPACS nodes on one PostgreSQL, against Orthanc + PostgreSQL (issue 16).

Both archives get the same corpus of small CT instances (../shared/bench/gen_dataset.py, 32x32 pixels, ~8 KB)
from 4 DCMTK storescu processes at once:

- OpenPACS: ``--nodes`` `openpacs serve` processes on one PostgreSQL database and one blob directory (the nodes of a
  cluster on one machine), storescu process i sending to node i mod N;
- Orthanc 1.10 with its PostgreSQL index plugin (files on disk), all storescu processes sending to it.

Each round uses fresh databases and storage, and the order of the two servers alternates between rounds; the
figure is instances per second over the wall time of the 4 senders. Prints one JSON line per round and the medians.

usage: bench/scale_ingest_bench.py [--studies 400] [--nodes 4] [--rounds 3] [--senders 4]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
SHARED = HERE.parent.parent / "shared" / "bench"

from helpers.orthanc import Orthanc  # noqa: E402
from helpers.pg import PostgresCluster, find_pg_bindir  # noqa: E402
from helpers.server import OpenPACSServer  # noqa: E402

ENV = dict(os.environ, TCP_NODELAY="1")
PG_PLUGIN = "/usr/share/orthanc/plugins/libOrthancPostgreSQLIndex.so"


def storescu() -> str:
    return "/usr/bin/storescu" if os.access("/usr/bin/storescu", os.X_OK) else "storescu"


def send(ports: list[int], aet: str, files: list[str], senders: int) -> float:
    """Wall time of ``senders`` storescu processes, process i sending files[i::senders] to ports[i % len(ports)]."""
    t = time.perf_counter()
    procs = [subprocess.Popen([storescu(), "-aec", aet, "-aet", "BENCHSCU", "127.0.0.1", str(ports[i % len(ports)]),
                               *files[i::senders]], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for i in range(senders)]
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"storescu failed: {err.decode()[-2000:]}")
    return time.perf_counter() - t


def run_openpacs(pg: PostgresCluster, work: Path, files: list[str], nodes: int, senders: int) -> dict:
    url = pg.create_database("bench")
    blobs = work / "shared-blobs"
    servers = [OpenPACSServer(work / f"node{i}", index_url=url,
                              settings={"storage_url": f"file://{blobs}", "dicom_workers": 1, "hl7_port": 0})
               for i in range(nodes)]
    try:
        servers[0].start()  # migrates the fresh index; the others start on it
        for s in servers[1:]:
            s.start()
        secs = send([s.dicom_port for s in servers], "OPENPACS", files, senders)
        import psycopg

        with psycopg.connect(url) as c:
            n = c.execute("SELECT count(*) FROM instances").fetchone()[0]
        assert n == len(files), f"OpenPACS indexed {n} of {len(files)}"
        return {"inst_s": round(len(files) / secs, 1), "secs": round(secs, 2)}
    finally:
        for s in servers:
            if s.running:
                s.stop()


def run_orthanc(pg: PostgresCluster, work: Path, files: list[str], senders: int) -> dict:
    url = pg.create_database("orthanc")
    db = url.rsplit("/", 1)[1]
    o = Orthanc(work / "orthanc", extra={
        "Plugins": [PG_PLUGIN],
        "PostgreSQL": {"EnableIndex": True, "EnableStorage": False, "Host": "127.0.0.1", "Port": pg.port,
                       "Database": db, "Username": pg.superuser, "Password": "", "Lock": False,
                       "EnableSsl": False},
        "ConcurrentJobs": 2,
    })
    o.start()
    try:
        secs = send([o.dicom_port], o.aet, files, senders)
        n = o.get("/statistics")["CountInstances"]
        assert n == len(files), f"Orthanc indexed {n} of {len(files)}"
        return {"inst_s": round(len(files) / secs, 1), "secs": round(secs, 2)}
    finally:
        o.stop()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--studies", type=int, default=400, help="studies of 5 small instances")
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--senders", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    if not Path(PG_PLUGIN).exists():
        sys.exit(f"{PG_PLUGIN} missing: apt-get install orthanc-postgresql")
    tmp = Path(tempfile.mkdtemp(prefix="scale-ingest-"))
    data = tmp / "data"
    subprocess.run([sys.executable, str(SHARED / "gen_dataset.py"), str(data), str(a.studies), "1", "5", "32"],
                   check=True, stdout=subprocess.DEVNULL)
    files = sorted(str(f) for f in data.rglob("*.dcm"))
    pg = PostgresCluster(find_pg_bindir())
    pg.start()
    rounds = []
    try:
        for r in range(a.rounds):
            order = ["openpacs", "orthanc"] if r % 2 == 0 else ["orthanc", "openpacs"]
            res = {}
            for kind in order:
                work = tmp / f"r{r}-{kind}"
                work.mkdir()
                res[kind] = (run_openpacs(pg, work, files, a.nodes, a.senders) if kind == "openpacs"
                             else run_orthanc(pg, work, files, a.senders))
                shutil.rmtree(work, ignore_errors=True)
            res["ratio"] = round(res["openpacs"]["inst_s"] / res["orthanc"]["inst_s"], 2)
            rounds.append(res)
            print(json.dumps({"round": r + 1, **res}), flush=True)
    finally:
        pg.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    ratios = [r["ratio"] for r in rounds]
    print(json.dumps({
        "instances": len(files), "nodes": a.nodes, "senders": a.senders, "cores": os.cpu_count(),
        "openpacs_inst_s": statistics.median(r["openpacs"]["inst_s"] for r in rounds),
        "orthanc_pg_inst_s": statistics.median(r["orthanc"]["inst_s"] for r in rounds),
        "ratio_median": statistics.median(ratios), "ratio_range": [min(ratios), max(ratios)],
    }))


if __name__ == "__main__":
    main()
