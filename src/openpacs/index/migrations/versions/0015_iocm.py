"""iocm: IOCM rejection notes (rejections, rejection_items); instances.rejected and instances.rejected_at

A rejected instance stays stored until the purge job deletes it, but no query or retrieval sees it and the counters
of its series, study and patient do not count it (services/iocm.py).

Revision ID: 0015
Revises: 0013
"""
import sqlalchemy as sa
from alembic import op

revision = '0015'
down_revision = '0013'
branch_labels = None
depends_on = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table('rejections',
        sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
        sa.Column('kos_sop_instance_uid', sa.String(length=64), nullable=True),
        sa.Column('study_instance_uid', sa.String(length=64), nullable=False),
        sa.Column('reason', sa.String(), nullable=False),
        sa.Column('source', sa.String(), nullable=False),
        sa.Column('actor', sa.String(), nullable=True),
        sa.Column('state', sa.String(), nullable=False),
        sa.Column('num_instances', sa.Integer(), nullable=False),
        sa.Column('created_at', _TS, nullable=False),
        sa.Column('updated_at', _TS, nullable=False),
        sa.Column('detail', sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('kos_sop_instance_uid'),
    )
    op.create_index('ix_rejections_state', 'rejections', ['state', 'id'])
    op.create_table('rejection_items',
        sa.Column('rejection_id', sa.Integer(), nullable=False),
        sa.Column('sop_instance_uid', sa.String(length=64), nullable=False),
        sa.Column('series_instance_uid', sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(['rejection_id'], ['rejections.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('rejection_id', 'sop_instance_uid'),
    )
    op.create_index('ix_rejection_items_sop', 'rejection_items', ['sop_instance_uid'])
    with op.batch_alter_table('instances', schema=None) as b:
        b.add_column(sa.Column('rejected', sa.String(), nullable=True))
        b.add_column(sa.Column('rejected_at', _TS, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('instances', schema=None) as b:
        b.drop_column('rejected_at')
        b.drop_column('rejected')
    op.drop_index('ix_rejection_items_sop', 'rejection_items')
    op.drop_table('rejection_items')
    op.drop_index('ix_rejections_state', 'rejections')
    op.drop_table('rejections')
