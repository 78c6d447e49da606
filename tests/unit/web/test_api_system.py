"""/api/stats, /api/stats/activity, /api/system(/config, /log), /api/me, /readyz and /metrics through the real app
with authentication on: the rights matrix across roles, bad parameters, figures that follow real stores, secrets
redacted, and /metrics refused off loopback without a token."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom.data import get_testdata_file
from starlette.testclient import TestClient

from openpacs.config import Settings
from openpacs.context import Context, build_context
from openpacs.services.types import Source
from openpacs.web.app import build_app

ROLES = ("admin", "radiologist", "physician", "technologist", "viewer", "auditor")


@pytest.fixture
def env(tmp_path: Path) -> Iterator[tuple[Context, TestClient, dict[str, dict[str, str]]]]:
    s = Settings(data_dir=tmp_path / "data", auth="on", metrics_token="s3cret-metrics-token",
                 index_url=f"sqlite:///{tmp_path / 'data' / 'index.sqlite'}")
    ctx = build_context(s)
    assert ctx.auth is not None
    heads = {}
    for role in ROLES:
        ctx.auth.add_user(role, f"pw-{role}-0123456789", role)
        heads[role] = {"Authorization": f"Bearer {ctx.auth.create_token(role)[1]}"}
    with TestClient(build_app(ctx)) as client:
        yield ctx, client, heads
    ctx.close()


def _store(ctx: Context, n: int) -> int:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    total = 0
    for i in range(n):
        ds.SOPInstanceUID = f"1.2.826.0.1.3680043.8.498.{i + 1}"
        from io import BytesIO

        buf = BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        out = ctx.ingest.store_file(buf.getvalue(), Source("IMPORT", user="test"))
        assert out.ok, out.message
        total += len(buf.getvalue())
    return total


def test_rights_matrix(env) -> None:
    _ctx, c, heads = env
    expected = {
        "/api/stats": {"admin", "radiologist", "physician", "technologist", "viewer"},
        "/api/stats/activity": {"admin", "radiologist", "physician", "technologist", "viewer"},
        "/api/system": {"admin", "radiologist", "physician", "technologist", "viewer"},
        "/api/system/config": {"admin"},
        "/api/system/log": {"admin"},
        "/api/me": set(ROLES),
    }
    for path, allowed in expected.items():
        for role in ROLES:
            r = c.get(path, headers=heads[role])
            assert r.status_code == (200 if role in allowed else 403), (path, role, r.status_code, r.text[:200])
        if path != "/api/me":
            assert c.get(path).status_code == 401, path
    assert c.get("/api/me").json()["authenticated"] is False
    assert c.get("/api/me", headers=heads["auditor"]).json()["role"] == "auditor"
    # the recent failures (from the audit trail) only for those who may read it
    assert c.get("/api/stats", headers=heads["viewer"]).json()["recent_failures"] is None
    assert isinstance(c.get("/api/stats", headers=heads["admin"]).json()["recent_failures"], list)


def test_bad_parameters(env) -> None:
    _ctx, c, heads = env
    admin = heads["admin"]
    for params in ({"hours": 0}, {"hours": 1000}, {"step": 30}, {"step": 90}, {"metrics": "nonsense"},
                   {"metrics": ""}, {"hours": "x"}):
        r = c.get("/api/stats/activity", params=params, headers=admin)
        assert r.status_code == 400, (params, r.status_code, r.text)
        assert r.json()["detail"]
    assert c.get("/api/system/log", params={"level": "LOUD"}, headers=admin).status_code == 400
    assert c.get("/api/system/log", params={"after": -1}, headers=admin).status_code == 400


def test_stats_and_activity_follow_stores(env) -> None:
    ctx, c, heads = env
    admin = heads["admin"]
    before = c.get("/api/stats", headers=admin).json()
    assert before["instances"] == 0 and before["studies"] == 0
    nbytes = _store(ctx, 3)
    assert ctx.monitor is not None and ctx.monitor.activity is not None
    ctx.monitor.activity.flush()
    ctx.figures._at = 0  # type: ignore[union-attr]  # no waiting for the 5-second cache
    after = c.get("/api/stats", headers=admin).json()
    assert after["instances"] == 3 and after["studies"] == 1 and after["patients"] == 1
    assert after["storage_used_bytes"] > 0 and after["storage_free_bytes"] > 0
    assert after["last_24h"]["store"] == 3
    assert after["ingest_bytes_per_day"] > 0 and after["days_until_full"] > 0
    act = c.get("/api/stats/activity", params={"hours": 1, "step": 300, "metrics": "store"}, headers=admin).json()
    assert act["step"] == 300 and len(act["metrics"]["store"]["count"]) == 12
    assert sum(act["metrics"]["store"]["count"]) == 3
    assert sum(act["metrics"]["store"]["bytes"]) >= nbytes - 3 * 1024  # stored as given (preamble + meta)


def test_system_info_config_redacted_and_log(env) -> None:
    ctx, c, heads = env
    admin = heads["admin"]
    info = c.get("/api/system", headers=admin).json()
    assert info["aet"] == "OPENPACS" and info["index_backend"] == "SQLite" and info["uptime_seconds"] >= 0
    assert info["ports"]["dicom"] == ctx.settings.dicom_port
    cfg = c.get("/api/system/config", headers=admin).json()
    assert cfg["metrics_token"] == "***" and "s3cret" not in c.get("/api/system/config", headers=admin).text
    assert cfg["aet"] == "OPENPACS" and cfg["auth"] == "on"
    import logging

    logging.getLogger("openpacs.test").warning("a line for the System page")
    got = c.get("/api/system/log", params={"level": "WARNING"}, headers=admin).json()
    assert any(i["message"] == "a line for the System page" for i in got["items"])
    again = c.get("/api/system/log", params={"after": got["last"], "level": "WARNING"}, headers=admin).json()
    assert all(i["seq"] > got["last"] for i in again["items"])


def test_redaction_of_url_passwords() -> None:
    from openpacs.config import redacted

    s = Settings(index_url="postgresql://pacs:hunter2@db.example/pacs", audit_syslog="tls://log:6514")
    out = redacted(s)
    assert out["index_url"] == "postgresql://pacs:***@db.example/pacs"
    assert out["audit_syslog"] == "tls://log:6514"


def test_metrics_needs_a_token_off_loopback(env) -> None:
    ctx, c, heads = env
    _store(ctx, 2)
    # the TestClient's address is "testclient", not loopback
    r = c.get("/metrics")
    assert r.status_code == 401 and "bearer" in r.json()["detail"].lower()
    assert c.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert c.get("/metrics", headers=heads["viewer"]).status_code == 401  # a reader's token is not enough
    r = c.get("/metrics", headers={"Authorization": "Bearer s3cret-metrics-token"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert c.get("/metrics", headers=heads["admin"]).status_code == 200
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    stored = {s.labels.get("protocol"): s.value for s in families["openpacs_instances_stored"].samples
              if s.name == "openpacs_instances_stored_total"}
    assert stored.get("import", 0) >= 2  # the default registry is per process: other tests may have added
    assert families["openpacs_index_instances"].samples[0].value == 2
    for name in ("openpacs_store_duration_seconds", "openpacs_storage_used_bytes", "openpacs_storage_free_bytes",
                 "openpacs_jobs", "openpacs_associations_active", "openpacs_http_requests"):
        assert name in families, name


def test_readyz(env) -> None:
    ctx, c, _ = env
    r = c.get("/readyz")
    assert r.status_code == 200 and r.json()["status"] == "ready"

    def broken() -> None:
        raise OSError(30, "Read-only file system")

    ctx.store.probe = broken  # type: ignore[method-assign]
    r = c.get("/readyz")
    assert r.status_code == 503
    assert any("not writable" in why for why in r.json()["reasons"])
