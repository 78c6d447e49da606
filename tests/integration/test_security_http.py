"""Security of a real `openpacs serve` (auth on): first-start admin, refusal to expose itself without auth, tokens
and sessions over HTTP, department scope, and audit completeness for a scripted session."""

from __future__ import annotations

import io
import re
import subprocess
import uuid
from pathlib import Path

import pytest
import requests

from tests.helpers.dicomdata import department_instance
from tests.helpers.server import OpenPACSServer, openpacs_command


def cli(server: OpenPACSServer, *args: str, stdin: str | None = None) -> str:
    argv = [*openpacs_command(), *args, "--data-dir", str(server.data_dir), *server.index_args()]
    r = subprocess.run(argv, capture_output=True, text=True, input=stdin, timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout


def instance(modality: str, pid: str) -> tuple[bytes, str]:
    ds = department_instance(modality, pid, name_prefix="TEST^", study_date="20240101")
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue(), ds.StudyInstanceUID


def stow(base: str, headers: dict[str, str], data: bytes) -> requests.Response:
    b = uuid.uuid4().hex
    body = f"--{b}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data + f"\r\n--{b}--\r\n".encode()
    return requests.post(
        f"{base}/dicom-web/studies",
        data=body,
        timeout=60,
        headers={
            **headers,
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={b}',
            "Accept": "application/dicom+json",
        },
    )


@pytest.fixture(scope="module")
def secured(tmp_path_factory) -> OpenPACSServer:
    base = tmp_path_factory.mktemp("secured")
    server = OpenPACSServer(base / "data", settings={"auth": "on"})
    cli(server, "department", "rule", "radiology", "--modality", "CT,MR,OT")
    cli(server, "department", "rule", "cardiology", "--modality", "US,ECG")
    server.start()
    yield server
    server.stop()


def test_first_start_creates_admin_once(tmp_path: Path) -> None:
    server = OpenPACSServer(tmp_path / "data", settings={"auth": "on"})
    server.start()
    try:
        found = re.findall(r"created user 'admin' with password\s+(\S+)", server.log_text())
        assert len(found) == 1
        s = requests.Session()
        base = f"http://127.0.0.1:{server.http_port}"
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', s.get(f"{base}/login").text).group(1)
        r = s.post(
            f"{base}/login", data={"username": "admin", "password": found[0], "csrf_token": csrf}, allow_redirects=False
        )
        assert r.status_code == 303
        assert s.get(f"{base}/dicom-web/studies").status_code in (200, 204)
    finally:
        server.stop()
    server.start()
    try:
        assert len(re.findall(r"created user 'admin'", server.log_text())) == 1  # not again
    finally:
        server.stop()


def test_refuses_network_listen_without_auth(tmp_path: Path) -> None:
    argv = [
        *openpacs_command(),
        "serve",
        "--data-dir",
        str(tmp_path / "d"),
        "--host",
        "0.0.0.0",
        "--dicom-port",
        "0",
        "--http-port",
        "0",
    ]
    r = subprocess.run(
        argv, capture_output=True, text=True, timeout=120, env={**__import__("os").environ, "OPENPACS_AUTH": "off"}
    )
    assert r.returncode == 2 and "refusing to listen" in r.stderr
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "dicom_accept_unknown" in r.stderr  # auth auto is on, but DICOM would be open


def test_scripted_session_audit_and_scope(secured: OpenPACSServer) -> None:
    base = f"http://127.0.0.1:{secured.http_port}"
    cli(secured, "user", "add", "boss", "--role", "admin", "--password-stdin", stdin="boss-password-123\n")
    cli(
        secured,
        "user",
        "add",
        "cardio",
        "--role",
        "viewer",
        "--departments",
        "cardiology",
        "--password-stdin",
        stdin="cardio-password-123\n",
    )
    admin_token = cli(secured, "user", "token", "boss").strip().splitlines()[-1]
    cardio_token = cli(secured, "user", "token", "cardio").strip().splitlines()[-1]
    admin = {"Authorization": f"Bearer {admin_token}"}
    cardio = {"Authorization": f"Bearer {cardio_token}"}

    # anonymous gets nothing
    assert requests.get(f"{base}/dicom-web/studies", timeout=30).status_code == 401
    # login: one failure, one success
    s = requests.Session()
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', s.get(f"{base}/login").text).group(1)
    assert (
        s.post(
            f"{base}/login",
            data={"username": "cardio", "password": "nope-nope-nope", "csrf_token": csrf},
            allow_redirects=False,
        ).status_code
        == 401
    )
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', s.get(f"{base}/login").text).group(1)
    assert (
        s.post(
            f"{base}/login",
            data={"username": "cardio", "password": "cardio-password-123", "csrf_token": csrf},
            allow_redirects=False,
        ).status_code
        == 303
    )
    # store one study per department
    ct, ct_study = instance("CT", "RAD-1")
    us, us_study = instance("US", "CARD-1")
    assert stow(base, admin, ct).status_code == 200
    assert stow(base, admin, us).status_code == 200
    assert stow(base, cardio, us).status_code == 403  # a viewer may not store
    # query + retrieve, scoped
    r = requests.get(f"{base}/dicom-web/studies", headers=cardio, timeout=30)
    assert r.status_code == 200 and us_study in r.text and ct_study not in r.text
    assert requests.get(f"{base}/dicom-web/studies/{ct_study}", headers=cardio, timeout=30).status_code == 404
    r = s.get(f"{base}/dicom-web/studies/{us_study}", headers={"Accept": 'multipart/related; type="application/dicom"'})
    assert r.status_code == 200  # the session works for the viewer's own department
    assert s.get(f"{base}/ui/studies").status_code == 200 and ct_study not in s.get(f"{base}/ui/studies").text
    # delete: refused to the viewer, done by the admin
    assert requests.delete(f"{base}/dicom-web/studies/{ct_study}", headers=cardio, timeout=30).status_code == 403
    assert requests.delete(f"{base}/dicom-web/studies/{ct_study}", headers=admin, timeout=30).status_code == 204
    # a revoked token stops working at once on this node
    tid = cli(secured, "user", "tokens", "cardio").split()[0]
    cli(secured, "user", "revoke", tid)
    # configuration change through the CLI
    cli(secured, "user", "disable", "cardio")
    # audit export
    r = requests.get(f"{base}/admin/audit", headers=admin, timeout=30)
    assert r.status_code == 200
    events = r.json()

    def has(event: str, **want) -> bool:
        return any(
            e["event"] == event and all((v in e[k]) if isinstance(e[k], list) else e[k] == v for k, v in want.items())
            for e in events
        )

    assert has("ApplicationActivity", event_type="110120")
    assert has("UserAuthentication", user="cardio", outcome=4)
    assert has("UserAuthentication", user="cardio", outcome=0, event_type="110122")
    assert has("InstancesTransferred", user="boss", action="C", outcome=0, study_uids=us_study, patient_id="CARD-1")
    assert has("SecurityAlert", user="cardio", outcome=4)  # the refused STOW / DELETE
    assert has("Query", user="cardio")
    assert has("InstancesTransferred", user="cardio", action="R", study_uids=us_study)
    assert has("SecurityAlert", user="anonymous")
    assert has("StudyDeleted", user="boss", study_uids=ct_study, outcome=0, patient_id="RAD-1")
    assert has("InstancesTransferred", user="cardio", patient_id="CARD-1")  # the patient is named in the trail
    assert sum(1 for e in events if e["event"] == "SecurityAlert" and e["protocol"] == "CLI") >= 4
    # exactly the expected events: one per audited HTTP request above, in order (the login page GETs are not audited)
    http = [(e["event"], e["user"], e["outcome"]) for e in events if e["protocol"] == "HTTP"]
    assert http == [
        ("SecurityAlert", "anonymous", 4),  # GET /dicom-web/studies without credentials
        ("UserAuthentication", "cardio", 4),
        ("UserAuthentication", "cardio", 0),
        ("InstancesTransferred", "boss", 0),  # STOW CT
        ("InstancesTransferred", "boss", 0),  # STOW US
        ("SecurityAlert", "cardio", 4),  # STOW refused to a viewer
        ("Query", "cardio", 0),
        ("SecurityAlert", "cardio", 4),  # the radiology study asked for by UID
        ("InstancesTransferred", "cardio", 0),  # WADO-RS of the own-department study (session)
        ("Query", "cardio", 0),  # study list
        ("Query", "cardio", 0),
        ("SecurityAlert", "cardio", 4),  # DELETE refused
        ("StudyDeleted", "boss", 0),
    ], http
    r = requests.get(f"{base}/admin/audit?format=xml&event=StudyDeleted", headers=admin, timeout=30)
    assert r.status_code == 200 and "<AuditMessage>" in r.text and ct_study in r.text
