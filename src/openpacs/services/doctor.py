"""Health checks of one OpenPACS instance (``openpacs doctor``), protocol-free: each check returns data, the CLI (and
later the console or the API) decides how to show it.

Read-only by design, so that it runs against a stopped server's data directory and beside a running one: the SQLite
index is opened with ``mode=ro`` (a WAL reader never blocks the writer) and read in short transactions, PostgreSQL in
read-only transactions; nothing is migrated, written to the index or removed from the blob store. The only write is a
probe file in the blob store's temp directory, removed at once.

Statuses: ``ok``; ``warn`` (works, but deserves attention); ``fail`` (a problem to fix); ``skip`` (not applicable or
not asked for). :meth:`Report.exit_code`: 1 when any check failed (or, with ``strict``, warned), else 0.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import socket
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

from .. import __version__
from ..config import Settings, is_loopback, security_refusal

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"
_RANK = {SKIP: 0, OK: 0, WARN: 1, FAIL: 2}

SAMPLE = 100  # blobs whose SHA-256 is verified without --full
ORPHAN_GRACE = 600.0  # seconds: a newer unreferenced blob may be a store whose index commit is still under way
DELETE_GRACE = 120.0  # seconds: the blobs of a recent delete stay on disk a while (services.ingest.DELETE_GRACE)
FREE_FAIL_BYTES, FREE_FAIL_PCT = 512 << 20, 2.0
FREE_WARN_BYTES, FREE_WARN_PCT = 5 << 30, 10.0
CLOCK_FLOOR = datetime(2026, 1, 1, tzinfo=UTC)  # this build is newer: a clock before it is certainly wrong
CLOCK_SKEW = timedelta(minutes=5)
CERT_WARN_DAYS = 30
ECHO_TIMEOUT = 5.0
LIST_EXAMPLES = 5  # keys or UIDs named in a finding's details


@dataclass
class Check:
    id: str
    title: str
    status: str
    finding: str
    action: str = ""
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Report:
    checks: list[Check]
    data_dir: str
    index: str
    storage: str
    started_at: datetime
    seconds: float = 0.0

    @property
    def status(self) -> str:
        worst = max((_RANK[c.status] for c in self.checks), default=0)
        return {0: OK, 1: WARN, 2: FAIL}[worst]

    def exit_code(self, strict: bool = False) -> int:
        s = self.status
        return 1 if s == FAIL or (strict and s == WARN) else 0

    def as_dict(self, strict: bool = False) -> dict[str, Any]:
        counts = {s: sum(1 for c in self.checks if c.status == s) for s in (OK, WARN, FAIL, SKIP)}
        return {
            "status": self.status, "exit_code": self.exit_code(strict), "strict": strict, "version": __version__,
            "data_dir": self.data_dir, "index": self.index, "storage": self.storage,
            "checked_at": self.started_at.isoformat(), "seconds": round(self.seconds, 3), "counts": counts,
            "checks": [asdict(c) for c in self.checks],
        }

    def to_json(self, strict: bool = False) -> str:
        return json.dumps(self.as_dict(strict), indent=2, default=str)


def _redact(url: str) -> str:
    """An index URL without its password."""
    if "://" in url and "@" in url.split("://", 1)[1]:
        scheme, rest = url.split("://", 1)
        cred, host = rest.rsplit("@", 1)
        return f"{scheme}://{cred.split(':', 1)[0]}:***@{host}"
    return url


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PB"


# ---------------------------------------------------------------------------------------------------------------------
# opening the index and the store without changing them


class ReadOnlyIndex:
    """The index opened for reading only: ``engine`` (the interface services.nodes reads through), no migration."""

    def __init__(self, url: str) -> None:
        from sqlalchemy import create_engine, event

        from ..index.db import _normalize_url

        self.url = _normalize_url(url)
        self.is_sqlite = self.url.startswith("sqlite")
        if self.is_sqlite:
            path = self.url.split("///", 1)[1] if "///" in self.url else ""
            self.path = Path(path) if path and path != ":memory:" else None
            if self.path is None or not self.path.is_file():
                raise FileNotFoundError(f"no index database at {path or self.url}")
            engine = create_engine(f"sqlite:///file:{self.path}?mode=ro&uri=true",
                                   connect_args={"check_same_thread": False, "timeout": 10})

            @event.listens_for(engine, "connect")
            def _connect(dbapi_conn: Any, _rec: Any) -> None:
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA busy_timeout=10000")
                cur.execute("PRAGMA query_only=ON")
                cur.close()
        else:
            self.path = None
            engine = create_engine(self.url, pool_size=2, max_overflow=2, pool_pre_ping=True,
                                   connect_args={"options": "-c default_transaction_read_only=on"})
        self.engine = engine
        self.write_engine = engine  # a write through it fails: read-only connection

    def close(self) -> None:
        self.engine.dispose()


# ---------------------------------------------------------------------------------------------------------------------
# the checks


def check_storage(settings: Settings) -> Check:
    url = settings.resolved_storage_url
    title = "Storage"
    if not url.startswith("file://"):
        return Check("storage", title, SKIP, f"storage {url.split('://')[0]}:// is not checked by doctor")
    root = Path(url[len("file://"):])
    if not root.is_dir():
        return Check("storage", title, FAIL, f"blob directory {root} does not exist",
                     "check --data-dir / storage_url; `openpacs serve` or `openpacs migrate` creates an empty one",
                     {"root": str(root)})
    probe_dir = root / ".tmp" if (root / ".tmp").is_dir() else root
    probe = probe_dir / f"doctor-{os.getpid()}-{time.time_ns()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"openpacs doctor write probe")
            os.fsync(fd)
        finally:
            os.close(fd)
            probe.unlink(missing_ok=True)
    except OSError as e:
        return Check("storage", title, FAIL, f"cannot write to {root}: {e.strerror or e}",
                     "give the user running OpenPACS write access to the blob directory, or free the file system "
                     "(read-only mount, full disk, quota)", {"root": str(root), "errno": e.errno})
    du = shutil.disk_usage(root)
    pct = 100.0 * du.free / du.total if du.total else 0.0
    details = {"root": str(root), "total_bytes": du.total, "used_bytes": du.used, "free_bytes": du.free,
               "free_percent": round(pct, 1)}
    finding = f"{root} writable; {_bytes(du.free)} free of {_bytes(du.total)} ({pct:.0f}%)"
    if du.free < FREE_FAIL_BYTES or pct < FREE_FAIL_PCT:
        return Check("storage", title, FAIL, finding + ": nearly full, stores will fail",
                     "free space now or grow the volume; stores are refused (out of resources) when it is full",
                     details)
    if du.free < FREE_WARN_BYTES or pct < FREE_WARN_PCT:
        return Check("storage", title, WARN, finding + ": running low",
                     "plan more storage (the dashboard forecasts the days left from the ingest rate)", details)
    return Check("storage", title, OK, finding, "", details)


def _alembic_heads() -> set[str]:
    from alembic.script import ScriptDirectory

    from ..index.migrate import alembic_config

    return set(ScriptDirectory.from_config(alembic_config()).get_heads())


def check_index(settings: Settings) -> tuple[Check, ReadOnlyIndex | None]:
    title = "Index"
    url = settings.resolved_index_url
    try:
        idx = ReadOnlyIndex(url)
    except FileNotFoundError as e:
        return Check("index", title, FAIL, str(e),
                     "check --data-dir / index_url; `openpacs migrate` creates a new, empty index"), None
    except Exception as e:  # noqa: BLE001 - a driver error is a finding, not a crash
        return Check("index", title, FAIL, f"cannot open the index {_redact(url)}: {e}",
                     "check index_url, that the database server runs and accepts this user"), None
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy import text

    t0 = time.perf_counter()
    try:
        with idx.engine.connect() as c:
            c.execute(text("SELECT 1"))
            current = set(MigrationContext.configure(c).get_current_heads())
    except Exception as e:  # noqa: BLE001
        idx.close()
        return Check("index", title, FAIL, f"index {_redact(url)} unreachable: {e}",
                     "check that the database is reachable, not locked by a crashed tool, and readable"), None
    ms = (time.perf_counter() - t0) * 1000
    heads = _alembic_heads()
    details: dict[str, Any] = {"url": _redact(url), "revision": sorted(current), "head": sorted(heads),
                               "ms": round(ms, 1)}
    if not current:
        return Check("index", title, FAIL, "the index has no schema (not an OpenPACS index, or never migrated)",
                     "run `openpacs migrate` (or start `openpacs serve`, which migrates)", details), idx
    if current == heads:
        return Check("index", title, OK, f"reachable in {ms:.0f} ms; schema at the current revision "
                     f"{', '.join(sorted(current))}", "", details), idx
    from alembic.script import ScriptDirectory

    from ..index.migrate import alembic_config

    script = ScriptDirectory.from_config(alembic_config())
    known = all(_known_revision(script, r) for r in current)
    if not known:
        return Check("index", title, FAIL, f"schema revision {', '.join(sorted(current))} is unknown to this "
                     f"version ({__version__}): the index was migrated by a newer OpenPACS",
                     "run the OpenPACS version that migrated it (a downgrade is not supported)", details), idx
    return Check("index", title, FAIL, f"schema at {', '.join(sorted(current))}, this version needs "
                 f"{', '.join(sorted(heads))}", "run `openpacs migrate` (back up the index first), "
                 "or restart `openpacs serve`, which migrates at start", details), idx


def _known_revision(script: Any, rev: str) -> bool:
    try:
        return script.get_revision(rev) is not None
    except Exception:  # noqa: BLE001
        return False


def _index_rows(idx: ReadOnlyIndex, chunk: int = 20000) -> Iterator[tuple[int, str, str, int, str]]:
    """(id, blob_key, sha256, size, sop_instance_uid) of every instance, in short keyset-paged transactions."""
    from sqlalchemy import select

    from ..index.schema import instances as t

    last = 0
    while True:
        with idx.engine.connect() as c:
            rows = c.execute(select(t.c.id, t.c.blob_key, t.c.sha256, t.c.size_bytes, t.c.sop_instance_uid)
                             .where(t.c.id > last).order_by(t.c.id).limit(chunk)).all()
        if not rows:
            return
        for r in rows:
            yield int(r[0]), r[1], r[2], int(r[3] or 0), r[4]
        last = int(rows[-1][0])


def _still_indexed(idx: ReadOnlyIndex, key: str) -> bool:
    from sqlalchemy import select

    from ..index.schema import instances as t

    with idx.engine.connect() as c:
        return c.execute(select(t.c.id).where(t.c.blob_key == key).limit(1)).first() is not None


def _recent_deletes(idx: ReadOnlyIndex, since: datetime) -> int:
    from sqlalchemy import func, select

    from ..index.schema import changes

    with idx.engine.connect() as c:
        n = c.execute(select(func.count()).select_from(changes)
                      .where(changes.c.change_type == "Deleted", changes.c.at >= since)).scalar_one()
    return int(n or 0)


def blob_digest(store: Any, key: str) -> str:
    """SHA-256 of a blob's data set, after its preamble and File Meta (what services.ingest records)."""
    from ..dicom.header import dataset_offset

    head = store.read(key, 0, 1 << 16)
    skip = dataset_offset(head)
    h = hashlib.sha256()
    for chunk in store.stream(key, skip):
        h.update(chunk)
    return h.hexdigest()


