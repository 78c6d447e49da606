"""Wrappers around the DCMTK command-line tools (echoscu, storescu, findscu, getscu, movescu, storescp).

The venv also holds pynetdicom's look-alike apps named echoscu/storescu/...; only the real DCMTK binaries are used:
a binary is accepted when ``--version`` names dcmtk. TCP_NODELAY=1 is always set (DCMTK otherwise waits on Nagle)."""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pydicom

from .ports import free_port, wait_for_port

DCMTK_TOOLS = ("echoscu", "storescu", "findscu", "getscu", "movescu", "storescp")

# transfer syntax -> storescu option proposing it (plus all uncompressed syntaxes)
STORESCU_PROPOSE = {
    "1.2.840.10008.1.2": "-xi",
    "1.2.840.10008.1.2.1": "-xe",
    "1.2.840.10008.1.2.2": "-xb",
    "1.2.840.10008.1.2.1.99": "-xd",
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw",
    "1.2.840.10008.1.2.5": "-xr",
}
# transfer syntax -> getscu/movescu option preferring it on their incoming storage associations
RETRIEVE_PREFER = {
    "1.2.840.10008.1.2": "+xi",
    "1.2.840.10008.1.2.1": "+xe",
    "1.2.840.10008.1.2.2": "+xb",
    "1.2.840.10008.1.2.1.99": "+xd",
    "1.2.840.10008.1.2.4.50": "+xy",
    "1.2.840.10008.1.2.4.51": "+xx",
    "1.2.840.10008.1.2.4.70": "+xs",
    "1.2.840.10008.1.2.4.80": "+xt",
    "1.2.840.10008.1.2.4.81": "+xu",
    "1.2.840.10008.1.2.4.90": "+xv",
    "1.2.840.10008.1.2.4.91": "+xw",
    "1.2.840.10008.1.2.5": "+xr",
}


def _is_dcmtk(path: str) -> bool:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "dcmtk" in (out.stdout + out.stderr).lower()


@functools.cache
def find_tool(name: str) -> str | None:
    """Absolute path of the DCMTK tool `name`, skipping pynetdicom's same-named scripts in the venv."""
    dirs = os.environ.get("PATH", "").split(os.pathsep) + ["/usr/bin", "/usr/local/bin"]
    venv_bin = os.path.realpath(os.path.dirname(sys.executable))
    for d in dirs:
        p = os.path.join(d, name)
        if not os.path.isfile(p) or not os.access(p, os.X_OK):
            continue
        if os.path.realpath(d) == venv_bin:
            continue
        if _is_dcmtk(p):
            return p
    return None


def missing_tools() -> list[str]:
    return [t for t in DCMTK_TOOLS if find_tool(t) is None]


def dcmtk_env() -> dict[str, str]:
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    # storescp/getscu use DCMDICTPATH only if set; the compiled-in dictionary is fine
    return env


@dataclass
class Result:
    args: list[str]
    returncode: int
    output: str  # stdout + stderr interleaved

    def check(self) -> Result:
        if self.returncode != 0:
            raise AssertionError(f"{' '.join(self.args)} exited {self.returncode}:\n{self.output[-6000:]}")
        return self


def run(tool: str, *args: str, timeout: float = 300, cwd: str | os.PathLike[str] | None = None) -> Result:
    exe = find_tool(tool)
    if exe is None:
        raise RuntimeError(f"DCMTK {tool} not found")
    argv = [exe, *[str(a) for a in args]]
    p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                       timeout=timeout, env=dcmtk_env(), cwd=cwd)
    return Result(argv, p.returncode, p.stdout)


