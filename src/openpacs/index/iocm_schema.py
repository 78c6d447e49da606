"""Tables of IOCM rejections (services/iocm.py): one row per rejection note (a Key Object Selection with a
rejection title), received over the network or made in the console, and the instances it rejects."""

from __future__ import annotations

from sqlalchemy import Column, DateTime, ForeignKey, Index, Integer, String, Table, Text

from .schema import UID, metadata

rejections = Table(
    "rejections",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("kos_sop_instance_uid", UID, unique=True),  # the rejection note itself
    Column("study_instance_uid", UID, nullable=False),
    Column("reason", String(), nullable=False),  # code value of the title: 113001, 113037, 113038, 113039
    Column("source", String(), nullable=False),  # "network" (received) or "console"/"api" (made here)
    Column("actor", String()),  # who made it, or the calling AE title it came from
    Column("state", String(), nullable=False),  # rejected, restored, purged
    Column("num_instances", Integer, nullable=False, default=0),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("detail", Text),
)
Index("ix_rejections_state", rejections.c.state, rejections.c.id)

rejection_items = Table(
    "rejection_items",
    metadata,
    Column("rejection_id", Integer, ForeignKey("rejections.id", ondelete="CASCADE"), primary_key=True),
    Column("sop_instance_uid", UID, primary_key=True),
    Column("series_instance_uid", UID, nullable=False),
)
Index("ix_rejection_items_sop", rejection_items.c.sop_instance_uid)
