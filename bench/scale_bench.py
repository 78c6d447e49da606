"""The index at a million instances (issue 16): bulk-load PostgreSQL, then QIDO-RS and C-FIND latencies.

1. A throw-away PostgreSQL cluster (initdb + pg_ctl, tests/helpers/pg.py, with the settings printed below), the
   OpenPACS schema by the project's migrations (Index.migrate).
2. N synthetic instances through the ingest service's bulk path (services/bulk.py, COPY in chunks), named as
   ../shared/bench/gen_dataset.py names its corpus (PatientID BP%05d, PatientName BENCH^PATIENT%04d,
   AccessionNumber ACC%06d, StudyDate 20260101, UIDs from the same entropy strings), so that
   ../shared/bench/query_bench.py's queries find what they look for. Every row points at one shared tiny DICOM blob
   in the filesystem store (see services/bulk.py: no benchmarked query reads a blob). Then ANALYZE (what
   autovacuum would have done by the time anyone queries a million instances).
3. ``openpacs serve --index postgresql://...`` on that index, and query_bench.py against it; its JSON is printed.
   With --explain, EXPLAIN ANALYZE of the SQL the query engine compiles for each QIDO query is printed too.

Run: .venv/bin/python bench/scale_bench.py [--instances 1000000] [--studies 20000] [--series 5] [--explain]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "src"))
from helpers.pg import PostgresCluster, find_pg_bindir  # noqa: E402
from helpers.server import OpenPACSServer  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from openpacs.index.db import Index  # noqa: E402
from openpacs.index.writer import NewInstance  # noqa: E402
from openpacs.services.bulk import BulkLoader  # noqa: E402

QUERY_BENCH = ROOT.parent / "shared" / "bench" / "query_bench.py"
CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
# a 2-core, 24 GB machine: memory for the cache, WAL sized so that a bulk load does not checkpoint every few seconds
PG_SETTINGS = {
    "shared_buffers": "2GB",
    "effective_cache_size": "8GB",
    "work_mem": "16MB",
    "maintenance_work_mem": "512MB",
    "max_wal_size": "8GB",
    "checkpoint_timeout": "30min",
    "random_page_cost": "1.1",
    "max_connections": "100",
    "fsync": "on",
    "synchronous_commit": "on",
}


class BenchCluster(PostgresCluster):
    """tests/helpers/pg.py's cluster with this benchmark's settings instead of the test suite's."""

    def start(self) -> None:
        self._cmd(str(self.bindir / "initdb"), "-D", str(self.datadir), "-U", self.superuser, "--auth=trust",
                  "--encoding=UTF8", "--no-sync")
        opts = f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.root} " + " ".join(
            f"-c {k}={v}" for k, v in PG_SETTINGS.items())
        try:
            self._cmd(str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-l", str(self.logfile), "-o", opts, "-w",
                      "-t", "120", "start")
        except subprocess.CalledProcessError as e:
            log = self.logfile.read_text(errors="replace") if self.logfile.exists() else ""
            raise RuntimeError(f"pg_ctl start failed: {e.stdout}\n{e.stderr}\n{log}") from e
        self._wait_ready()


