"""The index schema (SQLAlchemy Core): the PS3.4 Annex C Q/R information model, a change feed, jobs and settings.

Every attribute a C-FIND / QIDO-RS can match on at a level is a column of that level's table, named by its DICOM
keyword in snake_case, so that ``ATTRIBUTES`` can map keywords to columns mechanically. Values are stored as their
DICOM string form; ``*_norm`` columns hold the upper-cased person name for case-insensitive matching.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    false,
)

metadata = MetaData()

UID = String(64)

patients = Table(
    "patients",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("patient_id", String(), nullable=False, default=""),
    Column("issuer_of_patient_id", String(), nullable=False, default=""),
    Column("patient_name", String()),
    Column("patient_name_norm", String()),
    Column("patient_birth_date", String()),
    Column("patient_birth_time", String()),
    Column("patient_sex", String()),
    Column("other_patient_names", String()),
    Column("ethnic_group", String()),
    Column("patient_comments", Text),
    Column("num_studies", Integer, nullable=False, default=0),
    Column("num_series", Integer, nullable=False, default=0),
    Column("num_instances", Integer, nullable=False, default=0),
    Column("created_at", DateTime(timezone=True)),
    Column("updated_at", DateTime(timezone=True)),
    UniqueConstraint("patient_id", "issuer_of_patient_id", name="uq_patients_pid"),
)
Index("ix_patients_name_norm", patients.c.patient_name_norm)

studies = Table(
    "studies",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("patient_fk", Integer, ForeignKey("patients.id", ondelete="CASCADE"), nullable=False),
    Column("study_instance_uid", UID, nullable=False, unique=True),
    Column("study_date", String()),
    Column("study_time", String()),
    Column("accession_number", String()),
    Column("study_id", String()),
    Column("study_description", String()),
    Column("referring_physician_name", String()),
    Column("referring_physician_name_norm", String()),
    Column("name_of_physicians_reading_study", String()),
    Column("admitting_diagnoses_description", String()),
    Column("patient_age", String()),
    Column("patient_size", String()),
    Column("patient_weight", String()),
    Column("institution_name", String()),
    Column("modalities_in_study", String(), nullable=False, default=""),
    Column("sop_classes_in_study", Text, nullable=False, default=""),
    Column("department", String()),
    Column("num_series", Integer, nullable=False, default=0),
    Column("num_instances", Integer, nullable=False, default=0),
    Column("size_bytes", BigInteger, nullable=False, default=0),
    Column("created_at", DateTime(timezone=True)),
    Column("updated_at", DateTime(timezone=True)),
    # migration 0016: kept by retention rules (services/retention.py) while set
    Column("protected", Boolean, nullable=False, default=False, server_default=false()),
    # migration 0014 (services/qc_edit.py): bumped by every QC edit/merge/split/move; > 0: retrieval overlays the
    # index's study module onto the stored files
    Column("qc_version", Integer, nullable=False, default=0, server_default="0"),
)
Index("ix_studies_patient", studies.c.patient_fk)
Index("ix_studies_date", studies.c.study_date)
Index("ix_studies_date_id", studies.c.study_date, studies.c.id)  # migration 0019a: date-range pages in index order
Index("ix_studies_accession", studies.c.accession_number)
Index("ix_studies_updated", studies.c.updated_at)
Index("ix_studies_created", studies.c.created_at)

series = Table(
    "series",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("study_fk", Integer, ForeignKey("studies.id", ondelete="CASCADE"), nullable=False),
    Column("series_instance_uid", UID, nullable=False, unique=True),
    Column("modality", String()),
    Column("series_number", String()),
    Column("series_description", String()),
    Column("series_date", String()),
    Column("series_time", String()),
    Column("body_part_examined", String()),
    Column("protocol_name", String()),
    Column("laterality", String()),
    Column("station_name", String()),
    Column("institution_name", String()),
    Column("institutional_department_name", String()),
    Column("manufacturer", String()),
    Column("performed_procedure_step_start_date", String()),
    Column("performed_procedure_step_start_time", String()),
    Column("scheduled_procedure_step_id", String()),
    Column("requested_procedure_id", String()),
    Column("num_instances", Integer, nullable=False, default=0),
    Column("size_bytes", BigInteger, nullable=False, default=0),
    Column("created_at", DateTime(timezone=True)),
    Column("updated_at", DateTime(timezone=True)),
    # migration 0014 (services/qc_edit.py): as studies.qc_version, for the series module
    Column("qc_version", Integer, nullable=False, default=0, server_default="0"),
)
Index("ix_series_study", series.c.study_fk)
Index("ix_series_modality", series.c.modality)

instances = Table(
    "instances",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("series_fk", Integer, ForeignKey("series.id", ondelete="CASCADE"), nullable=False),
    Column("sop_instance_uid", UID, nullable=False, unique=True),
    Column("sop_class_uid", UID, nullable=False),
    Column("instance_number", String()),
    Column("content_date", String()),
    Column("content_time", String()),
    Column("acquisition_number", String()),
    Column("number_of_frames", String()),
    Column("rows", Integer),
    Column("columns", Integer),
    Column("bits_allocated", Integer),
    Column("transfer_syntax_uid", UID, nullable=False),
    Column("blob_key", String(), nullable=False),
    Column("size_bytes", BigInteger, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("calling_aet", String()),
    Column("source", String()),
    Column("received_at", DateTime(timezone=True)),
    Column("called_aet", String()),  # migration 0013: the AE title the sender called (routing conditions)
    # migration 0015 (services/iocm.py): the IOCM rejection title's code value (113001...) while rejected; hidden
    # from every query and retrieval, and the counters of its series, study and patient no longer count it
    Column("rejected", String()),
    Column("rejected_at", DateTime(timezone=True)),
)
Index("ix_instances_series", instances.c.series_fk)
Index("ix_instances_blob", instances.c.blob_key)

# Append-only change feed: routing, auto-forwarding, prefetch and other nodes follow it by ``seq``.
changes = Table(
    "changes",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("change_type", String(), nullable=False),  # NewInstance, NewSeries, NewStudy, NewPatient, Deleted...
    Column("level", String(), nullable=False),
    Column("uid", String(), nullable=False),
    Column("study_instance_uid", UID),
    Column("at", DateTime(timezone=True), nullable=False),
)

# Durable jobs (retrieve, forward, import...); used by later services.
jobs = Table(
    "jobs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("kind", String(), nullable=False),
    Column("state", String(), nullable=False),  # pending, running, done, failed, cancelled
    Column("payload", Text, nullable=False),
    Column("progress", Float, nullable=False, default=0.0),
    Column("error", Text),
    Column("owner", String()),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    # services/jobs.py (migration 0012): claim order, retries with backoff, the lease of the node running it, progress
    Column("priority", Integer, nullable=False, default=0, server_default="0"),
    Column("attempts", Integer, nullable=False, default=0, server_default="0"),
    Column("max_attempts", Integer, nullable=False, default=5, server_default="5"),
    Column("not_before", DateTime(timezone=True)),
    Column("lease_until", DateTime(timezone=True)),
    Column("destination", String()),
    Column("done", Integer, nullable=False, default=0, server_default="0"),
    Column("failed", Integer, nullable=False, default=0, server_default="0"),
    Column("total", Integer, nullable=False, default=0, server_default="0"),
    Column("bytes", BigInteger, nullable=False, default=0, server_default="0"),
    Column("started_at", DateTime(timezone=True)),
    Column("finished_at", DateTime(timezone=True)),
)
Index("ix_jobs_state", jobs.c.state)
Index("ix_jobs_claim", jobs.c.state, jobs.c.priority, jobs.c.id)

# One row per instance of a job: "acked" is written (committed) when the peer acknowledged it, before the next one
# goes out on that association, so a job resumed after a crash never sends an acknowledged instance again.
job_items = Table(
    "job_items",
    metadata,
    Column("job_id", Integer, ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    Column("seq", Integer, primary_key=True),
    Column("sop_instance_uid", UID, nullable=False),
    Column("state", String(), nullable=False),  # pending, acked, failed
    Column("status", Integer),  # the peer's DIMSE status (or HTTP code)
    Column("error", Text),
    Column("bytes", BigInteger, nullable=False, default=0, server_default="0"),
    Column("updated_at", DateTime(timezone=True)),
    UniqueConstraint("job_id", "sop_instance_uid", name="uq_job_items_instance"),
)
Index("ix_job_items_state", job_items.c.job_id, job_items.c.state)

# Configuration that lives in the index (shared by every node of a cluster).
settings_table = Table(
    "settings",
    metadata,
    Column("key", String(), primary_key=True),
    Column("value", Text, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)


LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")


@dataclass(frozen=True)
class Attribute:
    """One indexed DICOM attribute: the level whose table holds it and the column."""

    keyword: str
    tag: int
    vr: str
    level: str
    column: str
    computed: bool = False  # derived from lower levels; return-only or matched on the stored aggregate


def _a(keyword: str, tag: int, vr: str, level: str, column: str | None = None, computed: bool = False) -> Attribute:
    import re

    col = column or re.sub(r"(?<!^)(?=[A-Z])", "_", keyword).lower().replace("u_i_d", "uid").replace("i_d", "id")
    return Attribute(keyword, tag, vr, level, col, computed)


ATTRIBUTES: dict[str, Attribute] = {
    a.keyword: a
    for a in [
        _a("PatientName", 0x00100010, "PN", "PATIENT"),
        _a("PatientID", 0x00100020, "LO", "PATIENT", "patient_id"),
        _a("IssuerOfPatientID", 0x00100021, "LO", "PATIENT", "issuer_of_patient_id"),
        _a("PatientBirthDate", 0x00100030, "DA", "PATIENT"),
        _a("PatientBirthTime", 0x00100032, "TM", "PATIENT"),
        _a("PatientSex", 0x00100040, "CS", "PATIENT"),
        _a("OtherPatientNames", 0x00101001, "PN", "PATIENT"),
        _a("EthnicGroup", 0x00102160, "SH", "PATIENT"),
        _a("PatientComments", 0x00104000, "LT", "PATIENT"),
        _a("NumberOfPatientRelatedStudies", 0x00201200, "IS", "PATIENT", "num_studies", True),
        _a("NumberOfPatientRelatedSeries", 0x00201202, "IS", "PATIENT", "num_series", True),
        _a("NumberOfPatientRelatedInstances", 0x00201204, "IS", "PATIENT", "num_instances", True),
        _a("StudyInstanceUID", 0x0020000D, "UI", "STUDY", "study_instance_uid"),
        _a("StudyDate", 0x00080020, "DA", "STUDY"),
        _a("StudyTime", 0x00080030, "TM", "STUDY"),
        _a("AccessionNumber", 0x00080050, "SH", "STUDY"),
        _a("StudyID", 0x00200010, "SH", "STUDY", "study_id"),
        _a("StudyDescription", 0x00081030, "LO", "STUDY"),
        _a("ReferringPhysicianName", 0x00080090, "PN", "STUDY"),
        _a("NameOfPhysiciansReadingStudy", 0x00081060, "PN", "STUDY"),
        _a("AdmittingDiagnosesDescription", 0x00081080, "LO", "STUDY"),
        _a("PatientAge", 0x00101010, "AS", "STUDY"),
        _a("PatientSize", 0x00101020, "DS", "STUDY"),
        _a("PatientWeight", 0x00101030, "DS", "STUDY"),
        _a("ModalitiesInStudy", 0x00080061, "CS", "STUDY", "modalities_in_study", True),
        _a("SOPClassesInStudy", 0x00080062, "UI", "STUDY", "sop_classes_in_study", True),
        _a("NumberOfStudyRelatedSeries", 0x00201206, "IS", "STUDY", "num_series", True),
        _a("NumberOfStudyRelatedInstances", 0x00201208, "IS", "STUDY", "num_instances", True),
        _a("InstitutionName", 0x00080080, "LO", "SERIES", "institution_name"),
        _a("SeriesInstanceUID", 0x0020000E, "UI", "SERIES", "series_instance_uid"),
        _a("Modality", 0x00080060, "CS", "SERIES"),
        _a("SeriesNumber", 0x00200011, "IS", "SERIES"),
        _a("SeriesDescription", 0x0008103E, "LO", "SERIES"),
        _a("SeriesDate", 0x00080021, "DA", "SERIES"),
        _a("SeriesTime", 0x00080031, "TM", "SERIES"),
        _a("BodyPartExamined", 0x00180015, "CS", "SERIES"),
        _a("ProtocolName", 0x00181030, "LO", "SERIES"),
        _a("Laterality", 0x00200060, "CS", "SERIES"),
        _a("StationName", 0x00081010, "SH", "SERIES"),
        _a("InstitutionalDepartmentName", 0x00081040, "LO", "SERIES"),
        _a("Manufacturer", 0x00080070, "LO", "SERIES"),
        _a("PerformedProcedureStepStartDate", 0x00400244, "DA", "SERIES"),
        _a("PerformedProcedureStepStartTime", 0x00400245, "TM", "SERIES"),
        _a("NumberOfSeriesRelatedInstances", 0x00201209, "IS", "SERIES", "num_instances", True),
        _a("SOPInstanceUID", 0x00080018, "UI", "IMAGE", "sop_instance_uid"),
        _a("SOPClassUID", 0x00080016, "UI", "IMAGE", "sop_class_uid"),
        _a("InstanceNumber", 0x00200013, "IS", "IMAGE"),
        _a("ContentDate", 0x00080023, "DA", "IMAGE"),
        _a("ContentTime", 0x00080033, "TM", "IMAGE"),
        _a("AcquisitionNumber", 0x00200012, "IS", "IMAGE"),
        _a("NumberOfFrames", 0x00280008, "IS", "IMAGE"),
        _a("Rows", 0x00280010, "US", "IMAGE"),
        _a("Columns", 0x00280011, "US", "IMAGE"),
        _a("BitsAllocated", 0x00280100, "US", "IMAGE"),
        _a("AvailableTransferSyntaxUID", 0x00083002, "UI", "IMAGE", "transfer_syntax_uid", True),
    ]
}

# Attributes inside RequestAttributesSequence (0040,0275), matched as sequence items at the series level.
REQUEST_ATTRIBUTES = {
    "ScheduledProcedureStepID": _a("ScheduledProcedureStepID", 0x00400009, "SH", "SERIES"),
    "RequestedProcedureID": _a("RequestedProcedureID", 0x00401001, "SH", "SERIES"),
}

TABLES = {"PATIENT": patients, "STUDY": studies, "SERIES": series, "IMAGE": instances}