def check_blobs(settings: Settings, idx: ReadOnlyIndex | None, full: bool = False, sample: int = SAMPLE,
                now: float | None = None) -> list[Check]:
    """Missing blobs, orphan blobs and partial writes, and the SHA-256 of a sample of blobs (all with ``full``)."""
    titles = ("Blobs referenced by the index", "Unreferenced blobs", "Blob checksums")
    url = settings.resolved_storage_url
    root = Path(url[len("file://"):]) if url.startswith("file://") else None
    if idx is None or root is None or not root.is_dir():
        why = "index unavailable" if idx is None else "storage not checked"
        return [Check(i, t, SKIP, why) for i, t in zip(("blobs-missing", "blobs-orphan", "blobs-sha256"), titles,
                                                        strict=True)]
    from ..storage.filesystem import FilesystemBlobStore

    store = FilesystemBlobStore.__new__(FilesystemBlobStore)  # no temp dir created, no stale-temp bookkeeping
    store.root = str(root)
    store.tmp = str(root / ".tmp")
    now = time.time() if now is None else now
    started = datetime.now(UTC)

    # index first, files second: a store writes its blob before its row commits, so every row read has its blob
    rows: dict[str, tuple[str, int, str]] = {}
    for _id, key, digest, size, sop in _index_rows(idx):
        rows[key] = (digest, size, sop)
    on_disk = set(store.keys_older_than(float("inf")))
    missing = []
    for key in (k for k in rows if k not in on_disk):
        path = store.path(key)
        if path and os.path.exists(path):
            continue
        if _still_indexed(idx, key):  # deleted meanwhile? then its blob went with it
            missing.append(key)
    out: list[Check] = []
    if missing:
        sops = [rows[k][2] for k in missing[:LIST_EXAMPLES]]
        out.append(Check("blobs-missing", titles[0], FAIL,
                         f"{len(missing)} of {len(rows)} indexed instance(s) have no blob file: they cannot be retrieved",
                         "restore the files from backup into the blob directory (same paths); or, if they are lost, "
                         "delete the instances (console, or DELETE through the API) and have the modality send them "
                         "again", {"missing": len(missing), "instances": len(rows), "examples_sop_instance_uid": sops,
                                   "examples_blob_key": missing[:LIST_EXAMPLES]}))
    else:
        out.append(Check("blobs-missing", titles[0], OK, f"all {len(rows)} indexed instance(s) have their blob file",
                         "", {"missing": 0, "instances": len(rows)}))

    old = set(store.keys_older_than(now - ORPHAN_GRACE))
    orphans = sorted(k for k in old - rows.keys() if not _still_indexed(idx, k))
    recent_tmp = []
    tmp = root / ".tmp"
    if tmp.is_dir():
        recent_tmp = [f for f in os.scandir(tmp) if f.is_file() and f.stat().st_mtime < now - ORPHAN_GRACE
                      and not f.name.startswith("doctor-")]
    orphan_bytes = sum(os.path.getsize(p) for k in orphans if (p := store.path(k)) and os.path.exists(p))
    details = {"orphans": len(orphans), "orphan_bytes": orphan_bytes, "partial_writes": len(recent_tmp),
               "examples_blob_key": orphans[:LIST_EXAMPLES], "grace_seconds": ORPHAN_GRACE}
    if orphans:
        deleting = _recent_deletes(idx, started - timedelta(seconds=DELETE_GRACE))
        msg = (f"{len(orphans)} blob file(s) ({_bytes(orphan_bytes)}) older than {ORPHAN_GRACE / 60:.0f} min are "
               "not referenced by the index")
        action = ("left by a crash between blob write and index commit: `openpacs serve` removes them at start (orphan "
                  "sweep). If the index was restored from an older backup, they may be studies it lost: re-import "
                  "them first (`openpacs import <blob directory>`), the import skips what is already indexed")
        if deleting:
            out.append(Check("blobs-orphan", titles[1], WARN, msg + f" ({deleting} deletion(s) in the last "
                             f"{DELETE_GRACE / 60:.0f} min: their blobs are removed shortly)", "run doctor again in a "
                             "few minutes; " + action, details))
        else:
            out.append(Check("blobs-orphan", titles[1], FAIL, msg, action, details))
    elif recent_tmp:
        out.append(Check("blobs-orphan", titles[1], WARN, f"{len(recent_tmp)} partial write(s) in {tmp} from an "
                         "interrupted store", "`openpacs serve` removes them at start", details))
    else:
        out.append(Check("blobs-orphan", titles[1], OK, "every blob file is referenced by the index", "", details))

    keys = [k for k in rows if k not in missing]
    chosen = keys if full or len(keys) <= sample else random.sample(keys, sample)
    bad: list[dict[str, Any]] = []
    checked = 0
    for key in chosen:
        digest, size, sop = rows[key]
        try:
            path = store.path(key)
            actual_size = os.path.getsize(path) if path else None
            actual = blob_digest(store, key)
        except FileNotFoundError:
            continue  # deleted since the listing
        except OSError as e:
            bad.append({"blob_key": key, "sop_instance_uid": sop, "error": str(e)})
            continue
        checked += 1
        if actual != digest:
            if not _still_indexed(idx, key):
                continue
            bad.append({"blob_key": key, "sop_instance_uid": sop, "expected": digest, "actual": actual,
                        "size": actual_size, "indexed_size": size})
    scope = f"all {len(keys)}" if full or len(chosen) == len(keys) else f"a random sample of {len(chosen)} of {len(keys)}"
    details = {"checked": checked, "of": len(keys), "full": full, "corrupted": len(bad), "examples": bad[:LIST_EXAMPLES]}
    if bad:
        out.append(Check("blobs-sha256", titles[2], FAIL, f"{len(bad)} blob(s) do not match the SHA-256 recorded at "
                         f"ingest ({scope} checked): corrupted on disk",
                         "restore those files from backup, or delete the instances and have them sent again; then "
                         "check the disk (SMART, file system)" + ("" if full else "; run `openpacs doctor --full` "
                                                                 "to check every blob"), details))
    else:
        out.append(Check("blobs-sha256", titles[2], OK, f"SHA-256 matches for {scope} blob(s)",
                         "" if full or len(chosen) == len(keys) else "`openpacs doctor --full` checks every blob",
                         details))
    return out


