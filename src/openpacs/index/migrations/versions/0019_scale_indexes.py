"""scale indexes (issue 16): studies (study_date, id), so a date-range QIDO-RS page comes out of the index in its
ORDER BY study_date, id order and stops at LIMIT

At 1M instances / 20k studies all in one date range, ix_studies_date alone gave the rows in date order only: every
match was fetched, joined to its patient and sorted by id within the date (EXPLAIN ANALYZE 52 ms for limit=100).

Revision ID: 0019a
Revises: 0019
"""
from alembic import op

revision = '0019a'
down_revision = '0019'
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        # built while the other nodes keep serving: CREATE INDEX CONCURRENTLY takes no lock that blocks writes
        # (it cannot run inside a transaction, hence the autocommit block)
        with op.get_context().autocommit_block():
            op.create_index('ix_studies_date_id', 'studies', ['study_date', 'id'], postgresql_concurrently=True,
                            if_not_exists=True)
    else:
        op.create_index('ix_studies_date_id', 'studies', ['study_date', 'id'])


def downgrade() -> None:
    op.drop_index('ix_studies_date_id', table_name='studies')
