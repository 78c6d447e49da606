"""WADO-RS (PS3.18 10.4) and WADO-URI (PS3.18 9): retrieve instances, metadata, frames, bulk data, rendered images.

Instance retrieval streams: instances are read one batch at a time in a worker thread (the next batch is read while the
current one is on the wire) and a study never sits in memory. When the stored syntax is acceptable the stored bytes go
out as they are (the fast path: large pread()s straight into a chunked response, no parsing); only the
128-byte preamble is zeroed, so that a served file can never be a PE/ELF polyglot. Otherwise each instance is
transcoded on its own (dicom.transcode).
"""

from __future__ import annotations

import asyncio
import functools
import io
import logging
import os
import re
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Generator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import pydicom
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from ..dicom import transcode as tc
from ..dicom.frames import FrameError, FrameReader, WouldBlock
from ..dicom.header import is_valid_uid
from ..dicom.render import (
    RenderError,
    RenderParams,
    Viewport,
    parse_quality,
    parse_viewport,
    parse_window,
    render_frame,
)
from ..dicom.waveform import is_waveform_class
from ..services.types import InstanceRef
from .common import DICOM_XML, DicomWebError, accept_values, error_response, negotiate_metadata, split_list
from .common import parse_accept as common_parse_accept
from .multipart import OutPart, multipart_response, part_head, streaming_multipart_response

log = logging.getLogger(__name__)

DICOM = "application/dicom"
OCTET = "application/octet-stream"
DICOM_JSON = "application/dicom+json"

# Compressed frame media types (PS3.18 Table 8.7.3-2) and what we produce for each when the client names no syntax.
TS_MEDIA: dict[str, str] = {
    JPEGBaseline8Bit: "image/jpeg",
    JPEGExtended12Bit: "image/jpeg",
    JPEGLossless: "image/jpeg",
    JPEGLosslessSV1: "image/jpeg",
    JPEGLSLossless: "image/jls",
    JPEGLSNearLossless: "image/jls",
    JPEG2000Lossless: "image/jp2",
    JPEG2000: "image/jp2",
    HTJ2KLossless: "image/jphc",
    HTJ2KLosslessRPCL: "image/jphc",
    HTJ2K: "image/jphc",
    RLELossless: "image/dicom-rle",
}
MEDIA_ALIASES = {
    "image/x-jls": "image/jls",
    "image/x-dicom-rle": "image/dicom-rle",
    "image/jpx": "image/jp2",
    "image/jph": "image/jphc",
}
MEDIA_DEFAULT_TS: dict[str, str] = {
    "image/jls": JPEGLSLossless,
    "image/jp2": JPEG2000Lossless,
    "image/jphc": HTJ2KLossless,
    "image/dicom-rle": RLELossless,
    OCTET: ExplicitVRLittleEndian,
}
RENDERED_MEDIA = ("image/jpeg", "image/png", "image/gif")

BATCH_BYTES = 4 << 20  # one worker-thread read per ~4 MB of response
SMALL_PIECE = 256 << 10  # file reads below this are coalesced with part headers into one write
BULK_THRESHOLD = 1024  # binary values larger than this become BulkDataURIs in /metadata
METADATA_BATCH = 200  # /metadata documents gathered per worker-thread hop
FRAMES_IN_MEMORY = 8 << 20  # a frames request up to this size is read at once and sent with its Content-Length
FRAMES_ON_LOOP = 1 << 20  # frames answered on the event loop (page cache reads) add up to no more than this


class HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _error_response(exc: HTTPError) -> Response:
    return PlainTextResponse(exc.message + "\n", status_code=exc.status)


# ---------------------------------------------------------------------------------------------------------------------
# Accept header


@dataclass(frozen=True)
class MediaRange:
    type: str
    params: dict[str, str] = field(default_factory=dict)
    q: float = 1.0

    @property
    def multipart(self) -> bool:
        return self.type in ("multipart/related", "multipart/*")

    @property
    def inner(self) -> str:
        """The media type of the parts (``type`` parameter) or the type itself for a single part."""
        if self.multipart:
            return _norm_media(self.params.get("type", ""))
        return self.type


def _norm_media(value: str) -> str:
    v = value.strip().strip('"').lower()
    return MEDIA_ALIASES.get(v, v)


def parse_accept(header: str | None) -> list[MediaRange]:
    """Media ranges of an Accept header, most preferred first (q=0 dropped). An empty header accepts anything."""
    return list(_parsed_accept(header or ""))


@functools.lru_cache(maxsize=256)  # a viewer sends the same few Accept headers with each of its hundreds of requests
def _parsed_accept(header: str) -> tuple[MediaRange, ...]:  # shared: callers read the ranges, never change them
    if not header.strip():
        return (MediaRange("*/*"),)
    ranges: list[MediaRange] = []
    for media, params, q in common_parse_accept(header):
        if q <= 0:
            continue
        if "type" in params:
            params["type"] = _norm_media(params["type"])
        ranges.append(MediaRange(_norm_media(media), params, q))
    ranges.sort(key=lambda r: -r.q)  # stable: equal q keeps the client's order
    return tuple(ranges)


def _ts_param(r: MediaRange) -> str | None:
    ts = r.params.get("transfer-syntax")
    return ts.strip() if ts else None


def dicom_syntax_choices(accept: list[MediaRange], single_part: bool = False) -> list[str]:
    """Acceptable transfer syntaxes for application/dicom, preferred first ('*' = as stored): in multipart/related
    (wildcards included), or with ``single_part`` in a bare application/dicom body (PS3.18 10.4.4: instances only)."""
    choices: list[str] = []
    for r in accept:
        if r.multipart:
            inner = r.inner or DICOM
        elif r.type in ("*/*", "application/*"):
            inner = DICOM
        elif r.type == DICOM and single_part:
            inner = DICOM
        else:
            continue
        if single_part != (r.type == DICOM):
            continue
        if inner not in (DICOM, "*/*", "application/*"):
            continue
        ts = _ts_param(r)
        if ts is None:
            ts = ExplicitVRLittleEndian  # the default, also for wildcards (PS3.18 8.7.3.5.2)
        if ts not in choices:
            choices.append(ts)
    return choices


def choose_syntax(stored: str, choices: list[str]) -> str | None:
    for c in choices:
        if c == "*" or c == stored:
            return stored
        if tc.can_transcode(stored, c):
            return c
    return None


# ---------------------------------------------------------------------------------------------------------------------
# Instance streaming


def zero_preamble(data: bytes) -> bytes:
    if len(data) >= 132 and data[128:132] == b"DICM" and data[:128].strip(b"\0"):
        return bytes(128) + data[128:]
    return data


