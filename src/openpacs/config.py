"""One Settings object, built from defaults, then a TOML file, then OPENPACS_* environment variables, then CLI flags."""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class RemoteAE:
    """A DICOM peer this node knows: C-MOVE destinations and (when access control is on) accepted callers."""

    aet: str
    host: str
    port: int
    # Operations this peer may perform on us. The security layer enforces these when ``dicom_accept_unknown`` is false.
    allow: tuple[str, ...] = ("echo", "store", "find", "move", "get")
    # Department scope of what this peer may find/move/get (None: every department). Enforced with the operations.
    departments: tuple[str, ...] | None = None
    # Outgoing associations to this peer (C-MOVE destination) use DICOM TLS, verifying its certificate against tls_ca.
    tls: bool = False
    # Concurrent associations a send job opens to this peer (services/jobs.py, dimse/sender.py).
    max_associations: int = 1
    # Storage commitment (N-EVENT-REPORT) results go to this peer on a new association we open, even when its
    # N-ACTION association is still open (some SCUs release at once and listen for the report as SCP).
    commit_new_association: bool = False


@dataclass
class RemoteDicomweb:
    """A DICOMweb peer (``[remote_dicomweb.NAME]``): a STOW-RS destination of send jobs and routing rules, and a
    QIDO-RS / WADO-RS source for remote query and retrieve. ``url`` is the service root (e.g. .../dicom-web)."""

    url: str
    token: str = ""  # bearer token (Authorization: Bearer ...)
    username: str = ""  # basic auth, when no token
    password: str = ""
    timeout: float = 60.0
    max_instances_per_request: int = 50  # STOW-RS: instances in one multipart request
    verify_tls: bool = True


DUPLICATE_POLICIES = ("keep-first", "overwrite", "reject")


