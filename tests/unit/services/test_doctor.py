"""services.doctor checks that need a particular world: a wrong clock, TLS certificates near or past expiry, unsafe
settings, an index behind the current schema, and the demo re-identification (UIDs consistent within a study)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from openpacs.config import Settings
from openpacs.services import doctor


def _cert(tmp_path: Path, not_before: datetime, not_after: datetime, name: str = "pacs") -> tuple[str, str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(not_before).not_valid_after(not_after)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


def test_clock_before_build_fails() -> None:
    assert doctor.check_clock(None, now=datetime(2020, 1, 1, tzinfo=UTC)).status == "fail"
    assert doctor.check_clock(None, now=datetime.now(UTC)).status == "ok"


@pytest.mark.parametrize(("days_before", "days_after", "status"), [(400, -1, "fail"), (300, 10, "warn"),
                                                                   (10, 200, "ok"), (-5, 200, "fail")])
def test_tls_expiry(tmp_path, days_before, days_after, status) -> None:
    now = datetime.now(UTC)
    cert, key = _cert(tmp_path, now - timedelta(days=days_before), now + timedelta(days=days_after))
    check = doctor.check_tls(Settings(tls_cert=cert, tls_key=key), now=now)
    assert check.status == status, check
    if status != "ok":
        assert check.action


def test_tls_key_of_another_certificate_fails(tmp_path) -> None:
    now = datetime.now(UTC)
    cert, _ = _cert(tmp_path, now - timedelta(days=1), now + timedelta(days=100), "a")
    _, other_key = _cert(tmp_path, now - timedelta(days=1), now + timedelta(days=100), "b")
    check = doctor.check_tls(Settings(tls_cert=cert, tls_key=other_key), now=now)
    assert check.status == "fail" and "does not belong" in check.finding


def test_tls_not_configured_is_skipped() -> None:
    assert doctor.check_tls(Settings()).status == "skip"


def test_unsafe_settings_off_loopback() -> None:
    assert doctor.check_security(Settings(http_host="0.0.0.0", dicom_host="0.0.0.0", auth="off")).status == "fail"
    open_dicom = doctor.check_security(Settings(dicom_host="0.0.0.0", dicom_accept_unknown=True))
    assert open_dicom.status == "fail" and "dicom_accept_unknown" in open_dicom.finding
    accepted = doctor.check_security(Settings(dicom_host="0.0.0.0", allow_open_dicom=True, hl7_host="127.0.0.1"))
    assert accepted.status == "warn" and "any calling AE" in accepted.finding
    assert doctor.check_security(Settings()).status == "ok"


def test_index_behind_the_current_schema(tmp_path) -> None:
    from openpacs.index.db import Index
    from openpacs.index.migrate import upgrade

    idx = Index(f"sqlite:///{tmp_path / 'index.sqlite'}")
    upgrade(idx.write_engine, "0001")
    idx.close()
    check, ro = doctor.check_index(Settings(data_dir=tmp_path))
    assert ro is not None
    ro.close()
    assert check.status == "fail" and "openpacs migrate" in check.action
    assert check.details["revision"] == ["0001"]


def test_demo_reidentification_keeps_a_study_together() -> None:
    import io

    import pydicom

    from openpacs.services import demo

    study = next(s for s in demo.STUDIES if s.key == "rt-plan")
    files = [pydicom.dcmread(io.BytesIO(demo.reidentify(demo.sample_path(n) or "", study, 8))) for n in study.files]
    assert {f.StudyInstanceUID for f in files} == {demo.study_uid(study)}
    assert {str(f.PatientName) for f in files} == {demo.PATIENTS[study.patient_id][0]}
    assert all(f.file_meta.MediaStorageSOPInstanceUID == f.SOPInstanceUID for f in files)
    struct, plan = files[0], files[1]
    # the plan still points at the structure set, under its new UID
    assert plan.ReferencedStructureSetSequence[0].ReferencedSOPInstanceUID == struct.SOPInstanceUID
    assert files[2].ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID == plan.SOPInstanceUID
    again = pydicom.dcmread(io.BytesIO(demo.reidentify(demo.sample_path(study.files[0]) or "", study, 8)))
    assert again.SOPInstanceUID == struct.SOPInstanceUID  # deterministic: a second demo run stores no duplicates
