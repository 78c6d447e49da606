"""Integration fixtures: the OpenPACS server (SQLite and PostgreSQL index) on free ports, plus a DCMTK storescp known
to the server as the C-MOVE destination DESTSCP."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import browser, dcmtk
from helpers.server import OpenPACSServer, make_server, stop_cleanly

BACKENDS = [pytest.param("sqlite", id="sqlite"), pytest.param("postgresql", id="postgresql", marks=pytest.mark.postgres)]


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def storescp(require_dcmtk, tmp_path_factory):
    scp = dcmtk.StoreSCP(tmp_path_factory.mktemp("destscp") / "received", aet="DESTSCP").start()
    yield scp
    scp.stop()


@pytest.fixture(scope="module")
def server(request, backend, storescp, require_dcmtk, tmp_path_factory) -> OpenPACSServer:
    """One running server per test module and backend, with DESTSCP (the storescp fixture) as a C-MOVE destination."""
    base = tmp_path_factory.mktemp(f"openpacs-{backend}")
    srv = make_server(request, base, backend, remote_aes={"DESTSCP": ("DESTSCP", "127.0.0.1", storescp.port)})
    srv.start()
    yield srv
    stop_cleanly(srv)


@pytest.fixture(scope="module")
def chromium_path() -> str:
    """Debian's Chromium for Playwright (skipped, or failed under OPENPACS_TEST_REQUIRE_ALL, when absent)."""
    return browser.chromium()


@pytest.fixture(scope="module")
def artifacts() -> Path:
    """Where browser tests leave their screenshots (test-artifacts/, or OPENPACS_TEST_ARTIFACTS)."""
    browser.ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return browser.ARTIFACTS
