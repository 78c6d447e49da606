"""HL7 ADT ingest: messages/s over N MLLP connections against a real `openpacs serve`, each message acknowledged
only after its commit (the listener's group commit: one transaction per group, a savepoint per message).

Starts the server as a subprocess on free ports (SQLite index by default, ``--index postgresql://...`` for
PostgreSQL), sends ``--messages`` ADT^A08/A04 messages spread over ``--connections`` asyncio MLLP connections
(python-hl7's ``open_hl7_connection``), each connection waiting for its ACK before the next message (the MLLP
original mode a RIS or an interface engine uses), and checks every ACK is AA and every patient applied.

Run: .venv/bin/python bench/hl7_bench.py [--messages 20000] [--connections 4] [--patients 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import hl7
import hl7.mllp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers.server import OpenPACSServer  # noqa: E402


def message(i: int, patients: int) -> str:
    pid = f"BENCH{i % patients:06d}"
    trigger = "A04" if i < patients else "A08"
    return (f"MSH|^~\\&|RIS|HOSP|OPENPACS|RAD|20250101120000||ADT^{trigger}^ADT_A01|B{i}|P|2.5|||||||UNICODE UTF-8\r"
            f"EVN|{trigger}|20250101120000\r"
            f"PID|1||{pid}^^^HOSP^MR~N{i}^^^NHS^NH||Müller{i}^Anna^M^^Dr||19{i % 90 + 10:02d}0101|F|||"
            f"Street {i}^^Town^^12345\rPV1|1|O|RAD^^^HOSP\r")


async def connection(port: int, items: list[int], patients: int) -> list[str]:
    """One MLLP connection (python-hl7's asyncio streams): the messages are encoded before the clock starts and
    the ACK's MSA-1 is read from its bytes, so that the client's CPU (on the same machine) stays out of the way."""
    reader, writer = await hl7.mllp.open_hl7_connection("127.0.0.1", port, encoding="utf-8")
    blocks = [message(i, patients).encode() for i in items]
    codes = []
    try:
        for block in blocks:
            writer.writeblock(block)
            await writer.drain()
            ack = await reader.readblock()
            codes.append(ack.split(b"\rMSA|", 1)[1][:2].decode())
    finally:
        writer.close()
        await writer.wait_closed()
    return codes


async def run(port: int, n: int, conns: int, patients: int) -> tuple[float, list[str]]:
    chunks = [list(range(c, n, conns)) for c in range(conns)]
    t0 = time.perf_counter()
    results = await asyncio.gather(*(connection(port, ch, patients) for ch in chunks))
    return time.perf_counter() - t0, [c for r in results for c in r]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--connections", type=int, default=4)
    ap.add_argument("--patients", type=int, default=2000)
    ap.add_argument("--index", default=None, help="index URL (default: SQLite in a temporary data directory)")
    ap.add_argument("--postgresql", action="store_true", help="start a throw-away PostgreSQL cluster (initdb)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="hl7bench-"))
    cluster = None
    if args.postgresql:
        from helpers.pg import PostgresCluster, find_pg_bindir

        bindir = find_pg_bindir()
        assert bindir is not None, "PostgreSQL binaries not found"
        cluster = PostgresCluster(bindir)
        cluster.start()
        args.index = cluster.create_database("hl7bench")
    server = OpenPACSServer(tmp / "data", index_url=args.index, settings={"log_level": "WARNING"})
    server.start()
    try:
        # warm-up: creates the patients (A04) outside the timed run
        asyncio.run(run(server.hl7_port, args.patients, args.connections, args.patients))
        elapsed, codes = asyncio.run(run(server.hl7_port, args.messages, args.connections, args.patients))
        # the timed run's control IDs overlap the warm-up's for i < patients: those are duplicates (first ACK)
        bad = [c for c in codes if c != "AA"]
        rate = len(codes) / elapsed
        print(f"{len(codes)} ADT messages over {args.connections} MLLP connections in {elapsed:.2f} s: "
              f"{rate:,.0f} msg/s ({server.backend}); non-AA ACKs: {len(bad)}")
        if server.backend == "sqlite":
            with sqlite3.connect(tmp / "data" / "index.sqlite") as db:
                logged = db.execute("SELECT count(*) FROM hl7_messages").fetchone()[0]
                named = db.execute("SELECT count(*) FROM patients WHERE patient_id LIKE 'BENCH%'").fetchone()[0]
            print(f"log rows: {logged}, patients: {named}")
            assert named == args.patients
        return 0 if not bad else 1
    finally:
        server.stop()
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
