"""Compression at rest: natively encoded instances re-encoded losslessly (JPEG-LS, JPEG 2000, HTJ2K) by a job.

``compress`` names the codec and ``compress_after_days`` when (0: shortly after arrival; N: instances received more
than N days ago). The storage scheduler (services/storage_schedule.py) queues ``compress`` jobs of eligible
instances; the ingest hot path never waits for any of it.

Each instance is encoded and then **decoded again and compared pixel for pixel** (and attribute for attribute) with
the original in a separate low-priority process, so that the GIL of the process that answers C-STORE is not taken
by codec work. Only an exact round trip that saves space replaces the original: the new blob is written durably
(file and directory fsync), then one index transaction switches the instance's blob key, transfer syntax, size and
SHA-256 (and the series and study sizes) provided the instance still points at the blob that was read; the old blob
is removed after the same grace as a replaced instance's (services/ingest.py ``BlobReaper``). Every instance
handled gets a ``compression_results`` row: compressed with the bytes before and after, or skipped with the reason.
Retrieval still converts to whatever transfer syntax a client asks for; ``transfer-syntax=*`` gets the stored form.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import logging
import multiprocessing
import os
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from pydicom.uid import HTJ2KLossless, JPEG2000Lossless, JPEGLSLossless
from sqlalchemy import and_, exists, func, insert, select, update

from ..dicom.header import dataset_offset
from ..dicom.transcode import NATIVE
from ..index.db import now
from ..index.schema import instances, series, studies
from ..index.storage_schema import compression_results
from .jobs import JobContext, JobQueue, PermanentError

log = logging.getLogger("openpacs.compression")

KIND = "compress"
CODECS: dict[str, str] = {"jpeg-ls-lossless": JPEGLSLossless, "jpeg2000-lossless": JPEG2000Lossless,
                          "htj2k-lossless": HTJ2KLossless}
COMPRESSED, SKIPPED, FAILED = "compressed", "skipped", "failed"
# attributes a lossless re-encoding may legitimately change besides the pixel data itself
_MAY_CHANGE = {0x7FE00010, 0x00280006}  # PixelData, PlanarConfiguration


@dataclass
class Encoded:
    data: bytes | None  # the new Part 10 file, None when skipped
    reason: str = ""


# -- the worker process side (pure functions: no index, no store) ----------------------------------------------------

def _worker_init() -> None:
    try:
        os.nice(10)  # codec work yields to ingest and query
    except OSError:
        pass


_WIDTH = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}


def _attributes(ds: Any, little: bool | None = None) -> dict[int, Any]:
    """Every attribute's value, comparable across a re-encoding (binary words in little endian order; group lengths,
    which pydicom does not write, left out)."""
    if little is None:
        little = bool((getattr(ds, "original_encoding", None) or (None, True))[1] is not False)
    out: dict[int, Any] = {}
    for elem in ds:
        if elem.tag in _MAY_CHANGE or elem.tag.element == 0:
            continue
        if elem.VR == "SQ":
            out[int(elem.tag)] = [sorted(_attributes(item, little).items(), key=lambda kv: kv[0])
                                  for item in elem.value]
            continue
        v = elem.value
        if isinstance(v, bytes | bytearray | memoryview):
            raw = bytes(v)
            width = _WIDTH.get(elem.VR)
            if not little and width and len(raw) % width == 0:
                import numpy as np

                raw = np.frombuffer(raw, dtype=f">u{width}").astype(f"<u{width}").tobytes()
            out[int(elem.tag)] = raw
        else:
            out[int(elem.tag)] = str(v)
    return out


def encode_verified(data: bytes | None, path: str | None, target_ts: str) -> Encoded:
    """Encode a natively encoded Part 10 file in ``target_ts``; the result only if decoding it gives back exactly the
    same pixels and the same attributes. Runs in the compression worker process."""
    import numpy as np

    from ..dicom.transcode import TranscodeError, read_dataset, transcode_dataset, write_part10

    if data is None:
        assert path is not None
        with open(path, "rb") as f:
            data = f.read()
    try:
        ds = read_dataset(data)
        ts = str(ds.file_meta.get("TransferSyntaxUID", ""))
    except Exception as e:  # noqa: BLE001 - unreadable: left as it is
        return Encoded(None, f"unreadable: {e}")
    if ts not in NATIVE:
        return Encoded(None, f"already encoded ({ts})")
    if "PixelData" not in ds:
        return Encoded(None, "no pixel data")
    try:
        original = np.array(ds.pixel_array, copy=True)
    except Exception as e:  # noqa: BLE001
        return Encoded(None, f"pixel data not decodable: {e}")
    before = _attributes(ds)
    try:
        transcode_dataset(ds, target_ts)
        out = write_part10(ds)
    except TranscodeError as e:
        return Encoded(None, str(e))
    except Exception as e:  # noqa: BLE001 - a codec refusing this pixel format
        return Encoded(None, f"encoder failed: {e}")
    try:
        back = read_dataset(out)
        if str(back.file_meta.TransferSyntaxUID) != target_ts:
            return Encoded(None, "round trip: wrong transfer syntax written")
        decoded = back.pixel_array
    except Exception as e:  # noqa: BLE001
        return Encoded(None, f"round trip: the encoded data does not decode: {e}")
    if decoded.shape != original.shape or not np.array_equal(decoded, original):
        return Encoded(None, "round trip: decoded pixels differ from the original")
    if _attributes(back, True) != before:
        return Encoded(None, "round trip: attributes differ from the original")
    return Encoded(out)


# -- the node side ---------------------------------------------------------------------------------------------------

def _dataset_sha256(data: bytes) -> str:
    return hashlib.sha256(memoryview(data)[dataset_offset(data):]).hexdigest()


def _fsync_path(path: str) -> None:
    """The blob file, its hour, day and root directory entries on stable storage (a new blob is acknowledged by no
    group commit here, so it is made durable by itself)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    d = os.path.dirname(path)
    for _ in range(3):
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        d = os.path.dirname(d)


