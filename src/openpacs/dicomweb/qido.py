"""QIDO-RS (PS3.18 10.6): search parameters become a services.types.Query for the one query engine; results become
DICOM JSON with RetrieveURLs. No matching happens here.
"""

from __future__ import annotations

import re
import time
from typing import Any

from pydicom.datadict import dictionary_VR, tag_for_keyword
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..context import Context
from ..dicom.json import dumps
from ..services.query import QueryError, keyword_of
from ..services.types import Level, Query
from .common import (
    DICOM_XML,
    DicomWebError,
    check_uid,
    error_response,
    log,
    negotiate_metadata,
    request_departments,
    service_root,
    warning_header,
    xml_multipart_response,
)

# PS3.18 Table 10.6.1-5: attributes every result carries at each level (and the levels above for the "all" resources).
# InstanceAvailability and RetrieveURL are added here; TimezoneOffsetFromUTC is not kept by the index.
STUDY_DEFAULTS = [
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ModalitiesInStudy",
    "ReferringPhysicianName",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyID",
    "StudyDescription",  # not in the table, but every viewer's study list shows it
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
]
SERIES_DEFAULTS = [
    "Modality",
    "SeriesDescription",
    "SeriesInstanceUID",
    "SeriesNumber",
    "NumberOfSeriesRelatedInstances",
    "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime",
    "RequestAttributesSequence",
    "StudyInstanceUID",  # to build the RetrieveURL
]
INSTANCE_DEFAULTS = [
    "SOPClassUID",
    "SOPInstanceUID",
    "InstanceNumber",
    "Rows",
    "Columns",
    "BitsAllocated",
    "NumberOfFrames",
    "StudyInstanceUID",
    "SeriesInstanceUID",
]

# The parameters of PS3.18 8.3.4 that are not attribute matches.
RESERVED = {"limit", "offset", "includefield", "fuzzymatching", "emptyvaluematching", "multiplevaluematching", "accept",
            "charset", "emptyresultstatus"}
SEQUENCE_KEYS = {"RequestAttributesSequence"}
# PS3.18 8.3.4.4.1 / Table 14.4.3-1: no matching results is 204 (No Content). CP-2473 proposes 200 with an empty
# payload; the ``emptyresultstatus=200`` parameter (ours) gives that to clients that need it now.
EMPTY_RESULT_STATUS = 204
MAX_LIMIT = 10_000  # one response never holds more than this; the Warning header says when results were cut

_TAG_RE = re.compile(r"[0-9A-Fa-f]{8}")
_INT_RE = re.compile(r"\d{1,9}")


def _keyword(key: str) -> str:
    try:
        return keyword_of(key)
    except QueryError as e:
        raise DicomWebError(
            400, f"unknown attribute {key!r} in the query (use a DICOM keyword or 8-hex-digit tag)"
        ) from e


def _int_param(name: str, value: str) -> int:
    if not _INT_RE.fullmatch(value.strip()):
        raise DicomWebError(400, f"{name} must be a non-negative integer, not {value!r}")
    return int(value)


def _bool_param(name: str, value: str) -> bool:
    v = value.strip().lower()
    if v not in ("true", "false"):
        raise DicomWebError(400, f"{name} must be true or false, not {value!r}")
    return v == "true"


def _vr(keyword: str) -> str:
    tag = int(keyword, 16) if _TAG_RE.fullmatch(keyword) else tag_for_keyword(keyword)
    try:
        return dictionary_VR(tag).split(" or ")[0] if tag is not None else "UN"
    except KeyError:
        return "UN"


