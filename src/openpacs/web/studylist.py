"""A minimal study list page linking each study to the OHIF viewer, until the admin console exists.

Every value shown comes from DICOM data sent by modalities and is untrusted: it is HTML-escaped, links carry
percent-encoded UIDs, and a strict Content-Security-Policy (no script at all) backs that up.
"""

from __future__ import annotations

import html
import secrets
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlencode

from pydicom import Dataset
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Route

from ..services.query import QueryError
from ..services.types import Query
from .auth import departments_of
from .viewer import OHIF_PREFIX, viewer_url

STUDY_LIST_PATH = "/ui/studies"
PAGE_SIZE = 50
MAX_PAGE_SIZE = 500

# Search fields of the form: query parameter == DICOM keyword, matched by the one query engine (C-FIND rules).
SEARCH_KEYS = ("PatientName", "PatientID", "AccessionNumber", "StudyDate", "ModalitiesInStudy", "StudyDescription")
SEARCH_HINTS = {
    "PatientName": "Patient name (DOE*)",
    "PatientID": "Patient ID",
    "AccessionNumber": "Accession",
    "StudyDate": "Study date (20240101-20241231)",
    "ModalitiesInStudy": "Modality (CT)",
    "StudyDescription": "Description",
}
RETURN_KEYS = (
    "StudyInstanceUID",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyDescription",
    "ModalitiesInStudy",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
)
COLUMNS = (
    ("PatientName", "Patient"),
    ("PatientID", "Patient ID"),
    ("PatientBirthDate", "Birth date"),
    ("StudyDate", "Study date"),
    ("StudyDescription", "Description"),
    ("AccessionNumber", "Accession"),
    ("ModalitiesInStudy", "Modalities"),
    ("NumberOfStudyRelatedSeries", "Series"),
    ("NumberOfStudyRelatedInstances", "Instances"),
)

_STYLE = """
body{font:14px system-ui,sans-serif;margin:1.5em;color:#1a1f27;background:#f5f6f8}
h1{font-size:1.3em;margin:0 0 .8em}
form{display:flex;flex-wrap:wrap;gap:.5em;margin-bottom:1em}
input{padding:.3em .5em;border:1px solid #c5ccd5;border-radius:3px}
button{padding:.3em 1em}
table{border-collapse:collapse;width:100%;background:#fff}
th,td{text-align:left;padding:.35em .6em;border-bottom:1px solid #e3e6ea;white-space:nowrap}
th{background:#eef1f5}
tr:hover td{background:#f0f5ff}
.err{color:#a00;font-weight:600}
nav{margin-top:1em;display:flex;gap:1em}
"""


