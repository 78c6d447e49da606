"""Schema migrations with alembic, run programmatically at start (``openpacs serve``) or by ``openpacs migrate``."""

from __future__ import annotations

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
    with engine.connect() as lock:
        lock.execute(text("SELECT pg_advisory_lock(:k)"), {"k": MIGRATION_LOCK})
        lock.commit()
        try:
            command.upgrade(alembic_config(engine), revision)
        finally:
            lock.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": MIGRATION_LOCK})
            lock.commit()
