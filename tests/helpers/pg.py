"""A throw-away PostgreSQL cluster: initdb + pg_ctl on a free port in a temp dir, one fresh database per caller.

PostgreSQL refuses to run as root; when the tests run as root (CI, containers) the cluster is owned by and runs as an
unprivileged account (``nobody`` by default, OPENPACS_TEST_PG_USER to change) through ``runuser``/``setpriv``."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from .ports import free_port


def find_pg_bindir() -> Path | None:
    env = os.environ.get("OPENPACS_TEST_PG_BINDIR")
    candidates = [env] if env else []
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]), reverse=True)
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(os.path.dirname(on_path))
    for c in candidates:
        if c and os.path.exists(os.path.join(c, "initdb")) and os.path.exists(os.path.join(c, "pg_ctl")):
            return Path(c)
    return None


class PostgresCluster:
    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.port = free_port()
        # directly under /tmp: pytest's tmp dirs are 0700 root-owned and the postgres user could not enter them
        self.root = Path(tempfile.mkdtemp(prefix="openpacs-pg-"))
        self.datadir = self.root / "data"
        self.logfile = self.root / "postgres.log"
        self.superuser = "postgres"
        self._run_as: list[str] = []
        if os.geteuid() == 0:
            user = os.environ.get("OPENPACS_TEST_PG_USER", "nobody")
            pw = pwd.getpwnam(user)
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
            os.chmod(self.root, 0o700)
            if shutil.which("runuser"):
                self._run_as = ["runuser", "-u", user, "--"]
            else:
                self._run_as = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups", "--"]

    def _cmd(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, LC_ALL="C", LANG="C", HOME=str(self.root))
        return subprocess.run(
            [*self._run_as, *args], env=env, cwd=self.root, check=check, capture_output=True, text=True, timeout=120
        )

    def start(self) -> None:
        self._cmd(
            str(self.bindir / "initdb"), "-D", str(self.datadir), "-U", self.superuser, "--auth=trust",
            "--encoding=UTF8", "--no-sync",
        )
        opts = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.root} "
            "-c fsync=off -c max_connections=200 -c shared_buffers=32MB"
        )
        try:
            self._cmd(str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-l", str(self.logfile), "-o", opts,
                      "-w", "-t", "60", "start")
        except subprocess.CalledProcessError as e:
            log = self.logfile.read_text(errors="replace") if self.logfile.exists() else ""
            raise RuntimeError(f"pg_ctl start failed: {e.stdout}\n{e.stderr}\n{log}") from e
        self._wait_ready()

    def _wait_ready(self) -> None:
        import psycopg

        deadline = time.monotonic() + 60
        while True:
            try:
                with psycopg.connect(self.dsn("postgres"), connect_timeout=2):
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def dsn(self, dbname: str) -> str:
        return f"postgresql://{self.superuser}@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, prefix: str = "openpacs") -> str:
        """A fresh empty database; returns its postgresql:// URL."""
        import psycopg

        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def stop(self) -> None:
        try:
            self._cmd(str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", "immediate", "-w", "stop", check=False)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
