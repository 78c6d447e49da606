"""cache epochs: one row per configuration topic, bumped when the topic changes (cross-node cache invalidation)

Revision ID: 0019
Revises: 0018
"""
import sqlalchemy as sa
from alembic import op

revision = '0019'
down_revision = '0018'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('cache_epochs',
        sa.Column('topic', sa.String(length=32), nullable=False),
        sa.Column('epoch', sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint('topic'),
    )


def downgrade() -> None:
    op.drop_table('cache_epochs')
