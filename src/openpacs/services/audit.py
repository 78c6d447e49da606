"""The audit trail: IHE ATNA / DICOM PS3.15 A.5 events, stored append-only in the index, exported as the PS3.15 A.5.1
DICOM audit message XML, optionally forwarded over syslog (RFC 5424 messages, RFC 5425 TLS transport).

Recording never blocks a request: events go on a queue; a writer thread inserts them in batches (one transaction
for whatever is queued) and writes each to the syslog spool directory, from which a forwarder thread sends them and
deletes each file only once it has been written to the collector's connection. A collector that is down loses
nothing: the spool keeps growing until it is back.
"""

from __future__ import annotations

import base64
import collections
import logging
import os
import re
import select as _select
import socket
import ssl
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from xml.sax.saxutils import escape, quoteattr

from sqlalchemy import func, insert, select

from ..index.db import Index
from ..index.schema import patients, studies
from ..index.security_schema import audit_events

log = logging.getLogger("openpacs.audit")

# event name -> (EventID code, meaning, default EventActionCode)
EVENTS: dict[str, tuple[str, str, str]] = {
    "ApplicationActivity": ("110100", "Application Activity", "E"),
    "AuditLogUsed": ("110101", "Audit Log Used", "R"),
    "BeginTransferring": ("110102", "Begin Transferring DICOM Instances", "E"),
    "InstancesAccessed": ("110103", "DICOM Instances Accessed", "R"),
    "InstancesTransferred": ("110104", "DICOM Instances Transferred", "R"),
    "StudyDeleted": ("110105", "DICOM Study Deleted", "D"),
    "Export": ("110106", "Export", "R"),
    "Import": ("110107", "Import", "C"),
    "NetworkEntry": ("110108", "Network Entry", "E"),
    "OrderRecord": ("110109", "Order Record", "U"),
    "PatientRecord": ("110110", "Patient Record", "U"),
    "Query": ("110112", "Query", "E"),
    "SecurityAlert": ("110113", "Security Alert", "E"),
    "UserAuthentication": ("110114", "User Authentication", "E"),
}
EVENT_TYPES: dict[str, str] = {
    "110120": "Application Start",
    "110121": "Application Stop",
    "110122": "Login",
    "110123": "Logout",
    "110126": "Node Authentication",
    "110128": "Network Configuration",
    "110129": "Security Configuration",
    "110131": "Software Configuration",
    "110132": "Use of Restricted Function",
    "110136": "Security Roles Changed",
    "110137": "User Security Attributes Changed",
}
APPLICATION_START, APPLICATION_STOP, LOGIN, LOGOUT = "110120", "110121", "110122", "110123"
NODE_AUTHENTICATION, SECURITY_CONFIGURATION, RESTRICTED_FUNCTION = "110126", "110129", "110132"
ROLES_CHANGED, USER_ATTRIBUTES_CHANGED = "110136", "110137"

SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE, MAJOR_FAILURE = 0, 4, 8, 12


@dataclass
class AuditEvent:
    event: str
    outcome: int = SUCCESS
    event_type: str | None = None
    action: str | None = None
    user: str = ""
    role: str = ""
    protocol: str = ""
    source_address: str = ""
    source_aet: str = ""
    destination: str = ""
    study_uids: list[str] = field(default_factory=list)
    patient_id: str = ""
    patient_name: str = ""
    query: str = ""
    detail: str = ""
    at: datetime | None = None
    node: str = ""
    id: int | None = None

    def row(self) -> dict[str, Any]:
        code, _meaning, action = EVENTS[self.event]
        return dict(
            at=self.at,
            event=self.event,
            event_id=code,
            event_type=self.event_type,
            action=self.action or action,
            outcome=self.outcome,
            user=_clip(self.user),
            role=self.role,
            protocol=self.protocol,
            source_address=_clip(self.source_address),
            source_aet=_clip(self.source_aet),
            destination=_clip(self.destination),
            study_uids="\\".join(self.study_uids[:1000]) or None,
            patient_id=_clip(self.patient_id),
            patient_name=_clip(self.patient_name),
            query=(self.query or "")[:8000] or None,
            detail=(self.detail or "")[:8000] or None,
            node=self.node,
        )


