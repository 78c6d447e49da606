"""STOW-RS (PS3.18 10.5) through the one ingest path, and DELETE of studies / series / instances.

The request body is parsed as it streams in; each part, as the slices of the network chunks it arrived in (no copy), is
handed to the request's two store threads as soon as it is complete (``_PartStore``). They write it and queue its index
row without waiting for the commit, so the parts of a request share the group commit, under a bound on bytes in
flight. The answer is sent only when every part's store is settled, i.e. durable.

Response status (PS3.18 Table 10.5.3-1): 200 all stored; 202 some stored with failures or warnings; 409 none stored;
400 unparsable request; 413 over a size limit; 415 unsupported media type or content coding; 507 (Insufficient Storage)
for a request of a single instance refused for lack of space (FailureReason 0xA700, as in the 409 of larger requests).
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar

from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from ..context import Context
from ..dicom.json import DicomJSONError, dumps, part10_from_json
from ..dicom.xml import DicomXMLError, json_to_xml, xml_to_json
from ..services.ingest import PendingStore
from ..services.types import Query, Status, StoreOutcome
from . import multipart as mp
from .common import (
    DICOM_JSON,
    DICOM_XML,
    JSON,
    DicomWebError,
    authorize_delete,
    authorize_store,
    check_uid,
    error_response,
    instance_url,
    negotiate_or_406,
    request_source,
    service_root,
    study_url,
    warning_header,
)
from .multipart import MultipartError, MultipartParser, decoded_body, iter_parts, parse_media_type

log = logging.getLogger("openpacs.dicomweb.stow")

# Bytes of one request's parts received but not yet written (a part larger than this is taken alone), the same for
# all requests of the process together, and the threads that write them (two per request: one part's write overlaps
# the next one's digest and header).
INFLIGHT_BYTES = 256 << 20
TOTAL_INFLIGHT_BYTES = 1 << 30
WORKERS = 2
STORE_THREADS = 32

_FAILED_SOP_SEQUENCE = "00081198"
_REFERENCED_SOP_SEQUENCE = "00081199"
_RETRIEVE_URL = "00081190"
_REFERENCED_SOP_CLASS = "00081150"
_REFERENCED_SOP_INSTANCE = "00081155"
_FAILURE_REASON = "00081197"
_WARNING_REASON = "00081196"


class _Budget:
    """Bytes handed over by all the STOW-RS requests of this process and not yet written, and the part stores waiting
    for them to fall under ``limit``. Lock order: a store's lock, then this one's; a store's lock is never taken under
    this one."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.lock = threading.Lock()
        self.blocked: list[_PartStore] = []

    def add(self, n: int) -> None:
        with self.lock:
            self.used += n

    def block(self, store: _PartStore) -> bool:
        """True, with ``store`` registered to be woken, if the process is over its limit."""
        with self.lock:
            if self.used <= self.limit:
                return False
            if store not in self.blocked:
                self.blocked.append(store)
            return True

    def release(self, n: int) -> list[_PartStore]:
        """Give back ``n`` written bytes; the stores to wake if that brought the process under its limit."""
        with self.lock:
            self.used -= n
            if self.used > self.limit or not self.blocked:
                return []
            woken, self.blocked = self.blocked, []
            return woken


