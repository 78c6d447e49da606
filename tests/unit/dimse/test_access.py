"""dimse.access: who may associate, what they may do, which departments they see, the DICOM TLS contexts, and the
audit events an association produces."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from openpacs.config import RemoteAE, Settings
from openpacs.dimse import access, pdu

from ._support import Harness, associate_rq, echo_rq, pdata, store_rq_command


def settings(**kw: object) -> Settings:
    remotes = kw.pop("remote_aes", {})
    s = Settings(**kw)  # type: ignore[arg-type]
    s.remote_aes = remotes  # type: ignore[assignment]
    return s


PEERS = {
    "CARDIO": RemoteAE("CARDIO", "127.0.0.1", 104, allow=("echo", "find"), departments=("cardiology",)),
    "ALL": RemoteAE("ALL", "localhost", 104),
    "FAR": RemoteAE("FAR", "192.0.2.7", 104, allow=("store",), departments=("radiology",)),
}


def test_known_peer_matches_title_and_source_address() -> None:
    s = settings(remote_aes=PEERS)
    assert access.known_peer(s, "CARDIO", "127.0.0.1") is PEERS["CARDIO"]
    assert access.known_peer(s, "CARDIO", "::ffff:127.0.0.1") is PEERS["CARDIO"]  # IPv4-mapped
    assert access.known_peer(s, "ALL", "127.0.0.1") is PEERS["ALL"]  # host names resolve
    assert access.known_peer(s, "CARDIO", "10.1.1.1") is None
    assert access.known_peer(s, "FAR", "127.0.0.1") is None
    assert access.known_peer(s, "cardio", "127.0.0.1") is None  # AE titles are case-sensitive


def test_check_association() -> None:
    strict = settings(remote_aes=PEERS, dicom_accept_unknown=False, check_called_aet=True)
    assert access.check_association(strict, "CARDIO", "OPENPACS", "127.0.0.1") is None
    (rj, why) = access.check_association(strict, "CARDIO", "OTHER", "127.0.0.1")  # type: ignore[misc]
    assert rj == (1, 1, 7) and "called AE" in why
    (rj, _) = access.check_association(strict, "EVIL", "OPENPACS", "127.0.0.1")  # type: ignore[misc]
    assert rj == (1, 1, 3)
    assert access.check_association(strict, "FAR", "OPENPACS", "127.0.0.1") is not None  # wrong host
    permissive = settings(remote_aes=PEERS)
    assert access.check_association(permissive, "EVIL", "WHATEVER", "10.0.0.1") is None


def test_allowed_operations() -> None:
    strict = settings(remote_aes=PEERS, dicom_accept_unknown=False)
    assert access.allowed_operations(strict, "CARDIO", "127.0.0.1") == {"echo", "find"}
    assert access.allowed_operations(strict, "ALL", "127.0.0.1") == set(RemoteAE.allow)
    assert access.allowed_operations(strict, "EVIL", "127.0.0.1") == set()
    permissive = settings(remote_aes=PEERS)
    assert access.allowed_operations(permissive, "EVIL", "10.0.0.1") == set(access.OPERATIONS)
    # a configured title calling from elsewhere keeps its restrictions in permissive mode
    assert access.allowed_operations(permissive, "FAR", "127.0.0.1") == {"store"}
    assert access.allowed_operations(permissive, "CARDIO", "10.0.0.1") == {"echo", "find"}


def test_department_scope_is_never_widened() -> None:
    for s in (settings(remote_aes=PEERS), settings(remote_aes=PEERS, dicom_accept_unknown=False)):
        assert access.department_scope(s, "CARDIO", "127.0.0.1") == ("cardiology",)
        assert access.department_scope(s, "CARDIO", "10.0.0.1") == ("cardiology",)
        assert access.department_scope(s, "FAR", "127.0.0.1") == ("radiology",)
        assert access.department_scope(s, "ALL", "127.0.0.1") is None
    assert access.department_scope(settings(), "ANYONE", "10.0.0.1") is None


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A self-signed certificate and key (its own CA)."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    d = tmp_path_factory.mktemp("pki")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    (d / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    return {"cert": d / "cert.pem", "key": d / "key.pem", "ca": d / "cert.pem"}


def test_server_tls_context_is_bcp195(pki: dict[str, Path]) -> None:
    ctx = access.tls_context(settings(tls_cert=str(pki["cert"]), tls_key=str(pki["key"])))
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode == ssl.CERT_NONE
    tls12 = [c for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert tls12 and all(c["aead"] and c["kea"] in ("kx-ecdhe", "kx-dhe") for c in tls12), tls12
    mutual = access.tls_context(settings(tls_cert=str(pki["cert"]), tls_key=str(pki["key"]), tls_ca=str(pki["ca"])))
    assert mutual.verify_mode == ssl.CERT_REQUIRED
    with pytest.raises(ValueError):
        access.tls_context(settings())


def test_client_tls_context_verifies_the_peer(pki: dict[str, Path]) -> None:
    ctx = access.client_tls_context(settings(tls_ca=str(pki["ca"])))
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2


def test_rejection_and_refusal_are_security_alerts() -> None:
    h = Harness(dicom_accept_unknown=False)
    h.settings.remote_aes = {"M": RemoteAE("TESTSCU", "127.0.0.1", 104, allow=("echo",))}
    h.feed(associate_rq(calling="STRANGER"))
    assert h.transport.pdus()[0][0] == pdu.A_ASSOCIATE_RJ
    ((event, kw),) = h.endpoint.ctx.audit.events
    assert event == "SecurityAlert" and kw["event_type"] == "110126" and kw["outcome"] == 4
    assert kw["source_aet"] == "STRANGER" and kw["source_address"] == "127.0.0.1" and kw["protocol"] == "DIMSE"
    h.close()
    h = Harness(dicom_accept_unknown=False)
    h.settings.remote_aes = {"M": RemoteAE("TESTSCU", "127.0.0.1", 104, allow=("echo",))}
    h.associate()
    h.feed(echo_rq(1) + pdata(3, 0x03, store_rq_command(2)) + pdata(3, 0x02, b"xx"))
    ((event, kw),) = h.endpoint.ctx.audit.events
    assert event == "SecurityAlert" and kw["event_type"] == "110132" and "C-STORE" in kw["detail"]
    h.close()


def test_received_instances_are_audited_once_per_study_at_the_end() -> None:
    h = Harness()
    ingest = h.endpoint.ctx.ingest
    ingest.study_of = {"1.1": "9.1", "1.2": "9.1", "1.3": "9.2"}
    h.associate()
    for i, uid in enumerate(("1.1", "1.2", "1.3"), start=1):
        h.feed(pdata(3, 0x03, store_rq_command(i, sop_instance=uid)) + pdata(3, 0x02, b"xx"))
    assert h.endpoint.ctx.audit.events == []  # nothing per instance
    h.feed(pdu.encode_release_rq())
    h.close()
    events = h.endpoint.ctx.audit.events
    assert sorted((e, tuple(kw["study_uids"]), kw["action"]) for e, kw in events) == [
        ("InstancesTransferred", ("9.1",), "C"),
        ("InstancesTransferred", ("9.2",), "C"),
    ]
    assert "2 instance(s)" in next(kw["detail"] for _, kw in events if kw["study_uids"] == ["9.1"])
    assert all(kw["source_aet"] == "TESTSCU" and kw["destination"] == "OPENPACS" for _, kw in events)


def test_settings_warnings() -> None:
    s = settings(remote_aes={"X": RemoteAE("X", "h", 104, allow=("echo", "fnd"), tls=True)},
                 dicom_accept_unknown=False)
    warnings = access.settings_warnings(s)
    assert any("fnd" in w for w in warnings) and any("tls_ca" in w for w in warnings)
    assert any("every association" in w for w in access.settings_warnings(settings(dicom_accept_unknown=False)))
    assert access.settings_warnings(settings(remote_aes=PEERS)) == []