def _text(ds: Dataset, keyword: str) -> str:
    """A value as display text: multi-values joined, person names as "Family, Given", dates as YYYY-MM-DD."""
    elem = ds.data_element(keyword) if keyword in ds else None
    if elem is None or elem.value is None or elem.value == "":
        return ""
    value: Any = elem.value
    values = list(value) if elem.VM > 1 else [value]
    if elem.VR == "PN":
        out = []
        for v in values:
            parts = [p for p in str(v).split("=")[0].split("^")]
            family, given = (parts + ["", ""])[:2]
            out.append(f"{family}, {given}".strip(", ") if given else family)
        return "; ".join(out)
    if elem.VR == "DA":
        return ", ".join(
            f"{s[:4]}-{s[4:6]}-{s[6:8]}" if len(s) == 8 and s.isdigit() else s for s in (str(v) for v in values)
        )
    return "\\".join(str(v) for v in values)


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def render_study_rows(datasets: Iterable[Dataset], viewer_prefix: str = OHIF_PREFIX) -> str:
    rows = []
    for ds in datasets:
        uid = _text(ds, "StudyInstanceUID")
        if not uid:
            continue
        href = viewer_url(uid, viewer_prefix)
        cells = []
        for i, (kw, _label) in enumerate(COLUMNS):
            value = _text(ds, kw)
            if i == 0:
                cells.append(f'<td><a href="{_e(href)}" data-study-uid="{_e(uid)}">{_e(value or "(no name)")}</a></td>')
            else:
                cells.append(f"<td>{_e(value)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return "\n".join(rows)


def render_page(
    datasets: list[Dataset],
    *,
    params: dict[str, str],
    offset: int,
    limit: int,
    more: bool,
    error: str = "",
    nonce: str = "",
    base_path: str = STUDY_LIST_PATH,
    viewer_prefix: str = OHIF_PREFIX,
) -> str:
    fields = "".join(
        f'<input name="{k}" placeholder="{_e(SEARCH_HINTS[k])}" value="{_e(params.get(k, ""))}" aria-label="{_e(k)}">'
        for k in SEARCH_KEYS
    )
    head = "".join(f"<th>{_e(label)}</th>" for _kw, label in COLUMNS)
    body = render_study_rows(datasets, viewer_prefix)
    kept = {k: v for k, v in params.items() if k in SEARCH_KEYS and v}
    nav = []
    if offset > 0:
        nav.append(
            f'<a rel="prev" href="{_e(base_path + "?" + urlencode({**kept, "offset": max(0, offset - limit), "limit": limit}))}">Previous</a>'
        )
    if more:
        nav.append(
            f'<a rel="next" href="{_e(base_path + "?" + urlencode({**kept, "offset": offset + limit, "limit": limit}))}">Next</a>'
        )
    status = f'<p class="err" role="alert">{_e(error)}</p>' if error else ""
    count = f"<p>Studies {offset + 1}&ndash;{offset + len(datasets)}</p>" if datasets else "<p>No studies found.</p>"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>OpenPACS studies</title><style nonce="{_e(nonce)}">{_STYLE}</style></head>
<body><h1>Studies</h1>
<form method="get" action="{_e(base_path)}">{fields}<button type="submit">Search</button>
<a href="{_e(base_path)}">Clear</a> <a href="{_e(viewer_prefix)}">OHIF study list</a></form>
{status}{"" if error else count}
<table id="studies"><thead><tr>{head}</tr></thead><tbody>
{body}
</tbody></table>
<nav>{"".join(nav)}</nav>
</body></html>
"""


def _int_param(raw: str | None, default: int, lo: int, hi: int) -> int:
    try:
        return max(lo, min(hi, int(raw))) if raw not in (None, "") else default
    except ValueError:
        return default


def studylist_routes(ctx: Any, *, path: str = STUDY_LIST_PATH, viewer_prefix: str = OHIF_PREFIX) -> list[BaseRoute]:
    """``GET path``: a searchable, paged HTML table of studies, each linked to the viewer."""

    async def study_list(request: Request) -> Response:
        nonce = secrets.token_urlsafe(16)
        headers = {
            "Content-Security-Policy": (
                f"default-src 'none'; style-src 'nonce-{nonce}'; img-src 'self'; form-action 'self'; "
                "base-uri 'none'; frame-ancestors 'none'"
            ),
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "same-origin",
            "Cache-Control": "no-store",
        }
        qp = request.query_params
        params = {k: qp.get(k, "").strip() for k in SEARCH_KEYS}
        limit = _int_param(qp.get("limit"), PAGE_SIZE, 1, MAX_PAGE_SIZE)
        offset = _int_param(qp.get("offset"), 0, 0, 10**9)
        query = Query(
            level="STUDY",
            filters={k: v for k, v in params.items() if v},
            return_keys=[k for k in RETURN_KEYS if not params.get(k)],
            limit=limit + 1,
            offset=offset,
            departments=departments_of(request),
        )
        root = request.scope.get("root_path", "")
        status, error, found = 200, "", []
        try:
            found = await run_in_threadpool(lambda: list(ctx.query.find(query)))
        except QueryError as exc:  # a bad search term is the user's error, shown on the page; not a 500
            status, error = 400, f"Invalid search: {exc}"
        page = render_page(
            found[:limit],
            params=params,
            offset=offset,
            limit=limit,
            more=len(found) > limit,
            error=error,
            nonce=nonce,
            base_path=root + path,
            viewer_prefix=root + viewer_prefix,
        )
        return HTMLResponse(page, status_code=status, headers=headers)

    return [Route(path, study_list, methods=["GET", "HEAD"])]
