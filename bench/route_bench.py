"""Routing performance (issue 12): forwarding a CT study to DCMTK storescp, Orthanc vs OpenPACS, and ingest
throughput with and without an active routing rule.

Figures, each round on fresh storage, the two sides of a comparison in alternating order:
  forward_inst_s   one N-instance CT study (512x512x16 bit, ~525 KB each) is stored into the server (4 parallel
                   storescu, not timed), then forwarded to a fresh `storescp +B`:
                   Orthanc:  POST /modalities/dest/store {"Resources": [study], "Synchronous": true}, request to
                             response (one association, Orthanc's store job);
                   OpenPACS: POST /api/studies/{uid}/send {"destination": "DEST", "associations": 1} (the node's
                             default max_associations), then GET /api/jobs/{id} every 50 ms until done; then, on
                             the same server, "associations": 4 to a second storescp started with --fork (a plain
                             storescp serves one association at a time).
                   Every run checks that storescp holds all N files.
  ingest_inst_s    OpenPACS only: N instances over 4 parallel storescu processes into (a) a server without rules and
                   (b) one with `[[routes]] name="all" destinations=["DEST"]` (everything to a storescp); the routing
                   jobs run concurrently by design: `route_lag_s` is how long after the ingest ended storescp had all
                   N files and every routing job was done.
CPU of the server's process group (and of storescp) over each timed window comes from /proc/<pid>/stat.

Run (about 5 minutes with the defaults on 2 cores):
  .venv/bin/python bench/route_bench.py [--rounds 3] [--instances 1000] [--shared /work/shared/bench] [--json OUT]
      [--profile SECONDS]   # also py-spy the OpenPACS server while it forwards (round 1, 1 association)
Needs DCMTK (storescu, storescp) and Orthanc (Debian `orthanc`). The data comes from the shared gen_dataset.py
(1 study, 10 series), cached under $TMPDIR/pacs-bench-data/route-ct-N.
"""

from __future__ import annotations

import argparse
import atexit
import collections
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from helpers.dcmtk import StoreSCP  # noqa: E402
from helpers.orthanc import find_orthanc  # noqa: E402
from helpers.ports import free_port, wait_for_port  # noqa: E402
from helpers.server import OpenPACSServer  # noqa: E402

ENV = dict(os.environ, TCP_NODELAY="1")  # DCMTK and Orthanc otherwise hit Nagle/delayed-ACK stalls on loopback
STORESCU = "/usr/bin/storescu"  # DCMTK's own (the venv's pynetdicom look-alike is far slower)
TICK = os.sysconf("SC_CLK_TCK")
DEST_AET = "DESTSCP"
SCP_ROOT: list[Path] = []  # --scp-dir: where the storescp destinations write (default: beside the server's data)


def scp_dir(tmp: Path) -> Path:
    """Where one storescp writes: beside the server's data, or under --scp-dir (removed at exit)."""
    if not SCP_ROOT:
        return tmp
    d = Path(tempfile.mkdtemp(prefix="scp-", dir=SCP_ROOT[0]))
    atexit.register(shutil.rmtree, d, True)
    return d


ROUTE_TOML = '[[routes]]\nname = "all"\ndestinations = ["DEST"]\n'


def http() -> requests.Session:
    s = requests.Session()
    s.trust_env = False  # no proxy for loopback
    return s


# ---------------------------------------------------------------------------------------------------- data


