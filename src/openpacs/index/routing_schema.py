"""Tables of auto-routing (services/routing.py): the rules edited through the API and the console, how far the
router has read the change feed, and the studies waiting to be stable before a "study" rule sends them."""

from __future__ import annotations

from sqlalchemy import Boolean, Column, DateTime, Integer, PrimaryKeyConstraint, String, Table, Text

from .schema import metadata

routing_rules = Table(
    "routing_rules",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(), nullable=False, unique=True),
    Column("enabled", Boolean, nullable=False, default=True),
    Column("spec", Text, nullable=False),  # JSON: conditions, destinations, trigger, schedule, transfer syntax
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("updated_by", String()),
)

# One row per follower of the change feed ("router"): the last ``changes.seq`` it has handled.
routing_cursor = Table(
    "routing_cursor",
    metadata,
    Column("name", String(), primary_key=True),
    Column("seq", Integer, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

# A study matched by a rule whose trigger is "stable": sent once no instance has arrived for the rule's N seconds.
routing_pending = Table(
    "routing_pending",
    metadata,
    Column("rule", String(), nullable=False),  # rule name (index rules and TOML rules alike)
    Column("study_instance_uid", String(64), nullable=False),
    Column("first_at", DateTime(timezone=True), nullable=False),
    Column("last_at", DateTime(timezone=True), nullable=False),
    Column("instances", Integer, nullable=False, default=0),
    PrimaryKeyConstraint("rule", "study_instance_uid"),
)
