"""Query/retrieve from remote archives: C-FIND SCU, C-MOVE / C-GET SCU (pynetdicom, in worker threads) against a
DICOM node, and QIDO-RS / WADO-RS against a DICOMweb peer (``[remote_dicomweb.NAME]``, stdlib HTTP client).

A query answers DICOM JSON (PS3.18 F), whichever the protocol. A retrieve is a durable ``retrieve`` job
(services/jobs.py): the runner first lists the instances the remote holds for the request (C-FIND down to the image
level, or QIDO-RS), one job item each, then fetches them. Every instance goes through the one ingest path:

- C-MOVE: the remote sends to our own AE title (``settings.aet``); the instances arrive on our C-STORE SCP, which
  ingests them as any C-STORE. The job ends with the final C-MOVE-RSP, whose sub-operation counts it keeps
  (payload ``remote``); an item is acknowledged once its instance is in the index.
- C-GET: the instances come back on our association; the C-STORE handler prefixes the file meta to the received data
  set bytes (``IngestService.store_dataset``, as the C-STORE SCP does) and answers 0x0000 only after the commit.
- WADO-RS: ``multipart/related; type="application/dicom"; transfer-syntax=*`` (the stored bytes), each part a Part 10
  file for ``IngestService.store_file``.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import socket
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset
from sqlalchemy import func, select, update

from ..config import RemoteAE, RemoteDicomweb, Settings
from ..dicom.json import dataset_to_json
from ..index.db import now
from ..index.schema import instances, job_items, jobs
from .ingest import Source
from .jobs import Job, JobContext, JobQueue, JobStopped, PermanentError
from .nodes import remote_aes_for
from .query import QueryError, keyword_of

log = logging.getLogger("openpacs.remote_qr")

KIND = "retrieve"
METHODS = ("move", "get", "wado")
# API resource -> QueryRetrieveLevel
RESOURCES = {"patients": "PATIENT", "studies": "STUDY", "series": "SERIES", "instances": "IMAGE"}
LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
MAX_RESULTS = 1000  # one query answers at most this many matches
DEFAULT_LIMIT = 100
WADO_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'

PATIENT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
PATIENT_MOVE = "1.2.840.10008.5.1.4.1.2.1.2"
PATIENT_GET = "1.2.840.10008.5.1.4.1.2.1.3"
STUDY_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
STUDY_GET = "1.2.840.10008.5.1.4.1.2.2.3"

# Return keys asked for at each level (the QIDO-RS defaults, PS3.18 Table 10.6.1-5, plus what the console shows).
RETURN_KEYS: dict[str, tuple[str, ...]] = {
    "PATIENT": ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "NumberOfPatientRelatedStudies"),
    "STUDY": ("StudyDate", "StudyTime", "AccessionNumber", "ModalitiesInStudy", "ReferringPhysicianName",
              "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyID",
              "StudyDescription", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances"),
    "SERIES": ("Modality", "SeriesDescription", "SeriesInstanceUID", "SeriesNumber", "NumberOfSeriesRelatedInstances",
               "StudyInstanceUID"),
    "IMAGE": ("SOPClassUID", "SOPInstanceUID", "InstanceNumber", "Rows", "Columns", "NumberOfFrames",
              "StudyInstanceUID", "SeriesInstanceUID"),
}
RESERVED = {"limit", "offset", "includefield", "fuzzymatching"}

# Transfer syntaxes offered for C-GET, each in its own presentation context so that the remote can send every
# instance in the syntax it has stored (no transcoding, the same bytes).
GET_SYNTAXES = (
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51",  # JPEG Extended
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.5",  # RLE Lossless
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian
)
# C-GET storage classes when the remote did not say which it holds
COMMON_STORAGE = (
    "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.4",
    "1.2.840.10008.5.1.4.1.1.4.1", "1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1",
    "1.2.840.10008.5.1.4.1.1.1.2", "1.2.840.10008.5.1.4.1.1.6.1", "1.2.840.10008.5.1.4.1.1.3.1",
    "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.20", "1.2.840.10008.5.1.4.1.1.128",
    "1.2.840.10008.5.1.4.1.1.12.1", "1.2.840.10008.5.1.4.1.1.12.2", "1.2.840.10008.5.1.4.1.1.481.1",
    "1.2.840.10008.5.1.4.1.1.481.2", "1.2.840.10008.5.1.4.1.1.481.3", "1.2.840.10008.5.1.4.1.1.481.5",
    "1.2.840.10008.5.1.4.1.1.88.11", "1.2.840.10008.5.1.4.1.1.88.22", "1.2.840.10008.5.1.4.1.1.88.33",
    "1.2.840.10008.5.1.4.1.1.104.1", "1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.1.2.1",
)
MAX_CONTEXTS = 128

_TAG = re.compile(r"^[0-9A-Fa-f]{8}$")
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class RemoteQueryError(ValueError):
    """A query or retrieve request that is not valid (HTTP 400)."""


class RemoteUnavailable(Exception):
    """The remote could not be reached or answered with a failure (HTTP 502, or 504 on a timeout)."""

    def __init__(self, message: str, timeout: bool = False) -> None:
        super().__init__(message)
        self.timeout = timeout


@dataclass(frozen=True)
class Remote:
    """A remote archive by its name: a DICOM node (``ae``) or a DICOMweb peer (``web``)."""

    name: str
    ae: RemoteAE | None = None
    web: RemoteDicomweb | None = None

    @property
    def protocol(self) -> str:
        return "dicomweb" if self.web is not None else "dimse"

    @property
    def methods(self) -> tuple[str, ...]:
        return ("wado",) if self.web is not None else ("move", "get")

    def describe(self) -> str:
        if self.web is not None:
            return self.web.url
        assert self.ae is not None
        return f"{self.ae.aet}@{self.ae.host}:{self.ae.port}"


def remotes(settings: Settings) -> dict[str, Remote]:
    """Every remote archive: the DICOM nodes (TOML + index), then the DICOMweb peers of names not taken."""
    out = {name: Remote(name, ae=ae) for name, ae in remote_aes_for(settings).items()}
    for name, web in settings.remote_dicomweb.items():
        out.setdefault(name, Remote(name, web=web))
    return out


def find_remote(settings: Settings, name: str) -> Remote | None:
    return remotes(settings).get(name)


# ---------------------------------------------------------------------------------------------------------------------
# query keys (pure)


def _vr(keyword: str) -> str:
    tag = int(keyword, 16) if _TAG.match(keyword) else tag_for_keyword(keyword)
    try:
        return str(dictionary_VR(tag)).split(" or ")[0] if tag is not None else "UN"
    except KeyError:
        return "UN"


def _keyword(key: str) -> str:
    try:
        return keyword_of(key)
    except QueryError:
        raise RemoteQueryError(f"unknown attribute {key!r} in the query (use a DICOM keyword or 8-hex-digit tag)"
                               ) from None


def check_uid(value: str, what: str) -> str:
    v = value.strip()
    if not v or len(v) > 64 or not _UID.match(v):
        raise RemoteQueryError(f"{what}: not a valid UID: {value[:80]!r}")
    return v


@dataclass
class RemoteQuery:
    """A query on a remote archive, from QIDO-RS style parameters: matching keys, return keys, limit."""

    level: str
    filters: dict[str, str] = field(default_factory=dict)
    return_keys: list[str] = field(default_factory=list)
    limit: int = DEFAULT_LIMIT
    fuzzy: bool = False

    def qido_params(self) -> list[tuple[str, str]]:
        """The QIDO-RS parameters of this query (the path UIDs are in the URL, not here)."""
        out = [(k, v) for k, v in self.filters.items() if k not in self.path_keys()]
        out += [("includefield", k) for k in self.return_keys if k not in RETURN_KEYS[self.level]
                and k not in self.filters]
        if self.fuzzy:
            out.append(("fuzzymatching", "true"))
        out.append(("limit", str(self.limit)))
        return out

    def path_keys(self) -> tuple[str, ...]:
        return {"SERIES": ("StudyInstanceUID",),
                "IMAGE": ("StudyInstanceUID", "SeriesInstanceUID")}.get(self.level, ())


def build_query(level: str, params: Sequence[tuple[str, str]], path: Mapping[str, str] | None = None,
                max_limit: int = MAX_RESULTS) -> RemoteQuery:
    """A RemoteQuery from the (key, value) pairs of a request: keywords or tags as in QIDO-RS (a key given several
    times, or a UID list separated by commas, becomes a backslash list), ``limit``, ``includefield``,
    ``fuzzymatching``; ``path`` holds the UIDs of the resource path, which win over the same keys."""
    if level not in LEVELS:
        raise RemoteQueryError(f"level: one of {', '.join(LEVELS)}")
    q = RemoteQuery(level=level)
    for raw_key, raw_value in params:
        key, value = raw_key.strip(), raw_value.strip()
        lkey = key.lower()
        if lkey in RESERVED:
            if lkey == "limit":
                if not value.isdigit() or not 1 <= int(value) <= 10**6:
                    raise RemoteQueryError(f"limit: a positive integer, not {value!r}")
                q.limit = min(int(value), max_limit)
            elif lkey == "includefield":
                for f in (p.strip() for p in value.split(",")):
                    if f and f.lower() != "all":
                        kw = _keyword(f)
                        if kw not in q.return_keys:
                            q.return_keys.append(kw)
            elif lkey == "fuzzymatching":
                if value.lower() not in ("true", "false"):
                    raise RemoteQueryError(f"fuzzymatching: true or false, not {value!r}")
                q.fuzzy = value.lower() == "true"
            continue  # offset: not offered by C-FIND, ignored
        if not key:
            raise RemoteQueryError("empty query parameter name")
        if "." in key:
            raise RemoteQueryError(f"{key}: matching on sequence attributes is not supported for remote queries")
        kw = _keyword(key)
        vr = _vr(kw)
        if vr == "SQ":
            raise RemoteQueryError(f"{kw}: matching on sequence attributes is not supported for remote queries")
        if vr == "UI":
            value = "\\".join(check_uid(u, kw) for u in re.split(r"[,\\]", value) if u.strip())
        if any(ord(c) < 0x20 for c in value) or len(value) > 1024:
            raise RemoteQueryError(f"{kw}: control characters or a value too long")
        if kw in q.filters and value:
            if vr != "UI":
                raise RemoteQueryError(f"{kw} given more than once (only UID attributes take a list)")
            value = q.filters[kw] + "\\" + value
        q.filters[kw] = value
    for k, v in (path or {}).items():
        q.filters[k] = check_uid(v, k)
    for k in RETURN_KEYS[level]:
        if k not in q.return_keys:
            q.return_keys.append(k)
    return q


def identifier(q: RemoteQuery) -> Dataset:
    """The C-FIND identifier of a query: QueryRetrieveLevel, the matching keys with their values, the return keys
    empty (universal matching)."""
    ds = Dataset()
    ds.QueryRetrieveLevel = q.level
    for k in q.return_keys:
        if k not in q.filters:
            setattr(ds, k, "") if not _TAG.match(k) else ds.add_new(int(k, 16), _vr(k), "")
    for k, v in q.filters.items():
        if _TAG.match(k):
            ds.add_new(int(k, 16), _vr(k), v)
        else:
            setattr(ds, k, v)
    return ds


def result_json(ds: Dataset) -> dict[str, Any]:
    """One C-FIND match as DICOM JSON, without the query's own bookkeeping attributes."""
    for tag in (0x00080052, 0x00080005, 0x00000000):  # QueryRetrieveLevel, SpecificCharacterSet (decoded already)
        if tag in ds:
            del ds[tag]
    return dataset_to_json(ds)


