"""Training mode: `openpacs serve --demo` starts a throw-away instance in one command — the demo set went through
ingest (C-FIND and QIDO-RS show every expected modality), each study has its department, every demo user signs in,
a department-scoped user sees only their department — and its temporary data dir is gone after SIGTERM. `openpacs
demo` refuses an index with real patients and is idempotent on a demo instance."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import requests
from helpers import dcmtk
from helpers.dicomdata import testdata_file as sample_file
from helpers.ports import free_port
from helpers.server import openpacs_command

from openpacs.services import demo

EXPECTED_DEPARTMENTS = {"DEMO00001": "radiology", "DEMO00005": "cardiology", "DEMO00006": "cardiology",
                        "DEMO00007": "nuclear-medicine", "DEMO00008": "radiation-therapy"}


def login(base: str, username: str, password: str = demo.PASSWORD) -> requests.Session:
    s = requests.Session()
    page = s.get(f"{base}/login", timeout=30)
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert token, page.text
    r = s.post(f"{base}/login", data={"username": username, "password": password, "csrf_token": token.group(1),
                                      "next": "/ui/"}, allow_redirects=False, timeout=60)
    assert r.status_code == 303, (username, r.status_code, r.text[:500])
    return s


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("serve-demo")
    dicom, http, hl7 = free_port(), free_port(), free_port()
    log = cwd / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([*openpacs_command(), "serve", "--demo", "--dicom-port", str(dicom), "--http-port",
                                 str(http), "--hl7-port", str(hl7)], cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"), start_new_session=True)
    deadline = time.monotonic() + 180
    while True:
        assert proc.poll() is None, log.read_text()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http}/healthz", timeout=5) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)
    m = re.search(r"Throw-away data directory (\S+):", log.read_text())
    assert m, log.read_text()
    info = {"base": f"http://127.0.0.1:{http}", "dicom": dicom, "data_dir": Path(m.group(1)), "log": log,
            "cwd": cwd, "proc": proc}
    yield info
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_serve_demo_holds_the_data_set(demo_server, require_dcmtk, tmp_path) -> None:
    base = demo_server["base"]
    assert demo_server["data_dir"].is_dir()
    assert not (demo_server["cwd"] / "openpacs-data").exists()  # not the default data dir
    # C-FIND (DIMSE) and QIDO-RS (DICOMweb) see what ingest indexed
    found = dcmtk.find(demo_server["dicom"], "study", "STUDY", {"StudyInstanceUID": "", "ModalitiesInStudy": "",
                                                               "AccessionNumber": "", "PatientName": ""},
                       tmp_path / "find")
    assert len(found) == len(demo.STUDIES)
    modalities = {m for ds in found for m in ([ds.ModalitiesInStudy] if isinstance(ds.ModalitiesInStudy, str)
                                              else ds.ModalitiesInStudy)}
    assert set(demo.MODALITIES) <= modalities, modalities
    assert {str(ds.PatientName) for ds in found} == {n for n, _, _ in demo.PATIENTS.values()}

    admin = login(base, "admin")
    qido = admin.get(f"{base}/dicom-web/studies", params={"includefield": "00080061"},
                     headers={"Accept": "application/dicom+json"}, timeout=60)
    assert qido.status_code == 200, qido.text[:500]
    assert len(qido.json()) == len(demo.STUDIES)
    studies = admin.get(f"{base}/api/studies", params={"limit": 100}, timeout=60).json()["items"]
    departments = {s["accession"]: s["department"] for s in studies}
    assert set(departments.values()) == set(demo.DEPARTMENTS)
    for accession, dept in EXPECTED_DEPARTMENTS.items():
        assert departments[accession] == dept

    for username, role, _deps in demo.USERS:
        s = login(base, username)
        if role == "auditor":  # no read right: the audit trail, not the studies
            assert s.get(f"{base}/api/audit", params={"limit": 1}, timeout=30).status_code == 200
            assert s.get(f"{base}/api/studies", params={"limit": 1}, timeout=30).status_code == 403
        r = s.get(f"{base}/api/me", timeout=30)
        assert r.status_code == 200, (username, r.status_code, r.text[:300])
        me = r.json()
        assert me["username"] == username and me["role"] == role
    scoped = login(base, "cardiologist").get(f"{base}/api/studies", params={"limit": 100}, timeout=60).json()["items"]
    assert scoped and {s["department"] for s in scoped} == {"cardiology"}


def test_demo_refuses_real_data_and_is_idempotent(tmp_path) -> None:
    def cli(*args: object) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*openpacs_command(), *map(str, args)], capture_output=True, text=True, timeout=300)

    real = tmp_path / "real"
    assert cli("import", "--data-dir", real, "--no-progress", sample_file("CT_small.dcm")).returncode == 0
    r = cli("demo", "--data-dir", real)
    assert r.returncode == 2 and "did not create" in r.stderr, r.stdout + r.stderr

    d = tmp_path / "demo"
    first = cli("demo", "--data-dir", d)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "admin" in first.stdout and demo.PASSWORD in first.stdout
    second = cli("demo", "--data-dir", d)
    assert second.returncode == 0, second.stdout + second.stderr
    assert re.search(r": 0 instance\(s\) stored, [1-9]\d* already there, 0 failed", second.stdout), second.stdout


def test_temporary_data_dir_removed_after_stop(demo_server) -> None:
    """Runs last in this module (pytest keeps file order): SIGTERM, a clean exit, and the throw-away dir is gone."""
    proc = demo_server["proc"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(90) == 0, demo_server["log"].read_text()
    assert not demo_server["data_dir"].exists(), demo_server["log"].read_text()