class CompressionService:
    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    @property
    def target(self) -> str | None:
        return CODECS.get(self.ctx.settings.compress or "")

    def _executor(self) -> concurrent.futures.ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = concurrent.futures.ProcessPoolExecutor(
                    max_workers=1, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init)
            return self._pool

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    # -- which instances ---------------------------------------------------------------------------------------------
    def eligible(self, limit: int = 200, after_days: float | None = None) -> list[tuple[str, int]]:
        """(SOP Instance UID, size) of natively encoded images received long enough ago and never handled before."""
        days = self.ctx.settings.compress_after_days if after_days is None else after_days
        cutoff = now() - timedelta(days=max(0.0, float(days or 0)))
        handled = exists().where(compression_results.c.sop_instance_uid == instances.c.sop_instance_uid)
        stmt = (select(instances.c.sop_instance_uid, instances.c.size_bytes)
                .where(instances.c.transfer_syntax_uid.in_(sorted(NATIVE)), instances.c.rows.isnot(None),
                       instances.c.received_at <= cutoff, ~handled,
                       ~instances.c.blob_key.like("tier/%"))  # on the cold tier: left there (services/tiering.py)
                .order_by(instances.c.id).limit(limit))
        with self.ctx.index.engine.connect() as c:
            return [(r[0], int(r[1])) for r in c.execute(stmt)]

    def submit(self, uids: list[tuple[str, int]] | None = None, *, codec: str | None = None,
               user: str = "scheduler") -> Any:
        """A ``compress`` job of the given instances (default: the eligible ones now); None if nothing is due."""
        codec = codec or self.ctx.settings.compress
        if codec not in CODECS:
            raise ValueError(f"compress: one of {', '.join(CODECS)}, not {codec!r}")
        rows = uids if uids is not None else self.eligible(self.ctx.settings.compress_batch)
        if not rows:
            return None
        queue: JobQueue = self.ctx.jobs
        return queue.submit(KIND, {"codec": codec, "transfer_syntax": CODECS[codec], "user": user,
                                   "bytes_before": 0, "bytes_after": 0, "compressed": 0, "skipped": 0},
                            items=[u for u, _ in rows], item_bytes=[s for _, s in rows], priority=-10)

    # -- one instance --------------------------------------------------------------------------------------------------
    def _row(self, sop: str) -> Any:
        stmt = (select(instances.c.id, instances.c.blob_key, instances.c.size_bytes, instances.c.transfer_syntax_uid,
                       instances.c.series_fk, series.c.study_fk)
                .select_from(instances.join(series, instances.c.series_fk == series.c.id))
                .where(instances.c.sop_instance_uid == sop))
        with self.ctx.index.engine.connect() as c:
            return c.execute(stmt).first()

    def _record(self, sop: str, state: str, *, job_id: int | None, source_ts: str | None, target_ts: str,
                before: int = 0, after: int = 0, reason: str = "", conn: Any = None) -> None:
        values = dict(state=state, source_ts=source_ts, target_ts=target_ts, bytes_before=before, bytes_after=after,
                      reason=reason[:1000] or None, job_id=job_id, at=now())

        def write(c: Any) -> None:
            n = c.execute(update(compression_results).where(compression_results.c.sop_instance_uid == sop)
                          .values(**values)).rowcount
            if not n:
                c.execute(insert(compression_results).values(sop_instance_uid=sop, **values))

        if conn is not None:
            write(conn)
        else:
            with self.ctx.index.write_engine.begin() as c:
                write(c)

    def compress_instance(self, sop: str, target_ts: str, job_id: int | None = None) -> tuple[str, int, int, str]:
        """(state, bytes before, bytes after, reason) for one instance."""
        row = self._row(sop)
        if row is None:
            return SKIPPED, 0, 0, "no longer stored"
        if row.transfer_syntax_uid not in NATIVE:  # (compressed by another job meanwhile: its record stays)
            return SKIPPED, row.size_bytes, row.size_bytes, "already encoded"
        store = self.ctx.store
        path = store.path(row.blob_key)
        data = None if path else store.read(row.blob_key)
        encoded = self._executor().submit(encode_verified, data, path, target_ts).result()
        before = int(row.size_bytes)
        if encoded.data is None or len(encoded.data) >= before:
            reason = encoded.reason or f"no saving ({before} -> {len(encoded.data or b'')} bytes)"
            self._record(sop, SKIPPED, job_id=job_id, source_ts=row.transfer_syntax_uid, target_ts=target_ts,
                         before=before, after=before, reason=reason)
            return SKIPPED, before, before, reason
        out = encoded.data
        blob = store.put([out])
        new_path = store.path(blob.key)
        if new_path:
            _fsync_path(new_path)
        digest = _dataset_sha256(out)
        delta = blob.size - before
        with self.ctx.index.write_engine.begin() as c:
            n = c.execute(update(instances).where(instances.c.id == row.id, instances.c.blob_key == row.blob_key)
                          .values(blob_key=blob.key, transfer_syntax_uid=target_ts, size_bytes=blob.size,
                                  sha256=digest)).rowcount
            if n:
                c.execute(update(series).where(series.c.id == row.series_fk)
                          .values(size_bytes=series.c.size_bytes + delta))
                c.execute(update(studies).where(studies.c.id == row.study_fk)
                          .values(size_bytes=studies.c.size_bytes + delta))
                self._record(sop, COMPRESSED, job_id=job_id, source_ts=row.transfer_syntax_uid, target_ts=target_ts,
                             before=before, after=blob.size, conn=c)
        if not n:  # replaced or deleted while it was being encoded: the new blob is not needed
            store.delete(blob.key)
            return SKIPPED, before, before, "changed while being compressed"
        self.ctx.ingest.reaper.later([row.blob_key])
        return COMPRESSED, before, blob.size, ""

    # -- the summary -------------------------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        with self.ctx.index.engine.connect() as c:
            rows = c.execute(select(compression_results.c.state, func.count(),
                                    func.coalesce(func.sum(compression_results.c.bytes_before), 0),
                                    func.coalesce(func.sum(compression_results.c.bytes_after), 0))
                             .group_by(compression_results.c.state)).all()
            by_ts = c.execute(select(compression_results.c.target_ts, func.count(),
                                     func.coalesce(func.sum(compression_results.c.bytes_before), 0),
                                     func.coalesce(func.sum(compression_results.c.bytes_after), 0))
                              .where(compression_results.c.state == COMPRESSED)
                              .group_by(compression_results.c.target_ts)).all()
            reasons = c.execute(select(compression_results.c.reason, func.count())
                                .where(compression_results.c.state != COMPRESSED)
                                .group_by(compression_results.c.reason).order_by(func.count().desc()).limit(10)).all()
        states = {r[0]: {"instances": int(r[1]), "bytes_before": int(r[2]), "bytes_after": int(r[3])} for r in rows}
        done = states.get(COMPRESSED, {"instances": 0, "bytes_before": 0, "bytes_after": 0})
        saved = done["bytes_before"] - done["bytes_after"]
        return {"policy": self.ctx.settings.compress or "", "after_days": self.ctx.settings.compress_after_days,
                "compressed": done["instances"], "bytes_before": done["bytes_before"],
                "bytes_after": done["bytes_after"], "bytes_saved": saved,
                "ratio": round(done["bytes_before"] / done["bytes_after"], 3) if done["bytes_after"] else None,
                "skipped": states.get(SKIPPED, {}).get("instances", 0),
                "failed": states.get(FAILED, {}).get("instances", 0),
                "by_transfer_syntax": [{"transfer_syntax": r[0], "instances": int(r[1]), "bytes_before": int(r[2]),
                                        "bytes_after": int(r[3])} for r in by_ts],
                "skip_reasons": [{"reason": r[0] or "", "instances": int(r[1])} for r in reasons],
                "eligible_now": len(self.eligible(1000)) if self.target else None}


