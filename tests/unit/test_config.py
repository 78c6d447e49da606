"""Settings: defaults < TOML file < OPENPACS_* environment < explicit overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from openpacs.config import RemoteAE, Settings, as_dict, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    import os

    for k in list(os.environ):
        if k.startswith("OPENPACS_"):
            monkeypatch.delenv(k)


def test_defaults():
    s = load_settings()
    assert s.aet == "OPENPACS" and s.dicom_port == 11112 and s.http_port == 8042
    assert s.duplicate_policy == "keep-first" and s.pn_case_insensitive is True
    assert s.resolved_index_url == f"sqlite:///{(Path('openpacs-data') / 'index.sqlite').resolve()}"
    assert s.resolved_storage_url == f"file://{(Path('openpacs-data') / 'blobs').resolve()}"
    assert 1 <= s.worker_count <= 4


def test_precedence(tmp_path, monkeypatch):
    cfg = tmp_path / "openpacs.toml"
    cfg.write_text('aet = "FROMFILE"\ndicom_port = 104\nhttp_port = 9000\npn_case_insensitive = false\n'
                   'data_dir = "/srv/pacs"\nartim_timeout = 5\n')
    s = load_settings(cfg)
    assert (s.aet, s.dicom_port, s.http_port, s.pn_case_insensitive) == ("FROMFILE", 104, 9000, False)
    assert s.data_dir == Path("/srv/pacs") and s.artim_timeout == 5.0 and isinstance(s.artim_timeout, float)
    monkeypatch.setenv("OPENPACS_DICOM_PORT", "2000")
    monkeypatch.setenv("OPENPACS_PN_CASE_INSENSITIVE", "yes")
    s = load_settings(cfg)
    assert s.dicom_port == 2000 and s.pn_case_insensitive is True and s.aet == "FROMFILE"
    s = load_settings(cfg, dicom_port=3000, aet=None)
    assert s.dicom_port == 3000 and s.aet == "FROMFILE"  # None overrides are ignored (flag not given)


@pytest.mark.parametrize("raw,expected", [("1", True), ("true", True), ("ON", True), ("0", False), ("no", False),
                                          ("", False)])
def test_env_bools(monkeypatch, raw, expected):
    monkeypatch.setenv("OPENPACS_CHECK_CALLED_AET", raw)
    assert load_settings().check_called_aet is expected


def test_remote_aes(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[remote_aes.viewer]\nhost = "10.0.0.5"\nport = 11113\n'
                   '[remote_aes.modality]\naet = "CT01"\nhost = "ct"\nport = "104"\nallow = ["store", "echo"]\n')
    s = load_settings(cfg)
    assert s.remote_aes["viewer"] == RemoteAE("viewer", "10.0.0.5", 11113)
    assert s.remote_aes["modality"] == RemoteAE("CT01", "ct", 104, ("store", "echo"))
    assert as_dict(s)["remote_aes"]["modality"]["port"] == 104


def test_unknown_setting_is_an_error(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("dicom_prot = 104\n")
    with pytest.raises(ValueError, match="dicom_prot"):
        load_settings(cfg)


def test_bad_number_is_an_error(monkeypatch):
    monkeypatch.setenv("OPENPACS_DICOM_PORT", "eleven")
    with pytest.raises(ValueError):
        load_settings()


def test_explicit_urls_and_workers():
    s = Settings(index_url="postgresql://u@h/db", storage_url="file:///x", dicom_workers=3)
    assert s.resolved_index_url == "postgresql://u@h/db" and s.resolved_storage_url == "file:///x"
    assert s.worker_count == 3


def test_invalid_duplicate_policy_is_refused(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('duplicate_policy = "keep-last"\n')
    with pytest.raises(ValueError, match="duplicate_policy"):
        load_settings(cfg)
