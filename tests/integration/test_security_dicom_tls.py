"""DICOM TLS (BCP195) with DCMTK: echoscu/storescu +tls succeed with a trusted client certificate; plain TCP on the
TLS port, clients with an untrusted certificate, and clients that do not trust the server all fail."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from tests.helpers import dcmtk
from tests.helpers.ports import free_port
from tests.helpers.server import OpenPACSServer
from tests.unit.security.tlsutil import make_pki


@pytest.fixture(scope="module")
def tls_server(require_dcmtk, tmp_path_factory):
    base = tmp_path_factory.mktemp("dicomtls")
    pki = make_pki(base / "pki", rsa_keys=True)
    rogue = make_pki(base / "rogue", name="rogue", rsa_keys=True)
    port = free_port()
    server = OpenPACSServer(
        base / "data",
        settings={
            "tls_cert": str(pki["cert"]),
            "tls_key": str(pki["key"]),
            "tls_ca": str(pki["ca"]),
            "dicom_tls_port": port,
            "http_tls": False,
        },
    )
    server.start()
    server.tls_port = port
    yield server, pki, rogue, base
    server.stop()


def tls_args(key: Path, cert: Path, ca: Path) -> list[str]:
    return ["+tls", str(key), str(cert), "+cf", str(ca)]


def test_echo_and_store_over_tls(tls_server) -> None:
    server, pki, _, base = tls_server
    r = dcmtk.run(
        "echoscu",
        "-v",
        *tls_args(pki["client_key"], pki["client_cert"], pki["ca"]),
        "-aec",
        "OPENPACS",
        "127.0.0.1",
        str(server.tls_port),
    )
    assert r.returncode == 0, r.output
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "TLS1"
    ds.Modality = "OT"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    f = base / "tls.dcm"
    ds.save_as(f, enforce_file_format=True)
    r = dcmtk.run(
        "storescu",
        "-v",
        *tls_args(pki["client_key"], pki["client_cert"], pki["ca"]),
        "-aec",
        "OPENPACS",
        "127.0.0.1",
        str(server.tls_port),
        str(f),
    )
    assert r.returncode == 0 and "Success" in r.output, r.output


def test_untrusted_or_plain_clients_rejected(tls_server) -> None:
    server, pki, rogue, _ = tls_server
    # a client certificate from another CA
    r = dcmtk.run(
        "echoscu",
        *tls_args(rogue["client_key"], rogue["client_cert"], pki["ca"]),
        "-aec",
        "OPENPACS",
        "127.0.0.1",
        str(server.tls_port),
        timeout=60,
    )
    assert r.returncode != 0
    # anonymous TLS (no client certificate) where mutual TLS is configured
    r = dcmtk.run(
        "echoscu", "+tla", "+cf", str(pki["ca"]), "-aec", "OPENPACS", "127.0.0.1", str(server.tls_port), timeout=60
    )
    assert r.returncode != 0
    # a client that does not trust the server's CA
    r = dcmtk.run(
        "echoscu",
        *tls_args(pki["client_key"], pki["client_cert"], rogue["ca"]),
        "-aec",
        "OPENPACS",
        "127.0.0.1",
        str(server.tls_port),
        timeout=60,
    )
    assert r.returncode != 0
    # plain DICOM on the TLS port
    r = dcmtk.run(
        "echoscu", "-to", "10", "-ta", "10", "-aec", "OPENPACS", "127.0.0.1", str(server.tls_port), timeout=60
    )
    assert r.returncode != 0
    # the plain port still works (development / benchmark)
    assert dcmtk.echo(server.dicom_port).returncode == 0
