"""DICOM TLS (PS3.15 BCP195 profile) with real DCMTK peers.

Incoming: echoscu/storescu ``+tls`` succeed on ``dicom_tls_port``, served by both processes (``dicom_workers = 2``:
the handshake happens in whichever process the connection was handed to); plain DICOM on the TLS port, an untrusted
or missing client certificate (mutual TLS), TLS 1.1 and TLS 1.2 without forward secrecy are refused, and each
refusal is a Security Alert in the audit trail. The plain port is unaffected.
Outgoing: a C-MOVE to a destination configured with ``tls = true`` (storescp ``+tls``, requiring our client
certificate) goes over TLS; a destination whose certificate we do not trust receives nothing.
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import time
import urllib.request
import warnings
from pathlib import Path

import pydicom
import pytest
from helpers import dcmtk
from helpers.ports import free_port, wait_for_port
from helpers.server import OpenPACSServer
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from unit.security.tlsutil import make_pki


def tls(key: Path, cert: Path, ca: Path) -> list[str]:
    return ["+tls", str(key), str(cert), "+cf", str(ca)]


class TlsServer(OpenPACSServer):
    """The server with tls_cert set: its web side is HTTPS too (healthz and the audit API over TLS)."""

    ca: Path
    tls_port: int

    def _https(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))

    def _wait_healthz(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while True:
            self._alive()
            try:
                with urllib.request.urlopen(f"https://127.0.0.1:{self.http_port}/healthz", timeout=5,
                                            context=self._https()) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(self.log_tail())
            time.sleep(0.1)

    def audit(self) -> list[dict]:
        time.sleep(0.8)  # the trail is written in 250 ms batches
        with urllib.request.urlopen(f"https://127.0.0.1:{self.http_port}/admin/audit?limit=100000", timeout=30,
                                    context=self._https()) as r:
            return json.loads(r.read())


def write_instance(path: Path, pid: str) -> Path:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = pid
    ds.PatientName = "TLS^" + pid
    ds.Modality = "OT"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.save_as(path, enforce_file_format=True)
    return path


class TlsStoreSCP:
    """DCMTK storescp +tls (requires and verifies the client certificate: DCMTK's default -rc)."""

    def __init__(self, directory: Path, aet: str, key: Path, cert: Path, ca: Path) -> None:
        self.directory, self.aet, self.port = directory, aet, free_port()
        self.args = tls(key, cert, ca)
        self.log = directory.parent / f"{aet}.log"

    def start(self) -> TlsStoreSCP:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.logfh = open(self.log, "w")
        self.proc = dcmtk.spawn("storescp", "-v", "+xa", *self.args, "-aet", self.aet, "-od", str(self.directory),
                                str(self.port), stdout=self.logfh)
        wait_for_port(self.port)
        return self

    def files(self) -> list[Path]:
        return sorted(p for p in self.directory.iterdir() if p.is_file())

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.logfh.close()


@pytest.fixture(scope="module")
def world(require_dcmtk, tmp_path_factory):
    base = tmp_path_factory.mktemp("dimsetls")
    pki = make_pki(base / "pki", "good", rsa_keys=True, dual_use=True)
    rogue = make_pki(base / "rogue", "rogue", rsa_keys=True, dual_use=True)
    # a TLS move destination we trust, and one presenting a certificate of another CA
    dest = TlsStoreSCP(base / "dest", "TLSDEST", pki["key"], pki["cert"], pki["ca"]).start()
    fake = TlsStoreSCP(base / "fake", "FAKEDEST", rogue["key"], rogue["cert"], pki["ca"]).start()
    server = TlsServer(base / "data", settings={
        "tls_cert": str(pki["cert"]), "tls_key": str(pki["key"]), "tls_ca": str(pki["ca"]),
        "dicom_tls_port": free_port(), "dicom_workers": 2})
    server.ca = pki["ca"]
    server.tls_port = int(server.settings["dicom_tls_port"])  # type: ignore[call-overload]
    server.extra_toml = "".join(
        f'\n[remote_aes.{aet}]\naet = "{aet}"\nhost = "127.0.0.1"\nport = {port}\ntls = true\n'
        for aet, port in (("TLSDEST", dest.port), ("FAKEDEST", fake.port)))
    server.start()
    yield server, pki, rogue, base, dest, fake
    server.stop()
    dest.stop()
    fake.stop()


def test_echo_and_store_over_tls_in_every_process(world) -> None:
    server, pki, _, base, _, _ = world
    client = tls(pki["client_key"], pki["client_cert"], pki["ca"])
    for _ in range(4):  # the dispatcher alternates: the serving process and the worker both do handshakes
        r = dcmtk.run("echoscu", "-v", *client, "-aec", "OPENPACS", "127.0.0.1", str(server.tls_port))
        assert r.returncode == 0, r.output
    files = [write_instance(base / f"tls{i}.dcm", "TLSPAT") for i in range(3)]
    r = dcmtk.run("storescu", "-v", *client, "-aet", "TLSSCU", "-aec", "OPENPACS", "127.0.0.1", str(server.tls_port),
                  *map(str, files))
    assert r.returncode == 0 and r.output.count("Received Store Response (Success)") == 3, r.output
    assert len(server.blob_files()) == 3
    r = dcmtk.run("findscu", "-S", *client, "-k", "QueryRetrieveLevel=STUDY", "-k", "PatientID=TLSPAT",
                  "-k", "StudyInstanceUID", "-aec", "OPENPACS", "127.0.0.1", str(server.tls_port))
    assert r.returncode == 0 and r.output.count("TLSPAT") >= 1, r.output
    # the plain listener still works beside it
    assert dcmtk.echo(server.dicom_port).returncode == 0
    events = [e for e in server.audit() if e["event"] == "InstancesTransferred" and e["source_aet"] == "TLSSCU"]
    assert len(events) == 3 and all(e["action"] == "C" and e["patient_id"] == "TLSPAT" for e in events)
    assert all("over TLS (good client)" in e["detail"] for e in events)


def test_plain_untrusted_and_anonymous_clients_are_refused(world) -> None:
    server, pki, rogue, _, _, _ = world
    port = str(server.tls_port)
    before = sum(1 for e in server.audit() if e["event"] == "SecurityAlert")
    # plain DICOM on the TLS port
    r = dcmtk.run("echoscu", "-to", "10", "-ta", "10", "-aec", "OPENPACS", "127.0.0.1", port, timeout=60)
    assert r.returncode != 0
    # a client certificate from another CA (mutual TLS is on: tls_ca is set)
    r = dcmtk.run("echoscu", *tls(rogue["client_key"], rogue["client_cert"], pki["ca"]), "-aec", "OPENPACS",
                  "127.0.0.1", port, timeout=60)
    assert r.returncode != 0
    # no client certificate at all
    r = dcmtk.run("echoscu", "+tla", "+cf", str(pki["ca"]), "-aec", "OPENPACS", "127.0.0.1", port, timeout=60)
    assert r.returncode != 0
    # a client that does not trust the server
    r = dcmtk.run("echoscu", *tls(pki["client_key"], pki["client_cert"], rogue["ca"]), "-aec", "OPENPACS",
                  "127.0.0.1", port, timeout=60)
    assert r.returncode != 0 and "certificate verify failed" in r.output
    alerts = [e for e in server.audit() if e["event"] == "SecurityAlert"][before:]
    details = " ".join(e["detail"] for e in alerts)
    assert all(e["event_type"] == "110126" and e["outcome"] == 4 for e in alerts)
    for reason in ("WRONG_VERSION_NUMBER", "CERTIFICATE_VERIFY_FAILED", "PEER_DID_NOT_RETURN_A_CERTIFICATE",
                   "UNKNOWN_CA"):
        assert reason in details, details
    assert dcmtk.echo(server.dicom_port).returncode == 0


def _handshake(server: TlsServer, pki: dict[str, Path], version: ssl.TLSVersion, ciphers: str | None = None) -> str:
    """A Python client offering exactly ``version`` (and ``ciphers``): '' if the server completes the handshake."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(pki["ca"]))
    ctx.load_cert_chain(str(pki["client_cert"]), str(pki["client_key"]))
    ctx.minimum_version = ctx.maximum_version = version
    if ciphers:
        ctx.set_ciphers(ciphers)
    with socket.create_connection(("127.0.0.1", server.tls_port), timeout=10) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                s.sendall(b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00")  # an A-RELEASE-RQ out of place: aborted
                s.recv(16)
        except (ssl.SSLError, OSError) as exc:
            return str(exc)
    return ""


def test_bcp195_floor(world) -> None:
    server, pki, _, _, _, _ = world
    # the client really offers TLS 1.1 (security level 0): the server is the one refusing, and audits it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        assert _handshake(server, pki, ssl.TLSVersion.TLSv1_1, "ALL:@SECLEVEL=0")
    alerts = [e["detail"] for e in server.audit() if e["event"] == "SecurityAlert"]
    assert any("UNSUPPORTED_PROTOCOL" in d for d in alerts), alerts
    # TLS 1.2 without forward secrecy (static RSA key exchange) or without AEAD (CBC): no shared cipher
    assert _handshake(server, pki, ssl.TLSVersion.TLSv1_2, "AES256-GCM-SHA384")
    assert _handshake(server, pki, ssl.TLSVersion.TLSv1_2, "ECDHE-RSA-AES128-SHA256:ECDHE-RSA-AES256-SHA")
    # the BCP195 suites of TLS 1.2, and TLS 1.3, are accepted
    assert _handshake(server, pki, ssl.TLSVersion.TLSv1_2, "ECDHE-RSA-AES128-GCM-SHA256") == ""
    assert _handshake(server, pki, ssl.TLSVersion.TLSv1_3) == ""


def test_move_to_a_tls_destination(world) -> None:
    server, pki, _, base, dest, fake = world
    f = write_instance(base / "move.dcm", "MOVEPAT")
    study = str(pydicom.dcmread(f).StudyInstanceUID)
    assert dcmtk.store(server.dicom_port, [f]).returncode == 0
    # DCMTK's movescu has no TLS: the request comes on the plain port, the sub-association goes out over TLS
    r = dcmtk.run("movescu", "-d", "-S", "-aem", "TLSDEST", "-k", "QueryRetrieveLevel=STUDY",
                  "-k", f"StudyInstanceUID={study}", "-aec", "OPENPACS", "127.0.0.1", str(server.dicom_port))
    res = dcmtk.RetrieveResult(r)
    assert res.final_status() == 0 and res.final_counts().get("completed") == 1, r.output
    assert len(dest.files()) == 1
    moved = [e for e in server.audit() if e["event"] == "InstancesTransferred" and e["destination"] == "TLSDEST"]
    assert len(moved) == 1 and study in moved[0]["study_uids"] and "over TLS" in moved[0]["detail"], moved
    # a destination presenting a certificate we do not trust gets nothing
    r = dcmtk.run("movescu", "-d", "-S", "-aem", "FAKEDEST", "-k", "QueryRetrieveLevel=STUDY",
                  "-k", f"StudyInstanceUID={study}", "-aec", "OPENPACS", "127.0.0.1", str(server.dicom_port))
    res = dcmtk.RetrieveResult(r)
    assert res.final_status() not in (0, None) and not res.final_counts().get("completed"), r.output
    assert fake.files() == []
    assert "CERTIFICATE_VERIFY_FAILED" in server.log_text()


def test_without_tls_ca_client_certificates_are_not_required(world, tmp_path) -> None:
    _, pki, _, _, _, _ = world
    server = TlsServer(tmp_path / "data", settings={"tls_cert": str(pki["cert"]), "tls_key": str(pki["key"]),
                                                    "dicom_tls_port": free_port()})
    server.ca = pki["ca"]
    server.tls_port = int(server.settings["dicom_tls_port"])  # type: ignore[call-overload]
    server.start()
    try:
        r = dcmtk.run("echoscu", "+tla", "+cf", str(pki["ca"]), "-aec", "OPENPACS", "127.0.0.1", str(server.tls_port))
        assert r.returncode == 0, r.output
        r = dcmtk.run("echoscu", "-to", "10", "-ta", "10", "-aec", "OPENPACS", "127.0.0.1", str(server.tls_port),
                      timeout=60)
        assert r.returncode != 0  # still TLS only
    finally:
        server.stop()