_FRAME_READ = re.compile(r"GET (/\S*/instances/[^/\s]+/frames/)([0-9,]+) -> ([0-9]{3})")


def coalesce_frame_reads(batch: list[AuditEvent]) -> list[AuditEvent]:
    """A viewer's frame requests of one instance, by one user from one address, in one batch (~0.25 s), as one
    event whose detail lists the frames and counts the requests: DICOM Instances Transferred names the study and
    the instance once (PS3.15 A.5.3.2), and a slide viewed at 2,000 tiles a second would otherwise write 2,000
    rows a second. Every other event is kept as it is, in its order."""
    out: list[AuditEvent] = []
    groups: dict[tuple[Any, ...], tuple[AuditEvent, list[str], str, str]] = {}
    for ev in batch:
        m = _FRAME_READ.fullmatch(ev.detail or "")
        if m is None:
            out.append(ev)
            continue
        key = (ev.event, ev.outcome, ev.user, ev.role, ev.protocol, ev.source_address, tuple(ev.study_uids),
               ev.patient_id, ev.node, m.group(1), m.group(3))
        group = groups.get(key)
        if group is None:
            groups[key] = (ev, [m.group(2)], m.group(1), m.group(3))
            out.append(ev)
        else:
            group[1].append(m.group(2))
    for ev, frames, prefix, status in groups.values():
        if len(frames) > 1:
            listed = ",".join(frames)
            if len(listed) > 6000:
                listed = listed[: listed.rfind(",", 0, 6000)] + ",..."
            ev.detail = f"GET {prefix}{listed} -> {status} ({len(frames)} requests)"
    return out


def _clip(v: str | None, n: int = 256) -> str | None:
    return v[:n] if v else None


