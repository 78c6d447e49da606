"""The jobs process of ``openpacs serve`` (cli/jobs_process.py): distribution jobs and routing run beside the serving
process. Killed on its own (kill -9), it is started again and send jobs still reach DCMTK storescp; when the serving
process is killed -9 alone, the jobs process does not outlive it; with ``job_process = false`` the same send runs in
the serving process."""

from __future__ import annotations

import os
import signal
import sqlite3
import time
from pathlib import Path

import pytest
import requests
from helpers import dcmtk
from helpers.server import OpenPACSServer, make_server, stop_cleanly
from test_send_jobs import api, ct_study, received, store_all, wait_job

pytestmark = pytest.mark.usefixtures("require_dcmtk")


def jobs_process_pid(srv: OpenPACSServer, timeout: float = 60) -> int:
    """The pid of the serving process's child that runs the job worker (a multiprocessing spawn child, which is
    not the resource tracker)."""
    assert srv.proc is not None
    deadline = time.monotonic() + timeout
    while True:
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                stat = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
                cmd = Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if int(stat[1]) == srv.proc.pid and b"spawn_main" in cmd:
                return int(d)
        assert time.monotonic() < deadline, f"no jobs process under {srv.proc.pid}:\n{srv.log_tail(3000)}"
        time.sleep(0.1)


def wait_running(srv: OpenPACSServer, pid: int, timeout: float = 60) -> str:
    """The jobs process's own line once it runs (after its context and niceness are set)."""
    deadline = time.monotonic() + timeout
    while True:
        line = next((ln for ln in srv.log_text().splitlines() if f"jobs process {pid} running" in ln), None)
        if line is not None:
            return line
        assert time.monotonic() < deadline, srv.log_tail(3000)
        time.sleep(0.1)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def send_study(srv: OpenPACSServer, study: str, destination: str) -> dict:
    r = requests.post(f"{api(srv)}/studies/{study}/send", json={"destination": destination}, timeout=30)
    assert r.status_code == 202, r.text
    return wait_job(srv, r.json()["id"])


def test_a_killed_jobs_process_is_started_again_and_sends(request, tmp_path):
    scp = dcmtk.StoreSCP(tmp_path / "rx", aet="JPSCP", options=("+xa", "+uf")).start()
    srv = make_server(request, tmp_path, "sqlite", remote_aes={"JPSCP": ("JPSCP", "127.0.0.1", scp.port)})
    srv.start()
    try:
        first = jobs_process_pid(srv)
        assert "routing on, nice 10" in wait_running(srv, first)
        assert os.getpriority(os.PRIO_PROCESS, first) == 10, "the jobs process yields the CPU to ingest"
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while "starting it again" not in srv.log_text():
            assert time.monotonic() < deadline, srv.log_tail(3000)
            time.sleep(0.1)
        second = jobs_process_pid(srv)
        assert second != first
        wait_running(srv, second)
        study, paths = ct_study(tmp_path / "study", 12)
        store_all(srv, paths)
        j = send_study(srv, study, "JPSCP")
        assert j["state"] == "done" and j["done"] == 12 and j["failed"] == 0, j
        with sqlite3.connect(srv.data_dir / "index.sqlite") as db:
            owner = db.execute("SELECT owner FROM jobs WHERE id = ?", (j["id"],)).fetchone()[0]
        assert owner.split(":")[1] == str(second), f"run by the new jobs process, not {owner}"
        assert len(received(scp)) == 12
        assert requests.get(f"http://127.0.0.1:{srv.http_port}/healthz", timeout=10).status_code == 200
    finally:
        stop_cleanly(srv)
        scp.stop()


def test_the_jobs_process_does_not_outlive_a_killed_serving_process(request, tmp_path):
    srv = make_server(request, tmp_path, "sqlite")
    srv.start()
    try:
        child = jobs_process_pid(srv)
        assert srv.proc is not None
        os.kill(srv.proc.pid, signal.SIGKILL)  # the serving process alone, not its group
        srv.proc.wait()
        deadline = time.monotonic() + 60
        while alive(child):
            assert time.monotonic() < deadline, "the jobs process still runs 60 s after its serving process died"
            time.sleep(0.1)
    finally:
        srv.kill()


def test_send_jobs_in_the_serving_process_when_job_process_is_off(request, tmp_path):
    scp = dcmtk.StoreSCP(tmp_path / "rx", aet="INSCP", options=("+xa", "+uf")).start()
    srv = make_server(request, tmp_path, "sqlite", remote_aes={"INSCP": ("INSCP", "127.0.0.1", scp.port)},
                      settings={"job_process": False})
    srv.start()
    try:
        study, paths = ct_study(tmp_path / "study", 5)
        store_all(srv, paths)
        j = send_study(srv, study, "INSCP")
        assert j["state"] == "done" and j["done"] == 5, j
        with sqlite3.connect(srv.data_dir / "index.sqlite") as db:
            owner = db.execute("SELECT owner FROM jobs WHERE id = ?", (j["id"],)).fetchone()[0]
        assert srv.proc is not None and owner.split(":")[1] == str(srv.proc.pid), owner
        assert "jobs process" not in srv.log_text()
        assert len(received(scp)) == 5
    finally:
        stop_cleanly(srv)
        scp.stop()
