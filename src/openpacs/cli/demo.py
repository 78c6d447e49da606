"""`openpacs demo`: fill an instance with the training data set; `openpacs serve --demo`: a throw-away one, filled,
in one command (a temporary data directory unless --data-dir is given; removed when the server stops)."""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from ..config import Settings
from ..services.demo import PASSWORD, DemoResult, NotADemoInstance, fill


def add_parser(sub: Any, common: Any) -> None:
    d = sub.add_parser("demo", help="fill an instance with a fictitious training data set and demo users",
                       description="Fill an instance (by default ./openpacs-data) with demo studies re-identified "
                                   "from the DICOM sample files pydicom and pydicom-data ship, the departments and "
                                   "rules that classify them, and one demo user per role. For training instances only: "
                                   "it refuses an index holding other patients unless --force.")
    common(d)
    d.add_argument("--force", action="store_true", help="add the demo data even if the index holds real patients")
    d.add_argument("--password", default=PASSWORD, help=f"password of the demo users [{PASSWORD}]")


def _fill(settings: Settings, force: bool, password: str) -> DemoResult:
    from ..context import build_context

    ctx = build_context(settings)
    try:
        return fill(ctx, force=force, password=password)
    finally:
        ctx.close()


def print_result(result: DemoResult, settings: Settings) -> None:
    print(f"demo data set in {settings.data_dir}: {result.stored} instance(s) stored, {result.duplicates} already "
          f"there, {len(result.failed)} failed; {len(result.studies)} studies; {result.rules_added} rule(s) added")
    for s in result.studies:
        print(f"  {s['accession']}  {s['patient_id']}  {s['patient_name']:<18} {s['description']}")
    if result.missing_files:
        print(f"  sample files not found (install pydicom-data): {', '.join(sorted(set(result.missing_files)))}")
    for f in result.failed:
        print(f"  failed: {f}")
    if result.users:
        print("demo users (user / role / password):")
        for u in result.users:
            role = u["role"] + (f" ({u['departments']} only)" if u["departments"] else "")
            pw = u["password"] if u["created"] else "(exists: password unchanged)"
            print(f"  {u['username']:<13} {role:<28} {pw}")


def run(settings: Settings, args: argparse.Namespace) -> int:
    try:
        result = _fill(settings, args.force, args.password)
    except NotADemoInstance as e:
        print(f"openpacs demo: {e}", file=sys.stderr)
        return 2
    print_result(result, settings)
    if not settings.auth_enabled:
        print("note: with these settings authentication is off (loopback, auth = \"auto\"): start the server with "
              "auth = \"on\" (or OPENPACS_AUTH=on) for the demo users to sign in, or use `openpacs serve --demo`")
    return 0 if not result.failed else 1


def serve_demo(settings: Settings, data_dir_given: bool) -> int:
    """Fill, then serve; authentication on (the demo users sign in); a temporary data dir is removed at the end."""
    from .serve import serve

    temp: Path | None = None
    if not data_dir_given and settings.data_dir == Settings().data_dir and not settings.index_url:
        temp = Path(tempfile.mkdtemp(prefix="openpacs-demo-"))
        settings.data_dir = temp
    if settings.auth.strip().lower() == "auto":
        settings.auth = "on"
    try:
        try:
            result = _fill(settings, force=False, password=PASSWORD)
        except NotADemoInstance as e:
            print(f"openpacs serve --demo: {e}", file=sys.stderr)
            return 2
        print_result(result, settings)
        host = settings.http_host if ":" not in settings.http_host else f"[{settings.http_host}]"
        print(f"\n  OpenPACS training instance: http://{host}:{settings.http_port}/ui/  (sign in as one of the "
              f"users above; docs/training.md is the tutorial)\n"
              + (f"  Throw-away data directory {temp}: removed when the server stops.\n" if temp else ""),
              flush=True)
        logging.getLogger("openpacs").info("demo instance ready in %s", settings.data_dir)
        return serve(settings)
    finally:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)