def _port_free(host: str, port: int) -> bool | None:
    """True if we could listen on host:port now, False if it is taken, None if the address is not ours at all."""
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host.strip("[]"), port))
        return True
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            return False
        if e.errno in (errno.EADDRNOTAVAIL, errno.EACCES):
            return None
        raise
    finally:
        s.close()


def _probe_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host.strip("[]")


def _healthz(settings: Settings) -> dict[str, Any] | None:
    """The /healthz answer of the HTTP port (http, or https without certificate checks: it is our own), or None."""
    host = _probe_host(settings.http_host)
    hostpart = f"[{host}]" if ":" in host else host
    for scheme in ("http", "https"):
        ctx = None
        if scheme == "https":
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        try:
            with urllib.request.urlopen(f"{scheme}://{hostpart}:{settings.http_port}/healthz", timeout=3,
                                        context=ctx) as r:
                doc = json.loads(r.read(4096) or b"{}")
                return doc if isinstance(doc, dict) and "aet" in doc else None
        except urllib.error.HTTPError as e:
            try:
                doc = json.loads(e.read(4096) or b"{}")
                return doc if isinstance(doc, dict) and "aet" in doc else None
            except ValueError:
                return None
        except (OSError, ValueError):
            continue
    return None


def check_ports(settings: Settings, echo: Callable[..., Any] | None = None) -> Check:
    from .nodes import echo as echo_scu

    echo = echo or echo_scu
    listeners: list[tuple[str, str, int]] = [("DICOM", settings.dicom_host, settings.dicom_port),
                                             ("HTTP", settings.http_host, settings.http_port)]
    if settings.tls_cert and settings.dicom_tls_port:
        listeners.append(("DICOM TLS", settings.dicom_host, settings.dicom_tls_port))
    if settings.hl7_port:
        listeners.append(("HL7", settings.hl7_host, settings.hl7_port))
    free: list[str] = []
    ours: list[str] = []
    foreign: list[str] = []
    unbindable: list[str] = []
    asked = False
    health: dict[str, Any] | None = None
    for name, host, port in listeners:
        if not port:
            continue
        state = _port_free(host, port)
        label = f"{name} {host}:{port}"
        if state is True:
            free.append(label)
            continue
        if state is None:
            unbindable.append(label)
            continue
        if not asked:
            health, asked = _healthz(settings), True
        if name == "HTTP":
            (ours if health and health.get("aet") == settings.aet else foreign).append(label)
        elif name == "DICOM":
            r = echo(settings, settings.aet, _probe_host(host), port, timeout=ECHO_TIMEOUT)
            # a DICOM peer answering beside our own HTTP server is us (it may reject our AE title as caller)
            is_dicom = r.ok or "rejected" in r.detail
            mine = bool(health and health.get("aet") == settings.aet and is_dicom)
            (ours if mine else foreign).append(label + ("" if r.ok else f" ({r.detail})"))
        else:
            (ours if health and health.get("aet") == settings.aet else foreign).append(label)
    details = {"free": free, "ours": ours, "foreign": foreign, "not_local": unbindable}
    if foreign:
        return Check("ports", "Ports", FAIL, f"in use by another program: {', '.join(foreign)}",
                     "find it with `ss -ltnp` (or `lsof -i :PORT`) and stop it, or give OpenPACS other ports "
                     "(dicom_port, http_port, hl7_port, dicom_tls_port)", details)
    if unbindable:
        return Check("ports", "Ports", FAIL, f"cannot listen on {', '.join(unbindable)}: the address is not on this "
                     "machine or the port needs privileges", "use an address of this machine (or 0.0.0.0) and a port "
                     "above 1023, or grant CAP_NET_BIND_SERVICE", details)
    if ours and free:
        return Check("ports", "Ports", WARN, f"OpenPACS is running ({', '.join(ours)}) but {', '.join(free)} "
                     "nobody listens on", "check the server log: a listener failed to start, or it runs with other "
                     "ports than these settings", details)
    if ours:
        return Check("ports", "Ports", OK, f"in use by the running OpenPACS: {', '.join(ours)}", "", details)
    return Check("ports", "Ports", OK, f"free: {', '.join(free)} (no server running)", "", details)


