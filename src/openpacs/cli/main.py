"""`openpacs` command line: serve, import, migrate."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config import Settings, load_settings


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML configuration file (keys: fields of openpacs.config.Settings)")
    p.add_argument("--data-dir", type=Path, help="data directory (index + blobs by default) [./openpacs-data]")
    p.add_argument("--index", dest="index_url", help="index URL: sqlite:///path or postgresql://user@host/db")
    p.add_argument("--storage", dest="storage_url", help="blob storage URL: file:///path")
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="openpacs", description="OpenPACS picture archiving and communication system")
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run every service of this node (DICOM, HTTP)")
    _common(s)
    s.add_argument("--dicom-port", type=int, help="DICOM (DIMSE) port [11112]")
    s.add_argument("--http-port", type=int, help="HTTP port: DICOMweb, viewer, health [8042]")
    s.add_argument("--hl7-port", type=int, help="HL7 v2 MLLP port (0: off) [2575]")
    s.add_argument("--aet", help="our AE title [OPENPACS]")
    s.add_argument("--host", help="address to listen on for DICOM and HTTP [127.0.0.1]")
    s.add_argument("--workers", type=int, dest="dicom_workers", help="DICOM worker processes (0: per CPU)")
    s.add_argument("--demo", action="store_true",
                   help="throw-away training instance: a temporary data dir (unless --data-dir) filled by `openpacs demo`")

    i = sub.add_parser("import", help="import DICOM files, folders and zip archives through the ingest path")
    _common(i)
    i.add_argument("paths", nargs="+", type=Path)
    i.add_argument("--jobs", type=int, default=4, help="parallel workers [4]")
    i.add_argument("--no-progress", action="store_true", help="no progress bar")

    v = sub.add_parser("install-viewer", help="fetch the pinned OHIF viewer build from npm (idempotent)")
    v.add_argument("viewer_args", nargs=argparse.REMAINDER, help="[DEST] [--force] [--prefix /ohif/] [--tarball TGZ]")

    m = sub.add_parser("migrate", help="create or upgrade the index schema")
    _common(m)

    from .user import add_parsers as add_user_parsers

    add_user_parsers(sub, _common)
    from .demo import add_parser as add_demo_parser
    from .doctor import add_parser as add_doctor_parser

    add_doctor_parser(sub, _common)
    add_demo_parser(sub, _common)
    from .jobs import add_parsers as add_jobs_parsers

    add_jobs_parsers(sub, _common)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["install-viewer"]:
        # its own options (argparse's REMAINDER does not take a leading "--force" or "--prefix")
        from ..web.viewer import main as install_viewer

        return install_viewer(argv[1:])
    args = build_parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k in Settings.__dataclass_fields__}
    if getattr(args, "host", None):
        overrides["dicom_host"] = args.host
        overrides["http_host"] = args.host
    settings = load_settings(args.config, **overrides)
    from ..logs import configure as configure_logging

    configure_logging(settings.log_level, settings.log_format)
    if args.command == "serve":
        # before anything imports prometheus_client: every process of this server (DIMSE workers too) writes its
        # metrics where /metrics adds them up (services/metrics.py)
        import atexit
        import os
        import shutil
        import tempfile

        metrics_dir = tempfile.mkdtemp(prefix="openpacs-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        atexit.register(shutil.rmtree, metrics_dir, True)
        from .serve import serve

        if args.demo:
            from .demo import serve_demo

            return serve_demo(settings, data_dir_given=args.data_dir is not None)
        return serve(settings)
    if args.command == "doctor":
        from .doctor import run as run_doctor

        return run_doctor(settings, args)
    if args.command == "demo":
        from .demo import run as run_demo

        return run_demo(settings, args)
    if args.command == "import":
        from .importer import run_import

        return run_import(settings, args.paths, jobs=args.jobs, progress=not args.no_progress)
    if args.command in ("jobs", "send"):
        from .jobs import run as run_jobs

        return run_jobs(settings, args)
    if args.command in ("user", "department"):
        from .user import run as run_user

        return run_user(settings, args)
    if args.command == "migrate":
        from ..context import build_context

        build_context(settings).close()
        print(f"index at {settings.resolved_index_url.split('@')[-1]} is up to date")
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
