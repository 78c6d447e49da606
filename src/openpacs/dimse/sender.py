"""The C-STORE SCU of send jobs (services/jobs.py kind ``send``): instances of the archive to a remote AE.

Proposes each instance's stored transfer syntax alone plus Explicit/Implicit VR Little Endian (scu.propose); each instance
goes out through operations.store_instance, the one C-STORE SCU that C-MOVE and C-GET sub-operations use too: it sends the
stored bytes unchanged when the stored syntax is accepted, transcodes otherwise; ``max_associations`` lanes per
destination. Each instance the peer acknowledges is committed as acknowledged before that lane sends its next one.

With ``commit`` in the payload (API ``commit: true``, ``openpacs send --commit``), once every instance is
acknowledged the job asks the peer for storage commitment of all of them (dimse/commitment.py request_commitment:
N-ACTION on its own association, a new Transaction UID per attempt, recorded in the payload first) and waits up to
``commit_timeout`` for the N-EVENT-REPORT, which reaches the payload through the index whichever association and
process it came on. Done only when the peer committed every instance; instances it lists as failed (or leaves out)
become failed items with the Failure Reason and are sent again by the next attempt; a timeout is retried too.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pydicom.uid import generate_uid

from ..config import RemoteAE
from ..index.db import now
from ..services import commitment as sc
from ..services.jobs import ITEM_ACKED, JobContext, JobQueue, PermanentError, resolve_refs
from ..services.types import InstanceRef
from . import access
from .association import AssociationClosed
from .commitment import request_commitment
from .operations import store_instance
from .scu import open_association
from .server import Endpoint

log = logging.getLogger(__name__)

KIND = "send"


def find_remote(settings: Any, name: str) -> RemoteAE | None:
    """A destination by its node name, else by its AE title."""
    remotes: Mapping[str, RemoteAE] = access.remote_aes(settings)
    if name in remotes:
        return remotes[name]
    return next((r for r in remotes.values() if r.aet.strip() == name.strip()), None)


class Sender:
    """Runs ``send`` jobs on the worker's event loop."""

    def __init__(self, ctx: Any, queue: JobQueue, executor: ThreadPoolExecutor | None = None) -> None:
        self.ctx = ctx
        self.settings = ctx.settings
        self.queue = queue
        self._acks: list[tuple[int, int, int, int, asyncio.Future[None]]] = []
        self._flushing = False
        self.executor = executor or ThreadPoolExecutor(max_workers=4, thread_name_prefix="sender")
        self._endpoint: Endpoint | None = None

    def endpoint(self) -> Endpoint:
        if self._endpoint is None:
            self._endpoint = Endpoint(self.settings, self.ctx, asyncio.get_running_loop(), self.executor)
        return self._endpoint

    async def _ack(self, job_id: int, seq: int, status: int, nbytes: int) -> None:
        """Record the peer's acknowledgement durably before the lane sends its next instance; the acks of
        concurrent lanes that arrive while a commit runs share the next one (a group commit)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._acks.append((job_id, seq, status, nbytes, fut))
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().create_task(self._flush_acks())
        await fut

    async def _flush_acks(self) -> None:
        try:
            while self._acks:
                batch, self._acks = self._acks, []
                try:
                    await self._run(self.queue.ack_many, [(j, s, st, n) for j, s, st, n, _ in batch])
                except Exception as exc:  # noqa: BLE001 - each waiting lane gets the error
                    for *_, f in batch:
                        if not f.done():
                            f.set_exception(exc)
                else:
                    for *_, f in batch:
                        if not f.done():
                            f.set_result(None)
        finally:
            self._flushing = False

    def _run(self, fn: Any, *args: Any) -> asyncio.Future[Any]:
        return asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def __call__(self, jc: JobContext) -> None:
        job = jc.job
        name = str(job.payload.get("destination") or job.destination or "")
        remote = find_remote(self.settings, name)
        if remote is None:
            raise PermanentError(f"destination {name!r} unknown (no such node or [remote_aes.*])")
        items = await self._run(self.queue.pending_items, job.id)
        if items:
            await self._send(jc, remote, items)
        if job.payload.get("commit"):
            jc.check()
            await self._commit(jc, remote)

    async def _send(self, jc: JobContext, remote: RemoteAE, items: list[Any]) -> None:
        job = jc.job
        by_uid = {}
        uids = [i.sop_instance_uid for i in items]
        for ref in await self._run(resolve_refs, self.ctx, "IMAGE", uids):
            by_uid[ref.sop_instance_uid] = ref
        work: asyncio.Queue[tuple[Any, InstanceRef]] = asyncio.Queue()
        missing = 0
        for it in items:
            ref = by_uid.get(it.sop_instance_uid)
            if ref is None:
                missing += 1
                await self._run(self.queue.item_failed, job.id, it.seq, None, "no longer in the archive")
            else:
                work.put_nowait((it, ref))
        wanted: dict[str, set[str]] = {}
        target = str(job.payload.get("transfer_syntax") or "")  # a routing rule's choice; empty: as stored
        for _, ref in list(work._queue):  # type: ignore[attr-defined]
            wanted.setdefault(ref.sop_class_uid, set()).add(target or ref.transfer_syntax_uid)
        lanes = max(1, min(int(job.payload.get("associations") or remote.max_associations), work.qsize(), 16))
        refused: list[tuple[str, bool]] = []
        results = await asyncio.gather(*(self._lane(jc, remote, wanted, work, refused) for _ in range(lanes)),
                                       return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            if any(isinstance(e, PermanentError) for e in errors) and len(errors) == lanes:
                raise next(e for e in errors if isinstance(e, PermanentError))
            raise errors[0]
        jc.check()
        if refused or missing:
            parts = []
            if refused:
                parts.append(f"{len(refused)} instance(s) refused by {remote.aet}: "
                             f"{'; '.join(m for m, _ in refused[:3])}")
            if missing:
                parts.append(f"{missing} instance(s) no longer in the archive")
            # a failure of our own (unreadable blob, no context, no codec) is the same on every attempt: no retry;
            # a refusal by the peer (e.g. 0xA700 out of resources) may pass, so the job is retried with backoff
            if all(permanent for _, permanent in refused):
                raise PermanentError(", ".join(parts))
            raise RuntimeError(", ".join(parts))

    async def _lane(self, jc: JobContext, remote: RemoteAE, wanted: dict[str, set[str]],
                    work: asyncio.Queue[tuple[Any, InstanceRef]], refused: list[tuple[str, bool]]) -> None:
        job = jc.job
        try:
            assoc = await open_association(self.endpoint(), remote.host, remote.port, remote.aet, wanted,
                                           tls=remote.tls)
        except (OSError, TimeoutError, AssociationClosed) as exc:
            raise ConnectionError(f"cannot associate with {remote.aet} at {remote.host}:{remote.port}: "
                                  f"{exc or type(exc).__name__}") from exc
        try:
            if not assoc.contexts:
                raise PermanentError(f"{remote.aet} accepted no presentation context")
            def take() -> tuple[Any, InstanceRef, asyncio.Future[Any]] | None:
                """The lane's next instance, its file read started now: it overlaps the send and the ack before."""
                if work.empty():
                    return None
                item, ref = work.get_nowait()
                return item, ref, self._run(self.ctx.retrieve.read_file, ref)

            following = take()
            while following is not None:
                jc.check()
                item, ref, reading = following
                following = None
                try:
                    data = await reading
                    following = take()
                except Exception as exc:  # noqa: BLE001 - a missing blob fails this instance, not the job
                    following = take()
                    await self._run(self.queue.item_failed, job.id, item.seq, None, f"cannot read: {exc}")
                    refused.append((f"{ref.sop_instance_uid}: cannot read", True))
                    continue
                try:
                    sent = await store_instance(assoc, ref, data, need_peer_scp=False,
                                                prefer=str(job.payload.get("transfer_syntax") or ""))
                except TimeoutError:
                    assoc.abort("DIMSE timeout waiting for C-STORE-RSP")
                    raise ConnectionError(f"no C-STORE response from {remote.aet} within "
                                          f"{self.settings.dimse_timeout:.0f}s") from None
                except AssociationClosed as exc:
                    raise ConnectionError(f"association with {remote.aet} closed: {exc}") from exc
                if sent.kind == "failure":
                    await self._run(self.queue.item_failed, job.id, item.seq, sent.status, sent.error)
                    # ours (no context, no codec) is the same on every attempt; the peer's refusal may pass
                    refused.append((f"{ref.sop_instance_uid}: {sent.error}", sent.ours))
                else:
                    assert sent.status is not None
                    await self._ack(job.id, item.seq, sent.status, sent.nbytes)
        finally:
            if assoc.contexts and not assoc.closed.done():
                await assoc.release()
            else:
                assoc.abort("send done")

    async def _commit(self, jc: JobContext, remote: RemoteAE) -> None:
        """Storage commitment of every acknowledged instance; raises unless the peer committed them all."""
        job = jc.job
        acked = [i for i in await self._run(self.queue.items, job.id) if i.state == ITEM_ACKED]
        if not acked:
            return
        seq_of = {i.sop_instance_uid: i.seq for i in acked}
        refs = [sc.Reference(r.sop_class_uid, r.sop_instance_uid)
                for r in await self._run(resolve_refs, self.ctx, "IMAGE", list(seq_of))]
        if not refs:
            return
        transaction = generate_uid()
        await self._run(self.queue.update_payload, job.id, {
            "commit_transaction": transaction, "commit_aet": remote.aet, "commit_report": None})
        try:
            assoc = await request_commitment(self.endpoint(), remote, refs, transaction)
        except LookupError as exc:
            raise PermanentError(str(exc)) from None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + float(self.settings.commit_timeout)
        report: dict[str, Any] | None = None
        try:
            while True:
                jc.check()
                current = await self._run(self.queue.get, job.id)
                found = (current.payload.get("commit_report") if current is not None else None) or None
                if found and found.get("transaction") == transaction:
                    report = found
                    break
                if loop.time() >= deadline:
                    raise TimeoutError(f"storage commitment {transaction}: no N-EVENT-REPORT from {remote.aet} "
                                       f"within {self.settings.commit_timeout:.0f}s")
                await asyncio.sleep(0.3)
        finally:
            if not assoc.closed.done():
                await assoc.release()
        committed = set(report.get("committed") or ())
        failed: dict[str, int | None] = {str(u): r for u, r in report.get("failed") or ()}
        problems: list[str] = []
        for ref in refs:
            uid = ref.sop_instance_uid
            if uid in committed and uid not in failed:
                continue
            msg = sc.describe_failure(failed[uid]) if uid in failed else "not in the storage commitment report"
            await self._run(self.queue.unack, job.id, seq_of[uid], failed.get(uid), f"{remote.aet}: {msg}")
            problems.append(f"{uid} ({msg})")
        summary = {"transaction": transaction, "aet": remote.aet, "committed": len(refs) - len(problems),
                   "failed": len(problems), "at": now().isoformat(),
                   "state": "committed" if not problems else "failures"}
        await self._run(self.queue.update_payload, job.id, {"commit_report": None, "commit_result": summary})
        if problems:
            raise RuntimeError(f"storage commitment {transaction}: {len(problems)} of {len(refs)} instance(s) not "
                               f"committed by {remote.aet}: {'; '.join(problems[:3])}")
        log.info("job %d: %s committed all %d instance(s) (transaction %s)", job.id, remote.aet, len(refs),
                 transaction)