def _newest_index_time(idx: ReadOnlyIndex) -> datetime | None:
    from sqlalchemy import func, select

    from ..index.schema import changes, instances
    from ..index.security_schema import audit_events

    newest: datetime | None = None
    with idx.engine.connect() as c:
        for col in (instances.c.received_at, changes.c.at, audit_events.c.at):
            try:
                v = c.execute(select(func.max(col))).scalar()
            except Exception:  # noqa: BLE001 - a table of an older schema
                continue
            if isinstance(v, str):
                try:
                    v = datetime.fromisoformat(v)
                except ValueError:
                    continue
            if isinstance(v, datetime):
                v = v if v.tzinfo else v.replace(tzinfo=UTC)
                newest = v if newest is None or v > newest else newest
    return newest


def check_clock(idx: ReadOnlyIndex | None, now: datetime | None = None) -> Check:
    now = now or datetime.now(UTC)
    details: dict[str, Any] = {"now": now.isoformat()}
    if now < CLOCK_FLOOR:
        return Check("clock", "Clock", FAIL, f"system clock says {now:%Y-%m-%d %H:%M} UTC, before this build "
                     f"({CLOCK_FLOOR:%Y-%m-%d})", "set the clock (enable NTP: `timedatectl set-ntp true`); DICOM "
                     "dates, audit records and sessions depend on it", details)
    newest = None
    if idx is not None:
        try:
            newest = _newest_index_time(idx)
        except Exception:  # noqa: BLE001
            newest = None
    if newest is not None:
        details["newest_index_time"] = newest.isoformat()
        if newest - now > CLOCK_SKEW:
            return Check("clock", "Clock", FAIL, f"the index holds times up to {newest:%Y-%m-%d %H:%M:%S} UTC, "
                         f"{(newest - now).total_seconds() / 60:.0f} min ahead of this clock ({now:%H:%M:%S} UTC): "
                         "the clock is behind, or was ahead when they were written", "set the clock (NTP); on "
                         "several nodes, every node must use NTP", details)
    return Check("clock", "Clock", OK, f"{now:%Y-%m-%d %H:%M:%S} UTC" + (
        f", after the newest index time ({newest:%Y-%m-%d %H:%M:%S})" if newest else ""), "", details)