def _json_value(j: Mapping[str, Any], tag: str) -> str:
    v = (j.get(tag) or {}).get("Value") or []
    return str(v[0]) if v else ""


# ---------------------------------------------------------------------------------------------------------------------
# DIMSE: C-FIND, C-MOVE, C-GET SCU with pynetdicom


def _status(ds: Dataset | None) -> int | None:
    return int(ds.Status) if ds is not None and "Status" in ds else None


class DimseClient:
    """Associations from our AE title to one remote node (blocking: run it in a worker thread)."""

    def __init__(self, settings: Settings, remote: RemoteAE, timeout: float | None = None) -> None:
        self.settings = settings
        self.remote = remote
        self.timeout = timeout or settings.dimse_timeout

    @contextmanager
    def associate(self, contexts: Sequence[tuple[str, Sequence[str]]], *, roles: Sequence[str] = (),
                  handlers: Sequence[tuple[Any, Callable[..., Any]]] = ()) -> Iterator[Any]:
        from pynetdicom import AE, build_role

        quiet = logging.getLogger("pynetdicom")
        if quiet.level == logging.NOTSET:  # its INFO lines dump every identifier (patient data) into our log
            quiet.setLevel(logging.WARNING)
        ae = AE(ae_title=self.settings.aet)
        ae.maximum_pdu_size = 0
        for abstract, syntaxes in contexts[:MAX_CONTEXTS]:
            ae.add_requested_context(abstract, list(syntaxes))
        ae.acse_timeout = ae.network_timeout = ae.connection_timeout = min(self.timeout, 30.0)
        ae.dimse_timeout = self.timeout
        r = self.remote
        tls_args = None
        if r.tls:
            from ..dimse.access import client_tls_context  # noqa: PLC0415 - the one BCP195 client context

            tls_args = (client_tls_context(self.settings), r.host)
        ext: list[Any] = [build_role(cls, scp_role=True) for cls in roles]
        where = f"{r.aet} at {r.host}:{r.port}"
        try:
            try:
                assoc = ae.associate(r.host, r.port, ae_title=r.aet, tls_args=tls_args, ext_neg=ext or None,
                                     evt_handlers=list(handlers))
            except (TimeoutError, OSError) as exc:
                raise RemoteUnavailable(f"cannot connect to {where}: {exc}") from exc
            if not assoc.is_established:
                if assoc.is_rejected:
                    raise RemoteUnavailable(f"{where} rejected the association (does it know AE title "
                                            f"{self.settings.aet}?)")
                raise RemoteUnavailable(f"no association with {where} (connection refused, unreachable or "
                                        "timed out)", timeout=False)
            try:
                yield assoc
            finally:
                if assoc.is_established:
                    assoc.release()
                if assoc.is_alive():
                    assoc.abort()
        finally:
            ae.shutdown()

    def find(self, q: RemoteQuery) -> tuple[list[Dataset], bool]:
        """The matches (at most ``q.limit``) and whether there were more (the query was then cancelled)."""
        model = PATIENT_FIND if q.level == "PATIENT" else STUDY_FIND
        ident = identifier(q)
        found: list[Dataset] = []
        more = False
        with self.associate([(model, GET_SYNTAXES[:2])]) as assoc:
            if not any(c.abstract_syntax == model for c in assoc.accepted_contexts):
                raise RemoteUnavailable(f"{self.remote.aet} does not offer C-FIND ({'Patient' if model == PATIENT_FIND else 'Study'}"
                                        " Root)")
            for status, ds in assoc.send_c_find(ident, model):
                code = _status(status)
                if code is None:
                    raise RemoteUnavailable(f"no C-FIND response from {self.remote.aet} within {self.timeout:.0f}s "
                                            "(or the association was aborted)", timeout=True)
                if code in (0xFF00, 0xFF01):
                    if len(found) >= q.limit:
                        more = True
                        assoc.abort()
                        break
                    if ds is not None:
                        found.append(ds)
                    continue
                if code == 0:
                    break
                comment = str(getattr(status, "ErrorComment", "") or "")
                raise RemoteUnavailable(f"{self.remote.aet} answered C-FIND with status 0x{code:04X}"
                                        + (f": {comment}" if comment else ""))
        return found, more


