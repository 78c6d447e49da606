#!/usr/bin/env python3
"""In-process ingest throughput: the services.ingest path alone (no network), N threads, fresh data dir.

usage: bench/ingest_service.py DATASET_DIR [--threads 4] [--index URL]
Make a dataset with ../shared/bench/gen_dataset.py. Prints instances/s and CPU ms per instance (process time,
user + system: fsync and file creation are kernel work).
"""

import argparse
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from openpacs.config import load_settings
from openpacs.context import build_context
from openpacs.dicom.header import header_info
from openpacs.services.types import Source


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("dataset")
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--index", default=None)
    a = p.parse_args()
    files = sorted(os.path.join(a.dataset, f) for f in os.listdir(a.dataset))
    items = []
    for f in files:
        data = open(f, "rb").read()
        info = header_info(data)
        items.append((data[info.dataset_offset:], info.transfer_syntax_uid, info.values[0x00080016], info.values[0x00080018]))
    tmp = tempfile.mkdtemp(prefix="openpacs-ingest-bench-")
    ctx = build_context(load_settings(data_dir=Path(tmp), index_url=a.index))
    src = Source("DIMSE", calling_aet="BENCH")

    def one(item: tuple[bytes, str, str, str]) -> None:
        out = ctx.ingest.store_dataset([item[0]], item[1], item[2], item[3], src)
        assert out.ok, (hex(out.status), out.message)

    t, c = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(a.threads) as ex:
        list(ex.map(one, items))
    dt, cpu = time.perf_counter() - t, time.process_time() - c
    print(f"{len(items)} instances, {a.threads} threads: {len(items) / dt:.0f} inst/s, "
          f"{1000 * cpu / len(items):.2f} ms CPU/instance")
    ctx.close()
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
