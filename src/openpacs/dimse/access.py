"""Who may associate and what they may do: the one place the security work extends."""

from __future__ import annotations

import functools
import ipaddress
import logging
import socket
import ssl
from collections.abc import Iterable, Mapping
from typing import Any

from ..config import RemoteAE, Settings
from ..services import nodes
from ..services.types import Query
from . import pdu

# Names ``RemoteAE.allow`` may use: the services negotiated today, and those registered later with
# ``negotiation.register_service`` (Modality Worklist, MPPS, Storage Commitment), which permissive mode also allows.
OPERATIONS = nodes.OPERATIONS


def remote_aes(settings: Settings) -> Mapping[str, RemoteAE]:
    """The remote AEs in force: TOML ``[remote_aes.*]`` and the nodes kept in the index (services.nodes, cached)."""
    return nodes.remote_aes_for(settings)


def settings_warnings(settings: Settings) -> list[str]:
    """Access-control settings that are probably mistakes (logged at start): a misspelt operation silently denies."""
    out: list[str] = []
    for name, remote in settings.remote_aes.items():
        unknown = sorted(set(remote.allow) - set(OPERATIONS))
        if unknown:
            out.append(
                f"[remote_aes.{name}] allow: unknown operation(s) {', '.join(unknown)} (known: {', '.join(OPERATIONS)})"
            )
        if remote.tls and not settings.tls_ca:
            out.append(
                f"[remote_aes.{name}] tls = true without tls_ca: its certificate is checked against the "
                "system CA store only"
            )
    if not settings.dicom_accept_unknown and not remote_aes(settings):
        out.append("dicom_accept_unknown = false and no [remote_aes.*]: every association will be rejected")
    return out


@functools.lru_cache(maxsize=256)
def _addresses(host: str) -> frozenset[str]:
    """The IP addresses a configured host name stands for (cached; a literal address stands for itself)."""
    out = {host}
    try:
        ipaddress.ip_address(host)
        return frozenset(out)
    except ValueError:
        pass
    try:
        for info in socket.getaddrinfo(host, None):
            out.add(str(info[4][0]))
    except OSError:
        pass
    return frozenset(out)


def _normal(address: str) -> str:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def known_peer(settings: Settings, calling_aet: str, address: str) -> RemoteAE | None:
    """The configured remote AE with this title whose host matches the connection's source address."""
    source = _normal(address)
    for remote in remote_aes(settings).values():
        if remote.aet.strip() == calling_aet and source in {_normal(a) for a in _addresses(remote.host)}:
            return remote
    return None


def check_association(
    settings: Settings, calling_aet: str, called_aet: str, address: str
) -> tuple[tuple[int, int, int], str] | None:
    """None to accept, else ((result, source, reason), why) for the A-ASSOCIATE-RJ."""
    if settings.check_called_aet and called_aet != settings.aet.strip():
        return (pdu.RJ_PERMANENT, pdu.RJ_SOURCE_USER, pdu.RJ_USER_CALLED_AE_NOT_RECOGNIZED), (
            f"called AE {called_aet!r} is not {settings.aet!r}"
        )
    if not settings.dicom_accept_unknown and known_peer(settings, calling_aet, address) is None:
        return (pdu.RJ_PERMANENT, pdu.RJ_SOURCE_USER, pdu.RJ_USER_CALLING_AE_NOT_RECOGNIZED), (
            f"calling AE {calling_aet!r} from {address} is not a configured remote AE"
        )
    return None


def _titled(settings: Settings, calling_aet: str) -> list[RemoteAE]:
    return [r for r in remote_aes(settings).values() if r.aet.strip() == calling_aet]


def allowed_operations(settings: Settings, calling_aet: str, address: str) -> frozenset[str]:
    """DIMSE operations this peer may perform (checked per request; a refusal answers 0x0124).

    A configured peer gets its ``allow`` list. In permissive mode (``dicom_accept_unknown``) an unknown AE may do
    everything, but a configured AE title calling from another host keeps its title's restrictions: permissive mode
    never widens what a configured peer may do."""
    remote = known_peer(settings, calling_aet, address)
    if remote is not None:
        return frozenset(remote.allow)
    if not settings.dicom_accept_unknown:
        return frozenset()
    titled = _titled(settings, calling_aet)
    if titled:
        return frozenset(op for r in titled for op in r.allow)
    return frozenset(OPERATIONS)