# ---------------------------------------------------------------------------------------------------------------------
# DICOMweb: QIDO-RS and WADO-RS with the standard library's HTTP client (no dependency beyond Python)


class WebClient:
    def __init__(self, peer: RemoteDicomweb) -> None:
        self.peer = peer
        self.root = peer.url.rstrip("/")

    def _headers(self, accept: str) -> dict[str, str]:
        h = {"Accept": accept, "User-Agent": "OpenPACS"}
        if self.peer.token:
            h["Authorization"] = f"Bearer {self.peer.token}"
        elif self.peer.username:
            cred = base64.b64encode(f"{self.peer.username}:{self.peer.password}".encode()).decode()
            h["Authorization"] = f"Basic {cred}"
        return h

    def _open(self, path: str, accept: str, params: Sequence[tuple[str, str]] = ()) -> Any:
        url = self.root + path + (("?" + urllib.parse.urlencode(list(params))) if params else "")
        req = urllib.request.Request(url, headers=self._headers(accept))
        ctx = None
        if url.startswith("https:"):
            ctx = ssl.create_default_context()
            if not self.peer.verify_tls:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=ctx))
        try:
            return opener.open(req, timeout=self.peer.timeout)
        except urllib.error.HTTPError as e:
            body = e.read(500).decode("utf-8", "replace").strip()
            if e.code == 404:
                return None  # the caller decides (an unknown study)
            raise RemoteUnavailable(f"{self.root} answered {e.code} {e.reason}" + (f": {body}" if body else "")
                                    ) from None
        except TimeoutError as e:
            raise RemoteUnavailable(f"{self.root}: no answer within {self.peer.timeout:.0f}s", timeout=True
                                    ) from e
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            if isinstance(reason, (TimeoutError, socket.timeout)):
                raise RemoteUnavailable(f"{self.root}: no answer within {self.peer.timeout:.0f}s", timeout=True
                                        ) from e
            raise RemoteUnavailable(f"cannot reach {self.root}: {reason}") from e

    def qido(self, q: RemoteQuery) -> list[dict[str, Any]]:
        path = {"PATIENT": "/studies", "STUDY": "/studies"}.get(q.level)
        if q.level == "SERIES":
            study = q.filters.get("StudyInstanceUID", "")
            path = f"/studies/{study}/series" if study and "\\" not in study else "/series"
        elif q.level == "IMAGE":
            study, series = q.filters.get("StudyInstanceUID", ""), q.filters.get("SeriesInstanceUID", "")
            if study and series and "\\" not in study + series:
                path = f"/studies/{study}/series/{series}/instances"
            elif study and "\\" not in study:
                path = f"/studies/{study}/instances"
            else:
                path = "/instances"
        assert path is not None
        params = [(k, v) for k, v in q.qido_params() if not path.startswith("/studies/") or k not in q.path_keys()
                  or (k == "SeriesInstanceUID" and "/series/" not in path)]
        if q.level in ("SERIES", "IMAGE") and not path.startswith("/studies/"):
            params += [(k, q.filters[k]) for k in q.path_keys() if k in q.filters]
        resp = self._open(path, "application/dicom+json", params)
        if resp is None:
            return []
        with resp:
            if resp.status == 204:
                return []
            raw = resp.read()
        if not raw.strip():
            return []
        try:
            doc = json.loads(raw)
        except ValueError:
            raise RemoteUnavailable(f"{self.root}: QIDO-RS answer is not JSON") from None
        if not isinstance(doc, list):
            raise RemoteUnavailable(f"{self.root}: QIDO-RS answer is not a JSON array")
        return [d for d in doc if isinstance(d, dict)][: q.limit]

    def wado(self, path: str) -> Iterator[bytes]:
        """The Part 10 files of a WADO-RS resource, as stored by the peer."""
        resp = self._open(path, WADO_ACCEPT)
        if resp is None:
            return
        with resp:
            ctype = resp.headers.get("Content-Type", "")
            boundary = multipart_boundary(ctype)
            if boundary is None:
                raise RemoteUnavailable(f"{self.root}{path}: not a multipart answer ({ctype or 'no Content-Type'})")
            yield from split_multipart(iter(lambda: resp.read(1 << 20), b""), boundary)


