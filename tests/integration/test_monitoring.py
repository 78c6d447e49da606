"""Monitoring through real clients: /metrics parsed by prometheus_client's parser after N stores by DCMTK storescu
(over several associations spread on two DIMSE processes) and M by dicomweb-client's STOW-RS; /api/stats and the
per-minute activity agree; /readyz; JSON logs whose lines carry the association and request ids."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pydicom
import pytest
import requests
from helpers import dcmtk
from helpers.dicomdata import small_image, write_part10
from helpers.server import OpenPACSServer, stop_cleanly
from prometheus_client.parser import text_string_to_metric_families
from pydicom.uid import generate_uid


def _files(directory: Path, n: int, patient: str) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    out = []
    for i in range(n):
        ds = small_image(fill=i)
        ds.PatientID, ds.PatientName, ds.Modality = patient, f"{patient}^Test", "CT"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.InstanceNumber = study, series, i + 1
        out.append(write_part10(ds, directory / f"{patient}-{i}.dcm"))
    return out


def _metrics(base: str) -> dict[str, list]:
    r = requests.get(f"{base}/metrics", timeout=30)
    assert r.status_code == 200, r.text[:300]
    return {f.name: f.samples for f in text_string_to_metric_families(r.text)}


def _value(samples: list, name: str, **labels: str) -> float:
    return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def _until(check, timeout: float = 30.0):  # noqa: ANN001, ANN202
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.3)


@pytest.fixture(scope="module")
def srv(require_dcmtk, tmp_path_factory):
    base = tmp_path_factory.mktemp("monitoring")
    s = OpenPACSServer(base / "data", settings={"dicom_workers": 2})
    s.start()
    yield s
    stop_cleanly(s)


def test_metrics_count_dimse_and_stow_stores_across_processes(srv, tmp_path) -> None:
    from dicomweb_client.api import DICOMwebClient

    base = f"http://127.0.0.1:{srv.http_port}"
    n_per, senders, m = 3, 4, 5
    groups = [_files(tmp_path / f"dimse{k}", n_per, f"DIMSE{k}") for k in range(senders)]
    with ThreadPoolExecutor(senders) as pool:  # four associations at once: both DIMSE processes take some
        for result in pool.map(lambda fs: dcmtk.store(srv.dicom_port, fs), groups):
            result.check()
    stow = _files(tmp_path / "stow", m, "STOW1")
    DICOMwebClient(url=f"{base}/dicom-web").store_instances([pydicom.dcmread(f) for f in stow])
    n = n_per * senders
    families = _metrics(base)
    stored = families["openpacs_instances_stored"]
    assert _value(stored, "openpacs_instances_stored_total", protocol="dimse") == n
    assert _value(stored, "openpacs_instances_stored_total", protocol="stow") == m
    hist = families["openpacs_store_duration_seconds"]
    assert _value(hist, "openpacs_store_duration_seconds_count", protocol="dimse") == n
    assert _value(hist, "openpacs_store_duration_seconds_count", protocol="stow") == m
    assert families["openpacs_index_instances"][0].value == n + m
    assert families["openpacs_storage_used_bytes"][0].value > 0
    assert families["openpacs_storage_free_bytes"][0].value > 0
    assert _value(families["openpacs_associations"], "openpacs_associations_total") == senders
    # all associations are closed again (a live gauge summed over the processes)
    assert _until(lambda: _value(_metrics(base)["openpacs_associations_active"],
                                 "openpacs_associations_active") == 0)
    posts = _value(families["openpacs_http_requests"], "openpacs_http_requests_total",
                   route="/dicom-web/studies", status="200")
    assert posts == 1

    # queries and retrievals: C-FIND by findscu, QIDO-RS, WADO-RS
    dcmtk.find(srv.dicom_port, "study", "STUDY", {"PatientID": "DIMSE*", "StudyInstanceUID": ""}, tmp_path / "find")
    assert requests.get(f"{base}/dicom-web/studies", params={"PatientID": "STOW1"}, timeout=30).status_code == 200
    study = pydicom.dcmread(stow[0]).StudyInstanceUID
    r = requests.get(f"{base}/dicom-web/studies/{study}", headers={"Accept": "multipart/related; type=\"application/dicom\""},
                     timeout=30)
    assert r.status_code == 200
    families = _metrics(base)
    assert _value(families["openpacs_queries"], "openpacs_queries_total", protocol="dimse", level="study") == 1
    assert _value(families["openpacs_queries"], "openpacs_queries_total", protocol="qido", level="study") == 1
    assert _value(families["openpacs_retrieve_bytes"], "openpacs_retrieve_bytes_total", protocol="wado") >= len(r.content)

    # the dashboard's figures, from the index (flushed every few seconds by each process)
    stats = _until(lambda: (lambda s: s if s["last_24h"]["store"] == n + m else None)(
        requests.get(f"{base}/api/stats", timeout=30).json()))
    assert stats, requests.get(f"{base}/api/stats", timeout=30).json()
    assert stats["instances"] == n + m and stats["studies"] == senders + 1
    assert stats["last_24h"]["query"] >= 2 and stats["last_24h"]["retrieve"] >= 1
    act = requests.get(f"{base}/api/stats/activity", params={"hours": 1, "step": 60}, timeout=30).json()
    assert sum(act["metrics"]["store"]["count"]) == n + m
    assert requests.get(f"{base}/readyz", timeout=30).json()["status"] == "ready"


def test_json_logs_carry_association_and_request_ids(require_dcmtk, tmp_path) -> None:
    s = OpenPACSServer(tmp_path / "data", settings={"log_format": "json", "log_level": "DEBUG",
                                                     "dicom_accept_unknown": False})
    s.start()
    try:
        base = f"http://127.0.0.1:{s.http_port}"
        assert dcmtk.echo(s.dicom_port).returncode != 0  # an unknown calling AE: rejected
        assert requests.get(f"{base}/dicom-web/studies", timeout=30).status_code in (200, 204)
        families = _until(lambda: (lambda f: f if _value(f["openpacs_associations_rejected"],
                                                         "openpacs_associations_rejected_total") else None)(
            _metrics(base)))
        assert _value(families["openpacs_associations_rejected"], "openpacs_associations_rejected_total",
                      reason="access") == 1
        lines = []
        for raw in s.log_text().splitlines():
            if raw.startswith("{"):
                lines.append(json.loads(raw))  # every line the server printed as JSON parses
        assert lines and all({"time", "level", "logger", "message"} <= set(x) for x in lines)
        rejected = [x for x in lines if x["message"].startswith("association from") and "rejected" in x["message"]]
        assert rejected and all(x.get("association_id") for x in rejected), rejected
        qido = [x for x in lines if x["message"].startswith("QIDO")]
        assert qido and all(x.get("request_id") for x in qido), lines[-20:]
    finally:
        stop_cleanly(s)


def test_grafana_dashboard_reads_metrics_the_server_exports(srv) -> None:
    """Every openpacs_* series the Grafana dashboard in deploy/ queries is declared by services/metrics.py (with
    its counter/histogram suffixes) and those with values now are in the server's /metrics, so the dashboard
    cannot silently drift from the code."""
    import re

    from prometheus_client import Counter, Gauge, Histogram

    from openpacs.services import metrics

    doc = json.loads((Path(__file__).resolve().parents[2] / "deploy/grafana/openpacs-dashboard.json").read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p["targets"]]
    used = set(re.findall(r"\bopenpacs_[a-z0-9_]+", " ".join(exprs)))
    assert len(used) >= 10
    declared: set[str] = set()
    for obj in vars(metrics).values():
        if isinstance(obj, Counter):
            declared.add(obj._name + "_total")
        elif isinstance(obj, Histogram):
            declared.update(obj._name + sfx for sfx in ("_bucket", "_sum", "_count"))
        elif isinstance(obj, Gauge):
            declared.add(obj._name)
    r = requests.get(f"http://127.0.0.1:{srv.http_port}/metrics", timeout=30)
    exported = {s.name for fam in text_string_to_metric_families(r.text) for s in fam.samples}
    assert {"openpacs_index_instances", "openpacs_storage_used_bytes", "openpacs_jobs"} <= exported
    assert used <= declared | exported, sorted(used - declared - exported)
