"""`openpacs import PATH...`: files, folders (recursive) and zip archives through the one ingest path."""

from __future__ import annotations

import os
import sys
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ..config import Settings
from ..context import build_context
from ..services.ingest import IngestService
from ..services.types import Source

MAX_FILE = 4 << 30


@dataclass
class ImportSummary:
    stored: int = 0
    duplicates: int = 0
    warnings: int = 0
    rejected: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)
    study_uids: set[str] = field(default_factory=set)  # for the audit trail (Import event)


def iter_sources(paths: list[Path]) -> Iterator[tuple[str, Callable[[], bytes]]]:
    """(name, reader) for every candidate file; zip members are read lazily."""
    for p in paths:
        if p.is_dir():
            for root, _dirs, files in os.walk(p):
                for f in sorted(files):
                    yield from _one(Path(root) / f)
        else:
            yield from _one(p)


def _one(path: Path) -> Iterator[tuple[str, Callable[[], bytes]]]:
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            names = [i.filename for i in z.infolist() if not i.is_dir()]
        for name in names:
            def read(name: str = name) -> bytes:
                with zipfile.ZipFile(path) as z, z.open(name) as fh:
                    return fh.read(MAX_FILE)
            yield f"{path}!{name}", read
    else:
        yield str(path), path.read_bytes


def import_paths(ingest: IngestService, paths: list[Path], jobs: int = 4,
                 on_progress: Callable[[int], None] | None = None) -> ImportSummary:
    summary = ImportSummary()
    source = Source(protocol="IMPORT", calling_aet="", address="local", user=os.environ.get("USER", ""))

    def work(item: tuple[str, Callable[[], bytes]]) -> tuple[str, int, str, bool]:
        name, read = item
        try:
            data = read()
        except OSError as e:
            return name, 0xC000, f"unreadable: {e}", False
        out = ingest.store_file(data, source)
        if out.ok and out.study_instance_uid:
            summary.study_uids.add(out.study_instance_uid)
        return name, out.status, out.message, out.duplicate

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for name, status, message, duplicate in pool.map(work, iter_sources(paths)):
            if status == 0 and duplicate:
                summary.duplicates += 1
            elif status == 0:
                summary.stored += 1
            elif 0xB000 <= status <= 0xBFFF:
                summary.warnings += 1
                reason = f"0x{status:04X} {message}"
                summary.reasons[reason.split(":")[0]] += 1
            else:
                summary.rejected += 1
                reason = f"0x{status:04X} {message.split(':')[0]}"
                summary.reasons[reason] += 1
                summary.examples.setdefault(reason, name)
            if on_progress:
                on_progress(1)
    return summary


def run_import(settings: Settings, paths: list[Path], jobs: int = 4, progress: bool = True) -> int:
    missing = [p for p in paths if not p.exists()]
    if missing:
        print(f"openpacs import: no such file or directory: {', '.join(map(str, missing))}", file=sys.stderr)
        return 2
    ctx = build_context(settings)
    try:
        total = sum(1 for _ in iter_sources(paths))
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=total, unit="file", desc="import", file=sys.stderr, dynamic_ncols=True)
        summary = import_paths(ctx.ingest, paths, jobs=jobs, on_progress=bar.update if bar else None)
        if bar:
            bar.close()
        if ctx.audit is not None:
            ctx.audit.record("Import", user=os.environ.get("USER", ""), protocol="IMPORT", source_address="local",
                             outcome=0 if summary.rejected == 0 else 4, study_uids=sorted(summary.study_uids),
                             detail=f"import of {', '.join(map(str, paths))[:500]}: {summary.stored} stored, "
                                    f"{summary.duplicates} duplicates, {summary.rejected} rejected")
    finally:
        ctx.close()
    print(f"stored: {summary.stored}  duplicates: {summary.duplicates}  warnings: {summary.warnings}  "
          f"rejected: {summary.rejected}")
    for reason, n in summary.reasons.most_common():
        example = summary.examples.get(reason)
        print(f"  {n:6d} × {reason}" + (f"  (e.g. {example})" if example else ""))
    return 0 if summary.rejected == 0 else 1