def check_tls(settings: Settings, now: datetime | None = None) -> Check:
    if not settings.tls_cert:
        return Check("tls", "TLS certificate", SKIP, "TLS not configured (tls_cert is empty)",
                     "" if is_loopback(settings.http_host) else "set tls_cert/tls_key (or http_tls = false behind a "
                     "TLS proxy): passwords and images travel in clear otherwise")
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    now = now or datetime.now(UTC)
    try:
        certs = x509.load_pem_x509_certificates(Path(settings.tls_cert).read_bytes())
    except (OSError, ValueError) as e:
        return Check("tls", "TLS certificate", FAIL, f"cannot read tls_cert {settings.tls_cert}: {e}",
                     "point tls_cert at a readable PEM certificate (chain)")
    leaf = certs[0]
    not_after, not_before = leaf.not_valid_after_utc, leaf.not_valid_before_utc
    subject = leaf.subject.rfc4514_string()
    details: dict[str, Any] = {"cert": settings.tls_cert, "subject": subject, "not_before": not_before.isoformat(),
                               "not_after": not_after.isoformat(), "days_left": (not_after - now).days}
    if settings.tls_key:
        try:
            key = serialization.load_pem_private_key(Path(settings.tls_key).read_bytes(), password=None)
            pub = key.public_key().public_bytes(serialization.Encoding.DER,
                                                serialization.PublicFormat.SubjectPublicKeyInfo)
            mine = leaf.public_key().public_bytes(serialization.Encoding.DER,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo)
            if pub != mine:
                return Check("tls", "TLS certificate", FAIL, f"tls_key does not belong to the certificate {subject}",
                             "set tls_key to the private key of tls_cert", details)
        except (OSError, ValueError, TypeError) as e:
            return Check("tls", "TLS certificate", FAIL, f"cannot read tls_key {settings.tls_key}: {e}",
                         "point tls_key at a readable, unencrypted PEM private key", details)
    renew = "renew the certificate and restart `openpacs serve`"
    if now > not_after:
        return Check("tls", "TLS certificate", FAIL, f"{subject} expired on {not_after:%Y-%m-%d}: clients refuse "
                     "to connect", renew, details)
    if now < not_before:
        return Check("tls", "TLS certificate", FAIL, f"{subject} is valid only from {not_before:%Y-%m-%d}",
                     "check the clock, or use a certificate valid now", details)
    days = (not_after - now).days
    if days < CERT_WARN_DAYS:
        return Check("tls", "TLS certificate", WARN, f"{subject} expires in {days} day(s), on {not_after:%Y-%m-%d}",
                     renew, details)
    return Check("tls", "TLS certificate", OK, f"{subject} valid until {not_after:%Y-%m-%d} ({days} days)", "",
                 details)


