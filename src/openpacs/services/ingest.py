"""The one ingest path: C-STORE, STOW-RS, folder import and retrieve-from-remote all end here.

A store is acknowledged only after its blob is durable (file fsync + directory fsync) and its index row committed.
Concurrent stores share the directory fsyncs and the index transaction: the committer thread takes whatever is
queued when it finishes the previous batch (group commit), so more load means bigger batches, not weaker durability.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from ..config import Settings
from ..dicom.header import file_meta_bytes, header_info_chunks, index_values, is_valid_uid
from ..index.db import Index, NewInstance, WriteResult
from ..storage import BlobStore
from .types import Source, Status, StoreOutcome

log = logging.getLogger("openpacs.ingest")

MAX_BATCH = 256
DELETE_GRACE = 60.0  # seconds a deleted or replaced instance's blob stays readable for retrieves already under way


class IngestError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class _Pending:
    item: NewInstance
    future: Future[WriteResult]


@dataclass
class PendingStore:
    """A store whose blob is written and whose index row waits for the group commit: ``result()`` waits for it.

    Lets one thread hand several stores to the committer before waiting for any (STOW-RS parts of one request)."""

    service: IngestService
    pending: _Pending
    outcome: StoreOutcome
    source: Source
    digest: str
    started: float = 0.0

    def result(self) -> StoreOutcome:
        return self.service._finish(self)


class BlobReaper:
    """Removes the blobs of deleted or replaced instances ``grace`` seconds after their index rows went.

    The index forgets them at once (nothing new finds them); a retrieve that started before (a WADO-RS stream of
    the series, a C-GET) still reads them to the end instead of breaking off. A crash in between leaves them
    unreferenced, and the orphan sweep of the next start removes them."""

    def __init__(self, store: BlobStore, grace: float) -> None:
        self.store, self.grace = store, grace
        self._due: deque[tuple[float, list[str]]] = deque()  # in time order: the grace is the same for all
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="blob-reaper", daemon=True)
        self._thread.start()

    def later(self, keys: Sequence[str]) -> None:
        if not keys:
            return
        with self._cv:
            if self._closed:  # shutting down: nothing reads any more
                self._delete(list(keys))
                return
            self._due.append((time.monotonic() + self.grace, list(keys)))
            self._cv.notify()

    def close(self) -> None:
        """Delete everything still waiting (the server is stopping: no retrieve is under way) and stop."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout=60)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._due and not self._closed:
                    self._cv.wait()
                if not self._due:
                    return
                when, keys = self._due[0]
                delay = when - time.monotonic()
                if delay > 0 and not self._closed:
                    self._cv.wait(delay)
                    continue
                self._due.popleft()
            self._delete(keys)

    def _delete(self, keys: list[str]) -> None:
        for k in keys:
            try:
                self.store.delete(k)
            except Exception as e:  # left to the orphan sweep
                log.warning("could not delete blob %s: %s", k, e)


