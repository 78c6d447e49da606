"""qc: the reconciliation list (studies without a matching order, or disagreeing with it)

Revision ID: 0011a
Revises: 0011
"""
import sqlalchemy as sa
from alembic import op

revision = '0011a'
down_revision = '0011'
branch_labels = None
depends_on = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table('qc_items',
        sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
        sa.Column('study_instance_uid', sa.String(length=64), nullable=False),
        sa.Column('kind', sa.String(), nullable=False),
        sa.Column('step_fk', sa.Integer(), nullable=True),
        sa.Column('differences', sa.Text(), nullable=False),
        sa.Column('status', sa.String(), nullable=False),
        sa.Column('created_at', _TS, nullable=False),
        sa.Column('resolved_at', _TS, nullable=True),
        sa.Column('resolved_by', sa.String(), nullable=True),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('study_instance_uid'),
    )
    op.create_index('ix_qc_items_status', 'qc_items', ['status', 'id'])


def downgrade() -> None:
    op.drop_index('ix_qc_items_status', table_name='qc_items')
    op.drop_table('qc_items')
