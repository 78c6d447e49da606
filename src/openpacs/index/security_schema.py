"""Security tables on the index's one ``metadata``: users, API tokens, sessions, departments, audit trail.

Imported by :mod:`openpacs.index.schema`'s users (services.auth, services.audit, services.departments) so the tables
exist on the shared metadata; the DDL lives in migration 0002.
"""

from __future__ import annotations

from sqlalchemy import Boolean, Column, DateTime, ForeignKey, Index, Integer, String, Table, Text

from .schema import metadata

users = Table(
    "users",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("username", String(128), nullable=False, unique=True),
    Column("password_hash", String(), nullable=True),  # NULL: no password login (OIDC or token-only account)
    Column("role", String(32), nullable=False),
    Column("departments", Text, nullable=True),  # comma-separated department codes; NULL = every department
    Column("display_name", String()),
    Column("disabled", Boolean, nullable=False, default=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("last_login_at", DateTime(timezone=True)),
)

# Bearer tokens: only the SHA-256 of the (high-entropy, random) token is stored; revocable and expiring.
api_tokens = Table(
    "api_tokens",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("user_fk", Integer, ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("name", String(), nullable=False, default=""),
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("prefix", String(16), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True)),
    Column("revoked_at", DateTime(timezone=True)),
    Column("last_used_at", DateTime(timezone=True)),
)
Index("ix_api_tokens_user", api_tokens.c.user_fk)

# Browser sessions, keyed by the SHA-256 of the cookie value (a stolen database does not yield live cookies).
sessions = Table(
    "sessions",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("user_fk", Integer, ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("csrf_token", String(64), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Column("source_address", String()),
    Column("revoked", Boolean, nullable=False, default=False),
)
Index("ix_sessions_user", sessions.c.user_fk)

departments = Table(
    "departments",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("code", String(64), nullable=False, unique=True),
    Column("name", String(), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

# Rules assigning a new study to a department; the first enabled rule (lowest priority) whose non-empty criteria all
# match wins. Criteria are fnmatch-style patterns, matched case-insensitively.
department_rules = Table(
    "department_rules",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("priority", Integer, nullable=False, default=100),
    Column("department", String(64), nullable=False),
    Column("modality", String()),
    Column("calling_aet", String()),
    Column("institution_name", String()),
    Column("institutional_department_name", String()),
    Column("enabled", Boolean, nullable=False, default=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

# The audit trail (DICOM PS3.15 A.5 / IHE ATNA). Append-only: migration 0002 installs triggers refusing UPDATE/DELETE.
audit_events = Table(
    "audit_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("event", String(64), nullable=False),  # our name: Query, InstancesAccessed, UserAuthentication, ...
    Column("event_id", String(16), nullable=False),  # DCM code of EventID (110112 Query, ...)
    Column("event_type", String(16)),  # DCM code of EventTypeCode (110122 Login, ...)
    Column("action", String(1), nullable=False),  # EventActionCode C R U D E
    Column("outcome", Integer, nullable=False),  # EventOutcomeIndicator 0 4 8 12
    Column("user", String()),  # user name or calling AE title
    Column("role", String(32)),
    Column("protocol", String(16)),  # HTTP, DICOMWEB, DIMSE, CLI, IMPORT
    Column("source_address", String()),
    Column("source_aet", String()),
    Column("destination", String()),  # destination AE or address
    Column("study_uids", Text),  # backslash-separated
    Column("patient_id", String()),
    Column("patient_name", String()),
    Column("query", Text),  # the query (QIDO query string / C-FIND identifier as text)
    Column("detail", Text),  # free text: reason for a denial, object counts, configuration change...
    Column("node", String()),  # AE title of the node that recorded it
)
Index("ix_audit_events_at", audit_events.c.at)
Index("ix_audit_events_event", audit_events.c.event)
Index("ix_audit_events_user", audit_events.c.user)
