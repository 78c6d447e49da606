"""QC operations on two 1,000-instance studies (issue 14 target: a merge ≤ 2 s), in-process, on SQLite and on a
PostgreSQL cluster started for the run (``--pg``, Debian's postgresql binaries).

Both studies are ingested through the one ingest path (``IngestService.store_dataset``, as a C-STORE would), four
series of 250 instances each. Then timed, each through the REST API in-process (Starlette TestClient: the route, the
service transaction, the audit record; no network): merge study A into B, undo the merge, split 1,000 instances
(one by one named) of B off into a new study, undo the split; and the first read of a moved instance through
``RetrieveService.read_file`` (served with its new StudyInstanceUID). Run:
``.venv/bin/python bench/qc_bench.py [--instances 1000] [--pg]``
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from starlette.testclient import TestClient

from openpacs.config import Settings
from openpacs.context import build_context
from openpacs.services.types import Source
from openpacs.web.app import build_app

CT = "1.2.840.10008.5.1.4.1.1.2"


def dataset(study: str, series: str, pid: str, n: int) -> bytes:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = CT, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.PatientID, ds.PatientName, ds.Modality, ds.InstanceNumber = pid, "Bench^QC", "CT", n
    ds.StudyDescription = "bench"
    ds.Rows = ds.Columns = 8
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.PixelRepresentation, ds.SamplesPerPixel = 15, 0, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = bytes(128)
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue()


def ingest(ctx, n: int, pid: str) -> tuple[str, list[str]]:
    study = generate_uid()
    sops = []
    per = max(1, n // 4)
    src = Source(protocol="BENCH", calling_aet="BENCH")
    series = generate_uid()
    for i in range(n):
        if i and i % per == 0:
            series = generate_uid()
        data = dataset(study, series, pid, i + 1)
        ds = dcmread(io.BytesIO(data), force=True)
        r = ctx.ingest.store_dataset([data], ExplicitVRLittleEndian, CT, str(ds.SOPInstanceUID), src)
        assert r.status == 0, r
        sops.append(str(ds.SOPInstanceUID))
    return study, sops


def timed(label: str, fn, results: dict[str, float]):  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    out = fn()
    results[label] = time.perf_counter() - t0
    return out


def run(index_url: str | None, data: Path, n: int) -> dict[str, float]:
    settings = Settings(data_dir=data, **({"index_url": index_url} if index_url else {}))
    ctx = build_context(settings)
    try:
        t0 = time.perf_counter()
        a, _ = ingest(ctx, n, "BENCHA")
        b, b_sops = ingest(ctx, n, "BENCHB")
        print(f"  ingested 2 x {n} instances in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        client = TestClient(build_app(ctx))
        res: dict[str, float] = {}

        def post(path: str, body: dict) -> dict:
            r = client.post(f"/api{path}", json=body)
            assert r.status_code == 200, r.text
            return r.json()

        merge = timed("merge A into B (API)", lambda: post(f"/studies/{a}/merge", {"into": b}), res)
        one = ctx.retrieve.list_instances(b)[0]
        moved = [r for r in ctx.retrieve.list_instances(b) if r.qc_key is not None][0]
        served = timed("first read of a moved instance", lambda: ctx.retrieve.read_file(moved), res)
        assert dcmread(io.BytesIO(served)).StudyInstanceUID == b and one.study_instance_uid == b
        with ctx.index.engine.connect() as c:
            from sqlalchemy import select

            from openpacs.index.schema import studies
            ni = c.execute(select(studies.c.num_instances).where(studies.c.study_instance_uid == b)).scalar_one()
        assert ni == 2 * n, ni
        timed("undo the merge (API)", lambda: post(f"/qc/history/{merge['id']}/undo", {}), res)
        split = timed(f"split {n} named instances of B to a new study (API)",
                      lambda: post(f"/studies/{b}/split", {"instances": b_sops}), res)
        timed("undo the split (API)", lambda: post(f"/qc/history/{split['id']}/undo", {}), res)
        return res
    finally:
        ctx.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--instances", type=int, default=1000)
    ap.add_argument("--pg", action="store_true", help="also on a PostgreSQL cluster started for the run")
    args = ap.parse_args()
    backends: list[tuple[str, str | None]] = [("SQLite", None)]
    cluster = None
    if args.pg:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from helpers.pg import PostgresCluster, find_pg_bindir

        bindir = find_pg_bindir()
        assert bindir is not None, "no PostgreSQL binaries"
        cluster = PostgresCluster(bindir)
        cluster.start()
        backends.append(("PostgreSQL", cluster.create_database("qcbench")))
    try:
        for name, url in backends:
            with tempfile.TemporaryDirectory(prefix="qc-bench-") as d:
                print(f"{name}:", file=sys.stderr)
                for label, secs in run(url, Path(d) / "data", args.instances).items():
                    print(f"  {name:10s} {label:55s} {secs * 1000:8.1f} ms")
    finally:
        if cluster is not None:
            cluster.stop()


if __name__ == "__main__":
    main()
