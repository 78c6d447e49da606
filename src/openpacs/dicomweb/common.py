"""Shared DICOMweb plumbing: content negotiation, error responses, URLs, the request's Source, and the rights hook."""

from __future__ import annotations

import logging
import re
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..services.types import Source
from .multipart import parse_media_type

log = logging.getLogger("openpacs.dicomweb")

DICOM_JSON = "application/dicom+json"
DICOM_XML = "application/dicom+xml"
JSON = "application/json"


class DicomWebError(Exception):
    """Raised by route helpers; turned into an error response by :func:`error_response`."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def warning_header(text: str) -> str:
    """An RFC 7234 Warning header value (299 = miscellaneous persistent warning), as PS3.18 8.3.5.1 uses. Header
    values are Latin-1 on the wire: anything else (a client's "€" quoted back in a reason) is escaped, as \\u20ac."""
    clean = text.replace("\\", "\\\\").replace('"', "'").replace("\r", " ").replace("\n", " ")
    clean = clean.encode("ascii", "backslashreplace").decode("ascii")
    return f'299 openpacs "{clean[:900]}"'


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    """A readable error: JSON body ``{"error": ..., "status": ...}`` plus the reason in a Warning header."""
    h = {"Warning": warning_header(message)}
    if headers:
        h.update(headers)
    return JSONResponse({"status": status, "error": message}, status_code=status, headers=h)


# ---------------------------------------------------------------------------------------------------------------------
# Content negotiation (RFC 9110 12.5.1 with PS3.18 8.7: the ``accept`` query parameter overrides the header)


def parse_accept(value: str) -> list[tuple[str, dict[str, str], float]]:
    """``Accept`` as (media range, parameters, q) in the client's order; unparsable q counts as 1."""
    out: list[tuple[str, dict[str, str], float]] = []
    for item in split_list(value):
        media, params = parse_media_type(item)
        if not media:
            continue
        q = 1.0
        if "q" in params:
            try:
                q = float(params.pop("q"))
            except ValueError:
                q = 1.0
        out.append((media, params, q))
    return out


def split_list(value: str, sep: str = ",") -> list[str]:
    """Split a header list on ``sep`` outside quoted strings (a ``type="a,b"`` parameter must not be cut; a quoted
    string may escape a quote with a backslash); empty items are dropped."""
    out: list[str] = []
    buf: list[str] = []
    quoted = escaped = False
    for c in value:
        if escaped:
            escaped = False
        elif c == "\\" and quoted:
            escaped = True
        elif c == '"':
            quoted = not quoted
        elif c == sep and not quoted:
            out.append("".join(buf))
            buf = []
            continue
        buf.append(c)
    out.append("".join(buf))
    return [s for s in (x.strip() for x in out) if s]


def accept_values(request: Request) -> str:
    q = request.query_params.getlist("accept")
    if q:
        return ",".join(q)
    return request.headers.get("accept", "") or "*/*"


def negotiate(request: Request, offered: list[str]) -> str | None:
    """The first of ``offered`` (server preference) acceptable with the highest q; None if nothing is."""
    return _choose(parse_accept(accept_values(request)), offered)


def _choose(ranges: list[tuple[str, dict[str, str], float]], offered: list[str]) -> str | None:
    if not ranges:
        return offered[0]
    best: tuple[float, int] | None = None
    choice: str | None = None
    for i, media in enumerate(offered):
        q = _q_of(ranges, media)
        if q > 0 and (best is None or (q, -i) > best):
            best, choice = (q, -i), media
    return choice


def _q_of(ranges: list[tuple[str, dict[str, str], float]], media: str) -> float:
    """The q the most specific range matching ``media`` gives it (RFC 9110 12.5.1); 0 when none does."""
    mtype = media.split("/", 1)[0]
    best, spec = 0.0, -1
    for rng, _params, q in ranges:
        s = 2 if rng == media else 1 if rng == mtype + "/*" else 0 if rng in ("*/*", "*") else -1
        if s > spec:
            best, spec = q, s
    return best


def negotiate_metadata(request: Request) -> str:
    """application/dicom+json (default), application/json, or DICOM_XML for ``multipart/related;
    type="application/dicom+xml"`` (PS3.18 requires both for QIDO-RS results and WADO-RS metadata); else 406."""
    ranges = parse_accept(accept_values(request))
    choice = _choose(ranges, [DICOM_JSON, JSON])
    xml_q = max(
        (
            q
            for media, params, q in ranges
            if media == "multipart/related" and params.get("type", "").strip('"').lower() == DICOM_XML
        ),
        default=0.0,
    )
    if choice is not None and _q_of(ranges, choice) >= xml_q:
        return choice  # equal preference: JSON, the default
    if xml_q > 0:
        return DICOM_XML
    raise DicomWebError(
        406,
        f"none of the accepted media types ({accept_values(request)}) can be produced; use {DICOM_JSON} or "
        f'multipart/related; type="{DICOM_XML}"',
    )


def xml_multipart_response(objects: list[dict[str, Any]], headers: dict[str, str] | None = None) -> Response:
    """DICOM JSON objects (QIDO-RS results) as ``multipart/related; type="application/dicom+xml"``."""
    from ..dicom.xml import json_to_xml
    from .multipart import multipart_response

    return multipart_response(((DICOM_XML, json_to_xml(obj)) for obj in objects), DICOM_XML, headers=headers)


def negotiate_or_406(request: Request, offered: list[str]) -> str:
    """The first of ``offered`` the Accept header takes (``negotiate``); 406 naming them when it takes none."""
    choice = negotiate(request, offered)
    if choice is None:
        raise DicomWebError(
            406, f"none of the accepted media types ({accept_values(request)}) can be produced; use {' or '.join(offered)}"
        )
    return choice


# ---------------------------------------------------------------------------------------------------------------------
# URLs and request context

_UID_RE = re.compile(r"[0-9]+(\.[0-9]+)*")


def check_uid(uid: str) -> str:
    """A UID from a resource path: digits and dots only, so it can never act as a wildcard or a list."""
    if len(uid) > 64 or not _UID_RE.fullmatch(uid):
        raise DicomWebError(400, f"invalid UID {uid[:80]!r} in the resource path")
    return uid


def service_root(request: Request) -> str:
    """The absolute URL of the DICOMweb root this request came through, without a trailing slash.

    ``root_path`` holds the mount point (``/dicom-web``) and any proxy prefix; ``base_url`` does not (Starlette keeps
    the application's root there)."""
    url = request.url
    netloc = url.netloc
    server = request.scope.get("server")
    if url.port is None and server and server[0] == url.hostname:
        # dicomweb-client sends "Host: 127.0.0.1" without the port; on a direct connection the socket knows it
        default = 443 if url.scheme == "https" else 80
        if server[1] and server[1] != default:
            netloc = f"{netloc}:{server[1]}"
    return f"{url.scheme}://{netloc}{request.scope.get('root_path', '')}".rstrip("/")


def study_url(root: str, study: str) -> str:
    return f"{root}/studies/{study}"


def series_url(root: str, study: str, series: str) -> str:
    return f"{root}/studies/{study}/series/{series}"


def instance_url(root: str, study: str, series: str, sop: str) -> str:
    return f"{root}/studies/{study}/series/{series}/instances/{sop}"


def request_source(request: Request) -> Source:
    client = request.client
    principal = request.scope.get("openpacs.principal")
    user = str(getattr(principal, "name", "") or "")
    return Source(protocol="DICOMWEB", address=f"{client.host}:{client.port}" if client else "", user=user,
                  departments=getattr(principal, "departments", None))


# ---------------------------------------------------------------------------------------------------------------------
# Rights. web.auth's middleware authenticates every request, enforces the route family's right and the department
# of any study named in the path, and puts the caller (services.auth.Principal) in the scope; these read it so that a
# route never depends on the middleware alone. Without the middleware (unit tests of this package) all is permitted.


def _require(request: Request, right: str) -> None:
    principal = request.scope.get("openpacs.principal")
    if principal is not None and right not in principal.rights:
        raise DicomWebError(403, f"the {right!r} right is required")


def request_departments(request: Request) -> tuple[str, ...] | None:
    """The caller's department scope for ``Query.departments``: None = every department."""
    principal = request.scope.get("openpacs.principal")
    return None if principal is None else principal.departments


def authorize_delete(request: Request, level: str, uid: str) -> None:
    """May this request delete this entity? Raises DicomWebError(403) if not."""
    _require(request, "delete")


def authorize_store(request: Request) -> None:
    """May this request store (STOW-RS)? Raises DicomWebError(403) if not."""
    _require(request, "store")