def multipart_boundary(content_type: str) -> bytes | None:
    if not content_type.lower().startswith("multipart/"):
        return None
    m = re.search(r'boundary\s*=\s*(?:"([^"]+)"|([^;\s]+))', content_type, re.I)
    return (m.group(1) or m.group(2)).encode("latin-1") if m else None


def split_multipart(chunks: Iterator[bytes], boundary: bytes) -> Iterator[bytes]:
    """The bodies of a multipart stream (RFC 2046), one at a time, without holding the whole stream."""
    delim = b"\r\n--" + boundary
    buf = bytearray(b"\r\n")  # the first delimiter need not follow a CRLF
    scan = 0  # where the next delimiter may start (what is before was searched already)
    started = False
    for chunk in chunks:
        buf += chunk
        while True:
            i = buf.find(delim, scan)
            if i < 0:
                if not started and len(buf) > len(delim):
                    del buf[:len(buf) - len(delim)]  # the preamble
                scan = max(0, len(buf) - len(delim))
                break
            j = i + len(delim)
            if len(buf) < j + 2:
                scan = i
                break
            closing = buf[j:j + 2] == b"--"
            nl = -1 if closing else buf.find(b"\r\n", j)
            if not closing and nl < 0:
                scan = i
                break
            if started:
                part = bytes(buf[:i])
                if part.startswith(b"\r\n"):  # a part without headers
                    yield part[2:]
                else:
                    _head, sep, body = part.partition(b"\r\n\r\n")
                    yield body if sep else b""
            if closing:
                return
            started = True
            del buf[:nl + 2]
            scan = 0
    raise RemoteUnavailable("multipart answer ended before its closing boundary")


