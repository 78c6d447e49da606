"""`openpacs doctor`: check an instance (stopped or running) and say what to do about each problem.

Exit status: 0 healthy (warnings allowed), 1 a check failed (or warned, with --strict), 2 doctor could not run
(bad arguments or settings)."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from ..config import Settings
from ..services.doctor import FAIL, OK, SKIP, WARN, Report, run_checks

CHECKS = ("storage", "index", "blobs", "ports", "clock", "tls", "nodes", "security", "scrub")


def add_parser(sub: Any, common: Any) -> None:
    d = sub.add_parser("doctor", help="check storage, index, blobs, ports, clock, TLS, nodes and security settings",
                       description="Check an OpenPACS instance, running or stopped, without changing it. Exit status "
                                   "0: healthy (warnings allowed), 1: a problem was found (with --strict, warnings "
                                   "too), 2: doctor could not run.")
    common(d)
    d.add_argument("--full", action="store_true", help="verify the SHA-256 of every blob, not a random sample")
    d.add_argument("--sample", type=int, default=100, help="blobs checked without --full [100]")
    d.add_argument("--json", action="store_true", help="print a machine-readable JSON report")
    d.add_argument("--no-echo", action="store_true", help="do not C-ECHO the remote nodes")
    d.add_argument("--strict", action="store_true", help="exit 1 on warnings too")
    d.add_argument("--only", help=f"comma-separated checks to run ({', '.join(CHECKS)})")
    d.add_argument("--dicom-port", type=int, help="the DICOM port the server uses, if not in the settings")
    d.add_argument("--http-port", type=int, help="the HTTP port the server uses, if not in the settings")
    d.add_argument("--hl7-port", type=int, help="the HL7 port the server uses, if not in the settings")


_MARK = {OK: "ok", WARN: "WARN", FAIL: "FAIL", SKIP: "skip"}


def render(report: Report, strict: bool = False, color: bool = False) -> str:
    colors = {OK: "\033[32m", WARN: "\033[33m", FAIL: "\033[31;1m", SKIP: "\033[2m"}
    lines = [f"OpenPACS doctor: data dir {report.data_dir}", f"  index {report.index}", f"  storage {report.storage}",
             ""]
    width = max(len(c.title) for c in report.checks) if report.checks else 10
    for c in report.checks:
        mark = _MARK[c.status]
        if color:
            mark = f"{colors[c.status]}{mark:<4}\033[0m"
        lines.append(f"  {mark:<4}  {c.title:<{width}}  {c.finding}")
        if c.action and c.status in (WARN, FAIL):
            lines.append(f"        {'':<{width}}  → {c.action}")
    counts = {s: sum(1 for c in report.checks if c.status == s) for s in (OK, WARN, FAIL, SKIP)}
    verdict = {OK: "healthy", WARN: "healthy, with warnings", FAIL: "problems found"}[report.status]
    lines += ["", f"{verdict}: {counts[FAIL]} failed, {counts[WARN]} warning(s), {counts[OK]} ok, {counts[SKIP]} "
              f"skipped ({report.seconds:.1f} s); exit {report.exit_code(strict)}"]
    return "\n".join(lines)


def run(settings: Settings, args: argparse.Namespace) -> int:
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)  # a node that is down is a finding, not a log line
    only = None
    if args.only:
        only = [o.strip() for o in args.only.split(",") if o.strip()]
        unknown = sorted(set(only) - set(CHECKS))
        if unknown:
            print(f"openpacs doctor: unknown check(s) {', '.join(unknown)}; known: {', '.join(CHECKS)}",
                  file=sys.stderr)
            return 2
    if args.sample < 0:
        print("openpacs doctor: --sample must be >= 0", file=sys.stderr)
        return 2
    report = run_checks(settings, full=args.full, echo_nodes=not args.no_echo, sample=args.sample, only=only)
    if args.json:
        print(report.to_json(args.strict))
    else:
        print(render(report, args.strict, color=sys.stdout.isatty()))
    return report.exit_code(args.strict)
