"""DIMSE access control with real DCMTK peers: unknown AEs rejected, per-AE operations, department scope on
C-FIND / C-GET / C-MOVE, and the audit trail of it all."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from pydicom import Dataset

from tests.helpers import dcmtk
from tests.helpers.dicomdata import department_instance
from tests.helpers.server import OpenPACSServer, openpacs_command

PEERS = {  # name: (allow, departments)
    "STORER": (["echo", "store"], None),
    "CARDIO": (["echo", "find", "get", "move"], ["cardiology"]),
    "RADIO": (["echo", "find", "get", "move"], ["radiology"]),
}


class SecuredServer(OpenPACSServer):
    dest_port = 0

    def write_config(self) -> None:
        super().write_config()
        lines = []
        for name, (allow, deps) in PEERS.items():
            lines += [
                "",
                f"[remote_aes.{name}]",
                f'aet = "{name}"',
                'host = "127.0.0.1"',
                "port = 1",
                "allow = [" + ", ".join(f'"{a}"' for a in allow) + "]",
            ]
            if deps is not None:
                lines.append("departments = [" + ", ".join(f'"{d}"' for d in deps) + "]")
        lines += [
            "",
            "[remote_aes.DESTSCP]",
            'aet = "DESTSCP"',
            'host = "127.0.0.1"',
            f"port = {self.dest_port}",
            'allow = ["echo", "store"]',
        ]
        with open(self.config_path, "a") as fh:
            fh.write("\n".join(lines) + "\n")


def write_instance(path: Path, modality: str, pid: str) -> str:
    ds = department_instance(modality, pid)
    ds.save_as(path, enforce_file_format=True)
    return str(ds.StudyInstanceUID)


@pytest.fixture(scope="module")
def world(require_dcmtk, storescp, tmp_path_factory):
    base = tmp_path_factory.mktemp("secdimse")
    server = SecuredServer(base / "data", settings={"dicom_accept_unknown": False, "check_called_aet": True})
    server.dest_port = storescp.port
    server.write_config()
    for args in (("radiology", "--modality", "CT,OT"), ("cardiology", "--modality", "US")):
        subprocess.run(
            [
                *openpacs_command(),
                "department",
                "rule",
                *args,
                "--config",
                str(server.config_path),
                "--data-dir",
                str(server.data_dir),
            ],
            check=True,
            capture_output=True,
        )
    server.start()
    files = {"radiology": base / "ct.dcm", "cardiology": base / "us.dcm"}
    studies = {
        "radiology": write_instance(files["radiology"], "OT", "SECRAD"),
        "cardiology": write_instance(files["cardiology"], "US", "SECCARD"),
    }
    res = dcmtk.store(server.dicom_port, list(files.values()), calling="STORER")
    assert res.returncode == 0 and "Success" in res.output, res.output
    yield server, studies, base
    server.stop()


def find_as(server, aet: str, out: Path, **keys: str) -> list[Dataset]:
    return dcmtk.find(
        server.dicom_port, "study", "STUDY", {"StudyInstanceUID": "", "PatientID": "", **keys}, out, extra=("-aet", aet)
    )


def test_unknown_calling_ae_is_rejected(world) -> None:
    server, _, _ = world
    res = dcmtk.run("echoscu", "-aet", "EVIL", "-aec", "OPENPACS", "127.0.0.1", str(server.dicom_port))
    assert res.returncode != 0 and "Rejected" in res.output
    res = dcmtk.run("echoscu", "-aet", "CARDIO", "-aec", "WRONGAE", "127.0.0.1", str(server.dicom_port))
    assert res.returncode != 0  # called AE checked
    assert (
        dcmtk.run("echoscu", "-aet", "CARDIO", "-aec", "OPENPACS", "127.0.0.1", str(server.dicom_port)).returncode == 0
    )


def test_operation_not_allowed_for_peer(world) -> None:
    server, _, base = world
    res = dcmtk.run(
        "findscu",
        "-S",
        "-aet",
        "STORER",
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        "StudyInstanceUID",
        "-aec",
        "OPENPACS",
        "127.0.0.1",
        str(server.dicom_port),
    )
    assert "SECRAD" not in res.output and "SECCARD" not in res.output


def test_find_scoped_to_department(world) -> None:
    server, studies, base = world
    cardio = {str(d.StudyInstanceUID) for d in find_as(server, "CARDIO", base / "f1")}
    radio = {str(d.StudyInstanceUID) for d in find_as(server, "RADIO", base / "f2")}
    assert studies["cardiology"] in cardio and studies["radiology"] not in cardio
    assert studies["radiology"] in radio and studies["cardiology"] not in radio
    # asking for the other department's study by UID finds nothing
    assert not find_as(server, "CARDIO", base / "f3", StudyInstanceUID=studies["radiology"])
    assert not dcmtk.find(
        server.dicom_port, "patient", "PATIENT", {"PatientID": "SECRAD"}, base / "f4", extra=("-aet", "CARDIO")
    )


def test_get_and_move_scoped_to_department(world, storescp) -> None:
    server, studies, base = world

    def get(aet: str, study: str, out: Path) -> list[Path]:
        out.mkdir(parents=True, exist_ok=True)
        dcmtk.run(
            "getscu",
            "-S",
            "-aet",
            aet,
            "-od",
            str(out),
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            f"StudyInstanceUID={study}",
            "-aec",
            "OPENPACS",
            "127.0.0.1",
            str(server.dicom_port),
        )
        return list(out.iterdir())

    assert get("CARDIO", studies["radiology"], base / "g1") == []
    assert len(get("CARDIO", studies["cardiology"], base / "g2")) == 1
    storescp.clear()
    r = dcmtk.run(
        "movescu",
        "-d",
        "-S",
        "-aet",
        "CARDIO",
        "-aem",
        "DESTSCP",
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        f"StudyInstanceUID={studies['radiology']}",
        "-aec",
        "OPENPACS",
        "127.0.0.1",
        str(server.dicom_port),
    )
    assert dcmtk.RetrieveResult(r).final_counts().get("completed", 0) == 0
    assert storescp.files() == []


def test_dimse_audit_trail(world) -> None:
    server, studies, base = world
    find_as(server, "RADIO", base / "f9")
    dcmtk.run("echoscu", "-aet", "EVIL2", "-aec", "OPENPACS", "127.0.0.1", str(server.dicom_port))
    import time

    r = subprocess.run([*openpacs_command(), "migrate", "--data-dir", str(server.data_dir)], capture_output=True)
    assert r.returncode == 0
    from openpacs.index.db import Index
    from openpacs.services.audit import AuditService

    def recorded(events) -> list[bool]:
        return [
            any(e.event == "Query" and e.source_aet == "RADIO" and e.protocol == "DIMSE" for e in events),
            any(e.event == "SecurityAlert" and e.source_aet == "EVIL2" and e.outcome == 4 for e in events),
            any(e.event == "InstancesTransferred" and e.source_aet == "STORER" and e.action == "C"
                and studies["cardiology"] in e.study_uids for e in events),
            any(e.event in ("BeginTransferring", "InstancesTransferred") and e.source_aet == "CARDIO"
                and e.action == "R" for e in events),
        ]

    # the server writes its audit records in batches (<= 250 ms), from another process: poll, a loaded machine is slow
    deadline = time.monotonic() + 15
    while True:
        index = Index(f"sqlite:///{server.data_dir / 'index.sqlite'}")
        trail = AuditService(index)
        try:
            events = trail.search(limit=10000)
        finally:
            trail.close()
            index.close()
        found = recorded(events)
        if all(found) or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    assert found == [True, True, True, True]
