"""Console API at 100k studies (SQLite): server time of GET /api/studies at page 1 and page 1,000, of the audit
list at page 1 and 1,000 (100k events), and of the dashboard's two calls (/api/stats uncached + 24 h of activity).

Builds the index with bulk INSERTs of synthetic rows (not C-STOREs), then times the endpoint in-process through
Starlette's TestClient (server time, no network), walking cursors to page 1,000 with limit 50 (page 1,000 = rows
49,951-50,000). Run: .venv/bin/python bench/console_bench.py [--studies 100000] [--data DIR]
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import insert
from starlette.testclient import TestClient

from openpacs.config import Settings
from openpacs.context import build_context
from openpacs.index.admin_schema import activity
from openpacs.index.schema import patients, series, studies
from openpacs.index.security_schema import audit_events
from openpacs.web.app import build_app


def build(ctx, n: int) -> None:
    rnd = random.Random(1)
    t0 = datetime(2020, 1, 1, tzinfo=UTC)
    npat = n // 2
    with ctx.index.write_engine.begin() as c:
        c.execute(insert(patients), [dict(id=i + 1, patient_id=f"P{i:07d}", issuer_of_patient_id="",
                                          patient_name=f"NAME{i % 5000:04d}^GIVEN{i % 97}",
                                          patient_name_norm=f"NAME{i % 5000:04d}^GIVEN{i % 97}",
                                          num_studies=2, num_series=2, num_instances=20) for i in range(npat)])
        rows = []
        for i in range(n):
            rows.append(dict(id=i + 1, patient_fk=i % npat + 1, study_instance_uid=f"1.2.826.0.1.3680043.9.{i}",
                             study_date=(t0 + timedelta(days=rnd.randrange(2000))).strftime("%Y%m%d"),
                             study_time="120000", accession_number=f"A{i:08d}", study_description=rnd.choice(
                                 ["CT HEAD", "MR KNEE", "CR CHEST", "US ABDOMEN"]), modalities_in_study="CT",
                             department=rnd.choice(["radiology", "cardiology"]), num_series=1, num_instances=10,
                             size_bytes=5_000_000, created_at=t0 + timedelta(seconds=i), updated_at=t0 + timedelta(seconds=i)))
        for k in range(0, n, 10000):
            c.execute(insert(studies), rows[k:k + 10000])
        c.execute(insert(activity), [dict(minute=int(time.time() // 60) - m, node="OPENPACS", metric=metric,
                                          count=rnd.randrange(1, 200), bytes=rnd.randrange(1, 10**8))
                                     for m in range(7 * 24 * 60) for metric in ("store", "query", "retrieve")])
        events = [dict(at=t0 + timedelta(seconds=i), event="Query", event_id="110112", action="E", outcome=0,
                       user=f"user{i % 50}", protocol="DICOMWEB", node="OPENPACS") for i in range(n)]
        for k in range(0, n, 10000):
            c.execute(insert(audit_events), events[k:k + 10000])
        for k in range(0, n, 10000):
            c.execute(insert(series), [dict(id=i + 1, study_fk=i + 1, series_instance_uid=f"1.2.826.0.1.3680043.9.{i}.1",
                                            modality=rnd.choice(["CT", "MR"]), num_instances=10) for i in range(k, min(n, k + 10000))])


def timed(c: TestClient, params: dict, path: str = "/api/studies") -> tuple[float, dict]:
    best = []
    for _ in range(5):
        t = time.perf_counter()
        r = c.get(path, params=params)
        best.append((time.perf_counter() - t) * 1000)
        assert r.status_code == 200, r.text
    return statistics.median(best), r.json()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--studies", type=int, default=100_000)
    ap.add_argument("--data", type=Path, default=None)
    a = ap.parse_args()
    data = a.data or Path(tempfile.mkdtemp(prefix="openpacs-bench-"))
    ctx = build_context(Settings(data_dir=data / "data"))
    t = time.perf_counter()
    build(ctx, a.studies)
    print(f"built {a.studies} studies in {time.perf_counter() - t:.1f} s")
    with TestClient(build_app(ctx)) as c:
        for label, extra in (("no filter", {}), ("modality=CT", {"modality": "CT"}),
                             ("department=radiology", {"department": "radiology"}),
                             ("date range 2021", {"date_from": "20210101", "date_to": "20211231"}),
                             ("patient_name=name00*", {"patient_name": "name00*"})):
            for sort in ("-date", "received", "-accession"):
                params = {"limit": 50, "sort": sort, **extra}
                ms1, page = timed(c, params)
                cursor, last, n = page["next"], None, 1
                while cursor and n < 1000:  # to page 1,000, or the last page when there are fewer
                    last = cursor
                    page = c.get("/api/studies", params={**params, "cursor": cursor}).json()
                    cursor, n = page["next"], n + 1
                msn = timed(c, {**params, "cursor": last})[0] if last else float("nan")
                print(f"{label:24s} sort={sort:10s} page 1: {ms1:6.1f} ms   page {n}: {msn:6.1f} ms")
        params = {"limit": 50}
        ms1, page = timed(c, params, "/api/audit")
        cursor, last, n = page["next"], None, 1
        while cursor and n < 1000:
            last = cursor
            page = c.get("/api/audit", params={**params, "cursor": cursor}).json()
            cursor, n = page["next"], n + 1
        msn = timed(c, {**params, "cursor": last}, "/api/audit")[0] if last else float("nan")
        print(f"{'audit events':24s} {'':15s} page 1: {ms1:6.1f} ms   page {n}: {msn:6.1f} ms")
        assert ctx.figures is not None
        ctx.figures.ttl = 0  # every call recomputes the counts (the server caches them 5 s)
        stats = timed(c, {}, "/api/stats")[0]
        act = timed(c, {"hours": 24, "step": 300}, "/api/stats/activity")[0]
        print(f"dashboard: /api/stats {stats:6.1f} ms + /api/stats/activity (24 h) {act:6.1f} ms = {stats + act:6.1f} ms")
    ctx.close()


if __name__ == "__main__":
    main()