def check_nodes(settings: Settings, idx: ReadOnlyIndex | None, do_echo: bool = True,
                echo: Callable[..., Any] | None = None) -> Check:
    from .nodes import NodesService
    from .nodes import echo as echo_scu

    echo = echo or echo_scu
    # NodesService reads through ``index.engine`` only: the read-only index serves
    svc = NodesService(settings, cast(Any, idx), bind=False)
    try:
        nodes = svc.list() if idx is not None else svc.config_nodes()
    except Exception as e:  # noqa: BLE001
        nodes = svc.config_nodes()
        note = f" (index nodes unreadable: {e})"
    else:
        note = "" if idx is not None else " (index unavailable: TOML nodes only)"
    if not nodes:
        return Check("nodes", "Remote nodes (C-ECHO)", SKIP, "no remote node configured" + note)
    if not do_echo:
        return Check("nodes", "Remote nodes (C-ECHO)", SKIP, f"{len(nodes)} node(s); C-ECHO skipped (--no-echo)")

    def one(n: Any) -> dict[str, Any]:
        r = echo(settings, n.aet, n.host, n.port, tls=n.tls, timeout=ECHO_TIMEOUT)
        return {"name": n.name, "aet": n.aet, "host": n.host, "port": n.port, "source": n.source, "ok": r.ok,
                "ms": None if r.ms is None else round(r.ms, 1), "detail": r.detail}

    with ThreadPoolExecutor(max_workers=min(8, len(nodes))) as pool:
        results = list(pool.map(one, nodes))
    down = [r for r in results if not r["ok"]]
    summary = ", ".join(f"{r['name']} {r['ms']:.0f} ms" for r in results if r["ok"])
    details = {"nodes": results}
    if down:
        names = "; ".join(f"{r['name']} ({r['aet']}@{r['host']}:{r['port']}): {r['detail']}" for r in down)
        return Check("nodes", "Remote nodes (C-ECHO)", FAIL, f"{len(down)} of {len(results)} node(s) do not answer "
                     f"C-ECHO: {names}" + note, "check that the node is on and listening, its AE title, host and "
                     "port (Nodes page), the firewall, and that it accepts our AE title "
                     f"{settings.aet!r}; remove nodes that are gone", details)
    return Check("nodes", "Remote nodes (C-ECHO)", OK, f"all {len(results)} node(s) answer: {summary}" + note, "",
                 details)


