"""`openpacs doctor` as a real command: on a healthy instance (filled by `openpacs demo`) it exits 0; a deleted blob,
an orphan file, a corrupted blob (with --full) and unreachable nodes are each found and make it exit 1; the --json
report's structure; it runs beside a running server (ports are "ours", stores still work after it) and tells a port
taken by another program; a missing data directory is reported, not created."""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from helpers import dcmtk
from helpers.dicomdata import testdata_file as sample_file
from helpers.ports import free_port
from helpers.server import OpenPACSServer, openpacs_command, stop_cleanly

CHECK_IDS = {"storage", "index", "blobs-missing", "blobs-orphan", "blobs-sha256", "ports", "clock", "tls", "nodes",
             "security", "scrub"}  # scrub: the last integrity scrub's findings (services/scrub.py)


def cli(*args: str | os.PathLike[str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*openpacs_command(), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))


def doctor(data_dir: Path, *args: str, config: Path | None = None) -> tuple[int, dict]:
    """doctor --json on free ports (the default 8042/11112 may be anyone's on a shared machine)."""
    ports = ["--dicom-port", str(free_port()), "--http-port", str(free_port()), "--hl7-port", str(free_port())]
    cfg = ["--config", str(config)] if config else []
    r = cli("doctor", "--data-dir", data_dir, *cfg, *ports, "--json", *args)
    assert r.stdout.strip().startswith("{"), r.stdout + r.stderr
    return r.returncode, json.loads(r.stdout)


def by_id(report: dict) -> dict[str, dict]:
    return {c["id"]: c for c in report["checks"]}


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("doctor") / "demo"
    r = cli("demo", "--data-dir", d)
    assert r.returncode == 0, r.stdout + r.stderr
    return d


@pytest.fixture
def copy(demo_dir, tmp_path) -> Path:
    dst = tmp_path / "data"
    shutil.copytree(demo_dir, dst)
    return dst


