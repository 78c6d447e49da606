"""workbench: remote nodes in the index, node activity, per-minute activity counters

Revision ID: 0003
Revises: 0002
"""
import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table('remote_nodes',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('aet', sa.String(length=16), nullable=False),
    sa.Column('host', sa.String(), nullable=False),
    sa.Column('port', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('allow', sa.String(), nullable=False),
    sa.Column('departments', sa.Text(), nullable=True),
    sa.Column('tls', sa.Boolean(), nullable=False),
    sa.Column('description', sa.Text(), nullable=False),
    sa.Column('created_at', _TS, nullable=False),
    sa.Column('updated_at', _TS, nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('name')
    )
    op.create_table('node_activity',
    sa.Column('aet', sa.String(length=16), nullable=False),
    sa.Column('last_connected_at', _TS, nullable=True),
    sa.Column('last_address', sa.String(), nullable=True),
    sa.Column('associations', sa.BigInteger(), nullable=False),
    sa.Column('associations_rejected', sa.BigInteger(), nullable=False),
    sa.Column('instances_received', sa.BigInteger(), nullable=False),
    sa.Column('bytes_received', sa.BigInteger(), nullable=False),
    sa.Column('instances_sent', sa.BigInteger(), nullable=False),
    sa.Column('bytes_sent', sa.BigInteger(), nullable=False),
    sa.Column('queries', sa.BigInteger(), nullable=False),
    sa.Column('last_echo_at', _TS, nullable=True),
    sa.Column('last_echo_ok', sa.Boolean(), nullable=True),
    sa.Column('last_echo_ms', sa.Float(), nullable=True),
    sa.PrimaryKeyConstraint('aet')
    )
    op.create_table('activity',
    sa.Column('minute', sa.BigInteger(), nullable=False),
    sa.Column('node', sa.String(length=64), nullable=False),
    sa.Column('metric', sa.String(length=32), nullable=False),
    sa.Column('count', sa.BigInteger(), nullable=False),
    sa.Column('bytes', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('minute', 'node', 'metric')
    )


def downgrade() -> None:
    op.drop_table('activity')
    op.drop_table('node_activity')
    op.drop_table('remote_nodes')