class _StoredStream:
    """Reads stored files for the fast path in batches of about BATCH_BYTES (called in a worker thread)."""

    def __init__(self, items: list[tuple[bytes, str, int]], tail: bytes) -> None:
        self.items = items  # (part head, local path, file size)
        self.tail = tail
        self.i = 0
        self.fd: int | None = None
        self.pos = 0
        self.size = 0
        self.done = False

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def next_batch(self) -> list[bytes]:
        out: list[bytes] = []
        small = bytearray()
        total = 0
        while total < BATCH_BYTES and not self.done:
            if self.fd is None:
                if self.i >= len(self.items):
                    small += self.tail
                    self.done = True
                    break
                head, path, size = self.items[self.i]
                self.i += 1
                self.fd = os.open(path, os.O_RDONLY)
                self.size, self.pos = size, 0
                first = os.pread(self.fd, 132, 0)
                if len(first) < 132:
                    self.close()
                    raise OSError(f"stored file {path} shorter than its recorded size")
                small += head
                if first[128:132] == b"DICM":
                    small += bytes(128) + b"DICM"
                else:
                    small += first
                self.pos = 132
                total += len(head) + 132
            want = min(self.size - self.pos, max(BATCH_BYTES - total, SMALL_PIECE))
            if want > 0:
                data = os.pread(self.fd, want, self.pos)
                if len(data) != want:
                    self.close()
                    raise OSError("stored file changed size while being served")
                self.pos += want
                total += want
                if want < SMALL_PIECE:
                    small += data
                else:
                    if small:
                        out.append(bytes(small))
                        small = bytearray()
                    out.append(data)
            if self.pos >= self.size:
                self.close()
                small += b"\r\n"
        if small:
            out.append(bytes(small))
        return out


async def _prefetching(
    read: Callable[[], list[bytes]], done: Callable[[], bool], cleanup: Callable[[], None]
) -> AsyncIterator[bytes]:
    """Yield batches from ``read`` (run in a thread), reading the next batch while the current one is sent."""
    loop = asyncio.get_running_loop()
    pending: asyncio.Future[list[bytes]] | None = loop.run_in_executor(None, read)
    try:
        while pending is not None:
            batch = await pending
            pending = None if done() else loop.run_in_executor(None, read)
            for piece in batch:
                yield piece
    finally:
        if pending is not None:  # client went away: let the read in flight finish before closing its file
            await asyncio.wait([pending])
            if not pending.cancelled():
                pending.exception()
        cleanup()


@dataclass
class _Plan:
    ref: InstanceRef
    target: str
    path: str | None


def _plan(ref: InstanceRef, choices: list[str]) -> _Plan:
    """How to send an instance: the first acceptable transfer syntax it is in or can be converted to, else 406."""
    target = choose_syntax(ref.transfer_syntax_uid, choices)
    if target is None:
        raise HTTPError(
            406,
            f"instance {ref.sop_instance_uid} is stored in {ref.transfer_syntax_uid} and cannot be converted to "
            f"any acceptable transfer syntax ({', '.join(choices)})",
        )
    return _Plan(ref, target, None)


class MetadataCache:
    """Instance metadata documents already built, by what determines them: the blob (a replaced instance has a new
    key), the patient module overlaid on it (patient and its ADT version), the service root of the BulkDataURIs and
    the format. Bounded by bytes, least recently used out. A viewer opening a series again, or a second reader
    opening the same study, gets the documents without re-parsing the files."""

    def __init__(self, max_bytes: int = 64 * 1024 * 1024) -> None:
        from collections import OrderedDict

        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple[Any, ...], bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: tuple[Any, ...]) -> bytes | None:
        with self._lock:
            doc = self._items.get(key)
            if doc is not None:
                self._items.move_to_end(key)
            return doc

    def put(self, key: tuple[Any, ...], doc: bytes) -> None:
        if len(doc) > self.max_bytes // 16:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= len(old)
            self._items[key] = doc
            self._bytes += len(doc)
            while self._bytes > self.max_bytes and self._items:
                _, dropped = self._items.popitem(last=False)
                self._bytes -= len(dropped)


