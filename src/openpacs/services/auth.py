"""Identity and access: users, roles, department scope, passwords (argon2id), API tokens, sessions, OIDC JWTs.

Protocol-free: the HTTP middleware (web.auth), the CLI (cli.user) and the DIMSE access checks all ask this service.
Hot paths never run a KDF: bearer tokens and session cookies are random 256-bit secrets, looked up by their SHA-256
and cached for ``CACHE_TTL`` seconds. Revocation, disabling and password changes clear the local cache at once and
publish an ``auth`` change (index/changes.py): other nodes drop theirs on the PostgreSQL notification, other
processes on one SQLite index within a second; the TTL only bounds a node that crashed before publishing.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import insert, select, update

from ..index.db import Index
from ..index.security_schema import api_tokens, sessions, users

log = logging.getLogger("openpacs.auth")

# Rights. "read" covers query, retrieve and viewing; department scope narrows it to the user's departments.
READ, STORE, DELETE, EXPORT, ADMIN, AUDIT = "read", "store", "delete", "export", "admin", "audit"
ALL_RIGHTS = frozenset({READ, STORE, DELETE, EXPORT, ADMIN, AUDIT})

ROLES: dict[str, frozenset[str]] = {
    "admin": ALL_RIGHTS,
    "radiologist": frozenset({READ, STORE, EXPORT}),
    "physician": frozenset({READ, EXPORT}),
    "technologist": frozenset({READ, STORE}),
    "viewer": frozenset({READ}),
    "auditor": frozenset({AUDIT}),
}

CACHE_TTL = 5.0  # how long a revocation made elsewhere (CLI, another node) may take to bite
TOKEN_PREFIX = "opk_"
MIN_PASSWORD = 10


class AuthError(Exception):
    pass


class AccessDenied(Exception):
    """A right the principal lacks. The HTTP layer answers 401 (anonymous) or 403 and audits a Security Alert."""

    def __init__(self, principal: Principal, right: str, detail: str = "") -> None:
        super().__init__(detail or f"{principal.name or 'anonymous'} lacks the {right!r} right")
        self.principal = principal
        self.right = right


@dataclass(frozen=True)
class Principal:
    """Who is making a request and what they may do. ``departments`` None means every department."""

    name: str
    role: str
    rights: frozenset[str]
    departments: tuple[str, ...] | None = None
    method: str = "anonymous"  # anonymous | development | session | token | oidc | dimse
    user_id: int | None = None
    csrf_token: str = ""
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def authenticated(self) -> bool:
        return self.method not in ("anonymous",)

    def can(self, right: str) -> bool:
        return right in self.rights

    def sees(self, department: str | None) -> bool:
        return self.departments is None or (department is not None and department in self.departments)


ANONYMOUS = Principal(name="", role="", rights=frozenset(), method="anonymous")
# Loopback-only development mode (auth off): every request acts as this principal.
DEVELOPMENT = Principal(name="development", role="admin", rights=ALL_RIGHTS, method="development")


def require(principal: Principal, right: str, detail: str = "") -> Principal:
    """Raise :class:`AccessDenied` unless ``principal`` has ``right``; return it (for chaining)."""
    if right not in principal.rights:
        raise AccessDenied(principal, right, detail)
    return principal


def scope_of(principal: Principal) -> tuple[str, ...] | None:
    """The department scope to put in ``Query.departments`` / ``RetrieveService(departments=)``."""
    return principal.departments


def parse_departments(value: str | Iterable[str] | None) -> tuple[str, ...] | None:
    """Department codes from a comma-separated string or a list; None or "*" is every department, "" is none."""
    if value is None:
        return None
    if isinstance(value, str):
        if value.strip() == "*":
            return None
        value = value.split(",")
    return tuple(sorted({d.strip().lower() for d in value if d and d.strip()}))


# ---------------------------------------------------------------------------------------------------------------------
# Passwords

_hasher: Any = None


def _ph() -> Any:
    global _hasher
    if _hasher is None:
        from argon2 import PasswordHasher

        _hasher = PasswordHasher()  # argon2id, RFC 9106 low-memory profile defaults
    return _hasher


def hash_password(password: str) -> str:
    return str(_ph().hash(password))


def verify_password(stored: str | None, password: str) -> bool:
    from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

    if not stored:
        _burn(password)
        return False
    try:
        return bool(_ph().verify(stored, password))
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


_DUMMY: str | None = None


def _dummy_hash() -> str:
    global _DUMMY
    if _DUMMY is None:
        _DUMMY = hash_password(secrets.token_urlsafe(16))
    return _DUMMY


def _burn(password: str) -> None:
    """Spend the same time as a real verification, so unknown user names are not told apart by timing."""
    from argon2.exceptions import VerifyMismatchError

    try:
        _ph().verify(_dummy_hash(), password)
    except VerifyMismatchError:
        pass


def generate_password() -> str:
    return secrets.token_urlsafe(15)


def check_password_policy(password: str) -> None:
    if len(password) < MIN_PASSWORD:
        raise AuthError(f"password too short: at least {MIN_PASSWORD} characters")


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def _now() -> datetime:
    return datetime.now(UTC)


def _aware(dt: datetime | None) -> datetime | None:
    if dt is not None and dt.tzinfo is None:
        return dt.replace(tzinfo=UTC)  # SQLite hands back naive datetimes
    return dt


@dataclass
class UserInfo:
    id: int
    username: str
    role: str
    departments: tuple[str, ...] | None
    display_name: str
    disabled: bool
    created_at: datetime | None
    last_login_at: datetime | None


class _TTLCache:
    def __init__(self, ttl: float, maxsize: int = 10000) -> None:
        self.ttl = ttl
        self.maxsize = maxsize
        self._d: dict[str, tuple[float, Any]] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> Any:
        hit = self._d.get(key)
        if hit is None:
            return None
        if hit[0] < time.monotonic():
            self._d.pop(key, None)
            return None
        return hit[1]

    def put(self, key: str, value: Any, ttl: float | None = None) -> None:
        with self._lock:
            if len(self._d) >= self.maxsize:
                self._d.clear()
            self._d[key] = (time.monotonic() + (self.ttl if ttl is None else ttl), value)

    def clear(self) -> None:
        with self._lock:
            self._d.clear()


class AuthService:
    def __init__(self, index: Index, *, session_hours: float = 12.0, token_days: float = 90.0,
                 cache_seconds: float = CACHE_TTL) -> None:
        self.index = index
        self.session_ttl = timedelta(hours=session_hours)
        self.token_ttl = timedelta(days=token_days)
        self._tokens = _TTLCache(cache_seconds)
        self._sessions = _TTLCache(cache_seconds)
        self.oidc: OIDCValidator | None = None
        index.changes.subscribe("auth", self._clear_local)  # a change made on another node

    # -- users -----------------------------------------------------------------------------------------------
    def _principal(self, row: Any, method: str, csrf: str = "") -> Principal:
        role = row.role
        return Principal(
            name=row.username,
            role=role,
            rights=ROLES.get(role, frozenset()),
            departments=None if role == "admin" else parse_departments(row.departments),
            method=method,
            user_id=row.id,
            csrf_token=csrf,
        )

    def has_users(self) -> bool:
        with self.index.engine.connect() as c:
            return c.execute(select(users.c.id).limit(1)).first() is not None

    def add_user(
        self,
        username: str,
        password: str | None,
        role: str,
        departments: Iterable[str] | str | None = None,
        display_name: str = "",
    ) -> int:
        username = username.strip()
        if not username or len(username) > 128 or any(ch.isspace() or ord(ch) < 32 for ch in username):
            raise AuthError("invalid user name")
        if role not in ROLES:
            raise AuthError(f"unknown role {role!r}; one of {', '.join(ROLES)}")
        if password is not None:
            check_password_policy(password)
        deps = parse_departments(departments) if departments is not None else None
        ts = _now()
        with self.index.write_engine.begin() as c:
            if c.execute(select(users.c.id).where(users.c.username == username)).first() is not None:
                raise AuthError(f"user {username!r} exists")
            return int(
                c.execute(  # type: ignore[index]
                    insert(users).values(
                        username=username,
                        password_hash=hash_password(password) if password else None,
                        role=role,
                        departments=",".join(deps) if deps is not None else None,
                        display_name=display_name or username,
                        disabled=False,
                        created_at=ts,
                        updated_at=ts,
                    )
                ).inserted_primary_key[0]
            )

    def list_users(self) -> list[UserInfo]:
        with self.index.engine.connect() as c:
            rows = c.execute(select(users).order_by(users.c.username)).all()
        return [
            UserInfo(
                r.id,
                r.username,
                r.role,
                parse_departments(r.departments),
                r.display_name or "",
                bool(r.disabled),
                _aware(r.created_at),
                _aware(r.last_login_at),
            )
            for r in rows
        ]

    def _update_user(self, username: str, **values: Any) -> None:
        values["updated_at"] = _now()
        with self.index.write_engine.begin() as c:
            n = c.execute(update(users).where(users.c.username == username).values(**values)).rowcount
        if not n:
            raise AuthError(f"no user {username!r}")
        self._invalidate()

    def set_password(self, username: str, password: str) -> None:
        check_password_policy(password)
        self._update_user(username, password_hash=hash_password(password))
        self._revoke_sessions(username)

    def set_disabled(self, username: str, disabled: bool = True) -> None:
        self._update_user(username, disabled=disabled)
        if disabled:
            self._revoke_sessions(username)

    def set_role(self, username: str, role: str, departments: Iterable[str] | str | None = None) -> None:
        if role not in ROLES:
            raise AuthError(f"unknown role {role!r}")
        deps = parse_departments(departments) if departments is not None else None
        self._update_user(username, role=role, departments=",".join(deps) if deps is not None else None)

    def _revoke_sessions(self, username: str) -> None:
        with self.index.write_engine.begin() as c:
            uid = c.execute(select(users.c.id).where(users.c.username == username)).scalar_one_or_none()
            if uid is not None:
                c.execute(update(sessions).where(sessions.c.user_fk == uid).values(revoked=True))
        self._invalidate()

    def _invalidate(self) -> None:
        """Users, tokens or sessions changed: every node's copies go (this one's at once, the others' on notify)."""
        self.index.changes.bump("auth")

    def _clear_local(self) -> None:
        self._tokens.clear()
        self._sessions.clear()

    def authenticate(self, username: str, password: str) -> Principal | None:
        """Password login. Always spends one KDF verification, whether or not the user exists."""
        with self.index.engine.connect() as c:
            row = c.execute(select(users).where(users.c.username == username)).first()
        if row is None or row.disabled or not row.password_hash:
            _burn(password)
            return None
        if not verify_password(row.password_hash, password):
            return None
        try:
            with self.index.write_engine.begin() as c:
                c.execute(update(users).where(users.c.id == row.id).values(last_login_at=_now()))
        except Exception:  # a read-only replica must not block logins
            log.debug("could not record last login", exc_info=True)
        return self._principal(row, "password")

    def ensure_admin(self) -> str | None:
        """First start: create ``admin`` with a generated password and return it (shown once); None if users exist."""
        if self.has_users():
            return None
        password = generate_password()
        self.add_user("admin", password, "admin", display_name="Administrator")
        return password

    # -- API tokens ------------------------------------------------------------------------------------------
    def create_token(self, username: str, name: str = "", days: float | None = None) -> tuple[int, str]:
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        ts = _now()
        ttl = self.token_ttl if days is None else timedelta(days=days)
        with self.index.write_engine.begin() as c:
            uid = c.execute(select(users.c.id).where(users.c.username == username)).scalar_one_or_none()
            if uid is None:
                raise AuthError(f"no user {username!r}")
            tid = c.execute(
                insert(api_tokens).values(
                    user_fk=uid,
                    name=name,
                    token_hash=token_hash(token),
                    prefix=token[:12],
                    created_at=ts,
                    expires_at=None if ttl.total_seconds() == 0 else ts + ttl,
                )
            ).inserted_primary_key[0]  # type: ignore[index]
        return int(tid), token

    def list_tokens(self, username: str | None = None) -> list[dict[str, Any]]:
        stmt = select(api_tokens, users.c.username).select_from(api_tokens.join(users))
        if username:
            stmt = stmt.where(users.c.username == username)
        with self.index.engine.connect() as c:
            return [
                dict(
                    id=r.id,
                    user=r.username,
                    name=r.name,
                    prefix=r.prefix,
                    created_at=_aware(r.created_at),
                    expires_at=_aware(r.expires_at),
                    revoked=r.revoked_at is not None,
                )
                for r in c.execute(stmt.order_by(api_tokens.c.id))
            ]

    def revoke_token(self, token_id: int) -> bool:
        with self.index.write_engine.begin() as c:
            n = c.execute(
                update(api_tokens)
                .where(api_tokens.c.id == token_id, api_tokens.c.revoked_at.is_(None))
                .values(revoked_at=_now())
            ).rowcount
        self._invalidate()
        return bool(n)

    def cached_principal(self, kind: str, credential: str) -> tuple[bool, Principal | None]:
        """What principal_for_token / principal_for_session would answer, from memory only: (False, None) when the
        index must be asked (the caller then asks it off the event loop)."""
        if kind == "token" and (not credential.startswith(TOKEN_PREFIX) or len(credential) > 200):
            return True, None
        if kind == "session" and (not credential or len(credential) > 200):
            return True, None
        hit = (self._tokens if kind == "token" else self._sessions).get(token_hash(credential))
        if hit is None:
            return False, None
        p, expires = hit
        if p is None or (expires is not None and expires <= _now()):
            return True, None
        return True, p

    def principal_for_token(self, token: str) -> Principal | None:
        known, p = self.cached_principal("token", token)
        if known:
            return p
        h = token_hash(token)
        with self.index.engine.connect() as c:
            row = c.execute(
                select(users, api_tokens.c.expires_at, api_tokens.c.revoked_at)
                .select_from(api_tokens.join(users))
                .where(api_tokens.c.token_hash == h)
            ).first()
        if row is None or row.revoked_at is not None or row.disabled:
            self._tokens.put(h, (None, None))
            return None
        expires = _aware(row.expires_at)
        if expires is not None and expires <= _now():
            self._tokens.put(h, (None, None))
            return None
        p = self._principal(row, "token")
        self._tokens.put(h, (p, expires))
        return p

    # -- sessions --------------------------------------------------------------------------------------------
    def create_session(self, principal: Principal, address: str = "") -> tuple[str, str]:
        """A new session for a logged-in user: (cookie value, CSRF token)."""
        if principal.user_id is None:
            raise AuthError("sessions are for stored users")
        cookie = secrets.token_urlsafe(32)
        csrf = secrets.token_urlsafe(24)
        ts = _now()
        with self.index.write_engine.begin() as c:
            c.execute(
                insert(sessions).values(
                    id=token_hash(cookie),
                    user_fk=principal.user_id,
                    csrf_token=csrf,
                    created_at=ts,
                    expires_at=ts + self.session_ttl,
                    source_address=address[:200],
                    revoked=False,
                )
            )
        return cookie, csrf

    def principal_for_session(self, cookie: str) -> Principal | None:
        known, p = self.cached_principal("session", cookie)
        if known:
            return p
        h = token_hash(cookie)
        with self.index.engine.connect() as c:
            row = c.execute(
                select(users, sessions.c.csrf_token, sessions.c.expires_at, sessions.c.revoked)
                .select_from(sessions.join(users))
                .where(sessions.c.id == h)
            ).first()
        expires = _aware(row.expires_at) if row is not None else None
        if row is None or row.revoked or row.disabled or expires is None or expires <= _now():
            self._sessions.put(h, (None, None))
            return None
        p = self._principal(row, "session", csrf=row.csrf_token)
        self._sessions.put(h, (p, expires))
        return p

    def end_session(self, cookie: str) -> None:
        with self.index.write_engine.begin() as c:
            c.execute(update(sessions).where(sessions.c.id == token_hash(cookie)).values(revoked=True))
        self._invalidate()