class _PartStore:
    """Stores the parts of one request in order without waiting for each part's index commit (they join the group
    commit together); ``close()`` settles them all and returns when every part is durable.

    Up to WORKERS store threads take queued parts while there are any and give their thread back when the queue is
    empty, so a slow or stalled upload holds no thread between its parts. Per part that is at most one hand-over (none
    while a worker is busy) instead of a thread-pool round trip and a commit wait each: on a small machine thread
    switches, not bytes, are what a STOW-RS part costs. The bytes handed over but not yet written are bounded: ``put``
    waits while they exceed ``limit``, or while those of every request together exceed ``total``'s limit (a larger
    part goes alone: a request whose parts are all written may always hand over one more, so every upload advances).
    All requests together hold at most ``total``'s limit plus two parts each.
    """

    def __init__(self, ctx: Context, source: Any, study: str | None, limit: int, total: _Budget) -> None:
        self.ctx, self.source, self.study, self.limit, self.total = ctx, source, study, limit, total
        self.loop = asyncio.get_running_loop()
        self.queue: deque[tuple[int, list[bytes | memoryview], int]] = deque()
        self.outcomes: dict[int, StoreOutcome] = {}
        self.pending: list[tuple[int, PendingStore]] = []
        self.lock = threading.Lock()  # queue, running, inflight, waiter, pending
        self.running = 0
        self.inflight = 0
        self.waiter: asyncio.Future[None] | None = None
        self.workers: list[asyncio.Future[None]] = []

    async def put(self, index: int, chunks: list[bytes | memoryview], size: int) -> None:
        with self.lock:
            self.queue.append((index, chunks, size))
            self.inflight += size
            self.total.add(size)
            start = self.running < WORKERS
            if start:
                self.running += 1
        if start:
            self.workers.append(asyncio.wrap_future(_store_threads().submit(self._run)))
        waiter = None
        with self.lock:
            if self.running and (self.inflight > self.limit or self.total.block(self)):
                waiter = self.waiter = self.loop.create_future()
        if waiter is not None:
            await waiter

    async def close(self) -> dict[int, StoreOutcome]:
        """Wait for the queued parts to be written, then for their commits (one thread, not one per part)."""
        await asyncio.shield(asyncio.gather(*self.workers, return_exceptions=True))
        with self.lock:  # left by a worker that died of something _guarded does not catch (MemoryError)
            for index, _, size in self.queue:
                self.outcomes[index] = StoreOutcome(status=Status.PROCESSING_FAILURE, message="store thread failed")
                self.total.release(size)
            self.queue.clear()
        if self.pending:
            await asyncio.shield(asyncio.wrap_future(_store_threads().submit(self._settle)))
        return self.outcomes

    def _run(self) -> None:
        try:
            waiter = self._take_parts()
        except BaseException:
            with self.lock:
                self.running -= 1
                waiter, self.waiter = self.waiter, None
            self._wake(waiter)
            raise
        self._wake(waiter)

    def _take_parts(self) -> asyncio.Future[None] | None:
        """Store queued parts until there are none; returns the waiting put() to wake, if any."""
        while True:
            with self.lock:
                if not self.queue:  # checked and given up under the lock put() starts workers under
                    self.running -= 1
                    waiter, self.waiter = self.waiter, None
                    return waiter
                index, chunks, size = self.queue.popleft()
            try:
                out = _guarded(partial(self.ctx.ingest.submit_file, chunks, self.source, self.study))
            finally:
                del chunks
                others = self.total.release(size)
            with self.lock:
                self.inflight -= size
                if isinstance(out, StoreOutcome):
                    self.outcomes[index] = out
                else:
                    self.pending.append((index, out))
                waiter = self._ready_waiter()
            self._wake(waiter)
            for store in others:
                if store is not self:
                    store._room()

    def _room(self) -> None:
        """The process went under its limit: the waiting put() may go on."""
        with self.lock:
            waiter = self._ready_waiter()
        self._wake(waiter)

    def _ready_waiter(self) -> asyncio.Future[None] | None:
        """Under the lock: the waiting put(), taken, if it may go on: this request is within its own limit, and the
        process within its limit or this request has nothing unwritten. Otherwise it keeps waiting, registered with
        the process budget for the next release."""
        if self.waiter is None or self.inflight > self.limit or (self.inflight and self.total.block(self)):
            return None
        waiter, self.waiter = self.waiter, None
        return waiter

    def _wake(self, waiter: asyncio.Future[None] | None) -> None:
        """Let the put() waiting on ``waiter`` (taken from self.waiter under the lock) go on."""
        if waiter is not None:
            self.loop.call_soon_threadsafe(_set_done, waiter)

    def _settle(self) -> None:
        for index, p in self.pending:
            self.outcomes[index] = _guarded(p.result)


