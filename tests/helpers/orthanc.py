"""Orthanc as a real DICOM / DICOMweb peer: started on free loopback ports with its own storage and JSON config.

Orthanc (Debian package ``orthanc``) is found as ``Orthanc`` on PATH or /usr/sbin/Orthanc (OPENPACS_TEST_ORTHANC
overrides); its DICOMweb plugin (package ``orthanc-dicomweb``) at the Debian location or OPENPACS_TEST_ORTHANC_DICOMWEB.
TCP_NODELAY=1 is set in its environment like for DCMTK (Orthanc is built on DCMTK's network layer)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import requests

from .ports import free_port, wait_for_port

DICOMWEB_PLUGIN_PATHS = (
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
    "/usr/lib/orthanc/plugins/libOrthancDicomWeb.so",
    "/usr/local/share/orthanc/plugins/libOrthancDicomWeb.so",
)


def find_orthanc() -> str | None:
    env = os.environ.get("OPENPACS_TEST_ORTHANC")
    if env:
        return env if os.access(env, os.X_OK) else None
    found = shutil.which("Orthanc")
    if found:
        return found
    for p in ("/usr/sbin/Orthanc", "/usr/bin/Orthanc", "/usr/local/bin/Orthanc", "/usr/local/sbin/Orthanc"):
        if os.access(p, os.X_OK):
            return p
    return None


def find_dicomweb_plugin() -> str | None:
    env = os.environ.get("OPENPACS_TEST_ORTHANC_DICOMWEB")
    if env:
        return env if os.path.isfile(env) else None
    for p in DICOMWEB_PLUGIN_PATHS:
        if os.path.isfile(p):
            return p
    return None


class OrthancError(AssertionError):
    pass


class Orthanc:
    """One Orthanc process. ``modalities``: name -> (AET, host, port); ``dicomweb_servers``: name -> base URL."""

    def __init__(
        self,
        directory: Path,
        aet: str = "ORTHANC",
        modalities: dict[str, tuple[str, str, int]] | None = None,
        dicomweb_servers: dict[str, str] | None = None,
        dicomweb_plugin: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.aet = aet
        self.modalities = modalities or {}
        self.dicomweb_servers = dicomweb_servers or {}
        self.dicomweb_plugin = dicomweb_plugin
        self.extra = extra or {}
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.proc: subprocess.Popen | None = None
        self.config_path = self.directory / "orthanc.json"
        self.log_path = self.directory / "orthanc.log"
        self.session = requests.Session()
        self.session.trust_env = False  # no proxy for loopback

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "Name": "openpacs-test-peer",
            "StorageDirectory": str(self.directory / "db"),
            "IndexDirectory": str(self.directory / "db"),
            "StorageCompression": False,
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "DicomCheckCalledAet": False,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "HttpTimeout": 60,
            "DicomScuTimeout": 30,
            "DicomAssociationCloseDelay": 0,  # release SCU associations at once (no 5 s keep-alive between requests)
            "SynchronousCMove": True,
            "StableAge": 1,
            "DicomModalities": {name: [aet, host, port] for name, (aet, host, port) in self.modalities.items()},
            "Plugins": [self.dicomweb_plugin] if self.dicomweb_plugin else [],
        }
        if self.dicomweb_plugin:
            cfg["DicomWeb"] = {
                "Enable": True,
                "Root": "/dicom-web/",
                "Servers": {name: [url] for name, url in self.dicomweb_servers.items()},
            }
        cfg.update(self.extra)
        return cfg

    def start(self, timeout: float = 60.0) -> Orthanc:
        exe = find_orthanc()
        if exe is None:
            raise RuntimeError("Orthanc not found")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.config(), indent=2))
        self._log = open(self.log_path, "a")
        env = dict(os.environ, TCP_NODELAY="1")
        self.proc = subprocess.Popen(
            [exe, "--verbose", str(self.config_path)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            cwd=self.directory,
        )

        def alive() -> None:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode} during start-up:\n{self.log_tail()}")

        wait_for_port(self.http_port, timeout=timeout, alive=alive)
        wait_for_port(self.dicom_port, timeout=timeout, alive=alive)
        deadline = time.monotonic() + timeout
        while True:
            alive()
            try:
                if self.session.get(self.url + "/system", timeout=5).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"Orthanc REST never answered:\n{self.log_tail()}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()
            self._log = None
        self.session.close()

    def log_tail(self, chars: int = 15000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    # ---- REST -------------------------------------------------------------------------------------------------

    def request(self, method: str, path: str, expect: int | tuple[int, ...] = 200, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", 120)
        r = self.session.request(method, self.url + path, **kwargs)
        ok = (expect,) if isinstance(expect, int) else expect
        if r.status_code not in ok:
            raise OrthancError(
                f"Orthanc {method} {path} -> {r.status_code}: {r.text[:2000]}\n--- Orthanc log ---\n"
                f"{self.log_tail(6000)}"
            )
        return r

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs).json()

    def post(self, path: str, body: Any = None, **kwargs: Any) -> Any:
        if isinstance(body, (bytes, bytearray)):
            r = self.request("POST", path, data=body, **kwargs)
        else:
            r = self.request("POST", path, json=body, **kwargs)
        return r.json() if r.content else None

    def delete(self, path: str) -> None:
        self.request("DELETE", path)

    def upload(self, data: bytes) -> dict[str, Any]:
        """POST /instances; returns Orthanc's answer (ID, ParentStudy, Status...)."""
        return self.post("/instances", data, headers={"Content-Type": "application/dicom"})

    def instance_ids(self) -> list[str]:
        return self.get("/instances")

    def instance_file(self, orthanc_id: str) -> bytes:
        return self.request("GET", f"/instances/{orthanc_id}/file").content

    def find_instance(self, sop_instance_uid: str) -> str | None:
        found = self.post("/tools/lookup", sop_instance_uid.encode(), headers={"Content-Type": "text/plain"})
        ids = [f["ID"] for f in found or [] if f.get("Type") == "Instance"]
        return ids[0] if ids else None

    def find_study(self, study_instance_uid: str) -> str | None:
        found = self.post("/tools/lookup", study_instance_uid.encode(), headers={"Content-Type": "text/plain"})
        ids = [f["ID"] for f in found or [] if f.get("Type") == "Study"]
        return ids[0] if ids else None

    def clear(self) -> None:
        for pid in self.get("/patients"):
            self.delete(f"/patients/{pid}")
