"""Remote DICOM nodes: those kept in the index (added, edited and removed through the API and the console) merged
with the read-only ``[remote_aes.*]`` of the TOML file, their activity, and a C-ECHO to check one.

Every process (the web process and each DICOM worker) has its own :class:`NodesService` bound to its Settings;
the DIMSE access checks and the C-MOVE destination lookup read :func:`remote_aes_for`, a copy cached for
``CACHE_TTL`` seconds. A change made in this process clears its cache at once and publishes a ``nodes`` change
(index/changes.py) that the other processes and nodes act on as soon as they hear it; the TTL bounds the rest.

The C-ECHO is sent with pynetdicom as a plain client (no server of ours is needed: the web process and
``openpacs doctor`` use it too), and its result is kept in ``node_activity`` (``last_echo_*``).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from ..config import RemoteAE, Settings
from ..index.admin_schema import node_activity, remote_nodes
from ..index.db import Index

log = logging.getLogger("openpacs.nodes")

# What RemoteAE.allow may name (dimse/access.py uses the same tuple).
OPERATIONS = ("echo", "store", "find", "move", "get", "worklist", "mpps", "commit")
KINDS = ("modality", "workstation", "archive", "other")
DEFAULT_ALLOW = ("echo", "store", "find", "move", "get")
CACHE_TTL = 3.0  # how long another process may take to see a node added, edited or removed
ECHO_TIMEOUT = 10.0

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_HOST = re.compile(r"^[A-Za-z0-9_.:\[\]%-]{1,253}$")


class NodeError(ValueError):
    """A node specification that is not valid (HTTP 400)."""


class NodeConflict(Exception):
    """A name taken, or a TOML node that cannot be changed through the API (HTTP 409)."""


@dataclass(frozen=True)
class Node:
    name: str
    aet: str
    host: str
    port: int
    kind: str = "other"
    allow: tuple[str, ...] = DEFAULT_ALLOW
    departments: tuple[str, ...] | None = None
    tls: bool = False
    description: str = ""
    source: str = "index"  # index (editable) | config (TOML [remote_aes.*], read-only)
    created_at: datetime | None = None
    updated_at: datetime | None = None

    @property
    def editable(self) -> bool:
        return self.source == "index"

    def remote(self) -> RemoteAE:
        return RemoteAE(aet=self.aet, host=self.host, port=self.port, allow=self.allow,
                        departments=self.departments, tls=self.tls)


@dataclass
class EchoResult:
    ok: bool
    status: int | None  # DIMSE status of the C-ECHO-RSP (0 = success), None when there was none
    ms: float | None  # C-ECHO request to response, milliseconds
    total_ms: float  # connect + associate + echo + release
    detail: str
    at: datetime = field(default_factory=lambda: datetime.now(UTC))


# ---------------------------------------------------------------------------------------------------------------------
# validation


def valid_aet(value: Any, what: str = "aet") -> str:
    """An AE title: 1-16 characters of the default repertoire, no backslash, no control characters (PS3.5 6.2)."""
    if not isinstance(value, str):
        raise NodeError(f"{what}: expected a string")
    aet = value.strip()
    if not aet:
        raise NodeError(f"{what}: must not be empty")
    if len(aet) > 16:
        raise NodeError(f"{what}: at most 16 characters, not {len(aet)}")
    if any(c == "\\" or ord(c) < 0x20 or ord(c) > 0x7E for c in aet):
        raise NodeError(f"{what}: printable ASCII only, no backslash or control characters")
    return aet


def _strings(value: Any, what: str) -> list[str]:
    if isinstance(value, str):
        return [p.strip() for p in value.split(",") if p.strip()]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return [v.strip() for v in value if v.strip()]
    raise NodeError(f"{what}: expected a list of strings")


def validate(spec: Mapping[str, Any], current: Node | None = None) -> dict[str, Any]:
    """Column values of a node from a JSON object (a partial one when ``current`` is given); NodeError if invalid."""
    unknown = set(spec) - {"name", "aet", "host", "port", "kind", "allow", "departments", "tls", "description"}
    if unknown:
        raise NodeError(f"unknown field(s): {', '.join(sorted(unknown))}")
    base: dict[str, Any] = {}
    if current is not None:
        base = dict(name=current.name, aet=current.aet, host=current.host, port=current.port, kind=current.kind,
                    allow=list(current.allow), departments=current.departments, tls=current.tls,
                    description=current.description)
    doc = {**base, **{k: v for k, v in spec.items()}}
    for required in ("name", "aet", "host", "port"):
        if doc.get(required) in (None, ""):
            raise NodeError(f"{required}: required")
    name = doc["name"]
    if not isinstance(name, str) or not _NAME.match(name):
        raise NodeError("name: 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
    aet = valid_aet(doc["aet"])
    host = doc["host"]
    if not isinstance(host, str) or not host.strip():
        raise NodeError("host: must not be empty")
    host = host.strip()
    if not _HOST.match(host):
        raise NodeError("host: a host name or IP address (letters, digits, '.', '-', ':')")
    port = doc["port"]
    if isinstance(port, bool) or not isinstance(port, int):
        if isinstance(port, str) and port.strip().isdigit():
            port = int(port.strip())
        else:
            raise NodeError("port: expected an integer from 1 to 65535")
    if not 1 <= port <= 65535:
        raise NodeError(f"port: expected an integer from 1 to 65535, not {port}")
    kind = doc.get("kind") or "other"
    if kind not in KINDS:
        raise NodeError(f"kind: one of {', '.join(KINDS)}")
    allow = _strings(doc.get("allow", list(DEFAULT_ALLOW)), "allow")
    bad_ops = sorted(set(allow) - set(OPERATIONS))
    if bad_ops:
        raise NodeError(f"allow: unknown operation(s) {', '.join(bad_ops)} (known: {', '.join(OPERATIONS)})")
    deps = doc.get("departments")
    departments = None if deps is None else tuple(sorted({d.lower() for d in _strings(deps, "departments")}))
    tls = doc.get("tls", False)
    if not isinstance(tls, bool):
        raise NodeError("tls: expected true or false")
    description = doc.get("description") or ""
    if not isinstance(description, str) or len(description) > 1000:
        raise NodeError("description: a string of at most 1000 characters")
    return dict(name=name, aet=aet, host=host, port=port, kind=kind,
                allow=",".join(op for op in OPERATIONS if op in allow),
                departments=None if departments is None else ",".join(departments), tls=tls, description=description)


def _aware(dt: datetime | None) -> datetime | None:
    return dt if dt is None or dt.tzinfo else dt.replace(tzinfo=UTC)


def _from_row(r: Any) -> Node:
    return Node(
        name=r.name, aet=r.aet, host=r.host, port=int(r.port), kind=r.kind or "other",
        allow=tuple(op for op in (r.allow or "").split(",") if op),
        departments=None if r.departments is None else tuple(d for d in r.departments.split(",") if d),
        tls=bool(r.tls), description=r.description or "", source="index",
        created_at=_aware(r.created_at), updated_at=_aware(r.updated_at),
    )


# ---------------------------------------------------------------------------------------------------------------------
# the service

_BOUND: dict[int, NodesService] = {}
_BOUND_LOCK = threading.Lock()


def remote_aes_for(settings: Settings) -> Mapping[str, RemoteAE]:
    """The remote AEs in force for these settings: TOML ones plus those in the index (cached), or the TOML ones
    alone when no NodesService is bound to them (unit tests building Settings by hand)."""
    svc = _BOUND.get(id(settings))
    if svc is None or svc.settings is not settings:
        return settings.remote_aes
    return svc.remote_aes()


class NodesService:
    def __init__(self, settings: Settings, index: Index, ttl: float = CACHE_TTL, bind: bool = True) -> None:
        self.settings = settings
        self.index = index
        self.ttl = ttl
        self._cache: tuple[float, dict[str, RemoteAE]] | None = None
        self._lock = threading.Lock()
        self._changes = getattr(index, "changes", None)  # None: a read-only index (openpacs doctor)
        if self._changes is not None:
            self._changes.subscribe("nodes", self._drop_cache)  # a change made on another node or process
        if bind:
            with _BOUND_LOCK:
                _BOUND[id(settings)] = self

    def close(self) -> None:
        with _BOUND_LOCK:
            if _BOUND.get(id(self.settings)) is self:
                del _BOUND[id(self.settings)]

    # -- reading -----------------------------------------------------------------------------------------------
    def config_nodes(self) -> list[Node]:
        return [
            Node(name=name, aet=r.aet, host=r.host, port=r.port, kind="other", allow=tuple(r.allow),
                 departments=r.departments, tls=r.tls, source="config")
            for name, r in sorted(self.settings.remote_aes.items())
        ]

    def index_nodes(self) -> list[Node]:
        with self.index.engine.connect() as c:
            return [_from_row(r) for r in c.execute(select(remote_nodes).order_by(remote_nodes.c.name))]

    def list(self) -> list[Node]:
        """TOML nodes first (read-only), then the index's, by name; an index row never shadows a TOML name."""
        config = self.config_nodes()
        taken = {n.name for n in config}
        return config + [n for n in self.index_nodes() if n.name not in taken]

    def get(self, name: str) -> Node | None:
        return next((n for n in self.list() if n.name == name), None)

    def remote_aes(self) -> dict[str, RemoteAE]:
        """Name -> RemoteAE of every node (the DIMSE access checks and C-MOVE read this). The index's nodes are
        cached ``ttl`` seconds; the TOML ones are read from the settings on every call (so a reload is seen at once).
        If the index cannot be read, the last known index nodes stay in force."""
        merged = dict(self.settings.remote_aes)
        for name, remote in self._index_remotes().items():
            merged.setdefault(name, remote)
        return merged

    def _index_remotes(self) -> dict[str, RemoteAE]:
        now = time.monotonic()
        cached = self._cache
        if cached is not None and now - cached[0] < self.ttl:
            return cached[1]
        with self._lock:
            cached = self._cache
            if cached is not None and time.monotonic() - cached[0] < self.ttl:
                return cached[1]
            try:
                found = {node.name: node.remote() for node in self.index_nodes()}
            except Exception:  # noqa: BLE001 - an index hiccup must not take the DICOM listener down
                log.warning("cannot read remote nodes from the index; keeping the last known ones", exc_info=True)
                found = cached[1] if cached is not None else {}
            self._cache = (time.monotonic(), found)
            return found

    def invalidate(self) -> None:
        """The index's nodes changed here: drop the copy on every node (index/changes.py)."""
        if self._changes is not None:
            self._changes.bump("nodes")
        else:
            self._drop_cache()

    def _drop_cache(self) -> None:
        self._cache = None

    # -- changing ----------------------------------------------------------------------------------------------
    def _check_name_free(self, name: str) -> None:
        if name in self.settings.remote_aes:
            raise NodeConflict(f"node {name!r} is configured in the TOML file ([remote_aes.{name}]) and read-only")

    def add(self, spec: Mapping[str, Any]) -> Node:
        values = validate(spec)
        self._check_name_free(values["name"])
        now = datetime.now(UTC)
        try:
            with self.index.write_engine.begin() as c:
                if c.execute(select(remote_nodes.c.id).where(remote_nodes.c.name == values["name"])).first():
                    raise NodeConflict(f"node {values['name']!r} exists")
                c.execute(insert(remote_nodes).values(**values, created_at=now, updated_at=now))
        except IntegrityError:
            raise NodeConflict(f"node {values['name']!r} exists") from None
        self.invalidate()
        node = self.get(values["name"])
        assert node is not None
        return node

    def update(self, name: str, spec: Mapping[str, Any]) -> Node | None:
        """Change some fields of an index node (None: no such node); renaming is allowed to a free name."""
        current = self.get(name)
        if current is None:
            return None
        if not current.editable:
            raise NodeConflict(f"node {name!r} is configured in the TOML file ([remote_aes.{name}]) and read-only")
        values = validate(spec, current)
        if values["name"] != name:
            self._check_name_free(values["name"])
        try:
            with self.index.write_engine.begin() as c:
                res = c.execute(
                    update(remote_nodes).where(remote_nodes.c.name == name).values(**values,
                                                                                  updated_at=datetime.now(UTC))
                )
                if res.rowcount == 0:
                    return None
        except IntegrityError:
            raise NodeConflict(f"node {values['name']!r} exists") from None
        self.invalidate()
        return self.get(values["name"])

    def remove(self, name: str) -> bool:
        if name in self.settings.remote_aes:
            raise NodeConflict(f"node {name!r} is configured in the TOML file ([remote_aes.{name}]) and read-only")
        with self.index.write_engine.begin() as c:
            n = c.execute(delete(remote_nodes).where(remote_nodes.c.name == name)).rowcount
        self.invalidate()
        return bool(n)

    # -- activity ----------------------------------------------------------------------------------------------
    def activity(self, aets: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
        """node_activity rows by AE title (written by services.activity when associations close, and by echo)."""
        stmt = select(node_activity)
        wanted = None if aets is None else sorted(set(aets))
        if wanted is not None:
            if not wanted:
                return {}
            stmt = stmt.where(node_activity.c.aet.in_(wanted))
        out: dict[str, dict[str, Any]] = {}
        with self.index.engine.connect() as c:
            for r in c.execute(stmt):
                row = dict(r._mapping)
                for k in ("last_connected_at", "last_echo_at"):
                    row[k] = _aware(row[k])
                out[r.aet] = row
        return out

    # -- C-ECHO ------------------------------------------------------------------------------------------------
    def echo(self, node: Node | RemoteAE, timeout: float = ECHO_TIMEOUT) -> EchoResult:
        """C-ECHO the node (blocking) and keep the result in node_activity."""
        result = echo(self.settings, node.aet, node.host, node.port, tls=node.tls, timeout=timeout)
        try:
            self.record_echo(node.aet, result)
        except Exception:  # noqa: BLE001 - the result is still worth returning
            log.warning("cannot record the C-ECHO result of %s", node.aet, exc_info=True)
        return result

    def record_echo(self, aet: str, result: EchoResult) -> None:
        values = dict(last_echo_at=result.at, last_echo_ok=result.ok, last_echo_ms=result.ms)
        for _ in range(3):
            with self.index.write_engine.begin() as c:
                if c.execute(update(node_activity).where(node_activity.c.aet == aet).values(**values)).rowcount:
                    return
                try:
                    with c.begin_nested():
                        c.execute(insert(node_activity).values(aet=aet, associations=0, associations_rejected=0,
                                                               instances_received=0, bytes_received=0,
                                                               instances_sent=0, bytes_sent=0, queries=0, **values))
                    return
                except IntegrityError:
                    continue  # another process inserted the row: update it


def echo(settings: Settings, aet: str, host: str, port: int, *, tls: bool = False,
         timeout: float = ECHO_TIMEOUT) -> EchoResult:
    """One C-ECHO as SCU (Verification SOP class) from our AE title; never raises."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    ae = AE(ae_title=settings.aet)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    tls_args = None
    if tls:
        from ..dimse.access import client_tls_context  # noqa: PLC0415 - the one BCP195 client context

        tls_args = (client_tls_context(settings), host)
    t0 = time.perf_counter()
    try:
        assoc = ae.associate(host, port, ae_title=aet, tls_args=tls_args)
    except Exception as exc:  # noqa: BLE001
        return EchoResult(False, None, None, (time.perf_counter() - t0) * 1000, f"cannot associate: {exc}")
    try:
        if not assoc.is_established:
            if assoc.is_rejected:
                why = "association rejected"
            elif assoc.is_aborted:
                why = f"association aborted: no DICOM peer answering at {host}:{port}?"
            else:
                why = f"no association with {host}:{port} (connection refused, unreachable or timed out)"
            return EchoResult(False, None, None, (time.perf_counter() - t0) * 1000, why)
        t1 = time.perf_counter()
        status = assoc.send_c_echo()
        ms = (time.perf_counter() - t1) * 1000
        code = int(status.Status) if status is not None and "Status" in status else None
        assoc.release()
        total = (time.perf_counter() - t0) * 1000
        if code is None:
            return EchoResult(False, None, None, total, "no C-ECHO response (timeout or abort)")
        ok = code == 0
        return EchoResult(ok, code, ms, total, "success" if ok else f"C-ECHO status 0x{code:04X}")
    finally:
        if assoc.is_alive():
            assoc.abort()
        ae.shutdown()
