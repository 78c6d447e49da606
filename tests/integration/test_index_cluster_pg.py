"""The index's cluster primitives on a real PostgreSQL: concurrent migrations, the change bus (LISTEN/NOTIFY between
two Index objects, as between two nodes) and the cross-node exclusive section."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest

from openpacs.index.db import Index
from openpacs.services.auth import AuthService

pytestmark = pytest.mark.postgres


def test_nodes_migrating_at_once_end_on_one_head(pg_cluster) -> None:
    url = pg_cluster.create_database("migrate")
    errors: list[BaseException] = []

    def migrate() -> None:
        idx = Index(url)
        try:
            idx.migrate()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
        finally:
            idx.close()

    threads = [threading.Thread(target=migrate) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    with psycopg.connect(url) as c:
        assert len(c.execute("SELECT version_num FROM alembic_version").fetchall()) == 1
        assert c.execute("SELECT count(*) FROM pg_indexes WHERE indexname = 'ix_studies_date_id'").fetchone()[0] == 1


def test_a_change_on_one_node_drops_the_cached_copy_on_another(pg_cluster) -> None:
    url = pg_cluster.create_database("bus")
    a, b = Index(url), Index(url)
    a.migrate()
    try:
        # an hour of cache: only the notification can make node b refuse the token
        node_a, node_b = AuthService(a, cache_seconds=3600), AuthService(b, cache_seconds=3600)
        b.changes.start()
        node_a.add_user("u", None, "viewer")
        tid, token = node_a.create_token("u")
        assert node_b.principal_for_token(token) is not None  # cached on b
        before = b.changes.received
        assert node_a.revoke_token(tid)
        deadline = time.monotonic() + 30
        while b.changes.received == before and time.monotonic() < deadline:
            time.sleep(0.01)
        assert b.changes.received > before, "node b never heard of the change"
        assert node_b.principal_for_token(token) is None
    finally:
        a.close()
        b.close()


def test_exclusive_is_held_by_one_node_at_a_time(pg_cluster) -> None:
    url = pg_cluster.create_database("excl")
    a, b = Index(url), Index(url)
    try:
        with a.exclusive("sweep") as mine:
            assert mine
            with b.exclusive("sweep") as theirs:
                assert not theirs
            with b.exclusive("another") as other:
                assert other  # names are independent
        with b.exclusive("sweep") as theirs:
            assert theirs  # released on exit
    finally:
        a.close()
        b.close()