def spawn(tool: str, *args: str, cwd: str | os.PathLike[str] | None = None, stdout=None) -> subprocess.Popen:
    exe = find_tool(tool)
    if exe is None:
        raise RuntimeError(f"DCMTK {tool} not found")
    return subprocess.Popen([exe, *[str(a) for a in args]], stdout=stdout or subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", env=dcmtk_env(), cwd=cwd)


def peer_args(port: int, aet: str, host: str = "127.0.0.1") -> list[str]:
    return ["-aec", aet, host, str(port)]


def echo(port: int, aet: str = "OPENPACS", timeout: float = 60) -> Result:
    return run("echoscu", "-to", "20", "-ta", "20", "-aec", aet, "127.0.0.1", str(port), timeout=timeout)


def store(port: int, files: list[str | os.PathLike[str]], *options: str, aet: str = "OPENPACS",
          calling: str = "STORESCU") -> Result:
    return run("storescu", "-v", "-nh", "-to", "30", "-ta", "30", "-aet", calling, *options, "-aec", aet,
               "127.0.0.1", str(port), *[str(f) for f in files])


_SENDING = re.compile(r"^I: Sending file: (.+)$", re.M)
_RESPONSE = re.compile(r"^I: Received Store Response \(([^)]*)\)", re.M)


def parse_store_log(output: str) -> dict[str, str]:
    """file path -> the status text storescu printed for it ("Success", "Warning", "Failure: ..."); files whose
    request got no response (association dropped, server killed) are absent."""
    statuses: dict[str, str] = {}
    current: str | None = None
    for line in output.splitlines():
        m = _SENDING.match(line)
        if m:
            current = m.group(1).strip()
            continue
        m = _RESPONSE.match(line)
        if m and current is not None:
            statuses[current] = m.group(1)
            current = None
    return statuses


def find(port: int, model: str, level: str, keys: dict[str, str] | list[tuple[str, str]], out_dir: Path,
         aet: str = "OPENPACS", extra: tuple[str, ...] = ()) -> list[pydicom.Dataset]:
    """findscu -P/-S with -k keys; returns the identifiers of the pending responses (read back from -X files)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in out_dir.glob("rsp*.dcm"):
        f.unlink()
    items = list(keys.items()) if isinstance(keys, dict) else list(keys)
    argv = ["-to", "20", "-ta", "20", {"patient": "-P", "study": "-S"}[model], "-X", "-od", str(out_dir), *extra,
            "-k", f"QueryRetrieveLevel={level}"]
    for k, v in items:
        argv += ["-k", f"{k}={v}" if v is not None else k]
    res = run("findscu", *argv, *peer_args(port, aet))
    res.check()
    if re.search(r"^E: ", res.output, re.M):
        raise AssertionError(f"findscu reported errors:\n{res.output[-4000:]}")
    return [pydicom.dcmread(f) for f in sorted(out_dir.glob("rsp*.dcm"))]


@dataclass
class RetrieveResult:
    result: Result
    files: list[Path] = field(default_factory=list)

    @property
    def output(self) -> str:
        return self.result.output

    def _last_response(self) -> str:
        """The last incoming C-MOVE-RSP / C-GET-RSP as printed by DCMTK in debug mode (-d)."""
        blocks = re.findall(r"Message Type\s*:\s*C-(?:MOVE|GET) RSP(.*?)END DIMSE MESSAGE", self.output, re.S)
        return blocks[-1] if blocks else ""

    def final_counts(self) -> dict[str, int]:
        """Sub-operation counters of the final response; counters the response did not carry are absent."""
        counts: dict[str, int] = {}
        for name in ("Remaining", "Completed", "Failed", "Warning"):
            m = re.search(rf"{name} Suboperations\s*:\s*(\d+)", self._last_response())
            if m:
                counts[name.lower()] = int(m.group(1))
        return counts

    def final_status(self) -> int | None:
        m = re.search(r"DIMSE Status\s*:\s*0x([0-9A-Fa-f]{4})", self._last_response())
        return int(m.group(1), 16) if m else None


def get(port: int, model: str, level: str, keys: dict[str, str], out_dir: Path, prefer: str | None = None,
        aet: str = "OPENPACS") -> RetrieveResult:
    """getscu (bit preserving) into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    argv = ["-d", "+B", "-to", "30", "-ta", "30", {"patient": "-P", "study": "-S"}[model], "-od", str(out_dir)]
    if prefer:
        argv.append(prefer)
    argv += ["-k", f"QueryRetrieveLevel={level}"]
    for k, v in keys.items():
        argv += ["-k", f"{k}={v}"]
    before = set(out_dir.iterdir())
    res = run("getscu", *argv, *peer_args(port, aet))
    return RetrieveResult(res, sorted(set(out_dir.iterdir()) - before))


def move(port: int, model: str, level: str, keys: dict[str, str], destination: str,
         aet: str = "OPENPACS") -> RetrieveResult:
    argv = ["-d", "-to", "30", "-ta", "30", {"patient": "-P", "study": "-S"}[model], "-aem", destination,
            "-k", f"QueryRetrieveLevel={level}"]
    for k, v in keys.items():
        argv += ["-k", f"{k}={v}"]
    return RetrieveResult(run("movescu", *argv, *peer_args(port, aet)))


class StoreSCP:
    """DCMTK storescp accepting every transfer syntax, writing exactly what it receives (+B) into a directory."""

    def __init__(self, directory: Path, aet: str = "DESTSCP", port: int | None = None,
                 options: tuple[str, ...] = ("+xa",)) -> None:
        """``options``: storescp's transfer syntax (and other) options; ``("+xa",)`` accepts every syntax, ``()``
        only the uncompressed ones, ``("+xa", "+uf")`` also keeps a file per received request (duplicates show)."""
        self.directory = directory
        self.aet = aet
        self.port = port or free_port()
        self.options = options
        self.proc: subprocess.Popen | None = None
        self.log = directory.parent / f"storescp-{self.port}.log"

    def start(self) -> StoreSCP:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._logfh = open(self.log, "w")
        exe = find_tool("storescp")
        assert exe
        self.proc = subprocess.Popen([exe, "-v", *self.options, "+B", "-aet", self.aet, "-od", str(self.directory),
                                      str(self.port)], stdout=self._logfh, stderr=subprocess.STDOUT, env=dcmtk_env())

        def alive() -> None:
            if self.proc.poll() is not None:
                raise RuntimeError(f"storescp exited: {self.log.read_text(errors='replace')}")

        wait_for_port(self.port, alive=alive)
        return self

    def files(self) -> list[Path]:
        return sorted(p for p in self.directory.iterdir() if p.is_file())

    def clear(self) -> None:
        for p in self.files():
            p.unlink()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "_logfh", None):
            self._logfh.close()


def which_all_present() -> bool:
    return not missing_tools() and shutil.which("true") is not None
