"""services.audit: append-only storage, PS3.15 A.5.1 XML, syslog forwarding with a spool that loses nothing."""

from __future__ import annotations

import re
import socket
import ssl
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from sqlalchemy import text

from openpacs.services.audit import AuditEvent, AuditService, audit_message_xml, export_xml

from .tlsutil import make_pki


def test_events_are_stored_and_searchable(world) -> None:
    audit = world.ctx.audit
    audit.record(
        "Query",
        user="alice",
        role="viewer",
        protocol="DICOMWEB",
        source_address="10.0.0.5:5555",
        query="PatientID=123",
        study_uids=["1.2.3"],
    )
    audit.record("StudyDeleted", user="admin", study_uids=["1.2.3"], patient_id="123")
    audit.flush()
    q = audit.search(event="Query", user="alice")
    assert len(q) == 1 and q[0].query == "PatientID=123" and q[0].study_uids == ["1.2.3"] and q[0].action == "E"
    d = audit.search(study_uid="1.2.3", event="StudyDeleted")
    assert d[0].action == "D" and d[0].patient_id == "123"
    with pytest.raises(ValueError):
        audit.record("NoSuchEvent")


def test_audit_table_is_append_only(world) -> None:
    world.ctx.audit.record("Query", user="x")
    world.ctx.audit.flush()
    for stmt in ("UPDATE audit_events SET detail = 'mallory'", "DELETE FROM audit_events"):
        with pytest.raises(Exception, match="append-only"):
            with world.ctx.index.write_engine.begin() as c:
                c.execute(text(stmt))
    assert world.ctx.audit.count() >= 1


def test_audit_message_xml_is_well_formed_and_escaped() -> None:
    ev = AuditEvent(
        event="InstancesAccessed",
        user="<script>alert(1)</script>\"'&",
        source_address="10.1.1.1:4444",
        study_uids=["1.2.3", "1.2.4"],
        patient_id="P&1",
        patient_name="Müller^Zoë\x01",
        query="a=<b>",
        detail="ok",
        role="viewer",
        protocol="HTTP",
    )
    doc = audit_message_xml(ev)
    root = ET.fromstring(doc)
    ident = root.find("EventIdentification")
    assert ident.get("EventActionCode") == "R" and ident.get("EventOutcomeIndicator") == "0"
    assert root.find("EventIdentification/EventID").get("csd-code") == "110103"
    requestor = root.findall("ActiveParticipant")[0]
    assert requestor.get("UserID") == "<script>alert(1)</script>\"'&" and requestor.get("UserIsRequestor") == "true"
    assert requestor.get("NetworkAccessPointID") == "10.1.1.1"
    objs = root.findall("ParticipantObjectIdentification")
    assert [o.get("ParticipantObjectID") for o in objs][:3] == ["1.2.3", "1.2.4", "P&1"]
    assert "<script>" not in doc
    whole = "".join(export_xml([ev, ev]))
    assert len(ET.fromstring(whole.split("\n", 1)[1]).findall("AuditMessage")) == 2


def test_audit_log_export_over_http_is_itself_audited(world) -> None:
    from starlette.testclient import TestClient

    from openpacs.web.app import build_app

    from .conftest import bearer

    client = TestClient(build_app(world.ctx))
    world.ctx.audit.record("Query", user="someone")
    world.ctx.audit.flush()
    assert client.get("/admin/audit", headers=bearer(world.tokens["viewer"])).status_code == 403
    r = client.get("/admin/audit?format=xml", headers=bearer(world.tokens["auditor"]))
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/xml")
    ET.fromstring(r.text.split("\n", 1)[1])
    r = client.get("/admin/audit?event=Query", headers=bearer(world.tokens["admin"]))
    assert r.status_code == 200 and all(e["event"] == "Query" for e in r.json())
    world.ctx.audit.flush()
    used = world.ctx.audit.search(event="AuditLogUsed")
    assert {e.user for e in used} >= {"auditor", "admin"}
    denied = world.ctx.audit.search(event="SecurityAlert", user="viewer")
    assert denied and denied[0].outcome == 4


