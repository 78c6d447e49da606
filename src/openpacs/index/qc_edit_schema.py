"""Tables of the quality-control edits (services/qc_edit.py): the history of every edit, merge, split and move, with
the state before and after (what undo puts back). The ``qc_version`` columns of studies and series (index/schema.py,
migration 0014) tell retrieval to overlay the index's study and series modules onto the stored files."""

from __future__ import annotations

from sqlalchemy import Column, DateTime, Index, Integer, String, Table, Text

from .schema import metadata

qc_history = Table(
    "qc_history",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("user", String(), nullable=False, default=""),
    Column("operation", String(), nullable=False),  # edit | merge | split | move
    Column("level", String(), nullable=False),  # PATIENT | STUDY | SERIES | IMAGE
    Column("uid", String(), nullable=False),  # the UID (or PatientID) the operation was asked on
    Column("study_uids", Text, nullable=False, default=""),  # backslash-joined: the studies it touched (search)
    Column("old", Text, nullable=False),  # JSON: the state before (undo puts it back)
    Column("new", Text, nullable=False),  # JSON: the state after
    Column("undone_at", DateTime(timezone=True)),
    Column("undone_by", String()),
)
Index("ix_qc_history_at", qc_history.c.at)
Index("ix_qc_history_uid", qc_history.c.uid)