class WadoRS:
    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        self.metadata_cache = MetadataCache()
        self._loop_db: Any = None  # Index.loop_reader(), opened by the first frame request (on the event loop)
        self._loop_db_tried = False

    # -- helpers ------------------------------------------------------------------------------------------------------

    async def _instances(
        self, study: str, series: str | None = None, sop: str | None = None, request: Request | None = None
    ) -> list[InstanceRef]:
        # the caller's department scope (security middleware): an out-of-scope study is simply not found
        departments = None if request is None else getattr(request.scope.get("openpacs.principal"), "departments", None)
        refs = await run_in_threadpool(self.ctx.retrieve.list_instances, study, series, sop, departments)
        if not refs:
            what = "instance" if sop else "series" if series else "study"
            raise HTTPError(404, f"{what} not found")
        return list(refs)

    async def _one(self, request: Request) -> InstanceRef:
        p = request.path_params
        refs = await self._instances(p["study"], p["series"], p["instance"], request)
        return refs[0]

    def _local_path(self, ref: InstanceRef) -> str | None:
        if ref.demographics_version or ref.qc_key:  # modules overlaid (retrieve.read_file): no byte-identical path
            return None
        try:
            return self.ctx.store.path(ref.blob_key)
        except Exception:
            return None

    def _read(self, ref: InstanceRef) -> bytes:
        return bytes(self.ctx.retrieve.read_file(ref))

    def _source(self, ref: InstanceRef) -> Any:
        """What pydicom should read: the stored file's path when it is local, else its bytes."""
        path = self._local_path(ref)
        return path if path is not None and os.path.exists(path) else io.BytesIO(self._read(ref))

    def _metadata_dataset(self, ref: InstanceRef) -> Dataset:
        """The instance without reading its large binary values (placeholders stand for them)."""
        ds = pydicom.dcmread(self._source(ref), defer_size=BULK_THRESHOLD, force=True)
        _placeholder_deferred(ds)
        return ds

    @staticmethod
    def _bulk_prefix(ref: InstanceRef, base: str) -> str:
        return (
            f"{base}/studies/{ref.study_instance_uid}/series/{ref.series_instance_uid}"
            f"/instances/{ref.sop_instance_uid}/bulkdata/"
        )

    def _reader(self, ref: InstanceRef) -> FrameReader:
        if ref.qc_key is not None:  # frames and bulk data: the QC overlay (study/series text attributes) has neither
            ref = replace(ref, qc_key=None)
        path = self._local_path(ref)
        if path is not None and os.path.exists(path):
            return FrameReader(path)
        opener = getattr(self.ctx.store, "open", None)  # an object store: ranged GETs, only the header and frames
        if opener is not None and not ref.demographics_version and not ref.qc_key:
            try:
                return FrameReader(opener(ref.blob_key), cache_key=ref.blob_key)  # blob keys are never reused
            except (OSError, AttributeError):
                pass
        return FrameReader(self._read(ref))

    @staticmethod
    def base_url(request: Request) -> str:
        """The absolute DICOMweb root for BulkDataURIs, as the client addressed us.

        Some clients (dicomweb-client) send ``Host`` without the port; when that host is the address we listen on,
        the port of the listening socket is the one they used."""
        root = request.scope.get("root_path", "")
        netloc = request.url.netloc
        server = request.scope.get("server")
        host = request.headers.get("host", "")
        if server and host and ":" not in host.rsplit("]", 1)[-1] and host.strip("[]") == str(server[0]):
            default = 443 if request.url.scheme == "https" else 80
            if int(server[1]) != default:
                netloc = f"{host}:{server[1]}"
        return f"{request.url.scheme}://{netloc}{root}"

    # -- study / series / instance ------------------------------------------------------------------------------------

    async def retrieve(self, request: Request) -> Response:
        p = request.path_params
        try:
            refs = await self._instances(p["study"], p.get("series"), p.get("instance"), request)
            accept = parse_accept(accept_values(request))
            choices = dicom_syntax_choices(accept)
            if "instance" in p:
                single = dicom_syntax_choices(accept, single_part=True)
                first = next((r for r in accept if r.type == DICOM or (r.multipart and r.inner in (DICOM, ""))), None)
                if single and (not choices or (first is not None and first.type == DICOM)):
                    return await self._send_single(refs[0], single)
            if not choices and _wants_octet_parts(accept):
                # PS3.18 Table 10.4.4-1: instance resources as their bulk data (the same as .../bulkdata)
                return self._bulk_stream(refs, self.base_url(request), pixels_only=False)
            if not choices:
                raise HTTPError(406, 'acceptable: multipart/related; type="application/dicom"[; transfer-syntax=UID|*]')
            plans = [_plan(ref, choices) for ref in refs]
        except HTTPError as e:
            return _error_response(e)
        return await self._send_instances(plans, choices)

    async def _send_single(self, ref: InstanceRef, choices: list[str]) -> Response:
        """One instance as a bare application/dicom body (the client accepted only that, or preferred it)."""
        try:
            data, ts = await run_in_threadpool(self._instance_bytes, _plan(ref, choices), choices)
        except tc.TranscodeError as e:
            raise HTTPError(406, str(e)) from e
        return Response(data, media_type=DICOM, headers={"Content-Type": f"{DICOM}; transfer-syntax={ts}"})

    async def _send_instances(self, plans: list[_Plan], choices: list[str]) -> Response:
        from .multipart import new_boundary, related_content_type

        boundary = new_boundary()
        bnd = boundary.encode()
        tail = b"--" + bnd + b"--\r\n"
        fast = all(p.target == p.ref.transfer_syntax_uid for p in plans)
        if fast:
            items = await run_in_threadpool(self._stat_all, plans, bnd)
            if items is not None:
                # No Content-Length on purpose: the body goes out chunked. urllib3 (requests, dicomweb-client) reads a
                # chunked body a third faster than a length-delimited one of the same size (26 MB series: ~20 ms vs
                # ~30 ms of client time here); http.client measured 33 vs 30 ms, browsers and curl are indifferent.
                # Each part still carries its length.
                stream = _StoredStream(items, tail)
                body = _prefetching(stream.next_batch, lambda: stream.done, stream.close)
                syntaxes = {p.target for p in plans}
                return StreamingResponse(
                    body,
                    media_type=related_content_type(boundary, DICOM, syntaxes.pop() if len(syntaxes) == 1 else None),
                )
        return StreamingResponse(
            self._generic_stream(plans, choices, bnd, tail), media_type=related_content_type(boundary, DICOM)
        )

    def _stat_all(self, plans: list[_Plan], bnd: bytes) -> list[tuple[bytes, str, int]] | None:
        items = []
        for p in plans:
            path = self._local_path(p.ref)
            if path is None:
                return None
            try:
                size = os.stat(path).st_size
            except OSError:
                return None
            ctype = f"{DICOM}; transfer-syntax={p.target}"
            items.append((part_head(bnd, ctype, size), path, size))
        return items

    def _instance_bytes(self, plan: _Plan, choices: list[str]) -> tuple[bytes, str]:
        data = self._read(plan.ref)
        stored = plan.ref.transfer_syntax_uid
        if plan.target == stored:
            return zero_preamble(data), stored
        tried = [plan.target] + [c for c in choices if c not in ("*", plan.target)]
        for ts in tried:
            try:
                return zero_preamble(tc.transcode(data, ts)), ts
            except tc.TranscodeError as e:
                log.info("WADO-RS: %s to %s failed: %s", plan.ref.sop_instance_uid, ts, e)
        if "*" in choices:
            return zero_preamble(data), stored
        raise tc.TranscodeError(f"{plan.ref.sop_instance_uid}: no acceptable transfer syntax can hold this instance")

    async def _generic_stream(
        self, plans: list[_Plan], choices: list[str], bnd: bytes, tail: bytes
    ) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        pending = loop.run_in_executor(None, self._instance_bytes, plans[0], choices) if plans else None
        for i in range(len(plans)):
            assert pending is not None
            data, ts = await pending
            pending = (
                loop.run_in_executor(None, self._instance_bytes, plans[i + 1], choices) if i + 1 < len(plans) else None
            )
            yield part_head(bnd, f"{DICOM}; transfer-syntax={ts}", len(data))
            yield data
            yield b"\r\n"
        yield tail

    # -- metadata -----------------------------------------------------------------------------------------------------

    def _instance_metadata(self, ref: InstanceRef, base: str, xml: bool = False) -> bytes:
        key = (ref.blob_key, ref.patient_fk, ref.demographics_version, ref.qc_key, base, xml)
        doc = self.metadata_cache.get(key)
        if doc is None:
            doc = self._build_metadata(ref, base, xml)
            self.metadata_cache.put(key, doc)
        return doc

    def _build_metadata(self, ref: InstanceRef, base: str, xml: bool = False) -> bytes:
        from ..dicom import json as dj
        from ..dicom.xml import json_to_xml

        prefix = self._bulk_prefix(ref, base)

        def bulk_uri(tag_path: tuple[int, ...]) -> str:
            return prefix + dj.bulk_path_str(tag_path)

        obj = dj.dataset_to_json(self._metadata_dataset(ref), bulk_uri, BULK_THRESHOLD)
        # the stored syntax (PS3.18 10.4.3 / Table 6.3.1-1): how OHIF's dicom-video handler tells a video instance
        if "00083002" not in obj:
            obj = dict(sorted({**obj, "00083002": {"vr": "UI", "Value": [str(ref.transfer_syntax_uid)]}}.items()))
        return json_to_xml(obj) if xml else dj.dumps(obj)

    async def metadata(self, request: Request) -> Response:
        p = request.path_params
        try:
            media = negotiate_metadata(request)
            refs = await self._instances(p["study"], p.get("series"), p.get("instance"), request)
        except DicomWebError as e:
            return error_response(e.status, e.message, e.headers)
        except HTTPError as e:
            return _error_response(e)
        base = self.base_url(request)
        if media == DICOM_XML:  # streamed like the JSON below: one instance's document at a time
            async def documents() -> AsyncIterator[OutPart]:
                for ref in refs:
                    yield OutPart(DICOM_XML, await run_in_threadpool(self._instance_metadata, ref, base, True))

            return streaming_multipart_response(documents(), DICOM_XML)

        def batch(i: int) -> bytes:  # the documents of refs[i:i + METADATA_BATCH], comma-separated
            return b",".join([self._instance_metadata(ref, base) for ref in refs[i : i + METADATA_BATCH]])

        if len(refs) <= METADATA_BATCH:  # a series as a viewer opens it: one thread hop, sent with its length
            return Response(b"[" + await run_in_threadpool(batch, 0) + b"]", media_type=DICOM_JSON)

        async def body() -> AsyncIterator[bytes]:  # a large study: batches streamed, the next read while one is sent
            loop = asyncio.get_running_loop()
            yield b"["
            pending = loop.run_in_executor(None, batch, 0)
            for i in range(0, len(refs), METADATA_BATCH):
                data = await pending
                if i + METADATA_BATCH < len(refs):
                    pending = loop.run_in_executor(None, batch, i + METADATA_BATCH)
                yield (b"," + data) if i else data
            yield b"]"

        return StreamingResponse(body(), media_type=DICOM_JSON)

    # -- frames -------------------------------------------------------------------------------------------------------

    async def frames(self, request: Request) -> Response:
        departments = getattr(request.scope.get("openpacs.principal"), "departments", None)
        return await self.frames_response(request.path_params, accept_values(request), departments)

    async def frames_response(self, p: Mapping[str, str], accept_header: str,
                              departments: tuple[str, ...] | None) -> Response:
        """GET .../instances/{instance}/frames/{frames}: the route, and the fast path a viewer's frame requests take
        (``FramesFastPath``, without the router's layers).

        Answered on the event loop when nothing there can block (``_frames_now``); otherwise the lookup and the
        frames in one thread hop. A viewer asks for hundreds of frames, and at that rate the hop itself (the thread
        woken, the GIL passed to it and back, the loop woken) costs more than the lookup and the read: measured on a
        50,176-tile slide, 6 connections, 2 cores, ~700 tiles/s through the thread and ~1,150 on the loop."""
        try:
            numbers = parse_frame_list(p["frames"])
            accept = parse_accept(accept_header)
            ref, response = self._frames_now(p, numbers, accept, departments)
            if response is not None:
                return response

            def work() -> Response:
                refs = [ref] if ref is not None else self.ctx.retrieve.list_instances(
                    p["study"], p["series"], p["instance"], departments)
                if not refs:
                    raise HTTPError(404, "instance not found")
                return self._frames_of(self._reader(refs[0]), numbers, accept, nowait=False)

            return await asyncio.get_running_loop().run_in_executor(None, work)
        except HTTPError as e:
            return _error_response(e)

    def _frames_now(self, p: Mapping[str, str], numbers: list[int], accept: list[MediaRange],
                    departments: tuple[str, ...] | None) -> tuple[InstanceRef | None, Response | None]:
        """The frames answered on the event loop, when that cannot block: the lookup by key through this loop's own
        read-only SQLite connection (never waits: see ``Index.loop_reader``), a local file whose layout is cached,
        frames sent as stored and read from the page cache (``RWF_NOWAIT``), up to ``FRAMES_ON_LOOP`` bytes.
        (ref or None, None) when a thread must finish: PostgreSQL, an object store, a cold file or page, a
        transcode, a large request. An unknown instance is a 404 here as in the thread."""
        db = self._loop_reader()
        if db is None:
            return None, None
        try:
            refs = self.ctx.retrieve.list_instances(p["study"], p["series"], p["instance"], departments,
                                                    dbapi_conn=db)
        except sqlite3.Error:
            return None, None
        if not refs:
            raise HTTPError(404, "instance not found")
        ref = refs[0]
        path = self._local_path(replace(ref, qc_key=None))  # frames: the QC overlay has none
        reader = FrameReader.cached(path) if path is not None else None
        if reader is None:
            return ref, None
        try:
            return ref, self._frames_of(reader, numbers, accept, nowait=True)
        except WouldBlock:
            return ref, None

    def _loop_reader(self) -> Any:
        if not self._loop_db_tried:
            self._loop_db_tried = True
            try:
                self._loop_db = self.ctx.index.loop_reader()
            except Exception:  # noqa: BLE001 - no loop reader: every frame goes through a thread, as before
                log.warning("no event-loop index reader; frames are looked up in threads", exc_info=True)
        return self._loop_db

    def _frames_of(self, reader: FrameReader, numbers: list[int], accept: list[MediaRange],
                   nowait: bool) -> Response:
        """One frame as a single part, or a multipart streamed one frame at a time (a 1,000-frame cine or a slide
        is never held whole). The reader is the response's: closed here or when the stream ends. ``nowait``
        (the event loop): WouldBlock unless every frame is read at once from the page cache, as stored."""
        try:
            if not reader.has_pixels:
                raise HTTPError(404, "instance has no pixel data")
            for n in numbers:
                if n > reader.number_of_frames:
                    raise HTTPError(404, f"frame {n} does not exist (instance has {reader.number_of_frames})")
            choice = choose_frame_media(
                accept, str(reader.transfer_syntax), single=len(numbers) == 1, lossy=reader.lossy
            )
            if choice is None:
                raise HTTPError(
                    406,
                    "no acceptable media type for these frames (try multipart/related; "
                    'type="application/octet-stream"; transfer-syntax=*)',
                )
            media, ts, multipart = choice
            # frames read here while they add up to FRAMES_IN_MEMORY: sent with their length, as one response
            budget = FRAMES_ON_LOOP if nowait else FRAMES_IN_MEMORY
            read = [_frame(reader, numbers[0], ts, nowait)]
            total = len(read[0])
            while multipart and len(read) < len(numbers) and total < budget:
                read.append(_frame(reader, numbers[len(read)], ts, nowait))
                total += len(read[-1])
            if nowait and len(read) < len(numbers) and multipart:
                raise WouldBlock  # the rest is streamed, by a thread
        except BaseException:
            reader.close()
            raise
        ctype = f"{media}; transfer-syntax={ts}"
        if not multipart:
            reader.close()
            return Response(read[0], media_type=media, headers={"Content-Type": ctype})
        if len(read) == len(numbers):
            reader.close()
            return multipart_response([(ctype, f) for f in read], media, ts)

        async def parts() -> AsyncIterator[OutPart]:
            try:
                for data in read:
                    yield OutPart(ctype, data)
                for n in numbers[len(read):]:
                    yield OutPart(ctype, await run_in_threadpool(_frame, reader, n, ts))
            finally:
                reader.close()

        return streaming_multipart_response(parts(), media, ts)

    # -- bulk data ----------------------------------------------------------------------------------------------------

    async def bulkdata(self, request: Request) -> Response:
        try:
            ref = await self._one(request)
            tag_path = parse_bulk_path(request.path_params["path"])
            if tag_path == [0x7FE00010]:  # a video's Pixel Data as its bitstream (dicomweb/documents.py)
                from . import documents

                if (video := documents.wants_video(request, ref)) is not None:
                    range_header = request.headers.get("range")
                    return await run_in_threadpool(documents.video_response, self, ref, video, range_header)
            accept = parse_accept(accept_values(request))
            return await run_in_threadpool(self._bulk_sync, ref, tag_path, accept, request.headers.get("range"))
        except HTTPError as e:
            return _error_response(e)

    def _bulk_sync(
        self, ref: InstanceRef, tag_path: list[int], accept: list[MediaRange], range_header: str | None
    ) -> Response:
        if tag_path == [0x7FE00010]:
            with self._reader(ref) as reader:
                if not reader.has_pixels:
                    raise HTTPError(404, "no pixel data")
                n_frames = reader.number_of_frames
                stored = str(reader.transfer_syntax)
                # one octet-stream body holds every frame; one compressed image only a single frame
                choice = choose_frame_media(accept, stored, single=True, lossy=reader.lossy)
                if choice is not None and not choice[2] and choice[0] != OCTET and n_frames > 1:
                    choice = choose_frame_media(accept, stored, single=False, lossy=reader.lossy)
                if choice is None:
                    raise HTTPError(406, "no acceptable media type for this pixel data")
                media, ts, multipart = choice
                if media == OCTET and tc.is_native(ts):
                    return _bulk_response(_native_pixel_data(reader), accept, range_header)
                parts = [_frame(reader, n, ts) for n in range(1, n_frames + 1)]
            ctype = f"{media}; transfer-syntax={ts}"
            if not multipart:
                return Response(parts[0], media_type=media, headers={"Content-Type": ctype})
            return multipart_response([(ctype, p) for p in parts], media, ts)
        value = _walk(pydicom.dcmread(self._source(ref), force=True), tag_path)
        return _bulk_response(value, accept, range_header)

    # -- bulk data and pixel data of whole resources (PS3.18 10.4.1.1.5-6) ---------------------------------------------

    async def pixeldata(self, request: Request) -> Response:
        p = request.path_params
        try:
            if not _wants_octet_parts(parse_accept(accept_values(request))):
                raise HTTPError(406, 'pixel data is available as multipart/related; type="application/octet-stream"')
            refs = await self._instances(p["study"], p.get("series"), p.get("instance"), request)
            if "instance" in p and not await run_in_threadpool(self._has_pixels, refs[0]):
                raise HTTPError(404, "instance has no pixel data")
        except HTTPError as e:
            return _error_response(e)
        return self._bulk_stream(refs, self.base_url(request), pixels_only=True)

    def _has_pixels(self, ref: InstanceRef) -> bool:
        with self._reader(ref) as reader:
            return reader.has_pixels

    def _bulk_stream(self, refs: list[InstanceRef], base: str, pixels_only: bool) -> Response:
        async def parts() -> AsyncIterator[OutPart]:
            for ref in refs:  # one instance in memory at a time
                for location, data in await run_in_threadpool(self._bulk_items, ref, base, pixels_only):
                    yield OutPart(OCTET, data, {"Content-Location": location})

        return streaming_multipart_response(parts(), OCTET)

    def _bulk_items(self, ref: InstanceRef, base: str, pixels_only: bool) -> list[tuple[str, bytes]]:
        """Every bulk data value of an instance as (BulkDataURI, bytes), the URIs being those of its metadata; pixel
        data native little endian (decoded when stored compressed), as .../bulkdata/7FE00010 serves it."""
        from ..dicom import json as dj

        paths: list[tuple[int, ...]] = []

        def capture(tag_path: tuple[int, ...]) -> str:
            paths.append(tag_path)
            return ""

        # the paths exactly as the metadata finds them, without reading pixel data through pydicom as well
        dj.dataset_to_json(self._metadata_dataset(ref), capture, BULK_THRESHOLD)
        prefix = self._bulk_prefix(ref, base)
        full: Dataset | None = None  # read only when a bulk value other than pixel data is asked for
        out = []
        for tag_path in paths:
            if tag_path == (0x7FE00010,):
                with self._reader(ref) as reader:
                    data = _native_pixel_data(reader)
            elif pixels_only and tag_path not in ((0x7FE00008,), (0x7FE00009,)):
                continue
            else:
                full = full if full is not None else pydicom.dcmread(self._source(ref), force=True)
                data = _walk(full, list(tag_path))
            out.append((prefix + dj.bulk_path_str(tag_path), data))
        return out

    # -- rendered / thumbnail ------------------------------------------------------------------------------------------

    async def rendered(self, request: Request) -> Response:
        return await self._render(request, thumbnail=False)

    async def thumbnail(self, request: Request) -> Response:
        return await self._render(request, thumbnail=True)

    async def _render(self, request: Request, thumbnail: bool) -> Response:
        """PS3.18 10.4.1.1.3: a rendered instance or frame is one image (or a multipart of its frames); a rendered
        study, series or frame list is a multipart of images, streamed one instance at a time. Single-part media
        types count only for single items (PS3.18 10.4.4). A thumbnail is one image of the resource."""
        p = request.path_params
        try:
            frames: list[int] | None = parse_frame_list(p["frames"]) if "frames" in p else None
            single_item = thumbnail or ("instance" in p and (frames is None or len(frames) == 1))
            refs = await self._instances(p["study"], p.get("series"), p.get("instance"), request)
            if not thumbnail and "instance" in p and is_waveform_class(refs[0].sop_class_uid):  # ECG paper
                from .waveform_rendered import render_response
                return await run_in_threadpool(render_response, self, request, refs[0], frames)
            if not thumbnail and "instance" in p and frames is None:  # video, PDF, SR (dicomweb/documents.py)
                from . import documents

                special = await documents.rendered(self, refs[0], request)
                if special is not None:
                    return special
            params, multipart = rendered_params(request, thumbnail, single_ok=single_item)
            if thumbnail and "instance" not in p:
                # one representative image: the middle instance of the first series
                first_series = [r for r in refs if r.series_instance_uid == refs[0].series_instance_uid]
                refs = [first_series[(len(first_series) - 1) // 2]]
            if thumbnail and frames is None:
                frames = []  # the middle frame
            images = self._rendered_images(refs, frames, params, thumbnail)
            first = await run_in_threadpool(next, images, None)
            if first is None:
                raise HTTPError(404, "nothing to render")
        except HTTPError as e:
            return _error_response(e)
        if not multipart:
            images.close()
            return Response(first, media_type=params.media_type)

        async def parts() -> AsyncIterator[OutPart]:
            try:
                yield OutPart(params.media_type, first)
                while (image := await run_in_threadpool(next, images, None)) is not None:
                    yield OutPart(params.media_type, image)
            finally:
                images.close()

        return streaming_multipart_response(parts(), params.media_type)

    def _rendered_images(
        self, refs: list[InstanceRef], frames: list[int] | None, params: RenderParams, thumbnail: bool
    ) -> Generator[bytes, None, None]:
        """The rendered frames of ``refs`` in order (``frames``: those of the one instance; [] its middle frame).
        Instances without pixel data are skipped, and so are those that cannot be decoded once an image is out."""
        produced = False
        for ref in refs:
            try:
                with self._reader(ref) as reader:
                    if not reader.has_pixels:
                        if len(refs) == 1:
                            raise HTTPError(404 if thumbnail else 406, "instance has no pixel data to render")
                        continue
                    n_frames = reader.number_of_frames
                    wanted = [(n_frames + 1) // 2] if frames == [] else frames or list(range(1, n_frames + 1))
                    for n in wanted:
                        if n > n_frames:
                            raise HTTPError(404, f"frame {n} does not exist (instance has {n_frames})")
                    for n in wanted:
                        image = render_frame(reader, n, params)
                        produced = True
                        yield image
            except RenderError as e:
                if produced:  # a viewport that fits the first images but not this one: skipped, not a cut stream
                    log.warning("rendered: skipping %s: %s", ref.sop_instance_uid, e)
                    continue
                raise HTTPError(400, str(e)) from e
            except (tc.TranscodeError, FrameError, ValueError) as e:
                if produced or len(refs) > 1:
                    log.warning("rendered: skipping %s: %s", ref.sop_instance_uid, e)
                    continue
                raise HTTPError(406, f"cannot render {ref.sop_instance_uid}: {e}") from e


# ---------------------------------------------------------------------------------------------------------------------
# Parameter parsing and negotiation helpers


def _frame(reader: FrameReader, number: int, ts: str, nowait: bool = False) -> bytes:
    try:
        return reader.frame_as(number, ts, nowait)
    except (tc.TranscodeError, FrameError) as e:
        raise HTTPError(406 if isinstance(e, tc.TranscodeError) else 404, str(e)) from e


def _native_pixel_data(reader: FrameReader) -> bytes:
    """All frames little endian uncompressed, decoded when stored compressed (what application/octet-stream means)."""
    frames = range(1, reader.number_of_frames + 1)
    if reader.is_native:
        return b"".join(reader.stored_frame(n)[0] for n in frames)
    return b"".join(reader.frame_as(n, ExplicitVRLittleEndian) for n in frames)


def _wants_octet_parts(accept: list[MediaRange]) -> bool:
    return any(r.multipart and r.inner in (OCTET, "*/*", "") and r.q > 0 for r in accept)


def parse_frame_list(value: str) -> list[int]:
    try:
        numbers = [int(v) for v in value.split(",") if v.strip()]
    except ValueError as exc:
        raise HTTPError(400, "frame numbers must be positive integers separated by commas") from exc
    if not numbers or any(n < 1 for n in numbers) or len(numbers) > 10_000:
        raise HTTPError(400, "frame numbers must be positive integers (1-based) separated by commas")
    if len(set(numbers)) != len(numbers):
        # as in a frame-level retrieve (PS3.4 Y.3.2.1.1); it also bounds a response by the instance's own size
        raise HTTPError(400, "a frame number is given more than once")
    return numbers


def parse_bulk_path(value: str) -> list[int]:
    parts = [p for p in value.strip("/").split("/") if p]
    if not parts or len(parts) % 2 == 0:
        raise HTTPError(400, "bad bulk data path")
    out = []
    try:
        for i, p in enumerate(parts):
            out.append(int(p, 16) if i % 2 == 0 else int(p))
    except ValueError as exc:
        raise HTTPError(400, "bad bulk data path") from exc
    return out


def _walk(ds: Dataset, path: list[int]) -> bytes:
    cur: Any = ds
    for i in range(0, len(path) - 1, 2):
        tag, idx = path[i], path[i + 1]
        if tag not in cur or cur[tag].VR != "SQ" or idx >= len(cur[tag].value):
            raise HTTPError(404, "bulk data not found")
        cur = cur[tag].value[idx]
    tag = path[-1]
    if tag not in cur:
        raise HTTPError(404, "bulk data not found")
    value = cur[tag].value
    if isinstance(value, str):
        return value.encode("latin-1")
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    raise HTTPError(404, "not a bulk data element")


def _placeholder_deferred(ds: Dataset) -> None:
    """Replace deferred (unread) large values by a placeholder of the same size class, so that /metadata never reads
    pixel data: the JSON encoder only needs to know that the value is larger than the bulk threshold."""
    placeholder = bytes(BULK_THRESHOLD + 1)
    bits = ds.get("BitsAllocated", 16) if 0x00280100 in ds else 16
    for tag, elem in list(ds._dict.items()):
        if isinstance(elem, RawDataElement) and elem.value is None:
            vr = elem.VR
            if vr is None or " or " in str(vr):
                dvr = dictionary_VR(Tag(tag)) if _in_dictionary(tag) else "UN"
                vr = dvr if " or " not in dvr else ("OB" if elem.length == 0xFFFFFFFF or int(bits or 16) <= 8 else "OW")
            if elem.length == 0xFFFFFFFF:
                vr = "OB"
            if vr in ("OB", "OD", "OF", "OL", "OV", "OW", "UN"):
                ds._dict[tag] = DataElement(tag, vr, placeholder)
            else:
                _ = ds[tag]  # a large text value: read it


def _in_dictionary(tag: int) -> bool:
    from pydicom.datadict import dictionary_has_tag

    return dictionary_has_tag(tag)


def choose_frame_media(
    accept: list[MediaRange], stored: str, single: bool, lossy: bool = False
) -> tuple[str, str, bool] | None:
    """(media type, transfer syntax, multipart) for frames stored in ``stored``, or None (406).

    A wildcard without a transfer syntax asks for the default: uncompressed little endian octet-stream, decoded when
    stored compressed, unless the stored form is ``lossy`` (PS3.18 8.7.3.4) or cannot be decoded here."""
    stored_media = OCTET if tc.is_native(stored) else TS_MEDIA.get(stored, OCTET)
    native_stored = tc.is_native(stored)
    for r in accept:
        if r.multipart:
            inner, multipart = (r.inner or OCTET), True
        elif r.type in ("*/*",):
            inner, multipart = "*/*", True
        else:
            inner, multipart = r.type, False
            if not single:
                continue
        ts = _ts_param(r)
        if inner in ("*/*", "image/*", "application/*") and (ts is None or ts == "*"):
            if inner == "application/*" and not native_stored:
                return OCTET, (ExplicitVRLittleEndian if tc.can_decode(stored) else stored), multipart
            if inner == "image/*" and native_stored:
                continue
            if inner == "*/*" and ts is None and not native_stored and not lossy and tc.can_decode(stored):
                return OCTET, ExplicitVRLittleEndian, multipart
            return stored_media, (ExplicitVRLittleEndian if native_stored else stored), multipart
        if inner == OCTET:
            if ts == "*":
                return OCTET, (ExplicitVRLittleEndian if native_stored else stored), multipart
            target = ts or ExplicitVRLittleEndian
            if target in (ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian):
                target = ExplicitVRLittleEndian  # frame bytes are the same for every native syntax
            if target == stored or (native_stored and tc.is_native(target)) or tc.can_transcode(stored, target):
                return OCTET, target, multipart
            continue
        if inner.startswith("image/"):
            if ts == "*" or ts is None:
                if stored_media == inner:
                    return inner, stored, multipart
                default = MEDIA_DEFAULT_TS.get(inner)
                if default and tc.can_transcode(stored, default):
                    return inner, default, multipart
                continue
            if TS_MEDIA.get(ts) != inner:
                continue
            if ts == stored or tc.can_transcode(stored, ts):
                return inner, ts, multipart
    return None


def rendered_params(request: Request, thumbnail: bool, single_ok: bool) -> tuple[RenderParams, bool]:
    """Render parameters and whether the answer is multipart. ``single_ok``: the resource is one image, so single-part
    media types apply; otherwise they are ignored (PS3.18 10.4.4) and ``*/*`` means the multipart default."""
    q = request.query_params
    accept = parse_accept(accept_values(request))
    media, multipart = None, False
    for r in accept:
        inner = r.inner if r.multipart else r.type
        if not (r.multipart or single_ok or r.type == "*/*"):
            continue
        if inner in ("*/*", "image/*", "") or inner in RENDERED_MEDIA:
            media = "image/jpeg" if inner in ("*/*", "image/*", "") else inner
            multipart = r.multipart or not single_ok
            break
    if media is None:
        if not single_ok and any(r.type in RENDERED_MEDIA or r.type == "image/*" for r in accept):
            raise HTTPError(
                406, 'this resource holds several images: ask for multipart/related; type="image/jpeg" (or png, gif)'
            )
        raise HTTPError(406, "rendered images are available as image/jpeg, image/png or image/gif")
    try:
        window = parse_window(q["window"]) if q.get("window") else None
        viewport = parse_viewport(q["viewport"]) if q.get("viewport") else (Viewport(128, 128) if thumbnail else None)
        quality = parse_quality(q["quality"]) if q.get("quality") else 90
    except RenderError as e:
        raise HTTPError(400, str(e)) from e
    return RenderParams(media, window, viewport, quality), multipart and not thumbnail


def _bulk_response(data: bytes, accept: list[MediaRange], range_header: str | None) -> Response:
    """A bulk data value as application/octet-stream, single part or multipart as accepted. A single part honours one
    byte range (RFC 9110 14: 206 with Content-Range, 416 when it cannot be met); other Range headers are ignored."""
    for r in accept:
        inner = r.inner if r.multipart else r.type
        if inner in (OCTET, "*/*", "application/*", ""):
            if r.multipart or r.type == "*/*":
                return multipart_response([(OCTET, data)], OCTET, None)
            span = _byte_range(range_header, len(data)) if range_header else None
            if span is None:
                return Response(data, media_type=OCTET, headers={"Accept-Ranges": "bytes"})
            start, end = span
            if start > end:
                return Response(
                    b"", status_code=416, media_type=OCTET, headers={"Content-Range": f"bytes */{len(data)}"}
                )
            return Response(
                data[start : end + 1],
                status_code=206,
                media_type=OCTET,
                headers={"Content-Range": f"bytes {start}-{end}/{len(data)}", "Accept-Ranges": "bytes"},
            )
    raise HTTPError(406, "bulk data is available as application/octet-stream")


def _byte_range(header: str, size: int) -> tuple[int, int] | None:
    """(first, last) byte of a single ``bytes=`` range of a ``size``-byte value; first > last when it is not
    satisfiable; None for a header to ignore (another unit, several ranges, bad syntax)."""
    h = header.strip().lower()
    if not h.startswith("bytes=") or "," in h:
        return None
    start_s, sep, end_s = h[6:].strip().partition("-")
    if not sep:
        return None
    try:
        if start_s == "":
            n = int(end_s)  # the last n bytes
            if n < 0:
                return None
            return (max(0, size - n), size - 1) if n and size else (1, 0)
        start = int(start_s)
        end = min(int(end_s), size - 1) if end_s else size - 1
    except ValueError:
        return None
    if start < 0 or (end_s and int(end_s) < start):
        return None  # an invalid range: ignored (RFC 9110 14.1.1)
    return (start, end) if start < size else (1, 0)


# ---------------------------------------------------------------------------------------------------------------------
# WADO-URI


class WadoURI:
    def __init__(self, rs: WadoRS) -> None:
        self.rs = rs

    async def endpoint(self, request: Request) -> Response:
        try:
            return await self._handle(request)
        except HTTPError as e:
            return _error_response(e)

    async def _handle(self, request: Request) -> Response:
        q = request.query_params
        if q.get("requestType") != "WADO":
            raise HTTPError(400, "requestType=WADO is required")
        study, series, sop = q.get("studyUID"), q.get("seriesUID"), q.get("objectUID")
        if not (study and series and sop):
            raise HTTPError(400, "studyUID, seriesUID and objectUID are required")
        if "anonymize" in q:
            # PS3.18 9.4.2.3: a server unable to de-identify may answer an error; serving the identified object to a
            # client that asked for a de-identified one would hand out the very data it meant to avoid
            raise HTTPError(400, "anonymize is not supported by this server")
        ts = q.get("transferSyntax", "").strip()
        if ts and ts != "*" and not is_valid_uid(ts):  # "*": as stored, as in WADO-RS
            raise HTTPError(400, f"transferSyntax {ts!r} is not a UID")
        refs = await self.rs._instances(study, series, sop, request)
        ref = refs[0]
        requested = [_norm_media(c) for c in split_list(q.get("contentType", ""))]
        is_image = await run_in_threadpool(self.rs._has_pixels, ref)
        if not requested:
            requested = ["image/jpeg"] if is_image else [DICOM]
        for media in requested:
            if media in (DICOM, "application/*", "*/*"):
                return await self._dicom(ref, q.get("transferSyntax"))
            if media in RENDERED_MEDIA or media == "image/*":
                if not is_image:
                    continue
                return await self._rendered(ref, "image/jpeg" if media == "image/*" else media, q)
        raise HTTPError(406, f"contentType {q.get('contentType', '')!r} not available for this object")

    async def _dicom(self, ref: InstanceRef, ts: str | None) -> Response:
        choices: list[str] = [ts.strip()] if ts and ts.strip() else [str(ExplicitVRLittleEndian)]
        target = choose_syntax(ref.transfer_syntax_uid, choices)
        if target is None:
            raise HTTPError(406, f"cannot convert {ref.transfer_syntax_uid} to {choices[0]}")
        plan = _Plan(ref, target, None)
        try:
            data, _ = await run_in_threadpool(self.rs._instance_bytes, plan, choices)
        except tc.TranscodeError as e:
            raise HTTPError(406, str(e)) from e
        return Response(data, media_type=DICOM)

    async def _rendered(self, ref: InstanceRef, media: str, q: Any) -> Response:
        try:
            window = None
            if q.get("windowCenter") or q.get("windowWidth"):
                if not (q.get("windowCenter") and q.get("windowWidth")):
                    raise RenderError("windowCenter and windowWidth go together")
                window = parse_window(f"{q['windowCenter']},{q['windowWidth']}")
            viewport = None
            if q.get("rows") or q.get("columns"):
                rows = int(q.get("rows") or 8192)
                cols = int(q.get("columns") or 8192)
                viewport = parse_viewport(f"{cols},{rows}")
            quality = parse_quality(q["imageQuality"]) if q.get("imageQuality") else 90
            frame = int(q.get("frameNumber") or 1)
            if frame < 1:
                raise RenderError("frameNumber must be >= 1")
        except (RenderError, ValueError) as e:
            raise HTTPError(400, str(e)) from e
        images = self.rs._rendered_images([ref], [frame], RenderParams(media, window, viewport, quality), False)
        try:
            image = await run_in_threadpool(next, images, None)
        finally:
            images.close()
        if image is None:
            raise HTTPError(404, "nothing to render")
        return Response(image, media_type=media)


# ---------------------------------------------------------------------------------------------------------------------
# Routes


_FRAMES_PATH = re.compile(r"/dicom-web/studies/([^/]+)/series/([^/]+)/instances/([^/]+)/frames/([^/]+)")


class FramesFastPath:
    """``GET /dicom-web/.../frames/{n}`` answered straight from the ASGI scope, inside the security middleware
    (identity, department scope and audit as for every route) but past the two routers and their exception layers:
    a viewer opening a series asks for one frame of each instance, and those layers cost more than the frame.
    Anything else (other methods, ``?accept=``, a root path) goes through the routes, which answer it the same way.
    """

    def __init__(self, app: Any, ctx: Any) -> None:
        self.app = app
        self.rs = WadoRS(ctx)  # frames use no per-instance state of the routes' WadoRS (its metadata cache)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "GET" and not scope.get("query_string") \
                and not scope.get("root_path"):
            m = _FRAMES_PATH.fullmatch(scope["path"])
            if m is not None:
                accept = "*/*"
                for k, v in scope["headers"]:
                    if k == b"accept":
                        accept = v.decode("latin-1") or "*/*"
                        break
                p = dict(zip(("study", "series", "instance", "frames"), m.groups(), strict=True))
                departments = getattr(scope.get("openpacs.principal"), "departments", None)
                response = await self.rs.frames_response(p, accept, departments)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def routes(ctx: Any) -> list[Route]:
    rs = WadoRS(ctx)
    s, se, i = (
        "/studies/{study}",
        "/studies/{study}/series/{series}",
        "/studies/{study}/series/{series}/instances/{instance}",
    )
    get = ["GET"]
    return [
        Route(s, rs.retrieve, methods=get),
        Route(se, rs.retrieve, methods=get),
        Route(i, rs.retrieve, methods=get),
        Route(s + "/metadata", rs.metadata, methods=get),
        Route(se + "/metadata", rs.metadata, methods=get),
        Route(i + "/metadata", rs.metadata, methods=get),
        Route(i + "/frames/{frames}", rs.frames, methods=get),
        Route(i + "/bulkdata/{path:path}", rs.bulkdata, methods=get),
        Route(s + "/pixeldata", rs.pixeldata, methods=get),
        Route(se + "/pixeldata", rs.pixeldata, methods=get),
        Route(i + "/pixeldata", rs.pixeldata, methods=get),
        Route(s + "/rendered", rs.rendered, methods=get),
        Route(se + "/rendered", rs.rendered, methods=get),
        Route(i + "/rendered", rs.rendered, methods=get),
        Route(i + "/frames/{frames}/rendered", rs.rendered, methods=get),
        Route(s + "/thumbnail", rs.thumbnail, methods=get),
        Route(se + "/thumbnail", rs.thumbnail, methods=get),
        Route(i + "/thumbnail", rs.thumbnail, methods=get),
        Route(i + "/frames/{frames}/thumbnail", rs.thumbnail, methods=get),
        Route("/wado", WadoURI(rs).endpoint, methods=get),
    ]


def wado_uri_route(ctx: Any) -> Route:
    """WADO-URI at the root of the HTTP port (``/wado``); the lead mounts it in web/app.py."""
    return Route("/wado", WadoURI(WadoRS(ctx)).endpoint, methods=["GET"])
