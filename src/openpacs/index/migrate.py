"""Schema migrations with alembic, run programmatically at start (``openpacs serve``) or by ``openpacs migrate``."""

from __future__ import annotations

import time
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import text
from sqlalchemy.engine import Engine

MIGRATIONS = Path(__file__).with_name("migrations")


def alembic_config(engine: Engine | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    if engine is not None:
        cfg.attributes["engine"] = engine
    return cfg


MIGRATION_LOCK = 0x6F70_6163_7301  # pg_advisory_lock key: "opacs" + 1


def upgrade(engine: Engine, revision: str = "heads") -> None:
    """Bring the schema to ``revision``. On PostgreSQL the upgrade holds a session advisory lock, so several nodes
    started at once run it one after the other (the later ones find nothing left to do) instead of racing on
    CREATE TABLE; the revisions themselves add tables, columns and indexes without rewriting big tables."""
    if engine.dialect.name != "postgresql":
        command.upgrade(alembic_config(engine), revision)
        return
    # polled with try-lock in autocommit, never waited for in a statement: a waiting statement holds a snapshot, and
    # the holder's CREATE INDEX CONCURRENTLY waits for every snapshot to go (a deadlock PostgreSQL does not detect)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as lock:
        while not lock.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": MIGRATION_LOCK}).scalar():
            time.sleep(0.2)
        try:
            command.upgrade(alembic_config(engine), revision)
        finally:
            lock.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": MIGRATION_LOCK})
