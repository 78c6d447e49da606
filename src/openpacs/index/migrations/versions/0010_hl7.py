"""hl7: the HL7 v2 message log and the ADT demographics of patients (coerced on retrieval)

Revision ID: 0010
Revises: 0006
"""
import sqlalchemy as sa
from alembic import op

revision = '0010'
down_revision = '0006'
branch_labels = None
depends_on = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table('hl7_messages',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('received_at', _TS, nullable=False),
    sa.Column('message_type', sa.String(), nullable=False),
    sa.Column('control_id', sa.String(), nullable=False),
    sa.Column('sending_application', sa.String(), nullable=False),
    sa.Column('sending_facility', sa.String(), nullable=False),
    sa.Column('version', sa.String(), nullable=False),
    sa.Column('charset', sa.String(), nullable=False),
    sa.Column('result', sa.String(length=2), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('error_location', sa.String(), nullable=True),
    sa.Column('patient_id', sa.String(), nullable=True),
    sa.Column('peer', sa.String(), nullable=True),
    sa.Column('size', sa.Integer(), nullable=False),
    sa.Column('raw', sa.Text(), nullable=False),
    sa.Column('ack', sa.Text(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ix_hl7_messages_control', 'hl7_messages', ['control_id', 'sending_application',
                                                                'sending_facility'])
    op.create_index('ix_hl7_messages_received', 'hl7_messages', ['received_at'])
    op.create_index('ix_hl7_messages_patient', 'hl7_messages', ['patient_id'])
    op.create_index('ix_hl7_messages_type', 'hl7_messages', ['message_type'])
    op.create_table('patient_demographics',
    sa.Column('patient_fk', sa.Integer(), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('other_patient_ids', sa.Text(), nullable=True),
    sa.Column('updated_at', _TS, nullable=False),
    sa.Column('control_id', sa.String(), nullable=True),
    sa.ForeignKeyConstraint(['patient_fk'], ['patients.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('patient_fk')
    )


def downgrade() -> None:
    op.drop_table('patient_demographics')
    op.drop_index('ix_hl7_messages_type', table_name='hl7_messages')
    op.drop_index('ix_hl7_messages_patient', table_name='hl7_messages')
    op.drop_index('ix_hl7_messages_received', table_name='hl7_messages')
    op.drop_index('ix_hl7_messages_control', table_name='hl7_messages')
    op.drop_table('hl7_messages')
