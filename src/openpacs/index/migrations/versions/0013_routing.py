"""routing: auto-routing rules, the router's change-feed cursor, studies waiting to be stable; instances.called_aet

Revision ID: 0013
Revises: 0011a, 0012
"""
import sqlalchemy as sa
from alembic import op

revision = '0013'
down_revision = ('0011a', '0012')
branch_labels = None
depends_on = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table('routing_rules',
        sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
        sa.Column('name', sa.String(), nullable=False),
        sa.Column('enabled', sa.Boolean(), nullable=False),
        sa.Column('spec', sa.Text(), nullable=False),
        sa.Column('created_at', _TS, nullable=False),
        sa.Column('updated_at', _TS, nullable=False),
        sa.Column('updated_by', sa.String(), nullable=True),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('name'),
    )
    op.create_table('routing_cursor',
        sa.Column('name', sa.String(), nullable=False),
        sa.Column('seq', sa.Integer(), nullable=False),
        sa.Column('updated_at', _TS, nullable=False),
        sa.PrimaryKeyConstraint('name'),
    )
    op.create_table('routing_pending',
        sa.Column('rule', sa.String(), nullable=False),
        sa.Column('study_instance_uid', sa.String(length=64), nullable=False),
        sa.Column('first_at', _TS, nullable=False),
        sa.Column('last_at', _TS, nullable=False),
        sa.Column('instances', sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint('rule', 'study_instance_uid'),
    )
    with op.batch_alter_table('instances', schema=None) as b:
        b.add_column(sa.Column('called_aet', sa.String(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('instances', schema=None) as b:
        b.drop_column('called_aet')
    op.drop_table('routing_pending')
    op.drop_table('routing_cursor')
    op.drop_table('routing_rules')
