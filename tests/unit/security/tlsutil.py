"""A throw-away CA and certificates for 127.0.0.1 / localhost (syslog over TLS, DICOM TLS, HTTPS tests)."""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(key, path: Path) -> None:  # type: ignore[no-untyped-def]
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


def _new_key(rsa_keys: bool):  # type: ignore[no-untyped-def]
    if rsa_keys:
        from cryptography.hazmat.primitives.asymmetric import rsa

        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


def make_pki(directory: Path, name: str = "test", rsa_keys: bool = False, dual_use: bool = False) -> dict[str, Path]:
    """{ca, cert, key, client_cert, client_key}: a CA, a server certificate and a client certificate it signed.

    ``dual_use``: both certificates may serve and authenticate a client (a DICOM node is both: it accepts
    associations and, for C-MOVE, opens them with the same certificate)."""
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = _new_key(rsa_keys)
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name(f"{name} CA"))
        .issuer_name(_name(f"{name} CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    out = {"ca": directory / "ca.pem"}
    out["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for kind, usage in (("server", ExtendedKeyUsageOID.SERVER_AUTH), ("client", ExtendedKeyUsageOID.CLIENT_AUTH)):
        key = _new_key(rsa_keys)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(f"{name} {kind}"))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH] if dual_use else [usage]
                ),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        prefix = "" if kind == "server" else "client_"
        out[prefix + "cert"] = directory / f"{kind}.pem"
        out[prefix + "key"] = directory / f"{kind}.key"
        out[prefix + "cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key, out[prefix + "key"])
    return out