def shared_blob(data_dir: Path) -> tuple[str, int]:
    """One tiny real CT instance in the server's filesystem store; every bulk row points at it."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.filebase import DicomBytesIO

    from openpacs.storage import FilesystemBlobStore

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["scale-bench-shared-blob"])
    meta.TransferSyntaxUID = EXPLICIT_VR_LE
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CT, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.Modality = "BENCH^SHARED", "SHARED", "CT"
    ds.Rows = ds.Columns = 2
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = bytes(8)
    buf = DicomBytesIO()
    ds.save_as(buf, enforce_file_format=True)
    store = FilesystemBlobStore(str(data_dir / "blobs"))
    blob = store.put([buf.getvalue()])
    store.sync_pending()
    return blob.key, blob.size


def corpus(n_studies: int, n_series: int, per_series: int, blob_key: str, size: int) -> Iterator[NewInstance]:
    """gen_dataset.py's corpus, as the index stores it (dicom.header.index_values' columns)."""
    for s in range(n_studies):
        name = f"BENCH^PATIENT{s:04d}"
        pv = {"patient_id": f"BP{s:05d}", "patient_name": name, "patient_name_norm": name.upper(),
              "patient_birth_date": "19700101", "patient_sex": "O"}
        stv = {"study_instance_uid": generate_uid(entropy_srcs=[f"study{s}"]), "study_date": "20260101",
               "study_time": "120000", "accession_number": f"ACC{s:06d}", "study_description": "BENCH CT",
               "referring_physician_name": "REF^DOC", "referring_physician_name_norm": "REF^DOC", "study_id": str(s)}
        for se in range(n_series):
            sv = {"series_instance_uid": generate_uid(entropy_srcs=[f"series{s}.{se}"]), "modality": "CT",
                  "series_number": str(se + 1), "series_description": f"SERIES {se}"}
            for i in range(per_series):
                iv = {"sop_instance_uid": generate_uid(entropy_srcs=[f"sop{s}.{se}.{i}"]), "sop_class_uid": CT,
                      "instance_number": str(i + 1), "rows": 512, "columns": 512, "bits_allocated": 16}
                yield NewInstance(values={"PATIENT": pv, "STUDY": stv, "SERIES": sv, "IMAGE": iv}, blob_key=blob_key,
                                  size=size, sha256="0" * 64, transfer_syntax_uid=EXPLICIT_VR_LE,
                                  calling_aet="BENCHSCU", source="BULK")


def explain(url: str, n_studies: int) -> None:
    """EXPLAIN ANALYZE of the statements the query engine compiles for query_bench.py's QIDO queries."""
    import psycopg
    from sqlalchemy.dialects import postgresql

    from openpacs.dicomweb.qido import STUDY_DEFAULTS
    from openpacs.index.query import attributes_for, compile_query
    from openpacs.services.types import Query

    attrs = {a.keyword: a for a in attributes_for("STUDY")}
    sel = [attrs[k] for k in STUDY_DEFAULTS if k in attrs]
    cases = {
        "qido_pid": Query(level="STUDY", filters={"PatientID": f"BP{n_studies // 3:05d}"}),
        "qido_name_prefix": Query(level="STUDY", filters={"PatientName": f"*PATIENT{n_studies // 30:03d}*"}, limit=100),
        "qido_acc": Query(level="STUDY", filters={"AccessionNumber": f"ACC{n_studies // 3:06d}"}),
        "qido_page": Query(level="STUDY", limit=100, offset=max(0, n_studies - 200)),
        "qido_date": Query(level="STUDY", filters={"StudyDate": "20251201-20260201"}, limit=100),
        "cfind_pid": Query(level="STUDY", filters={"PatientID": f"BP{n_studies // 3:05d}", "StudyInstanceUID": ""}),
    }
    with psycopg.connect(url) as conn:
        for name, q in cases.items():
            cq = compile_query(q, sel)
            sql = str(cq.statement.compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True}))
            plan = conn.execute("EXPLAIN (ANALYZE, BUFFERS) " + sql).fetchall()
            print(f"--- {name}\n{sql}\n" + "\n".join(r[0] for r in plan), flush=True)


def _dcmtk(tool: str) -> str:
    """DCMTK's own tool (pynetdicom puts slower look-alikes into a venv's bin), as query_bench.py picks it."""
    for d in ("/usr/bin", "/usr/local/bin"):
        if os.access(os.path.join(d, tool), os.X_OK):
            return os.path.join(d, tool)
    return tool


