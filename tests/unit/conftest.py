"""Fixtures for the core unit suites: a Context on SQLite and on a real PostgreSQL, so the same tests run on both
(test instances come from core_factory)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from openpacs.config import Settings
from openpacs.context import Context, build_context
from openpacs.index.db import Index


@pytest.fixture(scope="session")
def _sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "index.sqlite"
    index = Index(f"sqlite:///{path}")
    index.migrate()
    index.close()
    return path


@pytest.fixture(scope="session")
def _pg_database(pg_cluster: Any) -> str:
    url = pg_cluster.create_database("unit")
    index = Index(url)
    index.migrate()
    index.close()
    return url


def _truncate_all(url: str) -> None:
    """Empty the archive tables (other schemas' tables, e.g. the append-only audit trail, are left alone)."""
    import psycopg

    from openpacs.index import iocm_schema, routing_schema, schema, security_schema, storage_schema
    from openpacs.index.qc_edit_schema import qc_history

    core = (schema.patients, schema.studies, schema.series, schema.instances, schema.changes, schema.jobs,
            schema.settings_table, routing_schema.routing_rules, routing_schema.routing_cursor,
            routing_schema.routing_pending, iocm_schema.rejections, iocm_schema.rejection_items,
            storage_schema.compression_results, storage_schema.scrub_results, qc_history,
            security_schema.department_rules)
    with psycopg.connect(url, autocommit=True) as conn:
        # CASCADE: also the tables that reference these (patient_demographics references patients)
        conn.execute("TRUNCATE " + ", ".join(f'"{t.name}"' for t in core) + " RESTART IDENTITY CASCADE")


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def index_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty, migrated index: a copy of a migrated SQLite file, or the session's PostgreSQL database emptied."""
    if request.param == "sqlite":
        path = tmp_path / "index.sqlite"
        shutil.copyfile(request.getfixturevalue("_sqlite_template"), path)
        return f"sqlite:///{path}"
    url = request.getfixturevalue("_pg_database")
    _truncate_all(url)
    return url


@pytest.fixture
def make_ctx(index_url: str, tmp_path: Path) -> Iterator[Any]:
    """Build contexts on the parametrised backend (several may share the index and blob store)."""
    made: list[Context] = []

    def make(**settings: Any) -> Context:
        s = Settings(data_dir=tmp_path / "data", index_url=index_url, **settings)
        ctx = build_context(s, migrate=False)
        made.append(ctx)
        return ctx

    yield make
    for c in made:
        c.close()


@pytest.fixture
def ctx(make_ctx: Any) -> Context:
    return make_ctx()


@pytest.fixture(autouse=True, scope="session")
def _cheap_kdf() -> Iterator[None]:
    """argon2id with test parameters: the suite checks behaviour, not KDF cost (the loaded CI box takes ~1 s each)."""
    from argon2 import PasswordHasher

    from openpacs.services import auth

    saved = auth._hasher
    auth._hasher = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
    yield
    auth._hasher = saved
