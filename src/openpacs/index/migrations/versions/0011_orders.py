"""orders: scheduled procedure steps (Modality Worklist), MPPS instances, reports waiting for their study

Revision ID: 0011
Revises: 0010
"""
import sqlalchemy as sa
from alembic import op

revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table('scheduled_steps',
        sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
        sa.Column('status', sa.String(), nullable=False),
        sa.Column('source', sa.String(), nullable=False),
        sa.Column('created_at', _TS, nullable=False),
        sa.Column('updated_at', _TS, nullable=False),
        sa.Column('control_id', sa.String(), nullable=True),
        sa.Column('placer_order_number', sa.String(), nullable=True),
        sa.Column('filler_order_number', sa.String(), nullable=True),
        sa.Column('accession_number', sa.String(), nullable=True),
        sa.Column('requested_procedure_id', sa.String(), nullable=True),
        sa.Column('requested_procedure_description', sa.String(), nullable=True),
        sa.Column('requested_procedure_code', sa.Text(), nullable=True),
        sa.Column('requested_procedure_priority', sa.String(), nullable=True),
        sa.Column('reason_for_the_requested_procedure', sa.String(), nullable=True),
        sa.Column('study_instance_uid', sa.String(length=64), nullable=True),
        sa.Column('scheduled_procedure_step_id', sa.String(), nullable=False),
        sa.Column('scheduled_procedure_step_description', sa.String(), nullable=True),
        sa.Column('scheduled_protocol_code', sa.Text(), nullable=True),
        sa.Column('modality', sa.String(), nullable=True),
        sa.Column('scheduled_station_ae_title', sa.String(), nullable=True),
        sa.Column('scheduled_station_name', sa.String(), nullable=True),
        sa.Column('scheduled_procedure_step_location', sa.String(), nullable=True),
        sa.Column('scheduled_procedure_step_start_date', sa.String(length=8), nullable=True),
        sa.Column('scheduled_procedure_step_start_time', sa.String(), nullable=True),
        sa.Column('start_datetime', sa.String(length=14), nullable=True),
        sa.Column('scheduled_performing_physician_name', sa.String(), nullable=True),
        sa.Column('scheduled_performing_physician_name_norm', sa.String(), nullable=True),
        sa.Column('requesting_physician', sa.String(), nullable=True),
        sa.Column('referring_physician_name', sa.String(), nullable=True),
        sa.Column('admission_id', sa.String(), nullable=True),
        sa.Column('current_patient_location', sa.String(), nullable=True),
        sa.Column('patient_id', sa.String(), nullable=False),
        sa.Column('issuer_of_patient_id', sa.String(), nullable=True),
        sa.Column('patient_name', sa.String(), nullable=True),
        sa.Column('patient_name_norm', sa.String(), nullable=True),
        sa.Column('patient_birth_date', sa.String(), nullable=True),
        sa.Column('patient_sex', sa.String(), nullable=True),
        sa.Column('patient_weight', sa.String(), nullable=True),
        sa.Column('medical_alerts', sa.String(), nullable=True),
        sa.Column('allergies', sa.String(), nullable=True),
        sa.Column('pregnancy_status', sa.Integer(), nullable=True),
        sa.Column('mpps_uid', sa.String(length=64), nullable=True),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index('ix_steps_accession', 'scheduled_steps', ['accession_number'])
    op.create_index('ix_steps_filler', 'scheduled_steps', ['filler_order_number'])
    op.create_index('ix_steps_modality', 'scheduled_steps', ['modality'])
    op.create_index('ix_steps_patient', 'scheduled_steps', ['patient_id'])
    op.create_index('ix_steps_placer', 'scheduled_steps', ['placer_order_number'])
    op.create_index('ix_steps_station', 'scheduled_steps', ['scheduled_station_ae_title'])
    op.create_index('ix_steps_study', 'scheduled_steps', ['study_instance_uid'])
    op.create_index('ix_steps_worklist', 'scheduled_steps', ['status', 'scheduled_procedure_step_start_date'])
    op.create_table('mpps',
        sa.Column('sop_instance_uid', sa.String(length=64), nullable=False),
        sa.Column('status', sa.String(), nullable=False),
        sa.Column('calling_aet', sa.String(), nullable=True),
        sa.Column('created_at', _TS, nullable=False),
        sa.Column('updated_at', _TS, nullable=False),
        sa.Column('attributes', sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint('sop_instance_uid'),
    )
    op.create_table('pending_reports',
        sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
        sa.Column('accession_number', sa.String(), nullable=False),
        sa.Column('received_at', _TS, nullable=False),
        sa.Column('control_id', sa.String(), nullable=True),
        sa.Column('report', sa.Text(), nullable=False),
        sa.Column('stored_sop_instance_uid', sa.String(length=64), nullable=True),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index('ix_pending_reports_accession', 'pending_reports', ['accession_number'])


def downgrade() -> None:
    op.drop_table('pending_reports')
    op.drop_table('mpps')
    op.drop_table('scheduled_steps')
