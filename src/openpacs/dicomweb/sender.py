"""The STOW-RS client of send jobs (services/jobs.py kind ``stow``): instances of the archive to a DICOMweb peer
(``[remote_dicomweb.NAME]``).

Up to ``max_instances_per_request`` stored Part 10 files go unchanged in one ``multipart/related;
type="application/dicom"`` POST to ``{url}/studies``; only that batch is held in memory. The peer's Store Instances
Response (DICOM JSON: Referenced SOP Sequence for the stored ones, Failed SOP Sequence with the Failure Reason) is
committed item by item (acknowledged or failed) before the next request goes out, so a job resumed after ``kill -9``
never sends an acknowledged instance again.

HTTP 400/401/403/404/405/413 are the same on every attempt: the job fails at once with the reason. Connection
errors, timeouts and 5xx are retried with the queue's backoff, as are instances the peer refused.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx

from ..config import RemoteDicomweb
from ..services.jobs import Item, JobContext, JobQueue, PermanentError, resolve_refs
from ..services.types import InstanceRef
from .multipart import new_boundary, part_head, related_content_type

log = logging.getLogger(__name__)

KIND = "stow"

REFERENCED_SOP_SEQUENCE = "00081199"
FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_INSTANCE_UID = "00081155"
FAILURE_REASON = "00081197"

FAILURE_REASONS = {  # PS3.18 Table I.2-1 / PS3.4 Annex B
    0xA700: "out of resources",
    0xA900: "data set does not match SOP class",
    0xC000: "cannot understand",
    0xC122: "referenced transfer syntax not supported",
    0x0110: "processing failure",
    0x0122: "SOP class not supported",
    0x0124: "not authorized",
    0x0112: "no such object instance",
}

_PERMANENT_HTTP = {
    400: "bad request",
    401: "unauthorized: check the token or username/password",
    403: "forbidden: the credentials may not store on this peer",
    404: "not found: check url (the DICOMweb service root, e.g. http://host/dicom-web)",
    405: "method not allowed: the peer does not accept STOW-RS at this url",
    413: "request too large: lower max_instances_per_request",
    415: "unsupported media type",
}


@dataclass
class StowResult:
    """What a Store Instances Response says: SOP Instance UIDs stored, and refused ones with their reason."""

    stored: set[str] = field(default_factory=set)
    failed: dict[str, int | None] = field(default_factory=dict)
    listed: bool = False  # the response carried one of the two sequences


def _uid_of(item: Mapping[str, Any]) -> str | None:
    value = (item.get(REFERENCED_SOP_INSTANCE_UID) or {}).get("Value") or []
    return str(value[0]).strip() if value and value[0] is not None else None


def parse_response(body: bytes | str) -> StowResult:
    """The Store Instances Response in DICOM JSON (one data set, or a one-element array as some servers send)."""
    out = StowResult()
    if not body or not (body.strip() if isinstance(body, str) else body.strip()):
        return out
    try:
        doc = json.loads(body)
    except ValueError as exc:
        raise ValueError(f"the STOW-RS response is not DICOM JSON: {exc}") from None
    if isinstance(doc, list):
        doc = doc[0] if doc else {}
    if not isinstance(doc, dict):
        raise ValueError("the STOW-RS response is not a DICOM JSON data set")
    for key in (REFERENCED_SOP_SEQUENCE, FAILED_SOP_SEQUENCE):
        seq = doc.get(key)
        if not isinstance(seq, dict):
            continue
        out.listed = True
        for item in seq.get("Value") or []:
            if not isinstance(item, dict):
                continue
            uid = _uid_of(item)
            if uid is None:
                continue
            if key == REFERENCED_SOP_SEQUENCE:
                out.stored.add(uid)
            else:
                reason = (item.get(FAILURE_REASON) or {}).get("Value") or [None]
                try:
                    out.failed[uid] = int(reason[0]) if reason[0] is not None else None
                except (TypeError, ValueError):
                    out.failed[uid] = None
    out.stored -= set(out.failed)
    return out


def describe_reason(reason: int | None) -> str:
    if reason is None:
        return "refused (no Failure Reason)"
    return f"Failure Reason 0x{reason:04X}" + (f" ({FAILURE_REASONS[reason]})" if reason in FAILURE_REASONS else "")


def auth_headers(peer: RemoteDicomweb) -> dict[str, str]:
    if peer.token:
        return {"Authorization": f"Bearer {peer.token}"}
    return {}


def find_peer(settings: Any, name: str) -> RemoteDicomweb | None:
    peers: Mapping[str, RemoteDicomweb] = getattr(settings, "remote_dicomweb", {}) or {}
    return peers.get(name)


class StowSender:
    """Runs ``stow`` jobs on the worker's event loop; one HTTP client per job attempt."""

    def __init__(self, ctx: Any, queue: JobQueue, executor: ThreadPoolExecutor | None = None) -> None:
        self.ctx = ctx
        self.settings = ctx.settings
        self.queue = queue
        self.executor = executor or ThreadPoolExecutor(max_workers=2, thread_name_prefix="stow")

    def _run(self, fn: Any, *args: Any) -> asyncio.Future[Any]:
        return asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def __call__(self, jc: JobContext) -> None:
        job = jc.job
        name = str(job.payload.get("destination") or job.destination or "")
        peer = find_peer(self.settings, name)
        if peer is None:
            raise PermanentError(f"destination {name!r} unknown (no [remote_dicomweb.{name}])")
        items = await self._run(self.queue.pending_items, job.id)
        if not items:
            return
        refs = {r.sop_instance_uid: r for r in await self._run(
            resolve_refs, self.ctx, "IMAGE", [i.sop_instance_uid for i in items])}
        work: list[tuple[Item, InstanceRef]] = []
        missing = 0
        for it in items:
            ref = refs.get(it.sop_instance_uid)
            if ref is None:
                missing += 1
                await self._run(self.queue.item_failed, job.id, it.seq, None, "no longer in the archive")
            else:
                work.append((it, ref))
        per_request = max(1, int(peer.max_instances_per_request or 1))
        refused: list[str] = []
        auth = httpx.BasicAuth(peer.username, peer.password) if peer.username and not peer.token else None
        url = peer.url.rstrip("/") + "/studies"
        async with httpx.AsyncClient(verify=peer.verify_tls, timeout=peer.timeout, auth=auth,
                                     headers=auth_headers(peer)) as client:
            for start in range(0, len(work), per_request):
                jc.check()
                await self._batch(jc, client, name, url, work[start:start + per_request], refused)
        jc.check()
        if refused or missing:
            parts = []
            if refused:
                parts.append(f"{len(refused)} instance(s) refused by {name}: {'; '.join(refused[:3])}")
            if missing:
                parts.append(f"{missing} instance(s) no longer in the archive")
            raise RuntimeError(", ".join(parts))

    async def _batch(self, jc: JobContext, client: httpx.AsyncClient, name: str, url: str,
                     batch: list[tuple[Item, InstanceRef]], refused: list[str]) -> None:
        job = jc.job
        files: list[tuple[Item, InstanceRef, bytes]] = []
        for item, ref in batch:
            try:
                files.append((item, ref, await self._run(self.ctx.retrieve.read_file, ref)))
            except Exception as exc:  # noqa: BLE001 - a missing blob fails this instance, not the job
                await self._run(self.queue.item_failed, job.id, item.seq, None, f"cannot read: {exc}")
                refused.append(f"{ref.sop_instance_uid}: cannot read")
        if not files:
            return
        boundary = new_boundary()
        b = boundary.encode()
        pieces: list[bytes] = []
        for _, _, data in files:
            pieces += [part_head(b, "application/dicom", len(data)), data, b"\r\n"]
        pieces.append(b"--" + b + b"--\r\n")

        async def body() -> AsyncIterator[bytes]:
            for piece in pieces:
                yield piece

        headers = {"Content-Type": related_content_type(boundary), "Accept": "application/dicom+json",
                   "Content-Length": str(sum(len(p) for p in pieces))}
        try:
            rsp = await client.post(url, content=body(), headers=headers)
        except httpx.TimeoutException as exc:
            raise TimeoutError(f"STOW-RS to {name} ({url}): no answer within {client.timeout.read}s "
                               f"({type(exc).__name__})") from None
        except httpx.HTTPError as exc:
            raise ConnectionError(f"STOW-RS to {name}: {url} unreachable: {exc or type(exc).__name__}") from None
        status = rsp.status_code
        if status in _PERMANENT_HTTP:
            raise PermanentError(f"STOW-RS to {name} ({url}): HTTP {status} {_PERMANENT_HTTP[status]}"
                                 + _excerpt(rsp))
        if status >= 300 and status != 409:  # 409: every instance failed, listed in the body
            raise RuntimeError(f"STOW-RS to {name} ({url}): HTTP {status} {rsp.reason_phrase}" + _excerpt(rsp))
        try:
            result = parse_response(rsp.content)
        except ValueError as exc:
            raise RuntimeError(f"STOW-RS to {name}: HTTP {status}, {exc}") from None
        for item, ref, data in files:
            uid = ref.sop_instance_uid
            if uid in result.stored or (status == 200 and not result.listed):
                await self._run(self.queue.ack, job.id, item.seq, 0, len(data))
                continue
            if uid in result.failed:
                reason = result.failed[uid]
                msg = describe_reason(reason)
            else:
                reason, msg = None, f"not acknowledged in the STOW-RS response (HTTP {status})"
            await self._run(self.queue.item_failed, job.id, item.seq, reason, msg)
            refused.append(f"{uid}: {msg}")


def _excerpt(rsp: httpx.Response) -> str:
    text = rsp.text.strip().replace("\n", " ")[:200] if rsp.content else ""
    return f": {text}" if text else ""