class IngestService:
    def __init__(self, settings: Settings, store: BlobStore, index: Index) -> None:
        self.settings = settings
        self.store = store
        self.index = index
        # Department of a new study from its first instance (set by the composition root: services.departments).
        self.classify_department: Callable[[dict[str, dict[str, Any]], str], str | None] | None = None
        self._queue: queue.Queue[_Pending | None] = queue.Queue()
        self._closed = False
        self._accepting = threading.Lock()
        self._committer = threading.Thread(target=self._commit_loop, name="ingest-committer", daemon=True)
        self._committer.start()
        self.reaper = BlobReaper(store, DELETE_GRACE)
        # services.metrics.Monitor (set by the composition root): counts and timings of stores, in memory
        self.monitor: Any = None
        # called with each new instance's outcome after its commit (services.reports attaches waiting reports);
        # it must return at once
        self.on_stored: Callable[[StoreOutcome], None] | None = None
        # services.storage_policy.StorageGuard (set by the composition root): storage_min_free / storage_quota
        self.guard: Any = None

    # -- entry points ----------------------------------------------------------------------------------------
    def store_dataset(
        self,
        chunks: Sequence[bytes | memoryview],
        transfer_syntax_uid: str,
        sop_class_uid: str,
        sop_instance_uid: str,
        source: Source,
    ) -> StoreOutcome:
        """A data set received over the network (no file meta): prefix the File Meta Information and ingest."""
        if not is_valid_uid(sop_instance_uid) or not is_valid_uid(sop_class_uid):
            return self._fail(Status.CANNOT_UNDERSTAND, "invalid Affected SOP Class/Instance UID in the command",
                              sop_class_uid, sop_instance_uid, source)
        meta = file_meta_bytes(sop_class_uid, sop_instance_uid, transfer_syntax_uid, source.calling_aet)
        out = self._prepare([meta, *chunks], source, sop_class_uid, sop_instance_uid, digest=_sha256(chunks))
        return out if isinstance(out, StoreOutcome) else out.result()

    def store_file(
        self, data: bytes | memoryview | Sequence[bytes | memoryview], source: Source, expected_study_uid: str | None = None
    ) -> StoreOutcome:
        """A Part 10 file (import, STOW-RS), whole or as the pieces it arrived in. Stored as given, preamble and meta
        included."""
        out = self.submit_file(data, source, expected_study_uid)
        return out if isinstance(out, StoreOutcome) else out.result()

    def submit_file(
        self, data: bytes | memoryview | Sequence[bytes | memoryview], source: Source, expected_study_uid: str | None = None
    ) -> StoreOutcome | PendingStore:
        """store_file without waiting for the index commit: the outcome now if the store already failed, else a
        PendingStore whose ``result()`` must be called (it finishes the store)."""
        chunks = [data] if isinstance(data, bytes | memoryview) else list(data)
        return self._prepare(chunks, source, None, None, expected_study_uid)  # digest after parsing the meta

    def delete(self, level: str, uid: str, source: Source) -> int:
        keys = self.index.delete(level, [uid])
        self.reaper.later(keys)
        if keys:
            log.info("deleted %s %s (%d instances) for %s", level, uid, len(keys), source.user or source.calling_aet)
        return len(keys)

    def close(self) -> None:
        with self._accepting:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)
        self._committer.join(timeout=60)
        self.reaper.close()

    # -- the path --------------------------------------------------------------------------------------------
    def _fail(self, status: int, message: str, cls: str | None, sop: str | None, source: Source) -> StoreOutcome:
        log.warning("store rejected (0x%04X) from %s %s: %s [SOP %s]", status, source.protocol,
                    source.calling_aet or source.address, message, sop or "?")
        if self.monitor is not None:
            self.monitor.store_failed(source.protocol, status)
        return StoreOutcome(status=status, message=message, sop_class_uid=cls or "", sop_instance_uid=sop or "")

    def _prepare(
        self,
        chunks: list[bytes | memoryview],
        source: Source,
        command_class: str | None,
        command_instance: str | None,
        expected_study_uid: str | None = None,
        digest: str | None = None,
    ) -> StoreOutcome | PendingStore:
        """Check, write the blob and queue the index row for the group commit; a StoreOutcome if it failed."""
        started = time.perf_counter()
        try:
            info = header_info_chunks(chunks)
        except Exception as e:  # pydicom raises many kinds on garbage
            return self._fail(Status.CANNOT_UNDERSTAND, f"unparsable data set: {e}", command_class, command_instance, source)
        ts = info.transfer_syntax_uid
        sop = info.values.get(0x00080018, "")
        cls = info.values.get(0x00080016, "")
        study = info.values.get(0x0020000D, "")
        series_uid = info.values.get(0x0020000E, "")
        if not ts:
            return self._fail(Status.CANNOT_UNDERSTAND, "no transfer syntax in file meta", cls, sop, source)
        for name, value in (("SOP Instance UID", sop), ("SOP Class UID", cls), ("Study Instance UID", study),
                            ("Series Instance UID", series_uid)):
            if not value:
                return self._fail(Status.DATASET_MISMATCH, f"missing {name}", cls, sop, source)
            if not is_valid_uid(value):
                return self._fail(Status.DATASET_MISMATCH, f"invalid {name} {value!r}", cls, sop, source)
        if command_class is not None and cls != command_class:
            return self._fail(Status.DATASET_MISMATCH, f"SOP Class UID {cls} differs from the command's {command_class}",
                              cls, sop, source)
        if command_instance is not None and sop != command_instance:
            return self._fail(Status.DATASET_MISMATCH,
                              f"SOP Instance UID {sop} differs from the command's {command_instance}", cls, sop, source)
        # A File Meta that disagrees with its data set is common in the wild (edited files); the data set wins.
        if expected_study_uid is not None and study != expected_study_uid:
            return StoreOutcome(status=Status.PROCESSING_FAILURE, message=f"instance belongs to study {study}, not {expected_study_uid}",
                                sop_class_uid=cls, sop_instance_uid=sop, study_instance_uid=study,
                                series_instance_uid=series_uid)
        if source.departments is not None and not self._may_add_to(study, source.departments):
            return self._fail(Status.NOT_AUTHORIZED, f"study {study} belongs to a department outside the sender's scope",
                              cls, sop, source)
        outcome = StoreOutcome(status=Status.SUCCESS, sop_class_uid=cls, sop_instance_uid=sop, study_instance_uid=study,
                               series_instance_uid=series_uid)

        if digest is None:
            digest = _sha256(chunks, skip=info.dataset_offset)
        policy = self.settings.duplicate_policy
        # Duplicates are rare: no lookup before writing; the index transaction detects them and the blob goes.
        try:
            values = index_values(info)
        except Exception as e:
            return self._fail(Status.CANNOT_UNDERSTAND, f"unreadable attribute: {e}", cls, sop, source)
        if self.classify_department is not None:
            values["STUDY"]["department"] = self.classify_department(values, source.calling_aet)
        if self.guard is not None:
            refused = self.guard.check(sum(len(c) for c in chunks))
            if refused is not None:
                return self._fail(Status.OUT_OF_RESOURCES, refused, cls, sop, source)
        try:
            blob = self.store.put(chunks)
        except OSError as e:
            if self.guard is not None:
                self.guard.write_failed()
            return self._fail(Status.OUT_OF_RESOURCES, f"storage write failed: {e}", cls, sop, source)
        item = NewInstance(values=values, blob_key=blob.key, size=blob.size, sha256=digest,
                           transfer_syntax_uid=ts, calling_aet=source.calling_aet, source=source.protocol,
                           called_aet=source.called_aet,
                           replace=policy == "overwrite", departments=source.departments)
        pending = _Pending(item, Future())
        with self._accepting:  # nothing is queued behind close()'s sentinel, where no commit would ever come
            closed = self._closed
            if not closed:
                self._queue.put(pending)
        if closed:
            self.store.delete(blob.key)
            return self._fail(Status.OUT_OF_RESOURCES, "ingest service is closed", cls, sop, source)
        return PendingStore(self, pending, outcome, source, digest, started)

    def _finish(self, p: PendingStore) -> StoreOutcome:
        """Wait for the group commit of a prepared store and settle it (duplicates, replaced blobs)."""
        outcome = self._settle(p)
        if self.monitor is not None and outcome.ok:
            self.monitor.stored(p.source.protocol, time.perf_counter() - p.started, p.pending.item.size,
                                p.source.calling_aet)
        if self.on_stored is not None and outcome.ok and not outcome.duplicate:
            try:
                self.on_stored(outcome)
            except Exception:  # noqa: BLE001 - a listener never fails a store
                log.exception("on_stored listener failed")
        return outcome

    def _settle(self, p: PendingStore) -> StoreOutcome:
        outcome, source, key = p.outcome, p.source, p.pending.item.blob_key
        cls, sop = outcome.sop_class_uid, outcome.sop_instance_uid
        try:
            result = p.pending.future.result()
        except Exception as e:
            log.exception("index write failed for %s", sop)
            self._discard_unless_indexed(key, sop)
            return self._fail(Status.OUT_OF_RESOURCES, f"index write failed: {e}", cls, sop, source)
        if result.inserted or result.existing_blob_key == key:
            # the second case: an earlier attempt of this very write committed (its COMMIT reported an error)
            return outcome
        if result.replaced:
            self.reaper.later([result.existing_blob_key])
            return outcome
        if result.refused:
            self.store.delete(key)
            return self._fail(Status.NOT_AUTHORIZED, "the stored instance with this SOP Instance UID belongs to a "
                              "department outside the sender's scope: not replaced", cls, sop, source)
        # lost a race with a concurrent store of the same instance
        self.store.delete(key)
        if result.existing_sha256 == p.digest:
            outcome.duplicate = True
            return outcome
        if self.settings.duplicate_policy == "reject":
            return self._fail(Status.DUPLICATE_REJECTED, "duplicate SOP Instance UID with different content", cls, sop, source)
        return self._duplicate_kept(outcome, source)

    def _discard_unless_indexed(self, key: str, sop: str) -> None:
        """After a failed index write: a COMMIT can fail after the rows became durable, so the blob goes only if the
        index does not reference it. If the index cannot even be asked, the orphan sweep decides at next start."""
        try:
            row = self.index.find_instance(sop)
        except Exception as e:
            log.warning("index unreachable (%s): blob %s of %s left to the orphan sweep", e, key, sop)
            return
        if row is None or row.blob_key != key:
            self.store.delete(key)

    def _may_add_to(self, study_uid: str, departments: tuple[str, ...]) -> bool:
        """A scoped sender may create studies, and add to existing ones of its departments only."""
        from sqlalchemy import select

        from ..index.schema import studies

        with self.index.engine.connect() as c:
            row = c.execute(select(studies.c.department).where(studies.c.study_instance_uid == study_uid)).first()
        return row is None or row[0] in departments

    def _duplicate_kept(self, outcome: StoreOutcome, source: Source) -> StoreOutcome:
        outcome.status = Status.WARNING_DUPLICATE
        outcome.message = "duplicate SOP Instance UID with different content: the first instance was kept"
        log.warning("%s from %s: %s", outcome.sop_instance_uid, source.calling_aet or source.address, outcome.message)
        return outcome

    # -- group commit ----------------------------------------------------------------------------------------
    def _commit_loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            stop = False
            while len(batch) < MAX_BATCH:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            self._commit_batch(batch)
            if stop:
                return

    def _commit_batch(self, batch: list[_Pending]) -> None:
        try:
            self.store.sync_pending()
        except Exception as e:
            for p in batch:
                p.future.set_exception(e)
            return
        try:
            results = self.index.write_batch([p.item for p in batch])
        except Exception:
            # one bad item must not fail its neighbours: index them one by one
            for p in batch:
                try:
                    p.future.set_result(self.index.write_batch([p.item])[0])
                except Exception as e:
                    p.future.set_exception(e)
        else:
            for p, r in zip(batch, results, strict=True):
                p.future.set_result(r)


def _sha256(chunks: Sequence[bytes | memoryview], skip: int = 0) -> str:
    """SHA-256 of the concatenated chunks after their first ``skip`` bytes."""
    h = hashlib.sha256()
    for c in chunks:
        if skip:
            if skip >= len(c):
                skip -= len(c)
                continue
            c = memoryview(c)[skip:]
            skip = 0
        h.update(c)
    return h.hexdigest()