def _timed(argv: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(argv, check=True, env=dict(os.environ, TCP_NODELAY="1"), stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return (time.perf_counter() - t) * 1000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--instances", type=int, default=1_000_000)
    p.add_argument("--studies", type=int, default=20_000)
    p.add_argument("--series", type=int, default=5, help="series per study")
    p.add_argument("--batch", type=int, default=20_000, help="instances per bulk transaction")
    p.add_argument("--explain", action="store_true", help="print EXPLAIN ANALYZE of the QIDO queries' SQL")
    p.add_argument("--no-serve", action="store_true", help="load (and explain) only")
    a = p.parse_args()
    per_series = a.instances // (a.studies * a.series)
    if per_series < 1 or per_series * a.studies * a.series != a.instances:
        p.error("--instances must be a multiple of --studies x --series")
    bindir = find_pg_bindir()
    if bindir is None:
        sys.exit("PostgreSQL server binaries not found (apt-get install postgresql)")
    cluster = BenchCluster(bindir)
    cluster.start()
    tmp = Path(tempfile.mkdtemp(prefix="openpacs-scale-"))
    server = None
    try:
        url = cluster.create_database("scale")
        version = subprocess.run([str(bindir / "postgres"), "--version"], capture_output=True, text=True).stdout.strip()
        print(json.dumps({"postgres": version, "settings": PG_SETTINGS}), flush=True)
        index = Index(url)
        index.migrate()
        data_dir = tmp / "data"
        key, size = shared_blob(data_dir)

        def progress(stats, elapsed):
            if stats.batches % 10 == 0:
                print(f"  {stats.instances:>9,} instances  {elapsed:7.1f} s  {stats.instances / elapsed:8.0f}/s",
                      flush=True)

        t0 = time.perf_counter()
        stats = BulkLoader(index, batch_size=a.batch).load(corpus(a.studies, a.series, per_series, key, size), progress)
        load_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        with index.write_engine.connect() as c:
            c.exec_driver_sql("COMMIT")
            c.exec_driver_sql("ANALYZE")
        analyze_s = time.perf_counter() - t1
        counts = index.counts()
        with index.engine.connect() as c:
            db_size = c.exec_driver_sql("SELECT pg_size_pretty(pg_database_size(current_database()))").scalar()
        index.close()
        print(json.dumps({"load": {"instances": stats.instances, "studies": stats.studies, "series": stats.series,
                                   "patients": stats.patients, "seconds": round(load_s, 1),
                                   "instances_per_s": round(stats.instances / load_s), "analyze_s": round(analyze_s, 1),
                                   "counts": counts, "database_size": db_size}}), flush=True)
        if a.explain:
            explain(url, a.studies)
        if a.no_serve:
            return
        server = OpenPACSServer(data_dir, index_url=url, aet="OPENPACS", startup_timeout=300)
        t2 = time.perf_counter()
        server.start()
        print(json.dumps({"serve_start_s": round(time.perf_counter() - t2, 1)}), flush=True)
        res = subprocess.run([sys.executable, str(QUERY_BENCH), "--port", str(server.dicom_port), "--aet", "OPENPACS",
                              "--web", f"http://127.0.0.1:{server.http_port}/dicom-web", str(a.studies)],
                             capture_output=True, text=True, env=dict(os.environ, TCP_NODELAY="1"), timeout=1800)
        if res.returncode != 0:
            print(res.stdout, res.stderr, server.log_tail(4000), sep="\n")
            sys.exit(res.returncode)
        medians = json.loads(res.stdout.strip().splitlines()[-1])
        # the floor under cfind_pid_ms: a DCMTK process, an association and a C-ECHO, no query at all
        echo = [
            _timed([_dcmtk("echoscu"), "-aec", "OPENPACS", "-aet", "BENCHSCU", "127.0.0.1", str(server.dicom_port)])
            for _ in range(20)
        ]
        medians["echoscu_floor_ms"] = round(statistics.median(echo), 2)
        print(json.dumps({"query_bench": medians, "instances": stats.instances, "studies": a.studies,
                          "over_20ms": [k for k, v in medians.items() if v > 20 and k != "echoscu_floor_ms"]}), flush=True)
    finally:
        if server is not None and server.running:
            server.stop()
        cluster.stop()
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
