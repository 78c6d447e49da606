"""qc edits: the QC history (qc_history); studies.qc_version and series.qc_version (the retrieval overlay)

Revision ID: 0014
Revises: 0013
"""
import sqlalchemy as sa
from alembic import op

revision = '0014'
down_revision = '0013'
branch_labels = None
depends_on = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table('qc_history',
        sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
        sa.Column('at', _TS, nullable=False),
        sa.Column('user', sa.String(), nullable=False),
        sa.Column('operation', sa.String(), nullable=False),
        sa.Column('level', sa.String(), nullable=False),
        sa.Column('uid', sa.String(), nullable=False),
        sa.Column('study_uids', sa.Text(), nullable=False),
        sa.Column('old', sa.Text(), nullable=False),
        sa.Column('new', sa.Text(), nullable=False),
        sa.Column('undone_at', _TS, nullable=True),
        sa.Column('undone_by', sa.String(), nullable=True),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index('ix_qc_history_at', 'qc_history', ['at'])
    op.create_index('ix_qc_history_uid', 'qc_history', ['uid'])
    for table in ('studies', 'series'):
        with op.batch_alter_table(table, schema=None) as b:
            b.add_column(sa.Column('qc_version', sa.Integer(), nullable=False, server_default='0'))


def downgrade() -> None:
    for table in ('series', 'studies'):
        with op.batch_alter_table(table, schema=None) as b:
            b.drop_column('qc_version')
    op.drop_index('ix_qc_history_uid', 'qc_history')
    op.drop_index('ix_qc_history_at', 'qc_history')
    op.drop_table('qc_history')