# ---------------------------------------------------------------------------------------------------------------------
# queries


def query(settings: Settings, remote: Remote, q: RemoteQuery) -> tuple[list[dict[str, Any]], bool]:
    """DICOM JSON matches of a query on the remote (blocking), and whether there were more than ``q.limit``."""
    if remote.web is not None:
        wanted = q.limit
        q.limit = wanted + 1  # one more tells whether there were more
        try:
            found = WebClient(remote.web).qido(q)
        finally:
            q.limit = wanted
        return found[:wanted], len(found) > wanted
    assert remote.ae is not None
    matches, more = DimseClient(settings, remote.ae).find(q)
    return [result_json(ds) for ds in matches], more


# ---------------------------------------------------------------------------------------------------------------------
# retrieve jobs


@dataclass
class RetrieveRequest:
    level: str
    uids: list[str]
    study: str = ""
    series: str = ""
    method: str = "move"


def validate_request(remote: Remote, level: str, uids: Sequence[str], study: str = "", series: str = "",
                     method: str | None = None) -> RetrieveRequest:
    level = (level or "").upper()
    if level == "INSTANCE":
        level = "IMAGE"
    if level not in LEVELS:
        raise RemoteQueryError(f"level: one of {', '.join(LEVELS)}")
    method = (method or remote.methods[0]).lower()
    if method not in remote.methods:
        raise RemoteQueryError(f"method: {remote.name} is a {remote.protocol} peer: one of "
                               f"{', '.join(remote.methods)}")
    if level == "PATIENT":
        ids = [u.strip() for u in uids if u and u.strip()]
        if any(len(u) > 64 or any(ord(c) < 0x20 or c in "\\*?" for c in u) for u in ids):
            raise RemoteQueryError("uids: Patient IDs of at most 64 characters, no wildcard or backslash")
        if method == "wado":
            raise RemoteQueryError("a DICOMweb peer retrieves studies, series or instances, not patients")
    else:
        ids = [check_uid(u, "uids") for u in uids if u and u.strip()]
    if not ids:
        raise RemoteQueryError("nothing to retrieve: no UID given")
    if len(ids) > 1000:
        raise RemoteQueryError("at most 1000 UIDs in one retrieve")
    study = check_uid(study, "StudyInstanceUID") if study else ""
    series = check_uid(series, "SeriesInstanceUID") if series else ""
    if level in ("SERIES", "IMAGE") and not study:
        raise RemoteQueryError(f"StudyInstanceUID: required to retrieve at the {level.lower()} level")
    if level == "IMAGE" and not series:
        raise RemoteQueryError("SeriesInstanceUID: required to retrieve instances")
    return RetrieveRequest(level, list(dict.fromkeys(ids)), study, series, method)


def submit_retrieve(queue: JobQueue, remote: Remote, req: RetrieveRequest, *, priority: int = 0,
                    user: str = "") -> Job:
    payload: dict[str, Any] = {"node": remote.name, "protocol": remote.protocol, "level": req.level,
                               "uids": req.uids, "method": req.method, "user": user}
    if req.study:
        payload["StudyInstanceUID"] = req.study
    if req.series:
        payload["SeriesInstanceUID"] = req.series
    return queue.submit(KIND, payload, priority=priority, destination=remote.name, max_attempts=3)


def _final_response(assoc: Any, responses: Any, op: str, aet: str, jc: JobContext,
                    on_pending: Any = None) -> Dataset:
    """The final response of a C-MOVE or C-GET (pynetdicom's generator of (status, identifier)): pending ones are
    skipped (``on_pending`` called for each), a stopped job aborts the association."""
    for status, _ident in responses:
        code = _status(status)
        if code is None:
            raise RemoteUnavailable(f"no {op} response from {aet} (timeout or abort)", timeout=True)
        if code in (0xFF00, 0xFF01):
            if on_pending is not None:
                on_pending()
            if jc.stopped is not None:
                assoc.abort()
                raise JobStopped(jc.stopped)
            continue
        return status  # type: ignore[no-any-return]
    raise RemoteUnavailable(f"{op} {'to' if op == 'C-MOVE' else 'from'} {aet} ended without a final response")


