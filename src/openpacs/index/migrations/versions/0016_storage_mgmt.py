"""storage management: compression results, integrity scrub results, studies.protected (retention)

Revision ID: 0016
Revises: 0013
"""
import sqlalchemy as sa
from alembic import op

revision = '0016'
down_revision = '0013'
branch_labels = None
depends_on = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table('compression_results',
        sa.Column('sop_instance_uid', sa.String(length=64), nullable=False),
        sa.Column('state', sa.String(), nullable=False),
        sa.Column('source_ts', sa.String(length=64), nullable=True),
        sa.Column('target_ts', sa.String(length=64), nullable=True),
        sa.Column('bytes_before', sa.BigInteger(), nullable=False),
        sa.Column('bytes_after', sa.BigInteger(), nullable=False),
        sa.Column('reason', sa.Text(), nullable=True),
        sa.Column('job_id', sa.Integer(), nullable=True),
        sa.Column('at', _TS, nullable=False),
        sa.PrimaryKeyConstraint('sop_instance_uid'),
    )
    op.create_index('ix_compression_results_state', 'compression_results', ['state'])
    op.create_table('scrub_results',
        sa.Column('sop_instance_uid', sa.String(length=64), nullable=False),
        sa.Column('blob_key', sa.String(), nullable=False),
        sa.Column('problem', sa.String(), nullable=False),
        sa.Column('detail', sa.Text(), nullable=True),
        sa.Column('study_instance_uid', sa.String(length=64), nullable=True),
        sa.Column('job_id', sa.Integer(), nullable=True),
        sa.Column('found_at', _TS, nullable=False),
        sa.PrimaryKeyConstraint('sop_instance_uid'),
    )
    with op.batch_alter_table('studies', schema=None) as b:
        b.add_column(sa.Column('protected', sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table('studies', schema=None) as b:
        b.drop_column('protected')
    op.drop_table('scrub_results')
    op.drop_index('ix_compression_results_state', table_name='compression_results')
    op.drop_table('compression_results')
