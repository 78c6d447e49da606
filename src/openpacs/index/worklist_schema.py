"""Tables of orders and the Modality Worklist: one row per scheduled procedure step (from ORM/OMI orders or the
REST API), the MPPS instances that modalities report against them, and reports waiting for their study.

A step's attributes are columns named after their DICOM keyword (snake_case) so that the worklist C-FIND compiles
its matching keys to SQL as the Q/R C-FIND does; the patient module is the order's (PID of the ORM/OMI).
"""

from __future__ import annotations

from sqlalchemy import Column, DateTime, Index, Integer, String, Table, Text

from .schema import metadata

# ScheduledProcedureStepStatus (0040,0020) values we keep; only the first two are on the worklist
SCHEDULED, IN_PROGRESS = "SCHEDULED", "IN PROGRESS"
COMPLETED, DISCONTINUED, CANCELLED = "COMPLETED", "DISCONTINUED", "CANCELLED"
ON_WORKLIST = (SCHEDULED, IN_PROGRESS)

scheduled_steps = Table(
    "scheduled_steps",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("status", String(), nullable=False),
    Column("source", String(), nullable=False),  # hl7 | api
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("control_id", String()),  # the HL7 message (MSH-10) that last changed it
    Column("placer_order_number", String()),  # ORC-2
    Column("filler_order_number", String()),  # ORC-3
    Column("accession_number", String()),
    Column("requested_procedure_id", String()),
    Column("requested_procedure_description", String()),
    Column("requested_procedure_code", Text),  # JSON [value, scheme, meaning]
    Column("requested_procedure_priority", String()),
    Column("reason_for_the_requested_procedure", String()),
    Column("study_instance_uid", String(64)),
    Column("scheduled_procedure_step_id", String(), nullable=False),
    Column("scheduled_procedure_step_description", String()),
    Column("scheduled_protocol_code", Text),  # JSON [value, scheme, meaning]
    Column("modality", String()),
    Column("scheduled_station_ae_title", String()),
    Column("scheduled_station_name", String()),
    Column("scheduled_procedure_step_location", String()),
    Column("scheduled_procedure_step_start_date", String(8)),
    Column("scheduled_procedure_step_start_time", String()),  # HHMMSS
    Column("start_datetime", String(14)),  # date + time, for combined date-time range matching
    Column("scheduled_performing_physician_name", String()),
    Column("scheduled_performing_physician_name_norm", String()),
    Column("requesting_physician", String()),
    Column("referring_physician_name", String()),
    Column("admission_id", String()),
    Column("current_patient_location", String()),
    Column("patient_id", String(), nullable=False, default=""),
    Column("issuer_of_patient_id", String()),
    Column("patient_name", String()),
    Column("patient_name_norm", String()),
    Column("patient_birth_date", String()),
    Column("patient_sex", String()),
    Column("patient_weight", String()),
    Column("medical_alerts", String()),
    Column("allergies", String()),
    Column("pregnancy_status", Integer),
    Column("mpps_uid", String(64)),  # the MPPS that started it
)
Index("ix_steps_worklist", scheduled_steps.c.status, scheduled_steps.c.scheduled_procedure_step_start_date)
Index("ix_steps_station", scheduled_steps.c.scheduled_station_ae_title)
Index("ix_steps_modality", scheduled_steps.c.modality)
Index("ix_steps_accession", scheduled_steps.c.accession_number)
Index("ix_steps_patient", scheduled_steps.c.patient_id)
Index("ix_steps_placer", scheduled_steps.c.placer_order_number)
Index("ix_steps_filler", scheduled_steps.c.filler_order_number)
Index("ix_steps_study", scheduled_steps.c.study_instance_uid)

# Modality Performed Procedure Step instances (PS3.4 F): the attributes as a DICOM JSON object, merged by N-SET.
mpps = Table(
    "mpps",
    metadata,
    Column("sop_instance_uid", String(64), primary_key=True),
    Column("status", String(), nullable=False),  # PerformedProcedureStepStatus
    Column("calling_aet", String()),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("attributes", Text, nullable=False),
)

# Reports (ORU^R01) kept until their study arrives; then stored as Basic Text SR through ingest.
pending_reports = Table(
    "pending_reports",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("accession_number", String(), nullable=False),
    Column("received_at", DateTime(timezone=True), nullable=False),
    Column("control_id", String()),
    Column("report", Text, nullable=False),  # JSON: the report's text and its header fields
    Column("stored_sop_instance_uid", String(64)),  # set once stored
)
Index("ix_pending_reports_accession", pending_reports.c.accession_number)

# Reconciliation (QC): a study with no matching order, or whose patient disagrees with its order.
qc_items = Table(
    "qc_items",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("study_instance_uid", String(64), nullable=False, unique=True),
    Column("kind", String(), nullable=False),  # no-order | mismatch
    Column("step_fk", Integer),  # the order's step it was compared with (mismatch)
    Column("differences", Text, nullable=False),  # JSON [{"attribute", "study", "order"}]
    Column("status", String(), nullable=False),  # open | linked | dismissed
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("resolved_at", DateTime(timezone=True)),
    Column("resolved_by", String()),
)
Index("ix_qc_items_status", qc_items.c.status, qc_items.c.id)
