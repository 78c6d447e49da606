"""Alembic environment: the engine comes from openpacs.index.migrate (no alembic.ini needed)."""

from alembic import context

from openpacs.index.schema import metadata

engine = context.config.attributes.get("engine")
if engine is None:  # `alembic revision --autogenerate` from a developer shell
    from sqlalchemy import create_engine

    engine = create_engine(context.config.get_main_option("sqlalchemy.url") or "sqlite:///:memory:")

with engine.connect() as connection:
    context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
    connection.commit()
