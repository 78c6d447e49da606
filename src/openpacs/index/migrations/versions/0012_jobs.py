"""jobs: priority, attempts with backoff, leases, progress (done/total/bytes), and per-instance job items

Revision ID: 0012
Revises: 0010
"""
import sqlalchemy as sa
from alembic import op

revision = '0012'
down_revision = '0010'
branch_labels = None
depends_on = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as b:
        b.add_column(sa.Column('priority', sa.Integer(), nullable=False, server_default='0'))
        b.add_column(sa.Column('attempts', sa.Integer(), nullable=False, server_default='0'))
        b.add_column(sa.Column('max_attempts', sa.Integer(), nullable=False, server_default='5'))
        b.add_column(sa.Column('not_before', _TS, nullable=True))
        b.add_column(sa.Column('lease_until', _TS, nullable=True))
        b.add_column(sa.Column('destination', sa.String(), nullable=True))
        b.add_column(sa.Column('done', sa.Integer(), nullable=False, server_default='0'))
        b.add_column(sa.Column('failed', sa.Integer(), nullable=False, server_default='0'))
        b.add_column(sa.Column('total', sa.Integer(), nullable=False, server_default='0'))
        b.add_column(sa.Column('bytes', sa.BigInteger(), nullable=False, server_default='0'))
        b.add_column(sa.Column('started_at', _TS, nullable=True))
        b.add_column(sa.Column('finished_at', _TS, nullable=True))
        b.create_index('ix_jobs_claim', ['state', 'priority', 'id'], unique=False)
    op.create_table('job_items',
        sa.Column('job_id', sa.Integer(), nullable=False),
        sa.Column('seq', sa.Integer(), nullable=False),
        sa.Column('sop_instance_uid', sa.String(length=64), nullable=False),
        sa.Column('state', sa.String(), nullable=False),
        sa.Column('status', sa.Integer(), nullable=True),
        sa.Column('error', sa.Text(), nullable=True),
        sa.Column('bytes', sa.BigInteger(), nullable=False, server_default='0'),
        sa.Column('updated_at', _TS, nullable=True),
        sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('job_id', 'seq'),
        sa.UniqueConstraint('job_id', 'sop_instance_uid', name='uq_job_items_instance'),
    )
    op.create_index('ix_job_items_state', 'job_items', ['job_id', 'state'])


def downgrade() -> None:
    op.drop_index('ix_job_items_state', table_name='job_items')
    op.drop_table('job_items')
    with op.batch_alter_table('jobs', schema=None) as b:
        b.drop_index('ix_jobs_claim')
        for c in ('finished_at', 'started_at', 'bytes', 'total', 'failed', 'done', 'destination', 'lease_until',
                  'not_before', 'max_attempts', 'attempts', 'priority'):
            b.drop_column(c)