def dataset(shared: Path, cache: Path, n: int) -> list[str]:
    """N deterministic CT instances of one study, made by the shared gen_dataset.py (imported, not copied)."""
    nseries = 10 if n % 10 == 0 else 1
    out = cache / f"route-ct-{n}"
    if not out.is_dir() or len(list(out.iterdir())) != n:
        shutil.rmtree(out, ignore_errors=True)
        sys.path.insert(0, str(shared))
        import gen_dataset  # type: ignore[import-not-found]

        argv = sys.argv
        sys.argv = ["gen_dataset.py", str(out), "1", str(nseries), str(n // nseries)]
        try:
            gen_dataset.main()
        finally:
            sys.argv = argv
    return sorted(str(p) for p in out.iterdir())


def study_uid(files: list[str]) -> str:
    from pydicom import dcmread

    return str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


def storescu_parallel(port: int, aet: str, files: list[str], parallel: int = 4) -> float:
    """compare.py's ingest_4: the files dealt over `parallel` storescu processes; returns the wall time."""
    t = time.perf_counter()
    ps = [subprocess.Popen([STORESCU, "-aec", aet, "-aet", "BENCHSCU", "127.0.0.1", str(port), *files[i::parallel]],
                           env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for i in range(parallel)]
    codes = [p.wait() for p in ps]
    dt = time.perf_counter() - t
    if any(codes):
        raise RuntimeError(f"storescu exit codes {codes}")
    return dt


# ---------------------------------------------------------------------------------------------------- CPU


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def group_cpu(pgid: int) -> float:
    """CPU seconds (user + system) of every live process in process group `pgid`."""
    total = 0
    for d in os.listdir("/proc"):
        if d.isdigit():
            f = _stat(int(d))
            if f and int(f[2]) == pgid:
                total += int(f[11]) + int(f[12])
    return total / TICK


def proc_cpu(pid: int) -> float:
    """CPU seconds of `pid` and of its children it has reaped (storescp --fork)."""
    f = _stat(pid)
    return sum(int(x) for x in f[11:15]) / TICK if f else 0.0


class Window:
    """Wall time and CPU (server group, storescp) over a timed window."""

    def __init__(self, pgid: int, scp: StoreSCP | None = None) -> None:
        self.pgid, self.scp = pgid, scp

    def __enter__(self) -> Window:
        self.cpu0, self.scp0, self.t0 = group_cpu(self.pgid), self._scp(), time.perf_counter()
        self.main0 = proc_cpu(self.pgid)  # the serving process alone (the group adds its jobs process)
        return self

    def _scp(self) -> float:
        return proc_cpu(self.scp.proc.pid) if self.scp and self.scp.proc else 0.0

    def stop(self) -> None:
        self.wall = time.perf_counter() - self.t0
        self.cpu = group_cpu(self.pgid) - self.cpu0
        self.main_cpu = proc_cpu(self.pgid) - self.main0
        self.scp_cpu = self._scp() - self.scp0

    def __exit__(self, *exc: object) -> None:
        if not hasattr(self, "wall"):
            self.stop()

    def figures(self, prefix: str) -> dict[str, float]:
        out = {f"{prefix}_server_cpu_pct": round(100 * self.cpu / self.wall, 1),
               f"{prefix}_serving_cpu_pct": round(100 * self.main_cpu / self.wall, 1)}
        if self.scp:
            out[f"{prefix}_storescp_cpu_pct"] = round(100 * self.scp_cpu / self.wall, 1)
        return out


# ---------------------------------------------------------------------------------------------------- servers


class Orthanc:
    """Orthanc 1.10 on free loopback ports with fresh storage, `dest` = the storescp (no --verbose: as deployed)."""

    def __init__(self, tmp: Path, scp_port: int) -> None:
        self.tmp, self.scp_port = tmp, scp_port
        self.dicom_port, self.http_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.aet = "ORTHANC"

    def __enter__(self) -> Orthanc:
        cfg = {"Name": "route-bench", "StorageDirectory": str(self.tmp / "db"), "IndexDirectory": str(self.tmp / "db"),
               "StorageCompression": False, "HttpPort": self.http_port, "DicomPort": self.dicom_port,
               "DicomAet": self.aet, "DicomCheckCalledAet": False, "RemoteAccessAllowed": False,
               "AuthenticationEnabled": False, "HttpTimeout": 600, "DicomScuTimeout": 60,
               "DicomAssociationCloseDelay": 0, "Plugins": [],
               "DicomModalities": {"dest": [DEST_AET, "127.0.0.1", self.scp_port]}}
        (self.tmp / "orthanc.json").write_text(json.dumps(cfg))
        self.log = open(self.tmp / "orthanc.log", "w")
        exe = find_orthanc()
        if exe is None:
            raise RuntimeError("Orthanc not found")
        self.proc = subprocess.Popen([exe, str(self.tmp / "orthanc.json")], stdout=self.log, stderr=subprocess.STDOUT,
                                     env=ENV, start_new_session=True, cwd=self.tmp)

        def alive() -> None:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode}")

        wait_for_port(self.http_port, timeout=60, alive=alive)
        wait_for_port(self.dicom_port, timeout=60, alive=alive)
        self.s = http()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


def openpacs(tmp: Path, scp_port: int, routes: str = "",
             remotes: dict[str, tuple[str, str, int]] | None = None) -> OpenPACSServer:
    return OpenPACSServer(tmp / "data", remote_aes={"DEST": (DEST_AET, "127.0.0.1", scp_port), **(remotes or {})},
                          extra_toml=routes)


def log_problems(text: str) -> list[str]:
    """ERROR / Traceback / WARNING lines of a server log (reported, never hidden)."""
    keys = ("ERROR", "Traceback", "WARNING", "CRITICAL")
    return [ln.strip()[:240] for ln in text.splitlines() if any(k in ln for k in keys)]


# ---------------------------------------------------------------------------------------------------- figures


def wait_files(scp: StoreSCP, n: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while len(scp.files()) < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"storescp has {len(scp.files())} of {n} files after {timeout}s")
        time.sleep(0.05)


def check_files(scp: StoreSCP, n: int, who: str) -> None:
    got = len(scp.files())
    if got != n:
        raise RuntimeError(f"{who}: storescp received {got} files, expected {n}")


def forward_orthanc(tmp: Path, files: list[str]) -> dict[str, float]:
    n = len(files)
    scp = StoreSCP(scp_dir(tmp) / "scp", aet=DEST_AET).start()
    try:
        (tmp / "orthanc").mkdir()
        with Orthanc(tmp / "orthanc", scp.port) as o:
            storescu_parallel(o.dicom_port, o.aet, files)
            os.sync()  # Orthanc does not fsync: its write-back is not the forward's business
            time.sleep(1)
            ids = o.s.get(o.url + "/studies", timeout=30).json()
            assert len(ids) == 1, ids
            with Window(o.proc.pid, scp) as w:
                r = o.s.post(o.url + "/modalities/dest/store", json={"Resources": ids, "Synchronous": True},
                             timeout=600)
                w.stop()
            r.raise_for_status()
            body = r.json()
            if body.get("FailedInstancesCount") or body.get("InstancesCount") not in (None, n):
                raise RuntimeError(f"Orthanc store: {body}")
            check_files(scp, n, "orthanc")
            return {"forward_inst_s": round(n / w.wall, 1), **w.figures("forward")}
    finally:
        scp.stop()


def send_job(s: requests.Session, base: str, uid: str, associations: int, n: int, dest: str = "DEST") -> None:
    r = s.post(f"{base}/api/studies/{uid}/send", json={"destination": dest, "associations": associations},
               timeout=60)
    if r.status_code != 202:
        raise RuntimeError(f"send: HTTP {r.status_code} {r.text[:500]}")
    job = r.json()["id"]
    while True:
        j = s.get(f"{base}/api/jobs/{job}", timeout=60).json()
        if j["state"] in ("done", "failed", "cancelled"):
            break
        time.sleep(0.05)
    if j["state"] != "done" or j["done"] != n or j["failed"]:
        raise RuntimeError(f"send job {job}: {json.dumps(j)[:1500]}")


def forward_openpacs(tmp: Path, files: list[str], uid: str, profile: float, problems: list[str]) -> dict[str, float]:
    """1 association to a plain storescp (one association at a time, like Orthanc's), then 4 associations to a
    `storescp --fork` (a plain storescp would serve the 4 lanes one after the other)."""
    n = len(files)
    scp1 = StoreSCP(scp_dir(tmp) / "scp1", aet=DEST_AET).start()
    scp4 = StoreSCP(scp_dir(tmp) / "scp4", aet=DEST_AET, options=("+xa", "--fork")).start()
    srv = openpacs(tmp, scp1.port, remotes={"DEST4": (DEST_AET, "127.0.0.1", scp4.port)})
    out: dict[str, float] = {}
    try:
        srv.start()
        base = f"http://127.0.0.1:{srv.http_port}"
        s = http()
        storescu_parallel(srv.dicom_port, srv.aet, files)
        os.sync()
        time.sleep(1)
        for assoc, dest, scp, prefix in ((1, "DEST", scp1, "forward"), (4, "DEST4", scp4, "forward4")):
            spy = None
            if profile and assoc == 1:
                spy = subprocess.Popen([str(ROOT / ".venv/bin/py-spy"), "record", "--pid", str(srv.proc.pid),
                                        "--duration", str(int(profile)), "--format", "raw", "--subprocesses", "--gil",
                                        "--output", str(tmp / "pyspy.txt")],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(1)
            with Window(srv.proc.pid, scp) as w:
                send_job(s, base, uid, assoc, n, dest)
                w.stop()
            check_files(scp, n, f"openpacs ({assoc} association(s))")
            out[f"{prefix}_inst_s"] = round(n / w.wall, 1)
            out.update(w.figures(prefix))
            if spy is not None:
                spy.wait()
                print_profile(tmp / "pyspy.txt")
    finally:
        if srv.proc is not None:
            srv.stop()
        problems += log_problems(srv.log_text())
        scp1.stop()
        scp4.stop()
    return out


def print_profile(raw: Path, top: int = 25) -> None:
    """py-spy's collapsed stacks: the functions on the most samples (inclusive) and at the top of the stack."""
    if not raw.exists():
        print("py-spy wrote nothing (ptrace not permitted?)", file=sys.stderr)
        return
    incl: collections.Counter[str] = collections.Counter()
    self_: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, k = line.rpartition(" ")
        if not stack:
            continue
        count = int(k)
        frames = stack.split(";")
        total += count
        self_[frames[-1]] += count
        for f in set(frames):
            incl[f] += count
    print(f"--- py-spy: {total} samples; self (top of stack) ---", file=sys.stderr)
    for f, c in self_.most_common(top):
        print(f"{100 * c / total:5.1f}%  {f}", file=sys.stderr)
    print("--- inclusive ---", file=sys.stderr)
    for f, c in incl.most_common(top):
        print(f"{100 * c / total:5.1f}%  {f}", file=sys.stderr)


def ingest(tmp: Path, files: list[str], routed: bool, problems: list[str]) -> dict[str, float]:
    n = len(files)
    scp = StoreSCP(scp_dir(tmp) / "scp", aet=DEST_AET).start()  # started in both cases: the same machine load
    srv = openpacs(tmp, scp.port, ROUTE_TOML if routed else "")
    out: dict[str, float] = {}
    try:
        srv.start()
        base = f"http://127.0.0.1:{srv.http_port}"
        s = http()
        deadline = time.monotonic() + 15  # the router takes its cursor at the feed's head on its first step
        while routed and "following the change feed" not in srv.log_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.5)
        with Window(srv.proc.pid, scp) as w:
            storescu_parallel(srv.dicom_port, srv.aet, files)
            w.stop()
        out["ingest_inst_s"] = round(n / w.wall, 1)
        out.update(w.figures("ingest"))
        if routed:
            with Window(srv.proc.pid, scp) as lag:
                wait_files(scp, n)
                while True:
                    items = s.get(f"{base}/api/jobs", params={"kind": "send", "limit": 500}, timeout=60).json()["items"]
                    if items and all(j["state"] in ("done", "failed", "cancelled") for j in items):
                        break
                    time.sleep(0.05)
                lag.stop()
            bad = [j for j in items if j["state"] != "done" or j["failed"]]
            if bad or sum(j["done"] for j in items) != n:
                raise RuntimeError(f"routing jobs: {json.dumps(items)[:1500]}")
            check_files(scp, n, "routing")
            out["route_lag_s"] = round(lag.wall, 2)
            out["route_jobs_n"] = len(items)
            out.update(lag.figures("lag"))
    finally:
        if srv.proc is not None:
            srv.stop()
        problems += log_problems(srv.log_text())
        scp.stop()
    return out


# ---------------------------------------------------------------------------------------------------- main


def med(runs: list[dict[str, float]], key: str) -> tuple[float, float, float] | None:
    xs = [r[key] for r in runs if key in r]
    return (round(statistics.median(xs), 2), min(xs), max(xs)) if xs else None


def fmt(m: tuple[float, float, float] | None) -> str:
    return "-" if m is None else f"{m[0]} ({m[1]}-{m[2]})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--instances", type=int, default=1000)
    p.add_argument("--shared", default="/work/shared/bench", help="directory of gen_dataset.py")
    p.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "pacs-bench-data"))
    p.add_argument("--only", default="forward,ingest")
    p.add_argument("--profile", type=float, default=0, help="py-spy the OpenPACS forward for this many seconds")
    p.add_argument("--json")
    p.add_argument("--scp-dir", help="where storescp writes (e.g. /dev/shm: a destination whose disk is not the "
                                     "archive's, as when it is another machine)")
    a = p.parse_args()
    if a.scp_dir:
        SCP_ROOT.append(Path(a.scp_dir))
    if not os.access(STORESCU, os.X_OK):
        sys.exit(f"{STORESCU} missing: apt-get install dcmtk")
    files = dataset(Path(a.shared), Path(a.cache), a.instances)
    uid = study_uid(files)
    parts = set(a.only.split(","))
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in ("orthanc", "openpacs", "plain", "routed")}
    problems: list[str] = []
    for r in range(a.rounds):
        flip = r % 2 == 1  # whoever runs second meets a colder page cache
        if "forward" in parts:
            for kind in (("openpacs", "orthanc") if flip else ("orthanc", "openpacs")):
                tmp = Path(tempfile.mkdtemp(prefix=f"route-bench-{kind}-"))
                try:
                    if kind == "orthanc":
                        runs[kind].append(forward_orthanc(tmp, files))
                    else:
                        runs[kind].append(forward_openpacs(tmp, files, uid, a.profile if r == 0 else 0, problems))
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
        if "ingest" in parts:
            for routed in ((True, False) if flip else (False, True)):
                tmp = Path(tempfile.mkdtemp(prefix="route-bench-ingest-"))
                try:
                    runs["routed" if routed else "plain"].append(ingest(tmp, files, routed, problems))
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
        print(f"round {r + 1}/{a.rounds} done: " + json.dumps({k: v[-1] for k, v in runs.items() if v}),
              file=sys.stderr, flush=True)

    def ratios(num: str, den: str, key_num: str, key_den: str) -> tuple[float, float, float] | None:
        xs = [x[key_num] / y[key_den] for x, y in zip(runs[num], runs[den], strict=True) if key_num in x]
        return (round(statistics.median(xs), 2), round(min(xs), 2), round(max(xs), 2)) if xs else None

    rows = []
    if "forward" in parts:
        rows += [("forward inst/s, Orthanc /modalities/store", med(runs["orthanc"], "forward_inst_s")),
                 ("forward inst/s, OpenPACS 1 association", med(runs["openpacs"], "forward_inst_s")),
                 ("forward inst/s, OpenPACS 4 associations", med(runs["openpacs"], "forward4_inst_s")),
                 ("ratio OpenPACS(1) / Orthanc  [>= 1.3]", ratios("openpacs", "orthanc", "forward_inst_s",
                                                                  "forward_inst_s")),
                 ("ratio OpenPACS(4) / Orthanc", ratios("openpacs", "orthanc", "forward4_inst_s", "forward_inst_s")),
                 ("server CPU % forwarding, Orthanc", med(runs["orthanc"], "forward_server_cpu_pct")),
                 ("server CPU % forwarding, OpenPACS(1)", med(runs["openpacs"], "forward_server_cpu_pct")),
                 ("server CPU % forwarding, OpenPACS(4)", med(runs["openpacs"], "forward4_server_cpu_pct")),
                 ("storescp CPU %, Orthanc run", med(runs["orthanc"], "forward_storescp_cpu_pct")),
                 ("storescp CPU %, OpenPACS(1) run", med(runs["openpacs"], "forward_storescp_cpu_pct")),
                 ("storescp CPU %, OpenPACS(4) run", med(runs["openpacs"], "forward4_storescp_cpu_pct"))]
    if "ingest" in parts:
        rows += [("ingest_4 inst/s, no rule", med(runs["plain"], "ingest_inst_s")),
                 ("ingest_4 inst/s, rule forwarding all", med(runs["routed"], "ingest_inst_s")),
                 ("ratio with / without rule  [>= 0.90]", ratios("routed", "plain", "ingest_inst_s",
                                                                 "ingest_inst_s")),
                 ("server CPU % ingest, no rule", med(runs["plain"], "ingest_server_cpu_pct")),
                 ("server CPU % ingest, rule", med(runs["routed"], "ingest_server_cpu_pct")),
                 ("  of which the serving process, no rule", med(runs["plain"], "ingest_serving_cpu_pct")),
                 ("  of which the serving process, rule", med(runs["routed"], "ingest_serving_cpu_pct")),
                 ("routing done after ingest end, s", med(runs["routed"], "route_lag_s")),
                 ("routing jobs per ingest", med(runs["routed"], "route_jobs_n")),
                 ("server CPU % after ingest (routing)", med(runs["routed"], "lag_server_cpu_pct"))]
    print(f"\n{a.instances} instances, {a.rounds} round(s); median (min-max over rounds)")
    for name, m in rows:
        print(f"  {name:44} {fmt(m)}")
    uniq = list(dict.fromkeys(problems))
    print(f"\nOpenPACS server log: {len(problems)} ERROR/WARNING line(s)" + ("" if not uniq else ":"))
    for ln in uniq[:20]:
        print("  " + ln)
    line = json.dumps({"runs": runs, "summary": {n: m for n, m in rows}, "log_problems": uniq[:50]})
    if a.json:
        Path(a.json).write_text(line)
    print(line)


if __name__ == "__main__":
    main()