def check_security(settings: Settings) -> Check:
    refusal = security_refusal(settings)
    details = {"auth": settings.auth, "auth_enabled": settings.auth_enabled, "http_host": settings.http_host,
               "dicom_host": settings.dicom_host, "dicom_accept_unknown": settings.dicom_accept_unknown,
               "allow_open_dicom": settings.allow_open_dicom}
    if refusal:
        return Check("security", "Security settings", FAIL, refusal.replace("refusing to listen", "unsafe: would "
                     "listen", 1), "`openpacs serve` refuses to start like this: change the settings named above",
                     details)
    warnings = []
    exposed_dicom = not is_loopback(settings.dicom_host)
    exposed_http = not is_loopback(settings.http_host)
    if exposed_dicom and settings.dicom_accept_unknown:
        warnings.append(f"DICOM on {settings.dicom_host} accepts any calling AE (allow_open_dicom = true)")
    if (exposed_http or exposed_dicom) and settings.auth.strip().lower() == "off":
        warnings.append("auth = \"off\"")
    if exposed_http and not settings.tls_cert and not settings.trusted_proxies:
        warnings.append(f"HTTP on {settings.http_host} without TLS: passwords travel in clear")
    if settings.hl7_port and not is_loopback(settings.hl7_host) and not settings.hl7_tls:
        warnings.append(f"HL7 on {settings.hl7_host} without TLS (anyone on the network can send ADT)")
    if warnings:
        return Check("security", "Security settings", WARN, "; ".join(warnings),
                     "set dicom_accept_unknown = false with [remote_aes.*] / Nodes for the known callers, tls_cert "
                     "and tls_key (or trusted_proxies behind a TLS proxy), hl7_tls = true", details)
    if not settings.auth_enabled:
        return Check("security", "Security settings", OK, "loopback only, authentication off (development mode)",
                     "", details)
    return Check("security", "Security settings", OK, "authentication on" + (
        "; DICOM callers restricted to known nodes" if not settings.dicom_accept_unknown else ""), "", details)