@dataclass
class Settings:
    data_dir: Path = Path("./openpacs-data")
    index_url: str = ""  # default: sqlite in data_dir
    storage_url: str = ""  # default: file:// in data_dir/blobs
    blob_sync: str = "auto"  # auto | syncfs | fsync: how a group commit makes its blobs durable (storage/filesystem.py)
    storage_min_free: str = ""  # refuse new data (0xA700) when less is free: bytes ("50GB") or "N%" of the store
    storage_quota: str = ""  # refuse new data when the stored instances would exceed this many bytes ("2TB")
    # Storage management (services/compression.py, retention.py, scrub.py; README "Storage management")
    compress: str = ""  # "" (off) | jpeg-ls-lossless | jpeg2000-lossless | htj2k-lossless: compression at rest
    compress_after_days: float = 0  # 0: shortly after arrival (background job); N: instances older than N days
    compress_batch: int = 200  # instances per compress job
    retention: list[dict[str, Any]] = field(default_factory=list)  # TOML [[retention]] rules (services/retention.py)
    scrub_interval_hours: float = 24.0  # the integrity scrub runs this often (0: only when asked)
    retention_interval_hours: float = 1.0  # retention rules are applied this often (0: only when asked)
    storage_check_seconds: float = 30.0  # how often the storage scheduler looks for compression/retention/scrub work
    # IOCM (services/iocm.py): rejected instances are deleted this many days after their rejection; the purge job
    # looks every rejected_purge_check_hours
    rejected_purge_days: float = 30.0
    rejected_purge_check_hours: float = 6.0
    # S3-compatible object storage (storage/s3.py) for storage_url = "s3://bucket/prefix" and tier_url; credentials
    # default to the standard AWS environment variables / config files when empty
    s3_endpoint_url: str = ""
    s3_region: str = ""
    s3_access_key: str = ""
    s3_secret_key: str = ""
    s3_max_pool: int = 64  # HTTP connections per store (concurrent PUTs of the ingest threads)
    # cold tier (services/tiering.py): studies received more than tier_after_days ago move to tier_url (0: off)
    tier_url: str = ""
    tier_after_days: int = 0
    tier_cache_dir: str = ""  # optional local cache of blobs read back from the tier
    tier_cache_max_gb: float = 10.0

    # DICOM upper layer
    aet: str = "OPENPACS"
    dicom_host: str = "127.0.0.1"
    dicom_port: int = 11112
    dicom_workers: int = 0  # 0: automatic (1 on SQLite, one per CPU up to 4 on PostgreSQL)
    max_associations: int = 64
    max_pdu: int = 4 * 1024 * 1024  # our maximum receive PDU length, advertised at association
    artim_timeout: float = 30.0
    dimse_timeout: float = 60.0
    # The durable job queue (services/jobs.py): lease a node renews while it runs a job, first retry delay (doubled
    # per attempt up to job_backoff_max), attempts before a job fails, jobs run at once per node
    job_lease_seconds: float = 30.0
    # the orphan sweep removes unreferenced blobs older than this; on a shared index (PostgreSQL: several nodes
    # write to one store) a younger blob may be another node's store whose index commit is under way
    orphan_grace_seconds: float = 600.0
    # how long a node may serve its cached copy of tokens, sessions and remote nodes when it missed a change
    # notification (index/changes.py normally drops the copies at once); department rules: max(30 s, this)
    config_cache_seconds: float = 5.0
    orphan_sweep_hours: float = 6.0  # shared index: how often one node (advisory lock) sweeps again; 0 = at start only
    job_backoff_seconds: float = 5.0
    job_backoff_max: float = 600.0
    job_max_attempts: int = 5
    job_concurrency: int = 2  # jobs run at once by each job worker (the serving process's, the jobs process's)
    # distribution (send, STOW-RS, retrieve, prefetch, HL7 to the RIS) and routing in a process of their own
    # (cli/jobs_process.py), at this CPU niceness: forwarding no longer takes its CPU out of ingest
    job_process: bool = True
    job_nice: int = 10
    commit_timeout: float = 300.0  # a send job asking for storage commitment waits this long for the report, then retries
    network_timeout: float = 120.0
    dicom_tls_port: int = 2762  # DICOM TLS listener, on when tls_cert/tls_key are set (tls_ca: mutual TLS); 0: off
    check_called_aet: bool = False
    dicom_accept_unknown: bool = True  # permissive development mode: any calling AE may associate
    remote_aes: dict[str, RemoteAE] = field(default_factory=dict)
    remote_dicomweb: dict[str, RemoteDicomweb] = field(default_factory=dict)
    routes: list[dict[str, Any]] = field(default_factory=list)  # TOML [[routes]] (services/routing.py parses them)

    # HTTP
    http_host: str = "127.0.0.1"
    http_port: int = 8042
    http_header_timeout: float = 30.0  # a request's headers must arrive within this (slow clients are closed)
    http_max_connections: int = 2000  # more are closed at once: descriptors stay for storage, index and DICOM

    # Security (README "Security"). auth "auto": required unless every listener is on loopback (development mode)
    auth: str = "auto"  # auto | on | off (off is refused on a non-loopback address)
    session_hours: float = 12.0
    token_days: float = 90.0  # default lifetime of API tokens
    login_max_failures: int = 5  # per user name and source address in 15 minutes, then 429
    trusted_proxies: str = ""  # comma-separated proxy addresses whose X-Forwarded-For/-Proto headers are believed
    tls_cert: str = ""  # PEM certificate (chain) for HTTPS and DICOM TLS
    tls_key: str = ""
    tls_ca: str = ""  # CA bundle: client certificates (mutual TLS) and peers of outgoing TLS
    http_tls: bool = True  # HTTPS on the web port when tls_cert is set (false: plain HTTP behind a TLS proxy)
    oidc_issuer: str = ""  # enables OIDC bearer JWTs
    oidc_audience: str = ""
    oidc_jwks_url: str = ""  # default: ISSUER/.well-known/jwks.json
    oidc_algorithms: str = "RS256,ES256"  # allow-list; none/HS* are never accepted
    oidc_role_claim: str = "roles"
    oidc_role_map: str = ""  # "claim-value=role,..."; default: claim values are role names
    oidc_department_claim: str = "departments"
    allow_open_dicom: bool = False  # permissive DICOM (dicom_accept_unknown) on a non-loopback address: not for production
    default_department: str = ""  # department of studies no rule matches ("" = none: admins only)
    audit_syslog: str = ""  # tls://host:6514 | tcp://host:514 | udp://host:514 (spooled in data_dir/audit-spool)
    audit_syslog_ca: str = ""
    audit_syslog_cert: str = ""
    audit_syslog_key: str = ""

    # HL7 v2 (MLLP): ADT from the RIS / interface engine (README "HL7")
    hl7_host: str = "127.0.0.1"
    hl7_port: int = 2575  # 0: off
    hl7_tls: bool = False  # MLLP over TLS with tls_cert/tls_key (tls_ca: client certificates required)
    hl7_max_message: int = 10 * 1024 * 1024  # larger messages are answered AR and skipped
    hl7_idle_timeout: float = 600.0  # seconds without data before a connection is closed (0: never)
    hl7_max_connections: int = 64
    # Outbound HL7 to the RIS: an order status update (ORC-5 IP / CM / DC) when a modality's MPPS starts and ends,
    # queued as jobs in the index (retried with backoff, in order, across restarts)
    ris_hl7: str = ""  # mllp://host:port ("" = off)
    ris_hl7_version: str = "2.5.1"  # 2.3-2.4: ORM^O01; 2.5 and later: OMI^O23
    ris_hl7_application: str = "RIS"  # MSH-5 / MSH-6 of what we send
    ris_hl7_facility: str = ""
    ris_hl7_timeout: float = 30.0  # seconds to wait for the RIS's ACK

    # Behaviour
    duplicate_policy: str = "keep-first"  # keep-first | overwrite | reject
    pn_case_insensitive: bool = True
    find_max_results: int = 0  # 0: unlimited
    log_level: str = "INFO"
    log_format: str = "text"  # text | json (one JSON object per line; request_id / association_id fields)

    # Monitoring: /metrics is open to loopback callers; others need this token (Authorization: Bearer …) or an
    # administrator's API token
    metrics_token: str = ""

    def __post_init__(self) -> None:
        if self.log_format not in ("text", "json"):
            raise ValueError(f"log_format must be text or json, not {self.log_format!r}")
        if self.duplicate_policy not in DUPLICATE_POLICIES:
            # a typo would otherwise silently behave as keep-first
            raise ValueError(f"duplicate_policy must be one of {', '.join(DUPLICATE_POLICIES)}, "
                             f"not {self.duplicate_policy!r}")

    @property
    def resolved_index_url(self) -> str:
        return self.index_url or f"sqlite:///{(self.data_dir / 'index.sqlite').resolve()}"

    @property
    def resolved_storage_url(self) -> str:
        return self.storage_url or f"file://{(self.data_dir / 'blobs').resolve()}"

    @property
    def auth_enabled(self) -> bool:
        mode = self.auth.strip().lower()
        if mode in ("on", "true", "1", "yes"):
            return True
        if mode in ("off", "false", "0", "no"):
            return False
        return not (is_loopback(self.http_host) and is_loopback(self.dicom_host))

    @property
    def worker_count(self) -> int:
        if self.dicom_workers > 0:
            return self.dicom_workers
        if self.resolved_index_url.startswith("sqlite"):
            # SQLite has one writer: processes with their own group commits contend for its lock (busy-wait sleeps),
            # measured slower than one process (4 storescu: CT 366-426 vs 385-453 inst/s, 8 KB 545-721 vs 721-737)
            return 1
        return max(1, min(4, os.cpu_count() or 1))


