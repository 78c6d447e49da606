"""`openpacs jobs ...` and `openpacs send ...`: the durable job queue from the command line.

Works on the index directly (like `openpacs user`); a running `openpacs serve` of the same index runs the jobs.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from ..config import Settings
from ..services import jobs as jobsvc


def add_parsers(sub: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    j = sub.add_parser("jobs", help="list, show, cancel, pause, resume, resubmit jobs")
    common(j)
    js = j.add_subparsers(dest="job_action", required=True)
    ls = js.add_parser("list", help="jobs, newest first")
    ls.add_argument("--state", choices=jobsvc.STATES)
    ls.add_argument("--kind")
    ls.add_argument("--limit", type=int, default=50)
    ls.add_argument("--json", action="store_true")
    sh = js.add_parser("show", help="one job with its failed instances and the peer's status codes")
    sh.add_argument("job_id", type=int)
    sh.add_argument("--json", action="store_true")
    for action in ("cancel", "pause", "resume", "resubmit"):
        a = js.add_parser(action, help=f"{action} a job")
        a.add_argument("job_id", type=int)
    pr = js.add_parser("priority", help="change a job's priority (higher runs first)")
    pr.add_argument("job_id", type=int)
    pr.add_argument("priority", type=int)

    s = sub.add_parser("send", help="send patients, studies, series or instances to a remote node (a job)")
    common(s)
    s.add_argument("destination", help="node name or AE title ([remote_aes.*] or a node added in the console), or a "
                                       "DICOMweb peer ([remote_dicomweb.*], sent by STOW-RS)")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--patient", nargs="+", metavar="PATIENT_ID")
    g.add_argument("--study", nargs="+", metavar="UID")
    g.add_argument("--series", nargs="+", metavar="UID")
    g.add_argument("--instance", nargs="+", metavar="UID")
    s.add_argument("--priority", type=int, default=0)
    s.add_argument("--associations", type=int, help="parallel associations [the node's max_associations]")
    s.add_argument("--commit", action="store_true",
                   help="ask the DICOM node for storage commitment (done only once it has committed every instance)")
    s.add_argument("--wait", action="store_true", help="wait until the job is done or failed (exit 1 if failed)")


def _line(j: jobsvc.Job) -> str:
    return (f"{j.id:>6}  {j.kind:<8} {j.state:<9} {j.done}/{j.total} done, {j.failed} failed, {j.bytes} B  "
            f"prio {j.priority}  attempt {j.attempts}/{j.max_attempts}  {j.destination or ''}"
            + (f"  error: {j.error}" if j.error else ""))


def _as_dict(j: jobsvc.Job) -> dict[str, Any]:
    from dataclasses import asdict

    return {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in asdict(j).items()}


def run(settings: Settings, args: argparse.Namespace) -> int:
    from ..context import build_context

    ctx = build_context(settings)
    try:
        q = ctx.jobs
        assert q is not None
        if args.command == "send":
            kind = jobsvc.destination_kind(settings, args.destination)
            if kind is None:
                print(f"error: destination {args.destination!r} unknown "
                      "(no such node, [remote_aes.*] or [remote_dicomweb.*])")
                return 2
            level, uids = next((lvl, v) for lvl, v in (("PATIENT", args.patient), ("STUDY", args.study),
                                                       ("SERIES", args.series), ("IMAGE", args.instance)) if v)
            try:
                job = jobsvc.submit_send(ctx, args.destination, level, uids, priority=args.priority,
                                         associations=args.associations, commit=args.commit)
            except jobsvc.JobError as e:
                print(f"error: {e}")
                return 1
            print(f"job {job.id}: {job.total} instance(s) to {args.destination}")
            if args.wait:
                import time

                while True:
                    cur = q.get(job.id)
                    assert cur is not None
                    if cur.state in (jobsvc.DONE, jobsvc.FAILED, jobsvc.CANCELLED):
                        print(_line(cur))
                        return 0 if cur.state == jobsvc.DONE else 1
                    time.sleep(0.5)
            return 0
        action = args.job_action
        if action == "list":
            rows = q.list_jobs(state=args.state, kind=args.kind, limit=args.limit)
            if args.json:
                print(json.dumps([_as_dict(j) for j in rows], indent=2))
            else:
                for j in rows:
                    print(_line(j))
            return 0
        found = q.get(args.job_id)
        if found is None:
            print(f"error: job {args.job_id} does not exist")
            return 1
        job = found
        if action == "show":
            failed = q.items(job.id, jobsvc.ITEM_FAILED, limit=1000)
            if args.json:
                out = _as_dict(job)
                out["failed_items"] = [{"sop_instance_uid": i.sop_instance_uid, "status": i.status,
                                        "error": i.error} for i in failed]
                print(json.dumps(out, indent=2))
            else:
                print(_line(job))
                for i in failed:
                    st = f"0x{i.status:04X}" if i.status is not None else "-"
                    print(f"  failed {i.sop_instance_uid}  {st}  {i.error or ''}")
            return 0
        try:
            if action == "priority":
                job = q.set_priority(job.id, args.priority)
            else:
                job = getattr(q, action)(job.id)
        except jobsvc.JobError as e:
            print(f"error: {e}")
            return 1
        print(_line(job))
        return 0
    finally:
        ctx.close()
