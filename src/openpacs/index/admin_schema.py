"""Tables of the administrator's workbench: remote nodes kept in the index, their activity, per-minute counters.

They live in the index (not a node-local file) so that every process and every node of a cluster sees the same
nodes, and so that the dashboard's 24-hour charts survive restarts and add up across worker processes.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Boolean, Column, DateTime, Float, Integer, String, Table, Text

from .schema import metadata

# Remote DICOM nodes (modalities, workstations, archives) edited in the console / API. TOML [remote_aes.*] entries
# are merged in at read time as read-only nodes (services/nodes.py); a row here never shadows a TOML name.
remote_nodes = Table(
    "remote_nodes",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(64), nullable=False, unique=True),
    Column("aet", String(16), nullable=False),
    Column("host", String(), nullable=False),
    Column("port", Integer, nullable=False),
    Column("kind", String(32), nullable=False, default="other"),  # modality | workstation | archive | other
    Column("allow", String(), nullable=False, default="echo,store,find,move,get"),
    Column("departments", Text, nullable=True),  # comma-separated department codes; NULL = every department
    Column("tls", Boolean, nullable=False, default=False),
    Column("description", Text, nullable=False, default=""),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

# What each peer AE did with us, added to by every process when an association closes or a C-ECHO SCU returns.
node_activity = Table(
    "node_activity",
    metadata,
    Column("aet", String(16), primary_key=True),
    Column("last_connected_at", DateTime(timezone=True)),
    Column("last_address", String()),
    Column("associations", BigInteger, nullable=False, default=0),
    Column("associations_rejected", BigInteger, nullable=False, default=0),
    Column("instances_received", BigInteger, nullable=False, default=0),
    Column("bytes_received", BigInteger, nullable=False, default=0),
    Column("instances_sent", BigInteger, nullable=False, default=0),
    Column("bytes_sent", BigInteger, nullable=False, default=0),
    Column("queries", BigInteger, nullable=False, default=0),
    Column("last_echo_at", DateTime(timezone=True)),
    Column("last_echo_ok", Boolean),
    Column("last_echo_ms", Float),
)

# Per-minute event counters (store, query, retrieve, association_rejected, error ...) by node. The dashboard's charts
# read the last 24 h from here; each process flushes its in-memory counts every few seconds with an additive upsert.
activity = Table(
    "activity",
    metadata,
    Column("minute", BigInteger, primary_key=True),  # Unix time // 60
    Column("node", String(64), primary_key=True),
    Column("metric", String(32), primary_key=True),
    Column("count", BigInteger, nullable=False, default=0),
    Column("bytes", BigInteger, nullable=False, default=0),
)