class AuditService:
    def __init__(
        self,
        index: Index,
        node: str = "OPENPACS",
        spool_dir: Path | None = None,
        syslog_url: str = "",
        syslog_ca: str = "",
        syslog_cert: str = "",
        syslog_key: str = "",
        hostname: str = "",
    ) -> None:
        self.index = index
        self.node = node
        self.hostname = hostname or socket.gethostname()
        # Recording is an append to a deque (atomic, no lock, no thread wake-up per event: at thousands of frame
        # requests per second a Queue's per-put notify cost more than the request); the writer is woken once per
        # batch, gathers for batch_window, and writes one transaction.
        self._buf: collections.deque[AuditEvent] = collections.deque()
        self._wake = threading.Event()  # set when events wait (or on flush/close)
        self._hurry = threading.Event()  # flush/close: do not wait out the window
        self._idle = threading.Condition()
        self._in_flight = 0
        self._closed = False
        self._stopping = False
        self.batch_window = 0.25
        self.forwarder: SyslogForwarder | None = None
        if syslog_url:
            if spool_dir is None:
                raise ValueError("syslog forwarding needs a spool directory")
            self.forwarder = SyslogForwarder(syslog_url, spool_dir, ca=syslog_ca, cert=syslog_cert, key=syslog_key)
        self._writer = threading.Thread(target=self._loop, name="audit-writer", daemon=True)
        self._writer.start()

    # -- recording -------------------------------------------------------------------------------------------
    def record(self, event: str, **kw: Any) -> None:
        """Queue one event (never blocks on the database). Unknown event names are a programming error."""
        if event not in EVENTS:
            raise ValueError(f"unknown audit event {event!r}")
        principal = kw.pop("principal", None)
        if principal is not None:
            kw.setdefault("user", principal.name)
            kw.setdefault("role", principal.role)
        uids = kw.pop("study_uids", None)
        ev = AuditEvent(event=event, study_uids=[u for u in (uids or []) if u], **kw)
        ev.at = ev.at or datetime.now(UTC)
        ev.node = ev.node or self.node
        if self._closed:
            self._write([ev])
            return
        self._buf.append(ev)
        if not self._wake.is_set():
            self._wake.set()

    @property
    def _pending(self) -> int:
        return len(self._buf) + self._in_flight

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until every queued event is in the index (and in the spool)."""
        deadline = time.monotonic() + timeout + self.batch_window
        if not self._pending:
            return
        self._hurry.set()  # the writer writes what it has now instead of waiting out its window
        self._wake.set()
        with self._idle:
            while self._pending and time.monotonic() < deadline:
                self._idle.wait(0.05)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stopping = True
        self._hurry.set()
        self._wake.set()
        self._writer.join(timeout=30)
        if self._buf:  # appended by a record() that raced close(): written here, not lost
            late = list(self._buf)
            self._buf.clear()
            self._write(late)
        if self.forwarder is not None:
            self.forwarder.close()

    def _loop(self) -> None:
        while True:
            self._wake.wait()
            if not self._stopping:
                # gather for a moment: one transaction per ~batch_window keeps audit off the hot paths
                self._hurry.wait(self.batch_window)
            self._wake.clear()
            self._hurry.clear()
            while self._buf:
                batch: list[AuditEvent] = []
                with self._idle:
                    while self._buf and len(batch) < 1000:
                        batch.append(self._buf.popleft())
                    self._in_flight = len(batch)
                try:
                    self._write(batch)
                finally:
                    with self._idle:
                        self._in_flight = 0
                        self._idle.notify_all()
            if self._stopping:
                return

    def patients_of(self, study_uids: Iterable[str]) -> dict[str, tuple[str, str]]:
        """study UID -> (PatientID, PatientName) for the studies still in the index."""
        uids = list(dict.fromkeys(u for u in study_uids if u))[:900]
        if not uids:
            return {}
        stmt = (
            select(studies.c.study_instance_uid, patients.c.patient_id, patients.c.patient_name)
            .select_from(studies.join(patients, studies.c.patient_fk == patients.c.id))
            .where(studies.c.study_instance_uid.in_(uids))
        )
        with self.index.engine.connect() as c:
            return {r[0]: (r[1] or "", r[2] or "") for r in c.execute(stmt)}

    def _enrich(self, batch: list[AuditEvent]) -> None:
        """Fill in the patient of events that name studies but not their patient (who/what for the audit)."""
        missing = [ev for ev in batch if not ev.patient_id and ev.study_uids]
        if not missing:
            return
        try:
            found = self.patients_of(u for ev in missing for u in ev.study_uids[:20])
        except Exception:
            log.debug("audit patient lookup failed", exc_info=True)
            return
        for ev in missing:
            for u in ev.study_uids:
                if u in found:
                    ev.patient_id, name = found[u]
                    ev.patient_name = ev.patient_name or name
                    break

    def _write(self, batch: list[AuditEvent]) -> None:
        batch = coalesce_frame_reads(batch)
        self._enrich(batch)
        for attempt in range(10):
            try:
                with self.index.write_engine.begin() as c:
                    c.execute(insert(audit_events), [ev.row() for ev in batch])
                break
            except Exception:
                if attempt == 9:
                    log.exception("audit events could not be stored; logging them instead")
                    for ev in batch:
                        log.error("AUDIT %s", ev.row())
                    break
                time.sleep(0.05 * (attempt + 1))
        if self.forwarder is not None:
            for ev in batch:
                self.forwarder.spool(syslog_message(ev, self.hostname))

    # -- reading ---------------------------------------------------------------------------------------------
    def search(
        self,
        *,
        event: str | None = None,
        user: str | None = None,
        study_uid: str | None = None,
        patient_id: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 1000,
        offset: int = 0,
    ) -> list[AuditEvent]:
        stmt = select(audit_events)
        if event:
            stmt = stmt.where(audit_events.c.event == event)
        if user:
            stmt = stmt.where(audit_events.c.user == user)
        if study_uid:
            stmt = stmt.where(audit_events.c.study_uids.contains(study_uid, autoescape=True))
        if patient_id:
            stmt = stmt.where(audit_events.c.patient_id == patient_id)
        if since:
            stmt = stmt.where(audit_events.c.at >= since)
        if until:
            stmt = stmt.where(audit_events.c.at < until)
        stmt = stmt.order_by(audit_events.c.id).limit(max(1, min(limit, 100000))).offset(max(0, offset))
        with self.index.engine.connect() as c:
            return [_from_row(r) for r in c.execute(stmt)]

    def count(self) -> int:
        with self.index.engine.connect() as c:
            return int(c.execute(select(func.count()).select_from(audit_events)).scalar_one())


def _from_row(r: Any) -> AuditEvent:
    at = r.at if r.at is None or r.at.tzinfo else r.at.replace(tzinfo=UTC)
    return AuditEvent(
        event=r.event,
        outcome=r.outcome,
        event_type=r.event_type,
        action=r.action,
        user=r.user or "",
        role=r.role or "",
        protocol=r.protocol or "",
        source_address=r.source_address or "",
        source_aet=r.source_aet or "",
        destination=r.destination or "",
        study_uids=[u for u in (r.study_uids or "").split("\\") if u],
        patient_id=r.patient_id or "",
        patient_name=r.patient_name or "",
        query=r.query or "",
        detail=r.detail or "",
        at=at,
        node=r.node or "",
        id=r.id,
    )


# ---------------------------------------------------------------------------------------------------------------------
# PS3.15 A.5.1 DICOM audit message XML


def _code(tag: str, code: str, system: str, text: str) -> str:
    return f"<{tag} csd-code={quoteattr(code)} codeSystemName={quoteattr(system)} originalText={quoteattr(text)}/>"


def _xml_text(v: str) -> str:
    # XML 1.0 cannot carry most control characters even escaped: replace them
    return escape("".join(c if c in "\t\n\r" or ord(c) >= 0x20 else "\ufffd" for c in v))


def _attr(v: str) -> str:
    return quoteattr("".join(c if ord(c) >= 0x20 else "\ufffd" for c in v))


def audit_message_xml(ev: AuditEvent) -> str:
    code, meaning, default_action = EVENTS[ev.event]
    at = (ev.at or datetime.now(UTC)).astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    parts = [
        f"<AuditMessage><EventIdentification EventActionCode={_attr(ev.action or default_action)} "
        f"EventDateTime={_attr(at)} EventOutcomeIndicator={_attr(str(ev.outcome))}>",
        _code("EventID", code, "DCM", meaning),
    ]
    if ev.event_type:
        parts.append(_code("EventTypeCode", ev.event_type, "DCM", EVENT_TYPES.get(ev.event_type, ev.event_type)))
    if ev.detail:
        parts.append(f"<EventOutcomeDescription>{_xml_text(ev.detail)}</EventOutcomeDescription>")
    parts.append("</EventIdentification>")
    requestor = ev.user or ev.source_aet or "unknown"
    ap = f'<ActiveParticipant UserID={_attr(requestor)} UserIsRequestor="true"'
    if ev.source_aet and ev.user and ev.source_aet != ev.user:
        ap += f" AlternativeUserID={_attr('AETITLES=' + ev.source_aet)}"
    if ev.source_address:
        host = ev.source_address.rsplit(":", 1)[0] if ev.source_address.count(":") == 1 else ev.source_address
        ap += f' NetworkAccessPointID={_attr(host)} NetworkAccessPointTypeCode="2"'
    ap += ">" + _code("RoleIDCode", "110153", "DCM", "Source Role ID")
    if ev.role:
        ap += _code("RoleIDCode", ev.role, "OPENPACS", ev.role)
    parts.append(ap + "</ActiveParticipant>")
    parts.append(
        f"<ActiveParticipant UserID={_attr(ev.node)} AlternativeUserID={_attr('AETITLES=' + ev.node)} "
        'UserIsRequestor="false">'
        + _code("RoleIDCode", "110152", "DCM", "Destination Role ID")
        + "</ActiveParticipant>"
    )
    if ev.destination:
        parts.append(
            f'<ActiveParticipant UserID={_attr(ev.destination)} UserIsRequestor="false">'
            + _code("RoleIDCode", "110152", "DCM", "Destination Role ID")
            + "</ActiveParticipant>"
        )
    parts.append(
        f"<AuditSourceIdentification AuditSourceID={_attr(ev.node)}>"
        '<AuditSourceTypeCode csd-code="4" codeSystemName="DCM" originalText="Application Server"/>'
        "</AuditSourceIdentification>"
    )
    for uid in ev.study_uids:
        parts.append(
            f'<ParticipantObjectIdentification ParticipantObjectID={_attr(uid)} ParticipantObjectTypeCode="2"'
            ' ParticipantObjectTypeCodeRole="3">'
            + _code("ParticipantObjectIDTypeCode", "110180", "DCM", "Study Instance UID")
            + "</ParticipantObjectIdentification>"
        )
    if ev.patient_id:
        parts.append(
            f"<ParticipantObjectIdentification ParticipantObjectID={_attr(ev.patient_id)}"
            ' ParticipantObjectTypeCode="1" ParticipantObjectTypeCodeRole="1">'
            + _code("ParticipantObjectIDTypeCode", "2", "RFC-3881", "Patient Number")
            + (
                f"<ParticipantObjectName>{_xml_text(ev.patient_name)}</ParticipantObjectName>"
                if ev.patient_name
                else ""
            )
            + "</ParticipantObjectIdentification>"
        )
    if ev.query:
        q = base64.b64encode(ev.query.encode("utf-8", "replace")).decode("ascii")
        parts.append(
            '<ParticipantObjectIdentification ParticipantObjectID="query" ParticipantObjectTypeCode="2"'
            ' ParticipantObjectTypeCodeRole="3">'
            + _code("ParticipantObjectIDTypeCode", "110181", "DCM", "SOP Class UID")
            + f"<ParticipantObjectQuery>{q}</ParticipantObjectQuery>"
            + (
                f'<ParticipantObjectDetail type="Protocol" value={_attr(base64.b64encode(ev.protocol.encode()).decode())}/>'
                if ev.protocol
                else ""
            )
            + "</ParticipantObjectIdentification>"
        )
    parts.append("</AuditMessage>")
    return "".join(parts)


def export_xml(events: Iterable[AuditEvent]) -> Iterator[str]:
    """A document holding many audit messages (``<AuditMessages>`` wrapper), streamed."""
    yield '<?xml version="1.0" encoding="UTF-8"?>\n<AuditMessages>\n'
    for ev in events:
        yield audit_message_xml(ev) + "\n"
    yield "</AuditMessages>\n"


# ---------------------------------------------------------------------------------------------------------------------
# Syslog forwarding (RFC 5424 message, RFC 5425 octet-counting framing over TLS or TCP, RFC 5426 UDP)


def syslog_message(ev: AuditEvent, hostname: str) -> bytes:
    pri = 10 * 8 + (5 if ev.outcome == SUCCESS else 4)  # authpriv.notice / authpriv.warning
    at = (ev.at or datetime.now(UTC)).astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    header = f"<{pri}>1 {at} {_sd_name(hostname)} openpacs {os.getpid()} IHE+RFC-3881 - "
    return header.encode("ascii", "replace") + b"\xef\xbb\xbf" + audit_message_xml(ev).encode("utf-8")


def _sd_name(s: str) -> str:
    out = "".join(c for c in s if 33 <= ord(c) <= 126)[:255]
    return out or "-"


class SyslogForwarder:
    """Spool-and-forward: every message is a file in ``spool_dir`` until it has been sent."""

    def __init__(
        self, url: str, spool_dir: Path, ca: str = "", cert: str = "", key: str = "", retry_max: float = 30.0
    ) -> None:
        u = urlparse(url)
        if u.scheme not in ("tls", "tcp", "udp") or not u.hostname:
            raise ValueError(f"syslog target {url!r}: expected tls://host:port, tcp://host:port or udp://host:port")
        self.scheme = u.scheme
        self.host = u.hostname
        self.port = u.port or (6514 if u.scheme == "tls" else 514)
        self.spool_dir = Path(spool_dir)
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        self.retry_max = retry_max
        self._ssl: ssl.SSLContext | None = None
        if self.scheme == "tls":
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca or None)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            if cert:
                ctx.load_cert_chain(cert, key or None)
            self._ssl = ctx
        self._seq = int(time.time() * 1e6)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._sock: socket.socket | None = None
        self.sent = 0
        self._thread = threading.Thread(target=self._loop, name="audit-syslog", daemon=True)
        self._thread.start()

    def spool(self, message: bytes) -> None:
        with self._lock:
            self._seq += 1
            name = f"{self._seq:020d}.msg"
        tmp = self.spool_dir / (name + ".tmp")
        with open(tmp, "wb") as fh:
            fh.write(message)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.spool_dir / name)
        self._wake.set()

    def pending(self) -> int:
        return sum(1 for p in self.spool_dir.glob("*.msg"))

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)
        self._disconnect()

    def _connect(self) -> socket.socket:
        if self.scheme == "udp":
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.connect((self.host, self.port))
            return s
        raw = socket.create_connection((self.host, self.port), timeout=10)
        if self._ssl is not None:
            return self._ssl.wrap_socket(raw, server_hostname=self.host)
        return raw

    def _disconnect(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None

    def _peer_closed(self) -> bool:
        """A collector that went away leaves a half-open connection that still accepts one write: look first.
        (A TLS 1.3 server's session tickets also make the socket readable: no application data means alive.)"""
        sock = self._sock
        assert sock is not None
        try:
            readable, _, _ = _select.select([sock], [], [], 0)
            if not readable:
                return False
            sock.setblocking(False)
            try:
                return sock.recv(4096) == b""
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                return False
            finally:
                sock.settimeout(10)
        except (OSError, ValueError):
            return True

    def _send(self, msg: bytes) -> None:
        if self._sock is not None and self.scheme != "udp" and self._peer_closed():
            self._disconnect()
        if self._sock is None:
            self._sock = self._connect()
        if self.scheme == "udp":
            self._sock.send(msg[:65000])
        else:
            self._sock.sendall(str(len(msg)).encode() + b" " + msg)

    def _loop(self) -> None:
        delay = 0.5
        while not self._stop.is_set():
            files = sorted(self.spool_dir.glob("*.msg"))
            if not files:
                self._wake.wait(5.0)
                self._wake.clear()
                continue
            try:
                for f in files:
                    if self._stop.is_set():
                        break
                    self._send(f.read_bytes())
                    f.unlink()
                    self.sent += 1
                delay = 0.5
            except Exception as e:  # OSError, ssl errors: the collector is away; anything else must not kill us
                log.warning(
                    "syslog collector %s:%d unavailable (%s); %d event(s) spooled",
                    self.host,
                    self.port,
                    e,
                    self.pending(),
                )
                self._disconnect()
                self._wake.wait(delay)
                self._wake.clear()
                delay = min(self.retry_max, delay * 2)


def audit_configuration(index: Index, audit: AuditService, settings: dict[str, Any], node: str) -> list[str]:
    """At start: a Security Alert (Security Configuration) naming the settings that changed since this node last
    started, so configuration changes made in files or the environment are in the trail too. Returns the keys."""
    import json

    from sqlalchemy import update

    from ..index.schema import settings_table

    current = {k: str(v) for k, v in settings.items()}
    key = f"audit.configuration.{node}"
    with index.engine.connect() as c:
        row = c.execute(select(settings_table.c.value).where(settings_table.c.key == key)).scalar_one_or_none()
    previous = json.loads(row) if row else None
    if previous == current:
        return []
    changed = sorted(k for k in set(current) | set(previous or {}) if (previous or {}).get(k) != current.get(k))
    doc = json.dumps(current, sort_keys=True)
    now = datetime.now(UTC)
    with index.write_engine.begin() as c:
        if row is None:
            c.execute(insert(settings_table).values(key=key, value=doc, updated_at=now))
        else:
            c.execute(update(settings_table).where(settings_table.c.key == key).values(value=doc, updated_at=now))
    if previous is not None:
        audit.record("SecurityAlert", user=node, protocol="CLI", event_type="110129",
                     detail="configuration changed since the last start: " + ", ".join(changed)[:4000])
    return changed