def is_loopback(host: str) -> bool:
    import ipaddress

    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


_ENV_PREFIX = "OPENPACS_"


def _coerce(name: str, raw: Any) -> Any:
    f = Settings.__dataclass_fields__[name]
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if kind == "Path":
        return Path(raw)
    if kind == "bool":
        if isinstance(raw, bool):
            return raw
        return str(raw).strip().lower() in ("1", "true", "yes", "on")
    if kind == "int":
        return int(raw)
    if kind == "float":
        return float(raw)
    return raw


def load_settings(config_file: str | os.PathLike[str] | None = None, **overrides: Any) -> Settings:
    """Defaults < TOML file < environment (OPENPACS_<FIELD>) < explicit overrides (CLI flags, None ignored)."""
    values: dict[str, Any] = {}
    remotes: dict[str, RemoteAE] = {}
    webs: dict[str, RemoteDicomweb] = {}
    routes: list[dict[str, Any]] = []
    if config_file:
        with open(config_file, "rb") as fh:
            doc = tomllib.load(fh)
        for key, raw in doc.items():
            if key == "remote_aes":
                for name, spec in raw.items():
                    allow = tuple(spec.get("allow", RemoteAE.allow))
                    deps = spec.get("departments")
                    if isinstance(deps, str):
                        deps = [d for d in deps.split(",") if d.strip()]
                    remotes[name] = RemoteAE(aet=spec.get("aet", name), host=spec["host"], port=int(spec["port"]), allow=allow,
                                             departments=None if deps is None else tuple(d.strip().lower() for d in deps),
                                             tls=bool(spec.get("tls", False)),
                                             max_associations=max(1, int(spec.get("max_associations", 1))),
                                             commit_new_association=bool(spec.get("commit_new_association", False)))
            elif key == "remote_dicomweb":
                for name, spec in raw.items():
                    if not isinstance(spec, dict) or not str(spec.get("url", "")).strip():
                        raise ValueError(f"{config_file}: [remote_dicomweb.{name}] needs url = \"http(s)://...\"")
                    known = RemoteDicomweb.__dataclass_fields__
                    bad = [k for k in spec if k not in known]
                    if bad:
                        raise ValueError(f"{config_file}: [remote_dicomweb.{name}]: unknown setting(s) {bad}")
                    webs[name] = RemoteDicomweb(**{k: v for k, v in spec.items()})
            elif key == "routes":
                if not isinstance(raw, list) or not all(isinstance(r, dict) for r in raw):
                    raise ValueError(f"{config_file}: routes must be [[routes]] tables")
                routes = [dict(r) for r in raw]
            elif key == "retention":
                if not isinstance(raw, list) or not all(isinstance(r, dict) for r in raw):
                    raise ValueError(f"{config_file}: retention must be [[retention]] tables")
                values["retention"] = [dict(r) for r in raw]
            elif key in Settings.__dataclass_fields__:
                values[key] = _coerce(key, raw)
            else:
                raise ValueError(f"{config_file}: unknown setting {key!r}")
    for name in Settings.__dataclass_fields__:
        env = os.environ.get(_ENV_PREFIX + name.upper())
        if env is not None and name not in ("remote_aes", "remote_dicomweb", "routes", "retention"):
            values[name] = _coerce(name, env)
    for name, raw in overrides.items():
        if raw is not None:
            values[name] = _coerce(name, raw)
    s = Settings(**values)
    s.remote_aes = remotes
    s.remote_dicomweb = webs
    s.routes = routes
    validate(s)
    return s