def csrf_ok(expected: str, given: str | None) -> bool:
    return bool(expected) and given is not None and hmac.compare_digest(expected.encode(), given.encode())


# ---------------------------------------------------------------------------------------------------------------------
# OIDC: JWT bearer tokens issued by a configured identity provider


class OIDCValidator:
    """Validates JWTs against the issuer's JWKS: signature, ``iss``, ``aud``, ``exp``/``nbf`` and an algorithm
    allow-list (``none`` and HMAC algorithms are never accepted: a public key must not double as a shared secret).
    Claims map to a role (``role_claim`` values through ``role_map``) and departments (``department_claim``)."""

    FORBIDDEN_ALGS = frozenset({"none", "HS256", "HS384", "HS512"})

    def __init__(
        self,
        issuer: str,
        audience: str,
        jwks_url: str = "",
        algorithms: Iterable[str] = ("RS256", "ES256"),
        role_claim: str = "roles",
        role_map: dict[str, str] | None = None,
        department_claim: str = "departments",
        username_claim: str = "preferred_username",
        leeway: float = 30.0,
        jwks_client: Any = None,
    ) -> None:
        self.issuer = issuer.rstrip("/")
        self.audience = audience
        self.algorithms = [a for a in algorithms if a and a not in self.FORBIDDEN_ALGS]
        if not self.algorithms:
            raise AuthError("no acceptable OIDC algorithm configured")
        self.role_claim = role_claim
        self.role_map = role_map or {r: r for r in ROLES}
        self.department_claim = department_claim
        self.username_claim = username_claim
        self.leeway = leeway
        self._cache = _TTLCache(CACHE_TTL)
        if jwks_client is None:
            from jwt import PyJWKClient

            jwks_client = PyJWKClient(
                jwks_url or f"{self.issuer}/.well-known/jwks.json", cache_keys=True, lifespan=300, timeout=10
            )
        self.jwks = jwks_client

    @staticmethod
    def looks_like_jwt(token: str) -> bool:
        return token.count(".") == 2 and not token.startswith(TOKEN_PREFIX)

    def validate(self, token: str) -> Principal | None:
        import jwt

        h = token_hash(token)
        hit = self._cache.get(h)
        if hit is not None:
            p, exp = hit
            return p if p is not None and exp > time.time() else None  # type: ignore[no-any-return]
        try:
            header = jwt.get_unverified_header(token)
            alg = header.get("alg")
            if alg not in self.algorithms:
                raise jwt.InvalidAlgorithmError(f"algorithm {alg!r} not allowed")
            key = self.jwks.get_signing_key_from_jwt(token).key
            claims = jwt.decode(
                token,
                key,
                algorithms=self.algorithms,
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except Exception as e:  # every failure is a rejection; the reason goes to the log
            log.info("OIDC token rejected: %s", e)
            self._cache.put(h, (None, 0.0), ttl=5.0)
            return None
        role = self._role(claims.get(self.role_claim))
        if role is None:
            log.info("OIDC token for %s maps to no role", claims.get("sub"))
            return None
        deps = claims.get(self.department_claim)
        departments = (
            None
            if role == "admin"
            else parse_departments(deps if isinstance(deps, list) else (str(deps) if deps else ""))
        )
        if departments is None and role != "admin" and not deps:
            departments = ()  # a non-admin without a department claim sees nothing rather than everything
        name = str(claims.get(self.username_claim) or claims["sub"])
        p = Principal(name=name, role=role, rights=ROLES[role], departments=departments, method="oidc")
        self._cache.put(h, (p, float(claims["exp"])))
        return p

    def _role(self, value: Any) -> str | None:
        values = value if isinstance(value, list) else [value] if value else []
        best: str | None = None
        order = list(ROLES)
        for v in values:
            role = self.role_map.get(str(v))
            if role in ROLES and (best is None or order.index(role) < order.index(best)):
                best = role
        return best
