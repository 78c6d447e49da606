"""The OpenPACS server as a real subprocess: `openpacs serve` on free ports with its own data dir and config file."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from .ports import free_port, wait_for_port

LIVE_SERVERS: list[OpenPACSServer] = []


def openpacs_command() -> list[str]:
    """How to run the CLI: OPENPACS_TEST_CLI (a shell-quoted command) or the venv's console script."""
    env = os.environ.get("OPENPACS_TEST_CLI")
    if env:
        return shlex.split(env)
    script = Path(sys.executable).parent / "openpacs"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from openpacs.cli.main import main; sys.exit(main())"]


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    s = str(v).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{s}"'


class ServerDied(RuntimeError):
    pass


class OpenPACSServer:
    def __init__(self, data_dir: Path, index_url: str | None = None, aet: str = "OPENPACS",
                 remote_aes: dict[str, tuple[str, str, int]] | None = None, settings: dict[str, object] | None = None,
                 startup_timeout: float = 120.0, extra_toml: str = "") -> None:
        self.data_dir = Path(data_dir)
        self.extra_toml = extra_toml  # raw TOML tables appended to the config ([remote_dicomweb.X], [[routes]])
        self.index_url = index_url
        self.aet = aet
        self.remote_aes = remote_aes or {}
        self.settings = settings or {}
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.hl7_port = free_port()  # the HL7 listener is on by default (2575): every test server gets its own
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.data_dir.parent / f"{self.data_dir.name}-openpacs.toml"
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}-server.log"
        self.starts = 0

    @property
    def backend(self) -> str:
        return "postgresql" if self.index_url and self.index_url.startswith("postgresql") else "sqlite"

    def write_config(self) -> None:
        lines = [f"{k} = {_toml_value(v)}" for k, v in self.settings.items()]
        for name, (aet, host, port) in self.remote_aes.items():
            lines += ["", f"[remote_aes.{name}]", f"aet = {_toml_value(aet)}", f"host = {_toml_value(host)}",
                      f"port = {port}"]
        if self.extra_toml:
            lines += ["", self.extra_toml.strip()]
        self.config_path.write_text("\n".join(lines) + "\n")

    def index_args(self) -> list[str]:
        return ["--index", self.index_url] if self.index_url else []

    def argv(self) -> list[str]:
        return [*openpacs_command(), "serve", "--config", str(self.config_path), "--data-dir", str(self.data_dir),
                "--dicom-port", str(self.dicom_port), "--http-port", str(self.http_port), "--aet", self.aet,
                "--hl7-port", str(self.hl7_port),
                *self.index_args()]

    def start(self) -> OpenPACSServer:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.write_config()
        self.starts += 1
        with open(self.log_path, "a") as log:
            log.write(f"\n===== start #{self.starts}: {shlex.join(self.argv())}\n")
        self._log = open(self.log_path, "a")
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")
        self.proc = subprocess.Popen(self.argv(), stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        if self not in LIVE_SERVERS:
            LIVE_SERVERS.append(self)
        wait_for_port(self.dicom_port, timeout=self.startup_timeout, alive=self._alive)
        wait_for_port(self.http_port, timeout=self.startup_timeout, alive=self._alive)
        self._wait_healthz()
        return self

    def _alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise ServerDied(f"openpacs serve exited with {self.proc.returncode} during start-up:\n{self.log_tail()}")

    def _wait_healthz(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        url = f"http://127.0.0.1:{self.http_port}/healthz"
        while True:
            self._alive()
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} never answered 200:\n{self.log_tail()}")
            time.sleep(0.1)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait; returns the exit code (0 is a clean stop)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._dump_stacks()
                self.proc.kill()
                self.proc.wait()
                self._close()
                raise AssertionError(f"server ignored SIGTERM for {timeout}s:\n{self.log_tail()}") from None
        self._close()
        return self.proc.returncode

    def kill(self) -> None:
        """kill -9 of the whole process group (the server may run worker processes)."""
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self._close()

    def _dump_stacks(self) -> None:
        try:
            self.proc.send_signal(signal.SIGABRT)  # faulthandler prints every thread's stack to the log
            self.proc.wait(5)
        except Exception:
            pass

    def _close(self) -> None:
        if self in LIVE_SERVERS:
            LIVE_SERVERS.remove(self)
        log = getattr(self, "_log", None)
        if log:
            log.close()
            self._log = None
        # make sure no worker process of the group survives the main one
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, chars: int = 20000) -> str:
        return self.log_text()[-chars:]

    def blob_files(self) -> list[Path]:
        """Every file of the filesystem blob store (<data-dir>/blobs/...), partial writes in blobs/.tmp excepted."""
        root = self.data_dir / "blobs"
        if not root.exists():
            return []
        return [p for p in root.rglob("*") if p.is_file() and ".tmp" not in p.relative_to(root).parts]

    def tmp_files(self) -> list[Path]:
        root = self.data_dir / "blobs" / ".tmp"
        return [p for p in root.iterdir() if p.is_file()] if root.exists() else []

    def run_cli(self, subcommand: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        """Another `openpacs` subcommand against the same data dir / index / config."""
        self.write_config()
        argv = [*openpacs_command(), subcommand, "--config", str(self.config_path), "--data-dir", str(self.data_dir),
                *self.index_args(), *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              env=dict(os.environ, PYTHONUNBUFFERED="1"))


def make_server(request, base: Path, backend: str, **kwargs) -> OpenPACSServer:
    """A not-yet-started server on `backend`; PostgreSQL gets a fresh database of the session cluster (pg_cluster)."""
    index_url = None
    if backend == "postgresql":
        index_url = request.getfixturevalue("pg_cluster").create_database()
    return OpenPACSServer(base / "data", index_url=index_url, **kwargs)


def stop_cleanly(server: OpenPACSServer) -> None:
    """SIGTERM; the server must exit 0. A server that already died is reported."""
    if server.proc is None:
        return
    if not server.running:
        code = server.proc.returncode
        server._close()
        if code != 0 and code != -9:
            raise AssertionError(f"server had exited with {code}:\n{server.log_tail()}")
        return
    code = server.stop()
    assert code == 0, f"openpacs serve exited with {code} on SIGTERM:\n{server.log_tail()}"
