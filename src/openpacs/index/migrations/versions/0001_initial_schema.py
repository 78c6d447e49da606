"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-28 03:43:34.099643
"""
import sqlalchemy as sa
from alembic import op

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('changes',
    sa.Column('seq', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('change_type', sa.String(), nullable=False),
    sa.Column('level', sa.String(), nullable=False),
    sa.Column('uid', sa.String(), nullable=False),
    sa.Column('study_instance_uid', sa.String(length=64), nullable=True),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('seq')
    )
    op.create_table('jobs',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('kind', sa.String(), nullable=False),
    sa.Column('state', sa.String(), nullable=False),
    sa.Column('payload', sa.Text(), nullable=False),
    sa.Column('progress', sa.Float(), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('owner', sa.String(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.create_index('ix_jobs_state', ['state'], unique=False)

    op.create_table('patients',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('patient_id', sa.String(), nullable=False),
    sa.Column('issuer_of_patient_id', sa.String(), nullable=False),
    sa.Column('patient_name', sa.String(), nullable=True),
    sa.Column('patient_name_norm', sa.String(), nullable=True),
    sa.Column('patient_birth_date', sa.String(), nullable=True),
    sa.Column('patient_birth_time', sa.String(), nullable=True),
    sa.Column('patient_sex', sa.String(), nullable=True),
    sa.Column('other_patient_names', sa.String(), nullable=True),
    sa.Column('ethnic_group', sa.String(), nullable=True),
    sa.Column('patient_comments', sa.Text(), nullable=True),
    sa.Column('num_studies', sa.Integer(), nullable=False),
    sa.Column('num_series', sa.Integer(), nullable=False),
    sa.Column('num_instances', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('patient_id', 'issuer_of_patient_id', name='uq_patients_pid')
    )
    with op.batch_alter_table('patients', schema=None) as batch_op:
        batch_op.create_index('ix_patients_name_norm', ['patient_name_norm'], unique=False)

    op.create_table('settings',
    sa.Column('key', sa.String(), nullable=False),
    sa.Column('value', sa.Text(), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('key')
    )
    op.create_table('studies',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('patient_fk', sa.Integer(), nullable=False),
    sa.Column('study_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('study_date', sa.String(), nullable=True),
    sa.Column('study_time', sa.String(), nullable=True),
    sa.Column('accession_number', sa.String(), nullable=True),
    sa.Column('study_id', sa.String(), nullable=True),
    sa.Column('study_description', sa.String(), nullable=True),
    sa.Column('referring_physician_name', sa.String(), nullable=True),
    sa.Column('referring_physician_name_norm', sa.String(), nullable=True),
    sa.Column('name_of_physicians_reading_study', sa.String(), nullable=True),
    sa.Column('admitting_diagnoses_description', sa.String(), nullable=True),
    sa.Column('patient_age', sa.String(), nullable=True),
    sa.Column('patient_size', sa.String(), nullable=True),
    sa.Column('patient_weight', sa.String(), nullable=True),
    sa.Column('institution_name', sa.String(), nullable=True),
    sa.Column('modalities_in_study', sa.String(), nullable=False),
    sa.Column('sop_classes_in_study', sa.Text(), nullable=False),
    sa.Column('department', sa.String(), nullable=True),
    sa.Column('num_series', sa.Integer(), nullable=False),
    sa.Column('num_instances', sa.Integer(), nullable=False),
    sa.Column('size_bytes', sa.BigInteger(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['patient_fk'], ['patients.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('study_instance_uid')
    )
    with op.batch_alter_table('studies', schema=None) as batch_op:
        batch_op.create_index('ix_studies_accession', ['accession_number'], unique=False)
        batch_op.create_index('ix_studies_date', ['study_date'], unique=False)
        batch_op.create_index('ix_studies_patient', ['patient_fk'], unique=False)
        batch_op.create_index('ix_studies_updated', ['updated_at'], unique=False)

    op.create_table('series',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('study_fk', sa.Integer(), nullable=False),
    sa.Column('series_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('modality', sa.String(), nullable=True),
    sa.Column('series_number', sa.String(), nullable=True),
    sa.Column('series_description', sa.String(), nullable=True),
    sa.Column('series_date', sa.String(), nullable=True),
    sa.Column('series_time', sa.String(), nullable=True),
    sa.Column('body_part_examined', sa.String(), nullable=True),
    sa.Column('protocol_name', sa.String(), nullable=True),
    sa.Column('laterality', sa.String(), nullable=True),
    sa.Column('station_name', sa.String(), nullable=True),
    sa.Column('institution_name', sa.String(), nullable=True),
    sa.Column('institutional_department_name', sa.String(), nullable=True),
    sa.Column('manufacturer', sa.String(), nullable=True),
    sa.Column('performed_procedure_step_start_date', sa.String(), nullable=True),
    sa.Column('performed_procedure_step_start_time', sa.String(), nullable=True),
    sa.Column('scheduled_procedure_step_id', sa.String(), nullable=True),
    sa.Column('requested_procedure_id', sa.String(), nullable=True),
    sa.Column('num_instances', sa.Integer(), nullable=False),
    sa.Column('size_bytes', sa.BigInteger(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['study_fk'], ['studies.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('series_instance_uid')
    )
    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.create_index('ix_series_modality', ['modality'], unique=False)
        batch_op.create_index('ix_series_study', ['study_fk'], unique=False)

    op.create_table('instances',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('series_fk', sa.Integer(), nullable=False),
    sa.Column('sop_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('sop_class_uid', sa.String(length=64), nullable=False),
    sa.Column('instance_number', sa.String(), nullable=True),
    sa.Column('content_date', sa.String(), nullable=True),
    sa.Column('content_time', sa.String(), nullable=True),
    sa.Column('acquisition_number', sa.String(), nullable=True),
    sa.Column('number_of_frames', sa.String(), nullable=True),
    sa.Column('rows', sa.Integer(), nullable=True),
    sa.Column('columns', sa.Integer(), nullable=True),
    sa.Column('bits_allocated', sa.Integer(), nullable=True),
    sa.Column('transfer_syntax_uid', sa.String(length=64), nullable=False),
    sa.Column('blob_key', sa.String(), nullable=False),
    sa.Column('size_bytes', sa.BigInteger(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('calling_aet', sa.String(), nullable=True),
    sa.Column('source', sa.String(), nullable=True),
    sa.Column('received_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['series_fk'], ['series.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('sop_instance_uid')
    )
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.create_index('ix_instances_blob', ['blob_key'], unique=False)
        batch_op.create_index('ix_instances_series', ['series_fk'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.drop_index('ix_instances_series')
        batch_op.drop_index('ix_instances_blob')

    op.drop_table('instances')
    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.drop_index('ix_series_study')
        batch_op.drop_index('ix_series_modality')

    op.drop_table('series')
    with op.batch_alter_table('studies', schema=None) as batch_op:
        batch_op.drop_index('ix_studies_updated')
        batch_op.drop_index('ix_studies_patient')
        batch_op.drop_index('ix_studies_date')
        batch_op.drop_index('ix_studies_accession')

    op.drop_table('studies')
    op.drop_table('settings')
    with op.batch_alter_table('patients', schema=None) as batch_op:
        batch_op.drop_index('ix_patients_name_norm')

    op.drop_table('patients')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_jobs_state')

    op.drop_table('jobs')
    op.drop_table('changes')
