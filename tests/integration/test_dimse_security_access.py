"""DIMSE access control, department scope and audit trail with real DCMTK peers.

The server runs with ``dicom_accept_unknown = false`` and ``check_called_aet = true`` and two processes. Peers:
STORER (echo, store), CARDIO (echo/find/get/move, cardiology), RADIO (same, radiology), FARAWAY (known title, but
configured on another host). Departments are assigned at ingest by the department rules (US -> cardiology,
OT -> radiology) configured with ``openpacs department rule`` before the start.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.request
from pathlib import Path

import pydicom
import pytest
from helpers import dcmtk
from helpers.dicomdata import department_instance
from helpers.server import OpenPACSServer, openpacs_command

REFUSED = re.compile(r"0x0?124\b|not ?authori[sz]ed", re.I)
PEERS = {  # AE title: (host, allow, departments)
    "STORER": ("127.0.0.1", ["echo", "store"], None),
    "CARDIO": ("127.0.0.1", ["echo", "find", "get", "move"], ["cardiology"]),
    "RADIO": ("127.0.0.1", ["echo", "find", "get", "move"], ["radiology"]),
    "FARAWAY": ("192.0.2.1", ["echo", "store", "find", "get", "move"], None),  # TEST-NET-1: never us
    "ECHOCART": ("127.0.0.1", ["echo", "store"], ["cardiology"]),  # a modality of cardiology
}


class SecuredServer(OpenPACSServer):
    dest_port = 0

    def write_config(self) -> None:
        super().write_config()
        lines = []
        for aet, (host, allow, deps) in PEERS.items():
            lines += ["", f"[remote_aes.{aet}]", f'aet = "{aet}"', f'host = "{host}"', "port = 104",
                      "allow = [" + ", ".join(f'"{a}"' for a in allow) + "]"]
            if deps is not None:
                lines.append("departments = [" + ", ".join(f'"{d}"' for d in deps) + "]")
        lines += ["", "[remote_aes.DESTSCP]", 'aet = "DESTSCP"', 'host = "127.0.0.1"', f"port = {self.dest_port}",
                  'allow = ["echo"]']
        with open(self.config_path, "a") as fh:
            fh.write("\n".join(lines) + "\n")

    def audit(self, after: int = 0) -> list[dict]:
        time.sleep(1.0)  # association-end events, then the trail's 250 ms batches
        url = f"http://127.0.0.1:{self.http_port}/admin/audit?limit=100000"
        with urllib.request.urlopen(url, timeout=30) as r:
            events = json.loads(r.read())
        return sorted((e for e in events if e["id"] > after), key=lambda e: e["id"])

    def last_audit_id(self) -> int:
        return max((e["id"] for e in self.audit()), default=0)


def write_instance(path: Path, modality: str, pid: str, study: str | None = None) -> str:
    ds = department_instance(modality, pid, study)
    ds.save_as(path, enforce_file_format=True)
    return str(ds.StudyInstanceUID)


def scu(tool: str, aet: str, *args: str, called: str = "OPENPACS", port: int) -> dcmtk.Result:
    return dcmtk.run(tool, "-to", "20", "-ta", "20", "-aet", aet, *args, "-aec", called, "127.0.0.1", str(port),
                     timeout=120)


@pytest.fixture(scope="module")
def world(require_dcmtk, storescp, tmp_path_factory):
    base = tmp_path_factory.mktemp("dimsesec")
    server = SecuredServer(base / "data", settings={"dicom_accept_unknown": False, "check_called_aet": True,
                                                    "dicom_workers": 2})
    server.dest_port = storescp.port
    server.write_config()
    for dept, modality in (("radiology", "OT,CT"), ("cardiology", "US")):
        r = subprocess.run([*openpacs_command(), "department", "rule", dept, "--modality", modality,
                            "--config", str(server.config_path), "--data-dir", str(server.data_dir)],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
    server.start()
    files = {"radiology": base / "rad.dcm", "cardiology": base / "card.dcm"}
    studies = {"radiology": write_instance(files["radiology"], "OT", "SECRAD"),
               "cardiology": write_instance(files["cardiology"], "US", "SECCARD")}
    res = dcmtk.store(server.dicom_port, list(files.values()), calling="STORER")
    assert res.returncode == 0 and res.output.count("(Success)") == 2, res.output
    yield server, studies, base
    server.stop()


def test_association_level_checks(world) -> None:
    server, _, _ = world
    port = server.dicom_port
    r = scu("echoscu", "EVIL", port=port)  # unknown calling AE
    assert r.returncode != 0 and "Association Rejected" in r.output and "Calling AE Title Not Recognized" in r.output
    r = scu("echoscu", "FARAWAY", port=port)  # known title, wrong source host
    assert r.returncode != 0 and "Calling AE Title Not Recognized" in r.output
    r = scu("echoscu", "CARDIO", called="WRONGAE", port=port)  # called AE checked
    assert r.returncode != 0 and "Called AE Title Not Recognized" in r.output
    for aet in ("CARDIO", "RADIO", "STORER"):
        assert scu("echoscu", aet, port=port).returncode == 0


def test_operations_not_allowed_are_refused(world, storescp) -> None:
    server, studies, base = world
    port = server.dicom_port
    study = studies["cardiology"]
    r = scu("findscu", "STORER", "-v", "-S", "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID", port=port)
    assert REFUSED.search(r.output), r.output
    assert "SECCARD" not in r.output and "SECRAD" not in r.output
    out = base / "refused-get"
    out.mkdir()
    r = scu("getscu", "STORER", "-d", "-S", "-od", str(out), "-k", "QueryRetrieveLevel=STUDY",
            "-k", f"StudyInstanceUID={study}", port=port)
    assert dcmtk.RetrieveResult(r).final_status() == 0x0124 and list(out.iterdir()) == []
    storescp.clear()
    r = scu("movescu", "STORER", "-d", "-S", "-aem", "DESTSCP", "-k", "QueryRetrieveLevel=STUDY",
            "-k", f"StudyInstanceUID={study}", port=port)
    assert dcmtk.RetrieveResult(r).final_status() == 0x0124 and storescp.files() == []
    f = base / "cardio-store.dcm"
    write_instance(f, "US", "NOSTORE")
    r = dcmtk.store(port, [f], calling="CARDIO")
    assert "Success" not in r.output and REFUSED.search(r.output), r.output


def _find(server: SecuredServer, aet: str, out: Path, model: str = "study", level: str = "STUDY",
          **keys: str) -> set[str]:
    found = dcmtk.find(server.dicom_port, model, level, {"StudyInstanceUID": "", "PatientID": "", **keys}
                       if level == "STUDY" else {"PatientID": "", **keys}, out, extra=("-aet", aet))
    return {str(d.get("StudyInstanceUID", "")) or str(d.PatientID) for d in found}


def test_find_is_scoped_to_the_peer_departments(world) -> None:
    server, studies, base = world
    cardio = _find(server, "CARDIO", base / "f1")
    radio = _find(server, "RADIO", base / "f2")
    assert studies["cardiology"] in cardio and studies["radiology"] not in cardio
    assert studies["radiology"] in radio and studies["cardiology"] not in radio
    # naming the other department's study, or its patient, finds nothing
    assert _find(server, "CARDIO", base / "f3", StudyInstanceUID=studies["radiology"]) == set()
    assert _find(server, "CARDIO", base / "f4", model="patient", level="PATIENT", PatientID="SECRAD") == set()
    assert _find(server, "RADIO", base / "f5", model="patient", level="PATIENT") == {"SECRAD"}


def test_get_and_move_are_scoped_to_the_peer_departments(world, storescp) -> None:
    server, studies, base = world
    port = server.dicom_port

    def get(aet: str, study: str, out: Path) -> tuple[dcmtk.RetrieveResult, list[Path]]:
        out.mkdir(parents=True, exist_ok=True)
        r = scu("getscu", aet, "-d", "-S", "-od", str(out), "-k", "QueryRetrieveLevel=STUDY",
                "-k", f"StudyInstanceUID={study}", port=port)
        return dcmtk.RetrieveResult(r), list(out.iterdir())

    def move(aet: str, key: str, value: str, level: str = "STUDY", model: str = "-S") -> dcmtk.RetrieveResult:
        r = scu("movescu", aet, "-d", model, "-aem", "DESTSCP", "-k", f"QueryRetrieveLevel={level}",
                "-k", f"{key}={value}", port=port)
        return dcmtk.RetrieveResult(r)

    res, files = get("CARDIO", studies["radiology"], base / "g1")
    assert files == [] and not res.final_counts().get("completed")
    res, files = get("CARDIO", studies["cardiology"], base / "g2")
    assert len(files) == 1 and res.final_status() == 0
    storescp.clear()
    res = move("CARDIO", "StudyInstanceUID", studies["radiology"])
    assert not res.final_counts().get("completed") and storescp.files() == []
    res = move("CARDIO", "PatientID", "SECRAD", level="PATIENT", model="-P")
    assert not res.final_counts().get("completed") and storescp.files() == []
    res = move("CARDIO", "StudyInstanceUID", studies["cardiology"])
    assert res.final_counts().get("completed") == 1 and len(storescp.files()) == 1
    assert pydicom.dcmread(storescp.files()[0]).PatientID == "SECCARD"


def test_scripted_session_audit_trail(world, storescp) -> None:
    """Exactly the expected DIMSE audit events, no more, no fewer."""
    server, studies, base = world
    port = server.dicom_port
    after = server.last_audit_id()
    # 1. echo: nothing to audit
    assert scu("echoscu", "STORER", port=port).returncode == 0
    # 2. one association stores 3 instances of 2 studies: one Instances Transferred per study, at its end
    study_a = write_instance(base / "a1.dcm", "US", "PATA")
    write_instance(base / "a2.dcm", "US", "PATA", study=study_a)
    study_b = write_instance(base / "b1.dcm", "OT", "PATB")
    r = dcmtk.store(port, [base / "a1.dcm", base / "a2.dcm", base / "b1.dcm"], calling="STORER")
    assert r.output.count("(Success)") == 3, r.output
    # 3. a query
    assert _find(server, "CARDIO", base / "q1", PatientID="PATA") == {study_a}
    # 4. a refused query
    scu("findscu", "STORER", "-S", "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID", port=port)
    # 5. a move and a get of study A
    storescp.clear()
    r = scu("movescu", "CARDIO", "-d", "-S", "-aem", "DESTSCP", "-k", "QueryRetrieveLevel=STUDY",
            "-k", f"StudyInstanceUID={study_a}", port=port)
    assert dcmtk.RetrieveResult(r).final_counts().get("completed") == 2, r.output
    out = base / "get-a"
    out.mkdir()
    r = scu("getscu", "CARDIO", "-d", "-S", "-od", str(out), "-k", "QueryRetrieveLevel=STUDY",
            "-k", f"StudyInstanceUID={study_a}", port=port)
    assert len(list(out.iterdir())) == 2, r.output
    # 6. a move of another department's study: nothing is transferred, nothing to audit as a transfer
    r = scu("movescu", "CARDIO", "-d", "-S", "-aem", "DESTSCP", "-k", "QueryRetrieveLevel=STUDY",
            "-k", f"StudyInstanceUID={study_b}", port=port)
    assert not dcmtk.RetrieveResult(r).final_counts().get("completed")
    # 7. an unknown calling AE
    assert scu("echoscu", "INTRUDER", port=port).returncode != 0

    events = [e for e in server.audit(after) if e["protocol"] == "DIMSE"]
    got = sorted((e["event"], e["source_aet"], e["action"], e["outcome"], e["event_type"], e["destination"],
                  tuple(e["study_uids"]), e["patient_id"]) for e in events)
    expected = sorted([
        ("InstancesTransferred", "STORER", "C", 0, None, "OPENPACS", (study_a,), "PATA"),
        ("InstancesTransferred", "STORER", "C", 0, None, "OPENPACS", (study_b,), "PATB"),
        ("Query", "CARDIO", "E", 0, None, "OPENPACS", (), "PATA"),
        ("SecurityAlert", "STORER", "E", 4, "110132", "OPENPACS", (), ""),
        ("BeginTransferring", "CARDIO", "R", 0, None, "DESTSCP", (study_a,), "PATA"),
        ("InstancesTransferred", "CARDIO", "R", 0, None, "DESTSCP", (study_a,), "PATA"),
        ("BeginTransferring", "CARDIO", "R", 0, None, "CARDIO", (study_a,), "PATA"),
        ("InstancesTransferred", "CARDIO", "R", 0, None, "CARDIO", (study_a,), "PATA"),
        ("SecurityAlert", "INTRUDER", "E", 4, "110126", "OPENPACS", (), ""),
    ], key=str)
    got = sorted(got, key=str)
    assert got == expected, json.dumps(events, indent=1)
    by_kind = {(e["event"], e["destination"], tuple(e["study_uids"])): e for e in events}
    assert "2 instance(s) received" in by_kind[("InstancesTransferred", "OPENPACS", (study_a,))]["detail"]
    query = next(e for e in events if e["event"] == "Query")
    assert "PATA" in query["query"] and query["source_address"] == "127.0.0.1" and query["user"] == "CARDIO"


def test_access_matrix(world, storescp) -> None:
    """Every DIMSE service x every kind of caller (unknown AE, known AE on the wrong host, each configured peer),
    on a study of each department: 0 unauthorized successes, 0 authorized failures."""
    server, studies, base = world
    port = server.dicom_port
    scope = {"STORER": None, "CARDIO": "cardiology", "RADIO": "radiology", "FARAWAY": None, "INTRUDER": None}
    allowed = {aet: set(PEERS[aet][1]) if aet in PEERS and PEERS[aet][0] == "127.0.0.1" else set() for aet in scope}
    cells: list[tuple[str, str, str, bool, bool]] = []  # (aet, service, department, expected, got)
    n = 0
    for aet in scope:
        cells.append((aet, "echo", "-", "echo" in allowed[aet], scu("echoscu", aet, port=port).returncode == 0))
        n += 1
        f = base / f"matrix-{n}.dcm"
        write_instance(f, "US", f"MATRIX{n}")
        r = dcmtk.store(port, [f], calling=aet)
        cells.append((aet, "store", "-", "store" in allowed[aet], "(Success)" in r.output))
        for dept, study in studies.items():
            visible = "find" in allowed[aet] and scope[aet] in (None, dept)
            found = base / f"matrix-find-{aet}-{dept}"
            found.mkdir()
            scu("findscu", aet, "-S", "-X", "-od", str(found), "-k", "QueryRetrieveLevel=STUDY",
                "-k", f"StudyInstanceUID={study}", port=port)
            matches = [str(pydicom.dcmread(p).StudyInstanceUID) for p in found.glob("rsp*.dcm")]
            cells.append((aet, "find", dept, visible, matches == [study]))
            out = base / f"matrix-get-{aet}-{dept}"
            out.mkdir()
            scu("getscu", aet, "-S", "-od", str(out), "-k", "QueryRetrieveLevel=STUDY",
                "-k", f"StudyInstanceUID={study}", port=port)
            cells.append((aet, "get", dept, "get" in allowed[aet] and scope[aet] in (None, dept),
                           len(list(out.iterdir())) == 1))
            storescp.clear()
            scu("movescu", aet, "-S", "-aem", "DESTSCP", "-k", "QueryRetrieveLevel=STUDY",
                "-k", f"StudyInstanceUID={study}", port=port)
            cells.append((aet, "move", dept, "move" in allowed[aet] and scope[aet] in (None, dept),
                          len(storescp.files()) == 1))
    unauthorized = [c for c in cells if c[4] and not c[3]]
    refused = [c for c in cells if c[3] and not c[4]]
    assert unauthorized == [] and refused == [], (unauthorized, refused)
    assert sum(1 for c in cells if c[4]) >= 10  # the matrix is not vacuous


def test_a_scoped_sender_adds_only_to_its_departments_studies(world) -> None:
    """Store scope: a cardiology modality may create studies and add to cardiology ones, not to radiology's."""
    server, studies, base = world
    after = server.last_audit_id()
    f_rad = base / "scoped-rad.dcm"
    write_instance(f_rad, "US", "SECRAD", study=studies["radiology"])
    f_card = base / "scoped-card.dcm"
    write_instance(f_card, "US", "SECCARD", study=studies["cardiology"])
    f_new = base / "scoped-new.dcm"
    new_study = write_instance(f_new, "US", "SCOPEDNEW")
    r = dcmtk.store(server.dicom_port, [f_rad, f_card, f_new], calling="ECHOCART")
    statuses = dcmtk.parse_store_log(r.output)
    assert REFUSED.search(statuses[str(f_rad)]) or "Refused" in statuses[str(f_rad)], r.output
    assert statuses[str(f_card)] == "Success" and statuses[str(f_new)] == "Success", r.output
    events = [e for e in server.audit(after) if e["protocol"] == "DIMSE"]
    alerts = [e for e in events if e["event"] == "SecurityAlert"]
    assert len(alerts) == 1 and alerts[0]["event_type"] == "110132" and studies["radiology"] in alerts[0]["detail"]
    received = sorted(tuple(e["study_uids"]) for e in events if e["event"] == "InstancesTransferred")
    assert received == sorted([(studies["cardiology"],), (new_study,)])