def rows(data_dir: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(data_dir / "index.sqlite") as c:
        return c.execute("SELECT blob_key, sop_instance_uid FROM instances ORDER BY id").fetchall()


def blob_path(data_dir: Path, key: str) -> Path:
    return data_dir / "blobs" / key[:8] / key[8:10] / key[10:]


def test_healthy_instance_exits_0_and_json_structure(demo_dir) -> None:
    code, report = doctor(demo_dir, "--full")
    assert code == 0, json.dumps(report, indent=1)
    assert report["exit_code"] == 0 and report["status"] in ("ok", "warn")
    assert set(by_id(report)) == CHECK_IDS
    for c in report["checks"]:
        assert set(c) == {"id", "title", "status", "finding", "action", "details"}, c
        assert c["status"] in ("ok", "warn", "skip"), c
        assert c["finding"], c
    checks = by_id(report)
    assert checks["blobs-sha256"]["details"]["checked"] == len(rows(demo_dir)) > 0
    assert checks["index"]["status"] == "ok" and checks["index"]["details"]["revision"] == checks["index"]["details"]["head"]
    assert report["counts"]["fail"] == 0
    text = cli("doctor", "--data-dir", demo_dir, "--dicom-port", str(free_port()), "--http-port", str(free_port()),
               "--hl7-port", str(free_port()))
    assert text.returncode == 0 and "healthy" in text.stdout, text.stdout + text.stderr


def test_missing_orphan_corrupted_and_unreachable_nodes_are_found(copy, tmp_path) -> None:
    (missing_key, missing_sop), (corrupt_key, corrupt_sop) = rows(copy)[0], rows(copy)[1]
    blob_path(copy, missing_key).unlink()
    p = blob_path(copy, corrupt_key)
    data = bytearray(p.read_bytes())
    data[-1] ^= 0xFF
    p.write_bytes(bytes(data))
    orphan_key = time.strftime("%Y%m%d%H", time.gmtime(time.time() - 7200)) + uuid.uuid4().hex
    orphan = blob_path(copy, orphan_key)
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(Path(sample_file("CT_small.dcm")).read_bytes())
    old = time.time() - 7200
    os.utime(orphan, (old, old))
    # one node in the TOML file, one in the index (added as the console would): nobody listens on either
    config = tmp_path / "doctor.toml"
    config.write_text(f'[remote_aes.gone]\naet = "GONE"\nhost = "127.0.0.1"\nport = {free_port()}\n')
    from openpacs.config import load_settings
    from openpacs.context import build_context

    ctx = build_context(load_settings(data_dir=copy))
    try:
        assert ctx.nodes is not None
        ctx.nodes.add({"name": "gone2", "aet": "GONE2", "host": "127.0.0.1", "port": free_port()})
    finally:
        ctx.close()

    code, report = doctor(copy, "--sample", "0", config=config)
    checks = by_id(report)
    assert code == 1 and report["status"] == "fail" and report["exit_code"] == 1
    assert checks["blobs-missing"]["status"] == "fail"
    assert checks["blobs-missing"]["details"]["missing"] == 1
    assert missing_sop in checks["blobs-missing"]["details"]["examples_sop_instance_uid"]
    assert checks["blobs-orphan"]["status"] == "fail"
    assert checks["blobs-orphan"]["details"]["examples_blob_key"] == [orphan_key]
    assert checks["blobs-sha256"]["status"] == "ok" and checks["blobs-sha256"]["details"]["checked"] == 0
    assert checks["nodes"]["status"] == "fail"
    down = {n["name"]: n for n in checks["nodes"]["details"]["nodes"]}
    assert set(down) == {"gone", "gone2"} and not any(n["ok"] for n in down.values())
    assert {n["source"] for n in down.values()} == {"config", "index"}
    for c in report["checks"]:
        if c["status"] == "fail":
            assert c["action"], c

    code, report = doctor(copy, "--full", "--no-echo", config=config)
    checks = by_id(report)
    assert code == 1
    assert checks["nodes"]["status"] == "skip"
    sha = checks["blobs-sha256"]
    assert sha["status"] == "fail" and sha["details"]["corrupted"] == 1
    assert [e["sop_instance_uid"] for e in sha["details"]["examples"]] == [corrupt_sop]

    text = cli("doctor", "--data-dir", copy, "--config", config, "--no-echo", "--dicom-port", str(free_port()),
               "--http-port", str(free_port()), "--hl7-port", str(free_port()))
    assert text.returncode == 1
    assert "FAIL" in text.stdout and "→" in text.stdout and "problems found" in text.stdout


def test_missing_data_dir_is_reported_not_created(tmp_path) -> None:
    where = tmp_path / "nothing-here"
    code, report = doctor(where)
    checks = by_id(report)
    assert code == 1
    assert checks["storage"]["status"] == "fail" and checks["index"]["status"] == "fail"
    assert not where.exists()


def test_beside_a_running_server(copy, require_dcmtk) -> None:
    server = OpenPACSServer(copy)
    server.start()
    try:
        ports = ["--dicom-port", str(server.dicom_port), "--http-port", str(server.http_port), "--hl7-port",
                 str(server.hl7_port)]
        r = server.run_cli("doctor", *ports, "--json", "--full")
        report = json.loads(r.stdout)
        checks = by_id(report)
        assert r.returncode == 0, r.stdout + r.stderr
        assert checks["ports"]["status"] == "ok", checks["ports"]
        assert len(checks["ports"]["details"]["ours"]) == 3 and not checks["ports"]["details"]["foreign"]
        # the server still takes stores after doctor read its index
        dcmtk.store(server.dicom_port, [sample_file("MR_small.dcm")]).check()
        r = server.run_cli("doctor", *ports, "--json")
        assert r.returncode == 0, r.stdout
        assert by_id(json.loads(r.stdout))["blobs-missing"]["details"]["instances"] == len(rows(copy))

        # a port held by something else is told apart from ours
        with socket.socket() as other:
            other.bind(("127.0.0.1", 0))
            other.listen()
            taken = other.getsockname()[1]
            r = server.run_cli("doctor", "--dicom-port", str(server.dicom_port), "--http-port", str(taken),
                               "--hl7-port", str(server.hl7_port), "--json", "--only", "ports")
        ports_check = by_id(json.loads(r.stdout))["ports"]
        assert r.returncode == 1 and ports_check["status"] == "fail"
        assert any(f"HTTP 127.0.0.1:{taken}" in f for f in ports_check["details"]["foreign"]), ports_check
    finally:
        stop_cleanly(server)
