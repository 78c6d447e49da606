"""Tables of the HL7 v2 interface: the message log (every message received, with the ACK it got) and the patient
demographics that ADT messages made authoritative over what the stored files hold.

The log doubles as the duplicate filter: a message whose control ID (MSH-10) was already received from the same
sending application and facility is answered with the stored ACK and not applied again.
"""

from __future__ import annotations

from sqlalchemy import Column, DateTime, ForeignKey, Index, Integer, String, Table, Text

from .schema import metadata

hl7_messages = Table(
    "hl7_messages",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("received_at", DateTime(timezone=True), nullable=False),
    Column("message_type", String(), nullable=False, default=""),  # MSH-9 type^trigger, e.g. ADT^A08
    Column("control_id", String(), nullable=False, default=""),  # MSH-10
    Column("sending_application", String(), nullable=False, default=""),  # MSH-3
    Column("sending_facility", String(), nullable=False, default=""),  # MSH-4
    Column("version", String(), nullable=False, default=""),  # MSH-12
    Column("charset", String(), nullable=False, default=""),  # MSH-18
    Column("result", String(2), nullable=False),  # AA | AE | AR
    Column("error", Text),
    Column("error_location", String()),  # e.g. PID^1^3
    Column("patient_id", String()),  # PID-3 (first repetition) of the message
    Column("peer", String()),
    Column("size", Integer, nullable=False, default=0),
    Column("raw", Text, nullable=False),  # the message as decoded from its character set
    Column("ack", Text, nullable=False),  # the ACK sent (a duplicate gets this one again)
)
Index("ix_hl7_messages_control", hl7_messages.c.control_id, hl7_messages.c.sending_application,
      hl7_messages.c.sending_facility)
Index("ix_hl7_messages_received", hl7_messages.c.received_at)
Index("ix_hl7_messages_patient", hl7_messages.c.patient_id)
Index("ix_hl7_messages_type", hl7_messages.c.message_type)

# A patient row's demographics set by ADT. Its presence tells retrieval to overlay the patient module from the index
# onto the stored files (services/patients.py): patients never touched by ADT are served byte for byte as stored.
patient_demographics = Table(
    "patient_demographics",
    metadata,
    Column("patient_fk", Integer, ForeignKey("patients.id", ondelete="CASCADE"), primary_key=True),
    Column("version", Integer, nullable=False, default=1),
    Column("other_patient_ids", Text),  # JSON list of {"id", "issuer", "type"}: PID-3 repetitions after the first
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("control_id", String()),  # the message that last changed it
)