def department_scope(settings: Settings, calling_aet: str, address: str) -> tuple[str, ...] | None:
    """Departments a peer's C-FIND / C-MOVE / C-GET may see (``Query.departments``, ``resolve(departments=)``).

    The configured peer's ``departments`` (None: every department). A peer known by AE title but calling from
    another host (permissive mode) keeps its title's scope, so that mode never widens a scoped peer."""
    remote = known_peer(settings, calling_aet, address)
    if remote is not None:
        return remote.departments
    scopes = [r.departments for r in _titled(settings, calling_aet)]
    if not scopes:
        return None
    if any(s is None for s in scopes):
        return None
    return tuple(sorted({d for s in scopes for d in (s or ())}))


def audit(services: object, event: str, calling_aet: str, address: str, **kw: object) -> None:
    """Record a DIMSE audit event if the services have an audit trail (never raises; ``record`` only queues)."""
    trail = getattr(services, "audit", None)
    if trail is None:
        return
    kw.setdefault("user", calling_aet)
    try:
        trail.record(event, source_aet=calling_aet, source_address=address, protocol="DIMSE", **kw)
    except Exception:  # noqa: BLE001 - auditing must not break an association
        logging.getLogger("openpacs.audit").exception("DIMSE audit record failed")


def security_alert(
    services: object, calling_aet: str, address: str, event_type: str, detail: str, **kw: object
) -> None:
    """A refused node or operation (PS3.15 A.5.3.11, outcome "serious failure"), its detail bounded."""
    audit(services, "SecurityAlert", calling_aet, address, outcome=4, event_type=event_type, detail=detail[:500], **kw)


def study_patients(services: Any, study_uids: Iterable[str]) -> dict[str, str]:
    """Patient ID of each study (for the audit trail's patient participant); blocking: run it in the executor."""
    uids = sorted({u for u in study_uids if u})
    out: dict[str, str] = {}
    query_service = getattr(services, "query", None)
    if not uids or query_service is None:
        return out
    try:
        for start in range(0, len(uids), 200):
            q = Query(
                level="STUDY", filters={"StudyInstanceUID": "\\".join(uids[start : start + 200]), "PatientID": ""}
            )
            for ds in query_service.find(q):
                out[str(ds.get("StudyInstanceUID", ""))] = str(ds.get("PatientID", "") or "")
    except Exception:  # noqa: BLE001 - an audit record without the patient beats none
        logging.getLogger("openpacs.audit").exception("patient lookup for the audit trail failed")
    return out


# BCP195 (RFC 9325) cipher suites for TLS 1.2: forward secrecy and AEAD only; TLS 1.3 suites are all acceptable.
BCP195_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL:!MD5:!SHA1:!DSS:!RC4:!3DES"


def tls_context(settings: Settings, client_certificates: ssl.VerifyMode = ssl.CERT_REQUIRED) -> ssl.SSLContext:
    """Server context for DICOM TLS (and HTTPS): TLS ≥ 1.2, no fallback, BCP195 ciphers; client certificates
    verified against ``tls_ca`` when it is set, and required (mutual TLS: an untrusted client never gets an
    association) unless ``client_certificates`` is CERT_OPTIONAL (HTTPS, where browsers log in with passwords)."""
    if not settings.tls_cert:
        raise ValueError("DICOM TLS needs tls_cert (and tls_key)")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION
    ctx.set_ciphers(BCP195_CIPHERS)
    ctx.load_cert_chain(settings.tls_cert, settings.tls_key or None)
    if settings.tls_ca:
        ctx.load_verify_locations(settings.tls_ca)
        ctx.verify_mode = client_certificates
    return ctx


def client_tls_context(settings: Settings) -> ssl.SSLContext:
    """Client context for outgoing DICOM TLS (C-MOVE sub-associations to peers with ``tls = true``): the same BCP195
    floor; the peer's certificate is verified against ``tls_ca`` (else the system store) and its host name; our
    ``tls_cert``/``tls_key`` are presented when set, for peers that require mutual TLS."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED + check_hostname
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.set_ciphers(BCP195_CIPHERS)
    if settings.tls_ca:
        ctx.load_verify_locations(settings.tls_ca)
    else:
        ctx.load_default_certs()
    if settings.tls_cert:
        ctx.load_cert_chain(settings.tls_cert, settings.tls_key or None)
    return ctx


def peer_certificate_name(transport: Any) -> str:
    """The subject common name of a TLS peer's verified certificate ('' for plain TCP or no certificate)."""
    cert = transport.get_extra_info("peercert") if transport is not None else None
    if not cert:
        return ""
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return ""