def _tally(final: Dataset, counts: dict[str, int], statuses: list[str]) -> int:
    """Add a final response's sub-operation counts, and its status when not success; returns the status."""
    for key, attr in (("completed", "NumberOfCompletedSuboperations"), ("failed", "NumberOfFailedSuboperations"),
                      ("warning", "NumberOfWarningSuboperations")):
        counts[key] += int(getattr(final, attr, 0) or 0)
    code = int(final.Status)
    if code != 0:
        comment = str(getattr(final, "ErrorComment", "") or "")
        statuses.append(f"0x{code:04X}" + (f" {comment}" if comment else ""))
    return code


@dataclass
class Found:
    """An instance the remote holds: the UIDs the retrieve needs."""

    study: str
    series: str
    sop: str
    sop_class: str = ""


class Retriever:
    """Runs ``retrieve`` jobs: lists the instances, then C-MOVE, C-GET or WADO-RS them into the archive."""

    def __init__(self, ctx: Any, queue: JobQueue) -> None:
        self.ctx = ctx
        self.settings: Settings = ctx.settings
        self.queue = queue

    async def __call__(self, jc: JobContext) -> None:
        import asyncio

        await asyncio.to_thread(self.run, jc)

    # -- the whole job, in a worker thread -------------------------------------------------------------------
    def run(self, jc: JobContext) -> None:
        job = jc.job
        p = job.payload
        name = str(p.get("node") or job.destination or "")
        remote = find_remote(self.settings, name)
        if remote is None:
            raise PermanentError(f"remote node {name!r} unknown (no such node, [remote_aes.*] or [remote_dicomweb.*])")
        try:
            req = validate_request(remote, str(p.get("level", "")), list(p.get("uids") or []),
                                   str(p.get("StudyInstanceUID") or ""), str(p.get("SeriesInstanceUID") or ""),
                                   str(p.get("method") or "") or None)
        except RemoteQueryError as e:
            raise PermanentError(str(e)) from None
        try:
            if not p.get("listed"):
                found = self.list_instances(remote, req)
                if not found:
                    raise PermanentError(f"{remote.name} holds no instance of {req.level.lower()} "
                                         f"{', '.join(req.uids[:3])}")
                self._add_items(job, found)
            jc.check()
            if req.method == "move":
                self._move(jc, remote, req)
            elif req.method == "get":
                self._get(jc, remote, req)
            else:
                self._wado(jc, remote, req)
        except RemoteUnavailable as e:
            raise ConnectionError(str(e)) from None  # retried with backoff
        left = self.queue.pending_items(job.id)
        if left:
            first = next((i for i in left if i.error), left[0])
            raise RuntimeError(f"{len(left)} instance(s) not retrieved from {remote.name}"
                               + (f": {first.sop_instance_uid}: {first.error}" if first.error else ""))

    # -- listing ---------------------------------------------------------------------------------------------
    def list_instances(self, remote: Remote, req: RetrieveRequest) -> list[Found]:
        if remote.web is not None:
            return self._list_web(remote.web, req)
        assert remote.ae is not None
        client = DimseClient(self.settings, remote.ae)

        def find(level: str, **keys: str) -> list[dict[str, Any]]:
            q = build_query(level, [(k, v) for k, v in keys.items()], max_limit=10**6)
            q.limit = 10**6
            if level == "IMAGE":
                q.return_keys = ["SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID"]
            elif level == "SERIES":
                q.return_keys = ["SeriesInstanceUID", "StudyInstanceUID"]
            else:
                q.return_keys = ["StudyInstanceUID"]
            return [result_json(d) for d in client.find(q)[0]]

        studies: list[str] = []
        out: list[Found] = []
        if req.level == "PATIENT":
            for pid in req.uids:
                studies += [_json_value(j, "0020000D") for j in find("STUDY", PatientID=pid)]
        elif req.level == "STUDY":
            studies = list(req.uids)
        series: list[tuple[str, str]] = []
        for st in dict.fromkeys(s for s in studies if s):
            series += [(st, _json_value(j, "0020000E")) for j in find("SERIES", StudyInstanceUID=st)]
        if req.level == "SERIES":
            series = [(req.study, s) for s in req.uids]
        if req.level == "IMAGE":
            wanted = set(req.uids)
            rows = find("IMAGE", StudyInstanceUID=req.study, SeriesInstanceUID=req.series)
            return [Found(req.study, req.series, _json_value(j, "00080018"), _json_value(j, "00080016"))
                    for j in rows if _json_value(j, "00080018") in wanted]
        for st, se in series:
            if not se:
                continue
            for j in find("IMAGE", StudyInstanceUID=st, SeriesInstanceUID=se):
                sop = _json_value(j, "00080018")
                if sop:
                    out.append(Found(st, se, sop, _json_value(j, "00080016")))
        return out

    def _list_web(self, peer: RemoteDicomweb, req: RetrieveRequest) -> list[Found]:
        client = WebClient(peer)
        out: list[Found] = []

        def instances(study: str, series: str = "") -> list[Found]:
            params = [("SeriesInstanceUID", series)] if series else []
            q = build_query("IMAGE", params, {"StudyInstanceUID": study}, max_limit=10**6)
            q.limit = 10**6
            return [Found(study, _json_value(j, "0020000E") or series, _json_value(j, "00080018"),
                          _json_value(j, "00080016")) for j in client.qido(q)]

        if req.level == "STUDY":
            for st in req.uids:
                out += instances(st)
        elif req.level == "SERIES":
            for se in req.uids:
                out += instances(req.study, se)
        else:
            wanted = set(req.uids)
            out = [f for f in instances(req.study, req.series) if f.sop in wanted]
        return [f for f in out if f.sop]

    def _add_items(self, job: Job, found: Sequence[Found]) -> None:
        """One job item per instance found, and what the fetch needs in the payload (the series, the classes)."""
        payload = dict(job.payload)
        payload["listed"] = True
        payload["series"] = sorted({(f.study, f.series) for f in found})[:10000]
        payload["sop_classes"] = sorted({f.sop_class for f in found if f.sop_class})
        t = now()
        with self.queue.index.write_engine.begin() as c:
            known = set(c.execute(select(job_items.c.sop_instance_uid).where(job_items.c.job_id == job.id))
                        .scalars())
            start = int(c.execute(select(func.coalesce(func.max(job_items.c.seq), -1))
                                  .where(job_items.c.job_id == job.id)).scalar_one()) + 1
            new = [u for u in dict.fromkeys(f.sop for f in found) if u not in known]
            if new:
                c.execute(job_items.insert(), [
                    {"job_id": job.id, "seq": start + i, "sop_instance_uid": u, "state": "pending", "bytes": 0,
                     "updated_at": t} for i, u in enumerate(new)])
            c.execute(update(jobs).where(jobs.c.id == job.id).values(
                total=jobs.c.total + len(new), payload=json.dumps(payload), updated_at=t))
        job.payload = payload
        job.total += len(new)

    def _save_payload(self, job: Job, **values: Any) -> None:
        job.payload = {**job.payload, **values}
        with self.queue.index.write_engine.begin() as c:
            c.execute(update(jobs).where(jobs.c.id == job.id).values(payload=json.dumps(job.payload),
                                                                    updated_at=now()))

    def _ack_present(self, job: Job) -> int:
        """Acknowledge the pending items whose instance is now in the index; how many."""
        pending = {i.sop_instance_uid: i for i in self.queue.pending_items(job.id)}
        uids = list(pending)
        acked = 0
        for k in range(0, len(uids), 500):
            with self.queue.index.engine.connect() as c:
                rows = c.execute(select(instances.c.sop_instance_uid, instances.c.size_bytes)
                                 .where(instances.c.sop_instance_uid.in_(uids[k:k + 500]))).all()
            for sop, size in rows:
                self.queue.ack(job.id, pending[sop].seq, 0, int(size or 0))
                acked += 1
        return acked

    # -- C-MOVE ----------------------------------------------------------------------------------------------
    def _move_identifiers(self, req: RetrieveRequest) -> list[tuple[str, Dataset]]:
        out: list[tuple[str, Dataset]] = []
        for uid in req.uids if req.level != "IMAGE" else ["\\".join(req.uids)]:
            ds = Dataset()
            ds.QueryRetrieveLevel = req.level
            if req.level == "PATIENT":
                ds.PatientID = uid
                out.append((PATIENT_MOVE, ds))
                continue
            if req.level == "STUDY":
                ds.StudyInstanceUID = uid
            elif req.level == "SERIES":
                ds.StudyInstanceUID = req.study
                ds.SeriesInstanceUID = uid
            else:
                ds.StudyInstanceUID = req.study
                ds.SeriesInstanceUID = req.series
                ds.SOPInstanceUID = uid
            out.append((STUDY_MOVE, ds))
        return out

    def _move(self, jc: JobContext, remote: Remote, req: RetrieveRequest) -> None:
        assert remote.ae is not None
        job = jc.job
        client = DimseClient(self.settings, remote.ae, timeout=max(self.settings.dimse_timeout, 120.0))
        counts = {"completed": 0, "failed": 0, "warning": 0}
        statuses: list[str] = []
        idents = self._move_identifiers(req)
        models = sorted({m for m, _ in idents})
        with client.associate([(m, GET_SYNTAXES[:2]) for m in models]) as assoc:
            for model, ds in idents:
                last = [time.monotonic()]

                def pending(last: list[float] = last) -> None:
                    if time.monotonic() - last[0] > 0.5:
                        self._ack_present(job)
                        last[0] = time.monotonic()

                final = _final_response(assoc, assoc.send_c_move(ds, self.settings.aet, model),
                                        "C-MOVE", remote.ae.aet, jc, pending)
                code = _tally(final, counts, statuses)
                if code == 0xA801:  # retrying cannot help: the remote must be told about us first
                    self._save_payload(job, remote={**counts, "statuses": ["0xA801"]})
                    raise PermanentError(f"{remote.ae.aet} does not know the move destination {self.settings.aet} "
                                         f"(status 0xA801): add AE title {self.settings.aet} with our address and "
                                         f"DICOM port {self.settings.dicom_port} to its modalities, or use C-GET")
        self._ack_present(job)
        self._save_payload(job, remote={**counts, "statuses": statuses})
        failed_status = next((int(s.split()[0], 16) for s in statuses), None)
        for item in self.queue.pending_items(job.id):
            self.queue.item_failed(job.id, item.seq, failed_status,
                                   f"not received from {remote.ae.aet} (C-MOVE "
                                   f"{'status ' + statuses[0] if statuses else 'success'}; "
                                   f"{counts['completed']} completed, {counts['failed']} failed)")

    # -- C-GET -----------------------------------------------------------------------------------------------
    def _get_contexts(self, classes: Sequence[str], model: str) -> list[tuple[str, Sequence[str]]]:
        budget = MAX_CONTEXTS - 1
        classes = list(dict.fromkeys(classes)) or list(COMMON_STORAGE)
        if len(classes) * len(GET_SYNTAXES) <= budget:
            ctxs = [(c, [ts]) for c in classes for ts in GET_SYNTAXES]
        else:
            ctxs = [(c, list(GET_SYNTAXES)) for c in classes[:budget]]
        return [(model, GET_SYNTAXES[:2]), *ctxs]

    def _get(self, jc: JobContext, remote: Remote, req: RetrieveRequest) -> None:
        from pynetdicom import evt

        assert remote.ae is not None
        job = jc.job
        seqs = {i.sop_instance_uid: i.seq for i in self.queue.items(job.id)}
        source = Source(protocol="DIMSE", calling_aet=remote.ae.aet, called_aet=self.settings.aet,
                        address=f"{remote.ae.host}:{remote.ae.port}", user=str(job.payload.get("user") or ""))
        lock = threading.Lock()
        counts = {"completed": 0, "failed": 0, "warning": 0}
        statuses: list[str] = []

        def on_store(event: Any) -> int:
            if jc.stopped is not None:
                return 0xA700
            rq = event.request
            sop_class = str(rq.AffectedSOPClassUID)
            sop = str(rq.AffectedSOPInstanceUID)
            data = rq.DataSet.getvalue()
            try:
                outcome = self.ctx.ingest.store_dataset([data], str(event.context.transfer_syntax), sop_class, sop,
                                                        source)
            except Exception as exc:  # noqa: BLE001 - answered as a failure, the job goes on
                log.exception("C-GET store of %s failed", sop)
                seq = seqs.get(sop)
                if seq is not None:
                    self.queue.item_failed(job.id, seq, 0x0110, f"processing failure: {exc}")
                return 0x0110
            seq = seqs.get(sop)
            with lock:
                if seq is not None:
                    if outcome.ok:
                        self.queue.ack(job.id, seq, outcome.status, len(data))
                    else:
                        self.queue.item_failed(job.id, seq, outcome.status, outcome.message or "refused by ingest")
            return int(outcome.status)

        classes = list(job.payload.get("sop_classes") or [])
        model = PATIENT_GET if req.level == "PATIENT" else STUDY_GET
        contexts = self._get_contexts(classes, model)
        roles = list(dict.fromkeys(c for c, _ in contexts[1:]))
        client = DimseClient(self.settings, remote.ae, timeout=max(self.settings.dimse_timeout, 120.0))
        idents = [(PATIENT_GET if m == PATIENT_MOVE else STUDY_GET, ds) for m, ds in self._move_identifiers(req)]
        with client.associate(contexts, roles=roles, handlers=[(evt.EVT_C_STORE, on_store)]) as assoc:
            if not any(c.abstract_syntax == model for c in assoc.accepted_contexts):
                raise PermanentError(f"{remote.ae.aet} does not accept C-GET")
            for m, ds in idents:
                final = _final_response(assoc, assoc.send_c_get(ds, m), "C-GET", remote.ae.aet, jc)
                _tally(final, counts, statuses)
        self._save_payload(job, remote={**counts, "statuses": statuses})
        self._ack_present(job)  # sent before (an earlier attempt) and answered as a duplicate
        for item in self.queue.pending_items(job.id):
            if not item.error:
                self.queue.item_failed(job.id, item.seq, None, f"not sent by {remote.ae.aet} (C-GET "
                                       f"{'status ' + statuses[0] if statuses else 'success'})")

    # -- WADO-RS ---------------------------------------------------------------------------------------------
    def _wado(self, jc: JobContext, remote: Remote, req: RetrieveRequest) -> None:
        assert remote.web is not None
        job = jc.job
        client = WebClient(remote.web)
        pending = {i.sop_instance_uid: i for i in self.queue.pending_items(job.id)}
        # the peer's name as the calling AE: what came from it is known as such (prefetch rules do not fire again
        # for priors they fetched; routing conditions on CallingAETitle see it)
        source = Source(protocol="DICOMWEB", calling_aet=remote.name[:16], address=remote.web.url,
                        user=str(job.payload.get("user") or ""))
        if req.level == "IMAGE":
            paths = [f"/studies/{req.study}/series/{req.series}/instances/{u}" for u in req.uids if u in pending]
        else:
            paths = [f"/studies/{st}/series/{se}" for st, se in job.payload.get("series") or []]
        for path in paths:
            jc.check()
            for part in client.wado(path):
                jc.check()
                outcome = self.ctx.ingest.store_file(part, source)
                item = pending.get(outcome.sop_instance_uid)
                if item is None:
                    continue
                if outcome.ok:
                    self.queue.ack(job.id, item.seq, outcome.status, len(part))
                else:
                    self.queue.item_failed(job.id, item.seq, outcome.status, outcome.message or "refused by ingest")
        for item in self.queue.pending_items(job.id):
            if not item.error:
                self.queue.item_failed(job.id, item.seq, None, f"not in the WADO-RS answers of {remote.web.url}")