_T = TypeVar("_T")
_TOTAL = _Budget(TOTAL_INFLIGHT_BYTES)
_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _store_threads() -> ThreadPoolExecutor:
    """The store threads of STOW-RS requests, apart from the thread pool that serves everything else, so that many
    uploads at once never leave QIDO or WADO-RS without a thread. Parts beyond STORE_THREADS writers wait for a
    thread (up to INFLIGHT_BYTES per request, in memory)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=STORE_THREADS, thread_name_prefix="stow-store")
        return _POOL


def _set_done(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _limits(ctx: Context) -> tuple[int, int]:
    s = ctx.settings
    return (
        int(getattr(s, "stow_max_part_bytes", 0) or mp.MAX_PART_BYTES),
        int(getattr(s, "stow_max_body_bytes", 0) or mp.MAX_BODY_BYTES),
    )


def _guarded(store: Callable[[], _T]) -> _T | StoreOutcome:
    """A store whose unexpected failure fails that part, not the request or the server."""
    try:
        return store()
    except OSError as e:
        status = Status.OUT_OF_RESOURCES if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.ENOMEM) else Status.PROCESSING_FAILURE
        log.exception("STOW store failed")
        return StoreOutcome(status=status, message=str(e))
    except Exception as e:  # a bug must fail this part, not the request or the server
        log.exception("STOW store failed")
        return StoreOutcome(status=Status.PROCESSING_FAILURE, message=f"{type(e).__name__}: {e}")


async def _receive(
    request: Request, ctx: Context, study: str | None
) -> tuple[list[StoreOutcome], MultipartError | None]:
    """Store every part; returns outcomes in part order and the framing error that ended the body early, if any."""
    media, params = parse_media_type(request.headers.get("content-type"))
    if media != "multipart/related":
        raise MultipartError(
            415, f'STOW-RS takes multipart/related; type="application/dicom", not {media or "nothing"!r}'
        )
    root_type = params.get("type", "").strip().lower()
    if root_type not in ("", "application/dicom", DICOM_JSON, DICOM_XML):
        raise MultipartError(
            415,
            f"multipart/related type {root_type!r} is not supported (use application/dicom, or application/dicom+json "
            "or application/dicom+xml with bulk data parts)",
        )
    max_part, max_body = _limits(ctx)
    parser = MultipartParser(params.get("boundary", ""), max_part_bytes=max_part)
    mp.check_content_length(request.headers.get("content-length"), max_body)
    body = decoded_body(request.stream(), request.headers.get("content-encoding"), max_body)

    source = request_source(request)
    if root_type in (DICOM_JSON, DICOM_XML):
        return await _receive_metadata_and_bulk(ctx, body, parser, source, study)
    outcomes: dict[int, StoreOutcome] = {}
    parts = 0
    storer: _PartStore | None = None
    error: MultipartError | None = None
    try:
        async for part in iter_parts(body, parser):
            i = parts
            parts += 1
            ptype = parse_media_type(part.content_type)[0] if part.content_type else "application/dicom"
            if ptype != "application/dicom":
                outcomes[i] = StoreOutcome(
                    status=Status.CANNOT_UNDERSTAND, message=f"part media type {ptype!r} is not application/dicom"
                )
                continue
            if storer is None:
                storer = _PartStore(ctx, source, study, limit=INFLIGHT_BYTES, total=_TOTAL)
            chunks, size = part.chunks, part.size
            del part
            await storer.put(i, chunks, size)
    except MultipartError as e:
        error = e
    except ClientDisconnect:
        error = MultipartError(400, "client disconnected before the end of the request body")
    finally:
        if storer is not None:  # every started store finishes (they are durable writes) before we answer
            outcomes.update(await storer.close())
    return [outcomes[i] for i in sorted(outcomes)], error


async def _receive_metadata_and_bulk(
    ctx: Context, body: Any, parser: MultipartParser, source: Any, study: str | None
) -> tuple[list[StoreOutcome], MultipartError | None]:
    """PS3.18 10.5.1.2: metadata parts, DICOM JSON (an array of data sets each) or DICOM XML (one NativeDicomModel
    each), then bulk data parts whose Content-Location is a BulkDataURI of the metadata. Each data set becomes a
    Part 10 instance (Explicit VR Little Endian: the bulk data is native) and goes through the one ingest path. The
    whole request is held until it ends (bulk parts may follow the metadata)."""
    documents: list[tuple[str, bytes]] = []
    bulk: dict[str, tuple[str, bytes]] = {}
    try:
        async for part in iter_parts(body, parser):
            ptype = parse_media_type(part.content_type)[0] if part.content_type else ""
            if ptype in (DICOM_JSON, "application/json", DICOM_XML):
                documents.append((ptype, part.content))
            else:
                location = part.headers.get("content-location", "").strip()
                if location:
                    bulk[location] = (ptype or "application/octet-stream", part.content)
    except MultipartError as e:
        return [], e
    except ClientDisconnect:
        return [], MultipartError(400, "client disconnected before the end of the request body")
    if not documents:
        return [], MultipartError(400, "no application/dicom+json or application/dicom+xml metadata part in the request")

    def parse() -> list[tuple[Any, str | None]]:
        """(DICOM JSON object, None) per data set, or (None, the reason a metadata part is unusable)."""
        out: list[tuple[Any, str | None]] = []
        for ptype, raw in documents:
            if ptype == DICOM_XML:
                try:
                    out.append((xml_to_json(raw), None))
                except (DicomXMLError, RecursionError) as e:
                    out.append((None, f"metadata part is not usable DICOM XML: {e}"))
                except Exception as e:  # a reader bug fails this metadata part, not the request
                    log.exception("STOW-RS: reading DICOM XML failed")
                    out.append((None, f"metadata part is not usable DICOM XML: {type(e).__name__}: {e}"))
                continue
            try:
                doc = json.loads(raw)
            except (ValueError, UnicodeDecodeError, RecursionError) as e:
                out.append((None, f"metadata part is not JSON: {e}"))
                continue
            out.extend((obj, None) for obj in (doc if isinstance(doc, list) else [doc]))
        return out

    metadata = await run_in_threadpool(parse)  # large JSON off the event loop

    def build(obj: Any, problem: str | None) -> StoreOutcome | PendingStore:
        if problem is not None:
            return StoreOutcome(status=Status.CANNOT_UNDERSTAND, message=problem)

        def load(uri: str) -> bytes:
            if uri not in bulk:
                raise DicomJSONError(f"bulk data {uri!r} is not in the request (no part with that Content-Location)")
            media, content = bulk[uri]
            if media != "application/octet-stream":
                raise DicomJSONError(f"bulk data {uri!r} is {media}: only native (application/octet-stream) is taken")
            return content

        if not isinstance(obj, dict):
            return StoreOutcome(status=Status.CANNOT_UNDERSTAND, message="a metadata item is not a DICOM JSON object")
        uids: dict[str, str] = {}
        for name, tag in (("SOP Class UID", "00080016"), ("SOP Instance UID", "00080018")):
            attr = obj.get(tag)
            values = attr.get("Value") if isinstance(attr, dict) else None
            if isinstance(values, list) and values and isinstance(values[0], str) and values[0]:
                uids[name] = values[0]
        missing = [k for k in ("SOP Class UID", "SOP Instance UID") if k not in uids]
        if missing:
            return StoreOutcome(status=Status.DATASET_MISMATCH, message=f"metadata without {' and '.join(missing)}",
                                sop_instance_uid=uids.get("SOP Instance UID", ""))
        try:
            data = part10_from_json(obj, load)
        except (DicomJSONError, ValueError, TypeError, KeyError, AttributeError, RecursionError) as e:
            return StoreOutcome(status=Status.CANNOT_UNDERSTAND, message=f"unusable DICOM JSON: {e}",
                                sop_instance_uid=uids["SOP Instance UID"])
        except Exception as e:  # a bug must fail this data set, not the request
            log.exception("STOW-RS: DICOM JSON to Part 10 failed")
            return StoreOutcome(status=Status.CANNOT_UNDERSTAND, message=f"{type(e).__name__}: {e}",
                                sop_instance_uid=uids["SOP Instance UID"])
        return _guarded(partial(ctx.ingest.submit_file, data, source, study))

    def build_all() -> list[StoreOutcome]:
        """Every data set written and queued first, then their commits settled: they share the group commit."""
        results = []
        for obj, problem in metadata:
            results.append(build(obj, problem))
        return [r if isinstance(r, StoreOutcome) else _guarded(r.result) for r in results]

    return await run_in_threadpool(build_all), None


def _response_body(ctx: Context, root: str, outcomes: list[StoreOutcome]) -> tuple[dict[str, Any], int, int]:
    """DICOM JSON response data set, and the number stored and failed."""
    referenced: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    studies: set[str] = set()
    for o in outcomes:
        item: dict[str, Any] = {
            _REFERENCED_SOP_CLASS: {"vr": "UI", "Value": [o.sop_class_uid]} if o.sop_class_uid else {"vr": "UI"},
            _REFERENCED_SOP_INSTANCE: {"vr": "UI", "Value": [o.sop_instance_uid]}
            if o.sop_instance_uid
            else {"vr": "UI"},
        }
        if o.ok:
            studies.add(o.study_instance_uid)
            series = o.series_instance_uid
            if series:
                item[_RETRIEVE_URL] = {
                    "vr": "UR",
                    "Value": [instance_url(root, o.study_instance_uid, series, o.sop_instance_uid)],
                }
            if o.status != 0:
                item[_WARNING_REASON] = {"vr": "US", "Value": [o.status]}
            referenced.append(item)
        else:
            item[_FAILURE_REASON] = {"vr": "US", "Value": [o.status]}
            failed.append(item)
    body: dict[str, Any] = {}
    if len(studies) == 1:
        body[_RETRIEVE_URL] = {"vr": "UR", "Value": [study_url(root, next(iter(studies)))]}
    if failed:
        body[_FAILED_SOP_SEQUENCE] = {"vr": "SQ", "Value": failed}
    if referenced:
        body[_REFERENCED_SOP_SEQUENCE] = {"vr": "SQ", "Value": referenced}
    return dict(sorted(body.items())), len(referenced), len(failed)


def _warnings(outcomes: list[StoreOutcome]) -> str:
    notes = [
        f"{o.sop_instance_uid or 'part'}: 0x{o.status:04X} {o.message}" for o in outcomes if o.status != 0 and o.message
    ]
    if len(notes) > 5:
        notes = notes[:5] + [f"... and {len(notes) - 5} more"]
    return ", ".join(warning_header(n) for n in notes)


async def stow(request: Request) -> Response:
    ctx: Context = request.app.state.ctx
    try:
        authorize_store(request)
        # the Store Instances Response Module in DICOM JSON (default) or in DICOM XML (PS3.19)
        media = negotiate_or_406(request, [DICOM_JSON, JSON, DICOM_XML])
        study = check_uid(request.path_params["study"]) if "study" in request.path_params else None
        outcomes, error = await _receive(request, ctx, study)
    except DicomWebError as e:
        return error_response(e.status, e.message, e.headers)
    except MultipartError as e:
        return error_response(e.status, e.message)
    except ClientDisconnect:
        return Response(status_code=400)
    root = service_root(request)
    body, stored, failed = await run_in_threadpool(_response_body, ctx, root, outcomes)
    # for the audit record the security middleware writes after the response
    request.scope["openpacs.audit_studies"] = sorted({o.study_instance_uid for o in outcomes if o.ok and o.study_instance_uid})
    headers: dict[str, str] = {}
    if error is not None:
        log.warning("STOW-RS from %s: %s (%d parts stored before it)", request.client, error.message, stored)
        if not stored and not failed:
            return error_response(error.status, error.message)
        headers["Warning"] = warning_header(error.message + f"; {stored} instance(s) were stored before the error")
        return Response(_encode(body, media), status_code=error.status, media_type=media, headers=headers)
    w = _warnings(outcomes)
    if w:
        headers["Warning"] = w
    if stored == 0 and len(outcomes) == 1 and outcomes[0].status == Status.OUT_OF_RESOURCES:
        status = 507  # a single upload refused for lack of space (storage_min_free, storage_quota, a full disk)
    elif stored == 0:
        status = 409
    elif failed or any(o.status != 0 for o in outcomes):
        status = 202
    else:
        status = 200
    return Response(_encode(body, media), status_code=status, media_type=media, headers=headers)


def _encode(body: dict[str, Any], media: str) -> bytes:
    return json_to_xml(body) if media == DICOM_XML else dumps(body)


# ---------------------------------------------------------------------------------------------------------------------
# DELETE


def _exists(ctx: Context, level: str, filters: dict[str, str]) -> bool:
    q = Query(level=level, filters=filters, limit=1)  # type: ignore[arg-type]
    return any(True for _ in ctx.query.find(q))


async def delete(request: Request) -> Response:
    ctx: Context = request.app.state.ctx
    p = request.path_params
    try:
        study = check_uid(p["study"])
        filters = {"StudyInstanceUID": study}
        level, uid = "STUDY", study
        if "series" in p:
            filters["SeriesInstanceUID"] = level_uid = check_uid(p["series"])
            level, uid = "SERIES", level_uid
        if "instance" in p:
            filters["SOPInstanceUID"] = level_uid = check_uid(p["instance"])
            level, uid = "IMAGE", level_uid
        authorize_delete(request, level, uid)
        if level != "STUDY" and not await run_in_threadpool(_exists, ctx, level, filters):
            return error_response(404, f"no {level.lower()} {uid} in study {study}")
        n = await run_in_threadpool(ctx.ingest.delete, level, uid, request_source(request))
    except DicomWebError as e:
        return error_response(e.status, e.message, e.headers)
    if n == 0:
        return error_response(404, f"no {level.lower()} {uid}")
    log.info("DELETE %s %s: %d instance(s) removed", level, uid, n)
    return Response(status_code=204)


def routes(ctx: Context) -> list[Route]:
    return [
        Route("/studies", stow, methods=["POST"]),
        Route("/studies/{study}", stow, methods=["POST"]),
        Route("/studies/{study}", delete, methods=["DELETE"]),
        Route("/studies/{study}/series/{series}", delete, methods=["DELETE"]),
        Route("/studies/{study}/series/{series}/instances/{instance}", delete, methods=["DELETE"]),
    ]