def build_query(request: Request, level: Level, path: dict[str, str]) -> tuple[Query, list[str], int | None]:
    """Query, warnings for the Warning header, and the server-side cap applied (None if the client set a limit)."""
    q = Query(level=level)
    single_values = False  # multiplevaluematching=false given explicitly
    warnings: list[str] = []
    seen: dict[str, str] = {}
    includes: list[str] = []
    for raw_key, value in request.query_params.multi_items():
        key = raw_key.strip()
        lkey = key.lower()
        if lkey in RESERVED:
            if lkey == "limit":
                q.limit = _int_param("limit", value)
            elif lkey == "offset":
                q.offset = _int_param("offset", value)
            elif lkey == "fuzzymatching":
                q.fuzzy = _bool_param(lkey, value)
            elif lkey == "emptyvaluematching":  # PS3.18 8.3.4.5
                q.empty_value_matching = _bool_param(lkey, value)
            elif lkey == "multiplevaluematching":  # PS3.18 8.3.4.6: values split by "\\" are alternatives
                single_values = not _bool_param(lkey, value)
            elif lkey == "includefield":
                includes += [f.strip() for f in value.split(",") if f.strip()]
            continue
        if not key:
            raise DicomWebError(400, "empty query parameter name")
        if "." in key:  # a sequence attribute path: only RequestAttributesSequence items are matched
            seq, _, sub = key.partition(".")
            seq_kw, sub_kw = _keyword(seq), _keyword(sub)
            if seq_kw in SEQUENCE_KEYS and "." not in sub:
                q.sequence_filters[sub_kw] = value
                if seq_kw not in q.return_keys:
                    q.return_keys.append(seq_kw)
            else:
                warnings.append(f"matching on {key} is not supported and was ignored")
            continue
        kw = _keyword(key)
        if "," in value and _vr(kw) == "UI":  # PS3.18 8.3.4.1: a UID list may be comma-separated
            value = value.replace(",", "\\")
        if kw in seen:
            if _vr(kw) != "UI":
                raise DicomWebError(400, f"{key} given more than once (only UID attributes take a list)")
            value = seen[kw] + "\\" + value
        seen[kw] = value
    for k, v in seen.items():
        if single_values and "\\" in v and _vr(k) != "UI":
            raise DicomWebError(400, f"{k} has several values ({v!r}) but multiplevaluematching=false was asked")
        if _vr(k) == "SQ":
            if k not in q.return_keys:
                q.return_keys.append(k)
            if v:
                warnings.append(f"matching on the sequence {k} is not supported and was ignored")
            continue
        q.filters[k] = v
    for k, v in path.items():  # the resource path wins over any same key in the query
        q.filters[k] = v
    for f in includes:
        if f.lower() == "all":
            q.include_all = True
            continue
        if "." in f:
            seq = _keyword(f.partition(".")[0])
            if seq not in q.return_keys:
                q.return_keys.append(seq)
            continue
        kw = _keyword(f)
        if kw not in q.return_keys and kw not in q.filters:
            q.return_keys.append(kw)
    for k in _defaults(level, path):
        if k not in q.return_keys and k not in q.filters:
            q.return_keys.append(k)
    cap: int | None = None
    if q.limit is None or q.limit > MAX_LIMIT:
        if q.limit is not None:
            warnings.append(f"limit reduced to the maximum of {MAX_LIMIT}")
        cap = MAX_LIMIT
        q.limit = MAX_LIMIT + 1  # one more tells whether results were cut
    return q, warnings, cap


def _defaults(level: Level, path: dict[str, str]) -> list[str]:
    if level == "STUDY":
        return STUDY_DEFAULTS
    if level == "SERIES":
        return SERIES_DEFAULTS if "StudyInstanceUID" in path else STUDY_DEFAULTS + SERIES_DEFAULTS
    if "SeriesInstanceUID" in path:
        return INSTANCE_DEFAULTS
    if "StudyInstanceUID" in path:
        return SERIES_DEFAULTS + INSTANCE_DEFAULTS
    return STUDY_DEFAULTS + SERIES_DEFAULTS + INSTANCE_DEFAULTS


_ONLINE = {"vr": "CS", "Value": ["ONLINE"]}