class Compressor:
    """Runs ``compress`` jobs: one instance at a time, the saving kept in the job's payload. While instances are
    arriving (a store acknowledged in the last ``busy`` seconds) it waits up to ``max_wait`` seconds before each
    instance: compression yields to ingest, and catches up when the archive is quiet."""

    busy = 0.5
    max_wait = 2.0

    def __init__(self, ctx: Any, service: CompressionService) -> None:
        self.ctx = ctx
        self.service = service

    def _yield_to_ingest(self, jc: JobContext) -> None:
        monitor = getattr(getattr(self.ctx, "ingest", None), "monitor", None)
        deadline = time.monotonic() + self.max_wait
        while monitor is not None and time.monotonic() < deadline:
            if time.monotonic() - getattr(monitor, "last_store", float("-inf")) >= self.busy:
                return
            jc.check()
            time.sleep(0.1)

    async def __call__(self, jc: JobContext) -> None:
        await asyncio.to_thread(self.run, jc)

    def run(self, jc: JobContext) -> None:
        p = jc.job.payload
        target = str(p.get("transfer_syntax") or CODECS.get(str(p.get("codec")), ""))
        if target not in CODECS.values():
            raise PermanentError(f"compress job: unknown codec {p.get('codec')!r}")
        q = jc.queue
        totals = {k: int(p.get(k) or 0) for k in ("bytes_before", "bytes_after", "compressed", "skipped")}
        errors = 0
        for n, item in enumerate(q.pending_items(jc.job.id), 1):
            jc.check()
            self._yield_to_ingest(jc)
            try:
                state, before, after, reason = self.service.compress_instance(item.sop_instance_uid, target,
                                                                              jc.job.id)
            except concurrent.futures.process.BrokenProcessPool:
                raise
            except Exception as e:  # noqa: BLE001 - one instance never stops the others
                log.warning("compress %s: %r", item.sop_instance_uid, e)
                q.item_failed(jc.job.id, item.seq, None, str(e) or repr(e))
                errors += 1
                continue
            if state == COMPRESSED:
                totals["compressed"] += 1
                totals["bytes_before"] += before
                totals["bytes_after"] += after
            else:
                totals["skipped"] += 1
            q.ack(jc.job.id, item.seq, 0, before)  # skipped ones too: their reason is in compression_results
            if n % 20 == 0:
                q.update_payload(jc.job.id, totals)
        totals["bytes_saved"] = totals["bytes_before"] - totals["bytes_after"]
        q.update_payload(jc.job.id, totals)
        log.info("compress job %d: %d compressed (%d -> %d bytes), %d skipped, %d failed", jc.job.id,
                 totals["compressed"], totals["bytes_before"], totals["bytes_after"], totals["skipped"], errors)
        if errors:
            raise RuntimeError(f"{errors} instance(s) could not be compressed (retried)")


def pending_or_running(ctx: Any, kind: str) -> bool:
    from ..index.schema import jobs

    with ctx.index.engine.connect() as c:
        return c.execute(select(func.count()).select_from(jobs).where(
            and_(jobs.c.kind == kind, jobs.c.state.in_(("pending", "running", "paused"))))).scalar_one() > 0