class Collector:
    """An RFC 5425 syslog collector (TLS, octet-counting framing) that can be stopped and started."""

    def __init__(self, port: int, pki: dict[str, Path], messages: list[bytes]) -> None:
        self.port = port
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(pki["cert"], pki["key"])
        self.messages = messages
        self._stop = threading.Event()
        self.sock: socket.socket | None = None

    def start(self) -> None:
        self._stop.clear()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", self.port))
        self.sock.listen()
        self.sock.settimeout(0.2)
        threading.Thread(target=self._run, daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        if self.sock:
            self.sock.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                raw, _ = self.sock.accept()
            except OSError:
                continue
            threading.Thread(target=self._conn, args=(raw,), daemon=True).start()

    def _conn(self, raw: socket.socket) -> None:
        try:
            conn = self.ctx.wrap_socket(raw, server_side=True)
            buf = b""
            conn.settimeout(0.2)
            while not self._stop.is_set():
                try:
                    chunk = conn.recv(65536)
                except (TimeoutError, ssl.SSLWantReadError):
                    continue
                if not chunk:
                    break
                buf += chunk
                while b" " in buf:
                    n, rest = buf.split(b" ", 1)
                    if len(rest) < int(n):
                        break
                    self.messages.append(rest[: int(n)])
                    buf = rest[int(n) :]
            conn.close()
        except (OSError, ssl.SSLError):
            pass


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_syslog_collector_down_then_up_loses_nothing(world, tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    port = _free_port()
    audit = AuditService(
        world.ctx.index,
        node="NODE1",
        spool_dir=tmp_path / "spool",
        syslog_url=f"tls://127.0.0.1:{port}",
        syslog_ca=str(pki["ca"]),
    )
    audit.forwarder.retry_max = 0.5
    received: list[bytes] = []
    first = Collector(port, pki, received)
    second = Collector(port, pki, received)

    def wait(cond, timeout: float = 30.0) -> None:
        deadline = time.time() + timeout
        while not cond() and time.time() < deadline:
            time.sleep(0.1)

    try:
        for i in range(5):
            audit.record("Query", user=f"down-{i}")
        audit.flush()
        time.sleep(1.0)
        assert audit.forwarder.pending() == 5  # collector down: every event waits on disk
        first.start()
        for i in range(5):
            audit.record("Query", user=f"up-{i}")
        wait(lambda: len(received) >= 10)
        assert len(received) == 10
        first.stop()  # down again: the half-open connection must not swallow an event
        time.sleep(0.5)
        for i in range(3):
            audit.record("Query", user=f"again-{i}")
        audit.flush()
        time.sleep(1.5)
        second.start()
        wait(lambda: len(received) >= 13 and audit.forwarder.pending() == 0)
    finally:
        audit.close()
        first.stop()
        second.stop()
    users = [ET.fromstring(m.split(b"\xef\xbb\xbf", 1)[1]).find("ActiveParticipant").get("UserID") for m in received]
    expected = [f"down-{i}" for i in range(5)] + [f"up-{i}" for i in range(5)] + [f"again-{i}" for i in range(3)]
    assert sorted(set(users)) == sorted(expected)  # nothing lost
    assert users[:10] == expected[:10]  # in order
    assert all(re.match(rb"<8[45]>1 \d{4}-", m) and b" IHE+RFC-3881 - " in m for m in received)
    assert audit.forwarder.pending() == 0


def test_configuration_change_between_starts_is_audited(world) -> None:
    from openpacs.config import as_dict
    from openpacs.services.audit import audit_configuration

    ctx = world.ctx
    assert audit_configuration(ctx.index, ctx.audit, as_dict(ctx.settings), "N1") != []  # first start: baseline
    assert audit_configuration(ctx.index, ctx.audit, as_dict(ctx.settings), "N1") == []
    ctx.settings.auth = "off"
    ctx.settings.trusted_proxies = "10.0.0.0/8"
    assert audit_configuration(ctx.index, ctx.audit, as_dict(ctx.settings), "N1") == ["auth", "trusted_proxies"]
    ctx.audit.flush()
    alerts = [e for e in ctx.audit.search(event="SecurityAlert") if e.event_type == "110129"]
    assert len(alerts) == 1 and "auth, trusted_proxies" in alerts[0].detail


def test_wado_uri_audit_names_the_study_however_the_key_is_encoded(world) -> None:
    """The handler decodes "%73tudyUID" as studyUID and serves the object: the audit record must name its study and
    patient all the same."""
    from starlette.testclient import TestClient

    from openpacs.web.app import build_app

    from .conftest import bearer

    client = TestClient(build_app(world.ctx))
    st, se, sop = world.studies["radiology"]
    r = client.get(
        f"/wado?requestType=WADO&%73tudyUID={st}&seriesUID={se}&objectUID={sop}&contentType=application/dicom",
        headers=bearer(world.tokens["admin"]),
    )
    assert r.status_code == 200
    world.ctx.audit.flush()
    served = [e for e in world.ctx.audit.search(user="admin") if e.detail and "/wado" in e.detail]
    assert served and st in served[0].study_uids and served[0].patient_id, served


def test_a_viewers_frame_reads_of_one_instance_are_one_event(world) -> None:
    """Frame requests gathered in one batch: one event per (user, address, instance, status), the frames listed and
    counted; other instances, users and events stay apart (services.audit.coalesce_frame_reads)."""
    audit = world.ctx.audit
    base = "/dicom-web/studies/1.2.9/series/1.2.9.1/instances/1.2.9.1.{}/frames/{}"

    def frame(user: str, instance: int, n: str, status: int = 200) -> None:
        audit.record("InstancesTransferred", user=user, protocol="HTTP", source_address="10.0.0.7",
                     study_uids=["1.2.9"], outcome=0 if status < 400 else 4,
                     detail=f"GET {base.format(instance, n)} -> {status}")

    for n in ("5", "9", "1,2"):
        frame("pathologist", 1, n)
    frame("pathologist", 2, "5")
    frame("resident", 1, "5")
    frame("pathologist", 1, "99999", 404)
    audit.record("Query", user="pathologist", study_uids=["1.2.9"], query="StudyInstanceUID=1.2.9")
    audit.flush()
    got = sorted((e.user, e.detail or "", e.event) for e in audit.search(study_uid="1.2.9"))
    assert got == sorted([
        ("pathologist", f"GET {base.format(1, '5,9,1,2')} -> 200 (3 requests)", "InstancesTransferred"),
        ("pathologist", f"GET {base.format(2, '5')} -> 200", "InstancesTransferred"),
        ("resident", f"GET {base.format(1, '5')} -> 200", "InstancesTransferred"),
        ("pathologist", f"GET {base.format(1, '99999')} -> 404", "InstancesTransferred"),
        ("pathologist", "", "Query"),
    ])