DUPLICATE_POLICIES = ("keep-first", "overwrite", "reject")


def validate(s: Settings) -> None:
    """Refuse settings that would make the node misbehave, with a message naming the setting."""
    if s.blob_sync not in ("auto", "syncfs", "fsync"):
        raise ValueError(f"blob_sync must be auto, syncfs or fsync, not {s.blob_sync!r}")
    if s.duplicate_policy not in DUPLICATE_POLICIES:
        raise ValueError(f"duplicate_policy must be one of {', '.join(DUPLICATE_POLICIES)}, not {s.duplicate_policy!r}")
    for name in ("dicom_port", "http_port", "dicom_tls_port", "hl7_port"):
        port = getattr(s, name)
        if not 0 <= port <= 65535:
            raise ValueError(f"{name} must be a TCP port (0-65535), not {port}")
    if s.http_header_timeout <= 0 or s.http_max_connections < 1:
        raise ValueError("http_header_timeout must be > 0 and http_max_connections >= 1")
    if not s.aet or len(s.aet) > 16:
        raise ValueError(f"aet must be 1 to 16 characters, not {s.aet!r}")
    if s.hl7_tls and s.hl7_port and not s.tls_cert:
        raise ValueError("hl7_tls needs tls_cert (and tls_key)")
    if s.ris_hl7:
        from .hl7.outbound import parse_mllp_url
        parse_mllp_url(s.ris_hl7)  # ValueError names the problem
    if s.hl7_max_message < 1024 or s.hl7_max_connections < 1 or s.hl7_idle_timeout < 0:
        raise ValueError("hl7_max_message must be >= 1024, hl7_max_connections >= 1 and hl7_idle_timeout >= 0")
    if s.compress not in ("", "jpeg-ls-lossless", "jpeg2000-lossless", "htj2k-lossless"):
        raise ValueError(f"compress must be \"\", jpeg-ls-lossless, jpeg2000-lossless or htj2k-lossless, "
                         f"not {s.compress!r}")
    if s.retention:
        from .services.retention import parse_rule
        for rule in s.retention:
            parse_rule(rule, "toml")  # RetentionError (a ValueError) names the rule and the problem
    if s.max_pdu < 4096:
        raise ValueError(f"max_pdu must be at least 4096, not {s.max_pdu}")
    # a TOML integer is a byte count; the sizes are parsed (and refused when malformed) by services.storage_policy
    s.storage_min_free, s.storage_quota = str(s.storage_min_free).strip(), str(s.storage_quota).strip()


