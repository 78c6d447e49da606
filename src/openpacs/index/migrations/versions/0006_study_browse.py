"""study browsing: an index on studies.created_at for the console's 'received' sort (keyset pages)

Revision ID: 0006
Revises: 0003 (chain-safe: 0004 and 0005 did not exist yet; the lead re-links it after them)
"""
from alembic import op

revision = '0006'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index('ix_studies_created', 'studies', ['created_at'])


def downgrade() -> None:
    op.drop_index('ix_studies_created', table_name='studies')
