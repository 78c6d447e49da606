"""Tables of storage management (migration 0016): compression at rest, the integrity scrub, retention rules.

``studies.protected`` (the retention protection flag) is a column of the studies table (index/schema.py)."""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, DateTime, Index, Integer, String, Table, Text

from .schema import metadata

# One row per instance the compression job handled: compressed (with the bytes saved), or skipped with the reason
# (already compressed, no pixel data, a pixel format the codec cannot hold, a round trip that did not match), so
# that the periodic check never offers the same instance twice.
compression_results = Table(
    "compression_results",
    metadata,
    Column("sop_instance_uid", String(64), primary_key=True),
    Column("state", String(), nullable=False),  # compressed, skipped, failed
    Column("source_ts", String(64)),
    Column("target_ts", String(64)),
    Column("bytes_before", BigInteger, nullable=False, default=0),
    Column("bytes_after", BigInteger, nullable=False, default=0),
    Column("reason", Text),
    Column("job_id", Integer),
    Column("at", DateTime(timezone=True), nullable=False),
)
Index("ix_compression_results_state", compression_results.c.state)

# Problems the last integrity scrub found: one row per instance whose blob is missing, unreadable or does not match
# the SHA-256 recorded at ingest (``blob_key`` is the blob it checked: a replaced instance is not flagged any more).
scrub_results = Table(
    "scrub_results",
    metadata,
    Column("sop_instance_uid", String(64), primary_key=True),
    Column("blob_key", String(), nullable=False),
    Column("problem", String(), nullable=False),  # missing, corrupt, unreadable
    Column("detail", Text),
    Column("study_instance_uid", String(64)),
    Column("job_id", Integer),
    Column("found_at", DateTime(timezone=True), nullable=False),
)