def as_dict(s: Settings) -> dict[str, Any]:
    return dataclasses.asdict(s)


SECRET_SETTINGS = frozenset({"metrics_token", "s3_secret_key"})
_SECRET_KEYS = ("token", "password")
REDACTED = "***"


def redact_url(url: str) -> str:
    """``scheme://user:password@host`` -> ``scheme://user:***@host``; other strings unchanged."""
    import re

    return re.sub(r"^([a-z][a-z0-9+.-]*://[^:/@]*):[^@/]*@", rf"\1:{REDACTED}@", url, flags=re.I)


def redacted(s: Settings) -> dict[str, Any]:
    """The effective settings with secrets hidden (console System page, audit of configuration changes)."""
    out: dict[str, Any] = {}
    for key, value in as_dict(s).items():
        if key in SECRET_SETTINGS:
            out[key] = REDACTED if value else ""
        elif isinstance(value, str):
            out[key] = redact_url(value)
        elif isinstance(value, Path):
            out[key] = str(value)
        elif key == "remote_dicomweb" and isinstance(value, dict):
            out[key] = {n: {k: (REDACTED if k in _SECRET_KEYS and v else v) for k, v in spec.items()}
                        for n, spec in value.items()}
        else:
            out[key] = value
    return out


def security_refusal(settings: Settings) -> str | None:
    """Secure by default: why this configuration must not start, or None. Loopback without auth is development mode.

    `openpacs serve` refuses to start with it; `openpacs doctor` reports it."""
    exposed = [h for h in {settings.http_host, settings.dicom_host} if not is_loopback(h)]
    if exposed and not settings.auth_enabled:
        return (f"refusing to listen on {', '.join(sorted(exposed))} with authentication off (auth = \"off\"): "
                "anyone on the network could read every study. Use auth = \"auto\" or \"on\", or listen on 127.0.0.1")
    if not is_loopback(settings.dicom_host) and settings.dicom_accept_unknown and not settings.allow_open_dicom:
        return (f"refusing to listen for DICOM on {settings.dicom_host} while any calling AE is accepted "
                "(dicom_accept_unknown = true): configure [remote_aes.*] with their allowed operations and set "
                "dicom_accept_unknown = false, or set allow_open_dicom = true to accept the risk")
    return None
