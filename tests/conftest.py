"""Shared fixtures: puts tests/ on sys.path for the ``helpers`` package, a session PostgreSQL cluster, DCMTK checks,
and server logs attached to the report of any failing test."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import dcmtk  # noqa: E402
from helpers.pg import PostgresCluster, find_pg_bindir  # noqa: E402
from helpers.server import LIVE_SERVERS  # noqa: E402

# In CI every prerequisite must be there: a missing DCMTK or PostgreSQL fails instead of skipping.
REQUIRE_ALL = os.environ.get("OPENPACS_TEST_REQUIRE_ALL", "") not in ("", "0", "false")


def missing(what: str) -> None:
    if REQUIRE_ALL:
        pytest.fail(f"{what} (OPENPACS_TEST_REQUIRE_ALL is set)", pytrace=False)
    pytest.skip(what)


@pytest.fixture(scope="session")
def pg_cluster():
    bindir = find_pg_bindir()
    if bindir is None:
        missing("PostgreSQL server binaries (initdb, pg_ctl) not found; set OPENPACS_TEST_PG_BINDIR")
    cluster = PostgresCluster(bindir)
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def require_dcmtk():
    lacking = dcmtk.missing_tools()
    if lacking:
        missing(f"DCMTK tools not found: {', '.join(lacking)} (apt-get install dcmtk)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed and LIVE_SERVERS:
        for srv in LIVE_SERVERS:
            rep.sections.append((f"openpacs server log ({srv.data_dir.name}, tail)", srv.log_tail(15000)))