# ---------------------------------------------------------------------------------------------------------------------


def run_checks(settings: Settings, *, full: bool = False, echo_nodes: bool = True, sample: int = SAMPLE,
               only: Iterable[str] | None = None, echo: Callable[..., Any] | None = None) -> Report:
    """Every check, in a stable order. ``only``: the ids to run (storage, index, blobs, ports, clock, tls, nodes,
    security); ``echo``: the C-ECHO function (tests)."""
    wanted = set(only) if only is not None else None
    started = datetime.now(UTC)
    t0 = time.perf_counter()
    checks: list[Check] = []

    def want(name: str) -> bool:
        return wanted is None or name in wanted

    if want("storage"):
        checks.append(check_storage(settings))
    idx_check, idx = check_index(settings)
    if want("index"):
        checks.append(idx_check)
    try:
        if want("blobs"):
            checks.extend(check_blobs(settings, idx, full=full, sample=sample))
        if want("ports"):
            checks.append(check_ports(settings, echo=echo))
        if want("clock"):
            checks.append(check_clock(idx))
        if want("tls"):
            checks.append(check_tls(settings))
        if want("nodes"):
            checks.append(check_nodes(settings, idx, do_echo=echo_nodes, echo=echo))
        if want("security"):
            checks.append(check_security(settings))
        if want("scrub"):
            from .scrub import doctor_check

            checks.append(doctor_check(idx))
    finally:
        if idx is not None:
            idx.close()
    return Report(checks, str(settings.data_dir.resolve()), _redact(settings.resolved_index_url),
                  settings.resolved_storage_url, started, time.perf_counter() - t0)