def _uid(j: dict[str, Any], key: str) -> str:
    v = j.get(key, {}).get("Value")
    return str(v[0]) if v else ""


def _complete(j: dict[str, Any], level: Level, root: str) -> dict[str, Any]:
    """Add InstanceAvailability and RetrieveURL (PS3.18 Table 10.6.1-5) to an encoded result, keys in tag order.

    Done on the JSON dict rather than the Dataset: building pydicom elements would cost more than the encoding."""
    study = _uid(j, "0020000D")
    if level == "STUDY":
        url = f"{root}/studies/{study}"
    elif level == "SERIES":
        url = f"{root}/studies/{study}/series/{_uid(j, '0020000E')}"
    else:
        url = f"{root}/studies/{study}/series/{_uid(j, '0020000E')}/instances/{_uid(j, '00080018')}"
    if level != "SERIES":
        j["00080056"] = _ONLINE
    j["00081190"] = {"vr": "UR", "Value": [url]}
    return dict(sorted(j.items()))


def run_search(ctx: Context, q: Query, level: Level, root: str, cap: int | None) -> tuple[list[dict[str, Any]], bool]:
    out: list[dict[str, Any]] = []
    more = False
    for j in ctx.query.find_json(q):  # encoded from the index rows, pydicom only for values read from files
        if cap is not None and len(out) >= cap:
            more = True
            break
        out.append(_complete(j, level, root))
    return out, more


def _handler(level: Level, path_keys: dict[str, str]):  # type: ignore[no-untyped-def]
    async def search(request: Request) -> Response:
        t0 = time.perf_counter()
        ctx: Context = request.app.state.ctx
        try:
            media = negotiate_metadata(request)
            path = {kw: check_uid(request.path_params[p]) for p, kw in path_keys.items()}
            q, warnings, cap = build_query(request, level, path)
            q.departments = request_departments(request)
            results, more = await run_in_threadpool(run_search, ctx, q, level, service_root(request), cap)
        except DicomWebError as e:
            return error_response(e.status, e.message, e.headers)
        except QueryError as e:
            return error_response(400, e.message)
        headers: dict[str, str] = {}
        if more:
            warnings.append("there are additional results that can be requested (use limit and offset)")
        if warnings:
            headers["Warning"] = ", ".join(warning_header(w) for w in warnings)
        monitor = getattr(ctx, "monitor", None)
        if monitor is not None:
            monitor.queried("qido", str(level), time.perf_counter() - t0)
        log.debug(
            "QIDO %s %s -> %d results in %.1f ms",
            level,
            request.url.query,
            len(results),
            (time.perf_counter() - t0) * 1000,
        )
        if not results:
            status = EMPTY_RESULT_STATUS
            if request.query_params.get("emptyresultstatus") == "200":
                status = 200
            if status == 204:
                return Response(status_code=204, headers=headers)
            if media == DICOM_XML:
                return xml_multipart_response([], headers)
            return Response(b"[]", status_code=200, media_type=media, headers=headers)
        if media == DICOM_XML:
            return xml_multipart_response(results, headers)
        return Response(dumps(results), media_type=media, headers=headers)

    return search


def routes(ctx: Context) -> list[Route]:
    study = {"study": "StudyInstanceUID"}
    study_series = {"study": "StudyInstanceUID", "series": "SeriesInstanceUID"}
    return [
        Route("/studies", _handler("STUDY", {}), methods=["GET"]),
        Route("/series", _handler("SERIES", {}), methods=["GET"]),
        Route("/instances", _handler("IMAGE", {}), methods=["GET"]),
        Route("/studies/{study}/series", _handler("SERIES", study), methods=["GET"]),
        Route("/studies/{study}/instances", _handler("IMAGE", study), methods=["GET"]),
        Route("/studies/{study}/series/{series}/instances", _handler("IMAGE", study_series), methods=["GET"]),
    ]
