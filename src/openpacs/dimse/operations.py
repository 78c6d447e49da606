"""DIMSE-C operations as SCP: translate requests to the protocol-free services and their answers back."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from io import BytesIO
from typing import TYPE_CHECKING, Any

from pydicom import Dataset
from pynetdicom.dsutils import decode, encode

from ..dicom.header import dataset_offset
from ..services.query import QueryError
from ..services.types import InstanceRef, Status, StoreOutcome
from . import access, commands
from .association import AssociationClosed, status_kind
from .commands import Command
from .negotiation import EXPLICIT_VR_LE, IMPLICIT_VR_LE, NATIVE_SYNTAXES, AcceptedContext

if TYPE_CHECKING:
    from .association import Association

log = logging.getLogger("openpacs.dimse")

UNRECOGNIZED_OPERATION = 0x0211
SOP_CLASS_NOT_SUPPORTED = 0x0122
OUT_OF_RESOURCES_SUBOPS = 0xA702

_REQUEST_OF_SERVICE = {
    "echo": commands.C_ECHO_RQ,
    "store": commands.C_STORE_RQ,
    "find": commands.C_FIND_RQ,
    "move": commands.C_MOVE_RQ,
    "get": commands.C_GET_RQ,
    "worklist": commands.C_FIND_RQ,
}
_N_REQUESTS_OF_SERVICE = {
    "mpps": (commands.N_CREATE_RQ, commands.N_SET_RQ),
    "commit": (commands.N_ACTION_RQ,),
}

try:  # the shared transcoder; a small pydicom fallback covers the native syntaxes when it is absent
    from ..dicom import transcode as _transcode
except ImportError:  # pragma: no cover
    _transcode = None  # type: ignore[assignment]


_DIMSE_NAME = {
    commands.C_ECHO_RQ: "C-ECHO",
    commands.C_STORE_RQ: "C-STORE",
    commands.C_FIND_RQ: "C-FIND",
    commands.C_MOVE_RQ: "C-MOVE",
    commands.C_GET_RQ: "C-GET",
    commands.N_CREATE_RQ: "N-CREATE",
    commands.N_SET_RQ: "N-SET",
    commands.N_ACTION_RQ: "N-ACTION",
}


def dispatch(assoc: Association, context_id: int, cmd: Command, chunks: list[bytes | memoryview] | None) -> None:
    ctx = assoc.contexts[context_id]
    field = cmd.field
    if field == commands.N_EVENT_REPORT_RQ and ctx.service == "commit":
        from . import commitment  # a storage commitment result for one of our send jobs (its transaction authorizes it)

        report = commitment.n_event_report(assoc, ctx, cmd, chunks or [])
        assoc.track(asyncio.ensure_future(_guard(assoc, ctx, cmd, report)))
        return
    if _REQUEST_OF_SERVICE.get(ctx.service) != field and field not in _N_REQUESTS_OF_SERVICE.get(ctx.service, ()):
        log.warning("DIMSE 0x%04X from %s on a %s context refused", field, assoc._who(), ctx.abstract_syntax)
        _final(
            assoc,
            context_id,
            cmd,
            (field | 0x8000) & 0xFFFF,
            UNRECOGNIZED_OPERATION,
            comment="operation not supported on this presentation context",
        )
        return
    if ctx.service not in assoc.allowed:
        log.warning("%s from %s refused: not authorized", ctx.service.upper(), assoc._who())
        access.security_alert(
            assoc.endpoint.ctx,
            assoc.calling_aet,
            assoc.peer_address,
            "110132",
            f"{_DIMSE_NAME.get(field, hex(field))} refused (0x0124): {ctx.service} not allowed for this AE",
            destination=assoc.settings.aet,
        )
        _final(
            assoc,
            context_id,
            cmd,
            field | 0x8000,
            Status.NOT_AUTHORIZED,
            comment=f"{ctx.service} not allowed for this AE",
        )
        return
    if field == commands.C_STORE_RQ:
        _c_store(assoc, ctx, cmd, chunks or [])
    elif field == commands.C_ECHO_RQ:
        _final(assoc, context_id, cmd, commands.C_ECHO_RSP, Status.SUCCESS)
    elif ctx.service in ("worklist", "mpps"):
        from . import ris  # Modality Worklist C-FIND, MPPS N-CREATE / N-SET

        assoc.track(asyncio.ensure_future(_guard(assoc, ctx, cmd, ris.handle(assoc, ctx, cmd, chunks or []))))
    elif ctx.service == "commit":
        from . import commitment  # Storage Commitment Push Model N-ACTION

        assoc.track(asyncio.ensure_future(_guard(assoc, ctx, cmd, commitment.n_action(assoc, ctx, cmd, chunks or []))))
    else:
        coro = {commands.C_FIND_RQ: c_find, commands.C_GET_RQ: c_get, commands.C_MOVE_RQ: c_move}[field]
        task = asyncio.ensure_future(_guard(assoc, ctx, cmd, coro(assoc, ctx, cmd, chunks or [])))
        assoc.track(task)


def _final(
    assoc: Association,
    context_id: int,
    cmd: Command,
    rsp_field: int,
    status: int,
    *,
    comment: str = "",
    extra: dict[int, Any] | None = None,
    identifier: bytes | None = None,
) -> None:
    assoc.send_command(
        context_id,
        commands.response(rsp_field, cmd, status, dataset=identifier is not None, comment=comment, extra=extra),
    )
    if identifier is not None:
        assoc.send_dataset(context_id, identifier)
    assoc.operation_done(cmd.message_id)


async def _guard(assoc: Association, ctx: AcceptedContext, cmd: Command, coro: Any) -> None:
    """Run an operation; whatever it raises becomes a failure status, never a dead association."""
    rsp_field = cmd.field | 0x8000
    try:
        await coro
    except AssociationClosed:
        assoc.operation_done(cmd.message_id)
    except Exception as exc:
        log.exception(
            "%s from %s failed", {0x20: "C-FIND", 0x21: "C-MOVE", 0x10: "C-GET"}.get(cmd.field, "DIMSE"), assoc._who()
        )
        if assoc.state == "Sta6" or assoc.state == "Sta13":
            _final(assoc, ctx.context_id, cmd, rsp_field, 0xC000, comment=str(exc)[:64])
        else:
            assoc.operation_done(cmd.message_id)


# ---- C-STORE ---------------------------------------------------------------------------------------------------


def _c_store(assoc: Association, ctx: AcceptedContext, cmd: Command, chunks: list[bytes | memoryview]) -> None:
    sop_class = cmd.get(commands.AFFECTED_SOP_CLASS_UID, "")
    sop_instance = cmd.get(commands.AFFECTED_SOP_INSTANCE_UID, "")
    if sop_class != ctx.abstract_syntax:
        log.warning(
            "C-STORE from %s refused: SOP class %s on a %s context", assoc._who(), sop_class, ctx.abstract_syntax
        )
        _final(
            assoc,
            ctx.context_id,
            cmd,
            commands.C_STORE_RSP,
            SOP_CLASS_NOT_SUPPORTED,
            comment="SOP class differs from the presentation context",
        )
        return
    endpoint = assoc.endpoint
    fut = assoc.loop.run_in_executor(
        endpoint.executor,
        endpoint.ctx.ingest.store_dataset,
        chunks,
        ctx.transfer_syntax,
        sop_class,
        sop_instance,
        assoc.source,
    )
    endpoint.stores_started()

    def done(f: asyncio.Future[StoreOutcome]) -> None:
        endpoint.stores_finished()
        exc = f.exception()
        if exc is not None:
            log.error("C-STORE %s from %s failed: %r", sop_instance, assoc._who(), exc, exc_info=exc)
            status, message = Status.PROCESSING_FAILURE, f"processing failure: {exc}"
        else:
            outcome = f.result()
            status, message = outcome.status, outcome.message
            if outcome.ok:
                study = outcome.study_instance_uid
                if study:
                    stored = assoc.stored_studies
                    stored[study] = stored.get(study, 0) + 1
            else:
                log.warning("C-STORE %s from %s failed: status 0x%04X %s", sop_instance, assoc._who(), status, message)
                if status == Status.NOT_AUTHORIZED:
                    assoc.store_refusals.append(message)
        if assoc.state in ("Sta6",):
            _final(assoc, ctx.context_id, cmd, commands.C_STORE_RSP, status, comment=message)
        else:
            assoc.operation_done(cmd.message_id)

    assoc.track(fut, done)


# ---- C-FIND ----------------------------------------------------------------------------------------------------


def _decode_identifier(ctx: AcceptedContext, chunks: list[bytes | memoryview]) -> Dataset:
    return decode(BytesIO(b"".join(chunks)), ctx.implicit, ctx.little_endian, ctx.deflated)


def _encode_identifier(ctx: AcceptedContext, ds: Dataset) -> bytes:
    raw = encode(ds, ctx.implicit, ctx.little_endian, ctx.deflated)
    if raw is None:
        raise ValueError("identifier could not be encoded")
    return raw


async def c_find(assoc: Association, ctx: AcceptedContext, cmd: Command, chunks: list[bytes | memoryview]) -> None:
    loop = assoc.loop
    services = assoc.endpoint.ctx
    mid = cmd.message_id
    try:
        identifier = _decode_identifier(ctx, chunks)
    except Exception as exc:
        _audit_query(assoc, ctx, None, 4, f"undecodable identifier: {exc}")
        _final(
            assoc, ctx.context_id, cmd, commands.C_FIND_RSP, Status.CANNOT_UNDERSTAND, comment=f"bad identifier: {exc}"
        )
        return
    try:
        query = services.query.from_identifier(identifier, ctx.model)
    except QueryError as exc:
        log.info("C-FIND from %s refused: 0x%04X %s", assoc._who(), exc.status, exc.message)
        _audit_query(assoc, ctx, identifier, 4, f"refused: 0x{exc.status:04X} {exc.message}")
        _final(assoc, ctx.context_id, cmd, commands.C_FIND_RSP, exc.status, comment=exc.message)
        return
    query.departments = _narrow(query.departments, assoc.departments)
    _audit_query(assoc, ctx, identifier, 0, "")
    started = time.perf_counter()

    results: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def put(item: tuple[str, Any]) -> None:
        loop.call_soon_threadsafe(results.put_nowait, item)

    def cancelled() -> bool:
        return assoc.is_cancelled(mid)

    def work() -> None:
        try:
            for ds in services.query.find(query, cancelled):
                if cancelled():
                    break
                put(("match", _encode_identifier(ctx, ds)))
            put(("end", None))
        except QueryError as exc:
            put(("error", exc))
        except BaseException as exc:  # noqa: BLE001 - reported as a failure status
            put(("crash", exc))

    assoc.track(loop.run_in_executor(assoc.endpoint.executor, work))
    pending = {commands.AFFECTED_SOP_CLASS_UID: ctx.abstract_syntax}
    while True:
        kind, value = await results.get()
        if kind == "match":
            if assoc.is_cancelled(mid):
                continue
            assoc.send_command(
                ctx.context_id, commands.response(commands.C_FIND_RSP, cmd, Status.PENDING, dataset=True, extra=pending)
            )
            assoc.send_dataset(ctx.context_id, value)
            await assoc.drain()
            continue
        if kind == "error":
            _final(assoc, ctx.context_id, cmd, commands.C_FIND_RSP, value.status, comment=value.message)
        elif kind == "crash":
            log.error("C-FIND from %s failed: %r", assoc._who(), value, exc_info=value)
            _final(assoc, ctx.context_id, cmd, commands.C_FIND_RSP, 0xC001, comment=f"unable to process: {value}")
        elif assoc.is_cancelled(mid):
            _final(assoc, ctx.context_id, cmd, commands.C_FIND_RSP, Status.CANCEL)
        else:
            _final(assoc, ctx.context_id, cmd, commands.C_FIND_RSP, Status.SUCCESS)
        monitor = getattr(services, "monitor", None)
        if monitor is not None:
            monitor.queried("dimse", str(identifier.get("QueryRetrieveLevel", "")), time.perf_counter() - started,
                            assoc.calling_aet)
            if kind in ("error", "crash"):
                monitor.operation_failed()
        return


def _narrow(a: tuple[str, ...] | None, b: tuple[str, ...] | None) -> tuple[str, ...] | None:
    """The intersection of two department scopes (None: every department)."""
    if a is None:
        return b
    if b is None:
        return a
    return tuple(d for d in a if d in b)


def _audit_query(assoc: Association, ctx: AcceptedContext, identifier: Dataset | None, outcome: int, why: str) -> None:
    """Query (110112): who asked what. A patient ID given without wildcards names the patient participant."""
    patient = ""
    text = ""
    if identifier is not None:
        pid = str(identifier.get("PatientID", "") or "")
        if pid and not any(c in pid for c in "*?\\"):
            patient = pid
        try:
            text = str(identifier)
        except Exception:  # noqa: BLE001
            text = repr(identifier)
    access.audit(
        assoc.endpoint.ctx,
        "Query",
        assoc.calling_aet,
        assoc.peer_address,
        outcome=outcome,
        destination=assoc.settings.aet,
        patient_id=patient,
        query=text,
        detail=" ".join(p for p in (f"C-FIND {ctx.abstract_syntax}", why) if p),
    )


# ---- C-GET / C-MOVE sub-operations --------------------------------------------------------------------------------


def _can_convert(source_ts: str, target_ts: str) -> bool:
    if source_ts == target_ts:
        return True
    if _transcode is not None:
        try:
            return bool(_transcode.can_transcode(source_ts, target_ts))
        except Exception:  # noqa: BLE001
            return False
    return source_ts in NATIVE_SYNTAXES and target_ts in NATIVE_SYNTAXES


def _convert(file_bytes: bytes, source_ts: str, target_ts: str) -> memoryview:
    """The data set of a Part 10 file, in ``target_ts``."""
    if source_ts == target_ts:
        view = memoryview(file_bytes)
        return view[dataset_offset(view) :]
    if _transcode is not None:
        out = _transcode.transcode(file_bytes, target_ts)
        view = memoryview(out)
        return view[dataset_offset(view) :]
    from pydicom import dcmread  # pragma: no cover - fallback for native syntaxes only

    ds = dcmread(BytesIO(file_bytes))
    raw = encode(ds, target_ts == IMPLICIT_VR_LE, target_ts != "1.2.840.10008.1.2.2", target_ts.endswith(".99"))
    if raw is None:
        raise ValueError("could not encode the data set")
    return memoryview(raw)


def choose_context(
    contexts: dict[int, AcceptedContext], ref: InstanceRef, *, need_peer_scp: bool
) -> AcceptedContext | None:
    """The accepted context to send ``ref`` on: its stored syntax if accepted, else one we can convert to."""
    candidates = [
        c for c in contexts.values() if c.abstract_syntax == ref.sop_class_uid and (c.peer_is_scp or not need_peer_scp)
    ]
    for c in candidates:
        if c.transfer_syntax == ref.transfer_syntax_uid:
            return c
    for c in candidates:
        if _can_convert(ref.transfer_syntax_uid, c.transfer_syntax):
            return c
    return None


class Sent:
    """What became of one instance offered to a peer by :func:`store_instance`."""

    __slots__ = ("status", "nbytes", "error", "ours")

    def __init__(self, status: int | None, nbytes: int = 0, error: str = "", ours: bool = False) -> None:
        self.status = status  # the peer's C-STORE status; None when nothing was sent
        self.nbytes = nbytes  # data set bytes the peer acknowledged
        self.error = error  # why it failed ("" for success and warnings)
        self.ours = ours  # a failure of ours (no context, no codec): the same on every attempt

    @property
    def kind(self) -> str:
        return "failure" if self.status is None else status_kind(self.status)


async def store_instance(
    target: Association, ref: InstanceRef, data: bytes, *, need_peer_scp: bool,
    originator: tuple[str, int] | None = None, prefer: str = "",
) -> Sent:
    """Offer one stored instance to ``target`` (a C-MOVE sub-association, the C-GET SCU's own association, or a send
    job's association): the stored bytes unchanged when the stored syntax was accepted, else converted (``prefer``:
    a transfer syntax to use when accepted, e.g. a routing rule's choice). The one C-STORE SCU of every sending path.

    The DIMSE timeout (``TimeoutError``) and a lost association (``AssociationClosed``) reach the caller, which
    knows whether the rest can go on."""
    chosen = None
    if prefer:
        chosen = next((c for c in target.contexts.values() if c.transfer_syntax == prefer
                       and c.abstract_syntax == ref.sop_class_uid and (c.peer_is_scp or not need_peer_scp)), None)
    chosen = chosen or choose_context(target.contexts, ref, need_peer_scp=need_peer_scp)
    if chosen is None:
        return Sent(None, error=f"no accepted context for {ref.sop_class_uid} in {ref.transfer_syntax_uid}",
                    ours=True)
    try:
        if chosen.transfer_syntax == ref.transfer_syntax_uid:
            dataset = _convert(data, ref.transfer_syntax_uid, chosen.transfer_syntax)
        else:
            dataset = await target.loop.run_in_executor(
                target.endpoint.executor, _convert, data, ref.transfer_syntax_uid, chosen.transfer_syntax)
    except Exception as exc:  # noqa: BLE001 - no codec, undecodable pixel data: this instance fails
        return Sent(None, error=f"cannot transcode to {chosen.transfer_syntax}: {exc}", ours=True)
    rsp = await asyncio.wait_for(
        target.send_c_store(chosen.context_id, ref.sop_class_uid, ref.sop_instance_uid, dataset, originator),
        timeout=target.settings.dimse_timeout)
    status = int(rsp.get(commands.STATUS, 0xC000))
    if status_kind(status) == "failure":
        comment = str(rsp.get(commands.ERROR_COMMENT, "") or "").strip()
        return Sent(status, error=f"status 0x{status:04X}" + (f" {comment}" if comment else ""))
    return Sent(status, len(dataset))


class SubOperations:
    """Counts and failed UIDs of a C-GET/C-MOVE, and the responses that report them."""

    def __init__(self, total: int) -> None:
        self.remaining = total
        self.completed = 0
        self.failed = 0
        self.warning = 0
        self.failed_uids: list[str] = []

    def record(self, kind: str, uid: str) -> None:
        self.remaining -= 1
        if kind == "success":
            self.completed += 1
        elif kind == "warning":
            self.warning += 1
        else:
            self.failed += 1
            self.failed_uids.append(uid)

    def counts(self, with_remaining: bool) -> dict[int, Any]:
        out = {commands.COMPLETED: self.completed, commands.FAILED: self.failed, commands.WARNING: self.warning}
        if with_remaining:
            out[commands.REMAINING] = self.remaining
        return out

    def final_status(self, cancelled: bool) -> int:
        if cancelled:
            return Status.CANCEL
        if self.failed == 0 and self.warning == 0:
            return Status.SUCCESS
        if self.completed == 0 and self.warning == 0:
            return OUT_OF_RESOURCES_SUBOPS
        return Status.SUBOPS_FAILURES


def _failed_identifier(ctx: AcceptedContext, subops: SubOperations) -> bytes | None:
    if not subops.failed_uids:
        return None
    ds = Dataset()
    ds.FailedSOPInstanceUIDList = subops.failed_uids
    return _encode_identifier(ctx, ds)


async def _resolve(
    assoc: Association, ctx: AcceptedContext, cmd: Command, chunks: list[bytes | memoryview]
) -> list[InstanceRef] | None:
    rsp_field = cmd.field | 0x8000
    try:
        identifier = _decode_identifier(ctx, chunks)
    except Exception as exc:
        _final(assoc, ctx.context_id, cmd, rsp_field, Status.CANNOT_UNDERSTAND, comment=f"bad identifier: {exc}")
        return None
    try:
        return await assoc.loop.run_in_executor(
            assoc.endpoint.executor,
            functools.partial(
                assoc.endpoint.ctx.retrieve.resolve, identifier, ctx.model, departments=assoc.departments
            ),
        )
    except QueryError as exc:
        log.info("retrieve from %s refused: 0x%04X %s", assoc._who(), exc.status, exc.message)
        _final(assoc, ctx.context_id, cmd, rsp_field, exc.status, comment=exc.message)
        return None


async def _run_suboperations(
    assoc: Association,
    ctx: AcceptedContext,
    cmd: Command,
    refs: list[InstanceRef],
    target: Association,
    originator: tuple[str, int] | None,
) -> None:
    """Send every instance with C-STORE on ``target``, reporting progress to the requestor of ``cmd``."""
    subops = SubOperations(len(refs))
    transfer = _Transfer(assoc, cmd, refs, target)
    await transfer.begin()
    try:
        await _send_all(assoc, ctx, cmd, refs, target, originator, subops)
    finally:
        transfer.end(subops)


class _Transfer:
    """Begin Transferring (110102) before the first sub-operation, DICOM Instances Transferred (110104) after the
    last: one pair per C-MOVE / C-GET that has something to send, with its studies, patient and destination."""

    def __init__(self, assoc: Association, cmd: Command, refs: list[InstanceRef], target: Association) -> None:
        self.assoc = assoc
        self.name = _DIMSE_NAME.get(cmd.field, "retrieve")
        self.studies = list(dict.fromkeys(r.study_instance_uid for r in refs))
        self.destination = target.called_aet if target is not assoc else assoc.calling_aet
        if target.tls and target is not assoc:
            self.destination_detail = f" to {self.destination} over TLS"
        else:
            self.destination_detail = f" to {self.destination}"
        self.patient = ""
        self.count = len(refs)

    def _record(self, event: str, outcome: int, detail: str) -> None:
        access.audit(
            self.assoc.endpoint.ctx,
            event,
            self.assoc.calling_aet,
            self.assoc.peer_address,
            action="R",
            outcome=outcome,
            destination=self.destination,
            study_uids=self.studies,
            patient_id=self.patient,
            detail=detail,
        )

    async def begin(self) -> None:
        if not self.count:
            return
        assoc = self.assoc
        try:
            patients = await assoc.loop.run_in_executor(
                assoc.endpoint.executor, access.study_patients, assoc.endpoint.ctx, self.studies
            )
        except Exception:  # noqa: BLE001
            patients = {}
        self.patient = "\\".join(dict.fromkeys(p for p in patients.values() if p))
        self._record("BeginTransferring", 0, f"{self.name}: {self.count} instance(s){self.destination_detail}")

    def end(self, subops: SubOperations) -> None:
        if not self.count:
            return
        done = subops.completed + subops.warning
        outcome = 0 if done == self.count else (8 if done == 0 else 4)
        self._record(
            "InstancesTransferred",
            outcome,
            f"{self.name}: {subops.completed} completed, {subops.warning} warning, {subops.failed} failed, "
            f"{subops.remaining} not sent{self.destination_detail}",
        )


async def _send_all(
    assoc: Association,
    ctx: AcceptedContext,
    cmd: Command,
    refs: list[InstanceRef],
    target: Association,
    originator: tuple[str, int] | None,
    subops: SubOperations,
) -> None:
    loop = assoc.loop
    endpoint = assoc.endpoint
    rsp_field = cmd.field | 0x8000
    mid = cmd.message_id

    def read(ref: InstanceRef) -> asyncio.Future[bytes]:
        return loop.run_in_executor(endpoint.executor, endpoint.ctx.retrieve.read_file, ref)

    cancelled = False
    prefetch = read(refs[0]) if refs else None
    for i, ref in enumerate(refs):
        if assoc.is_cancelled(mid):
            cancelled = True
            if prefetch is not None:
                prefetch.cancel()
            break
        assert prefetch is not None
        current = prefetch
        prefetch = read(refs[i + 1]) if i + 1 < len(refs) else None
        kind = "failure"
        try:
            data = await current
            sent = await store_instance(target, ref, data, need_peer_scp=target is assoc, originator=originator)
            kind = sent.kind
            if sent.error:
                log.warning("C-STORE sub-operation %s to %s: %s", ref.sop_instance_uid, target._who(), sent.error)
        except AssociationClosed:
            if target is assoc:
                raise
            log.warning("sub-association to %s closed during sub-operation %s", target._who(), ref.sop_instance_uid)
        except TimeoutError:
            log.warning(
                "C-STORE sub-operation %s: no response from %s within %.0fs",
                ref.sop_instance_uid,
                target._who(),
                assoc.settings.dimse_timeout,
            )
            target.abort("DIMSE timeout waiting for C-STORE-RSP")
            if target is assoc:
                raise AssociationClosed("DIMSE timeout") from None
        except Exception as exc:  # noqa: BLE001 - one bad instance must not stop the rest
            log.warning("sub-operation %s failed: %r", ref.sop_instance_uid, exc)
        subops.record(kind, ref.sop_instance_uid)
        if subops.remaining:
            assoc.send_command(
                ctx.context_id, commands.response(rsp_field, cmd, Status.PENDING, extra=subops.counts(True))
            )
            await assoc.drain()
    if cancelled:
        # sub-operations not started count as remaining, and are reported as such with the cancel status
        _final(
            assoc,
            ctx.context_id,
            cmd,
            rsp_field,
            Status.CANCEL,
            extra=subops.counts(True),
            identifier=_failed_identifier(ctx, subops),
        )
        return
    status = subops.final_status(False)
    if status != Status.SUCCESS:
        log.warning(
            "%s from %s finished with status 0x%04X: %d completed, %d failed, %d warning",
            "C-GET" if cmd.field == commands.C_GET_RQ else "C-MOVE",
            assoc._who(),
            status,
            subops.completed,
            subops.failed,
            subops.warning,
        )
    _final(
        assoc,
        ctx.context_id,
        cmd,
        rsp_field,
        status,
        extra=subops.counts(False),
        identifier=_failed_identifier(ctx, subops),
    )


async def c_get(assoc: Association, ctx: AcceptedContext, cmd: Command, chunks: list[bytes | memoryview]) -> None:
    refs = await _resolve(assoc, ctx, cmd, chunks)
    if refs is None:
        return
    await _run_suboperations(assoc, ctx, cmd, refs, assoc, None)


async def c_move(assoc: Association, ctx: AcceptedContext, cmd: Command, chunks: list[bytes | memoryview]) -> None:
    from .scu import open_association

    destination = cmd.get(commands.MOVE_DESTINATION, "")
    remote = next((r for r in access.remote_aes(assoc.settings).values() if r.aet.strip() == destination), None)
    if remote is None:
        log.warning("C-MOVE from %s refused: move destination %r unknown", assoc._who(), destination)
        _final(
            assoc,
            ctx.context_id,
            cmd,
            commands.C_MOVE_RSP,
            Status.MOVE_DESTINATION_UNKNOWN,
            comment=f"move destination {destination!r} unknown",
        )
        return
    refs = await _resolve(assoc, ctx, cmd, chunks)
    if refs is None:
        return
    if not refs:
        _final(assoc, ctx.context_id, cmd, commands.C_MOVE_RSP, Status.SUCCESS, extra=SubOperations(0).counts(False))
        return
    wanted: dict[str, set[str]] = {}
    for ref in refs:
        wanted.setdefault(ref.sop_class_uid, set()).add(ref.transfer_syntax_uid)
    try:
        target = await open_association(assoc.endpoint, remote.host, remote.port, remote.aet, wanted, tls=remote.tls)
    except Exception as exc:  # noqa: BLE001
        log.warning(
            "C-MOVE from %s: cannot associate with %s at %s:%s: %s",
            assoc._who(),
            remote.aet,
            remote.host,
            remote.port,
            exc,
        )
        # a known destination we cannot reach: PS3.4 C.4.2.1.4 "Unable to perform sub-operations", every one failed
        _final(
            assoc,
            ctx.context_id,
            cmd,
            commands.C_MOVE_RSP,
            0xA702,
            comment=f"cannot associate with {remote.aet}"[:64],
            extra={commands.COMPLETED: 0, commands.FAILED: len(refs), commands.WARNING: 0},
        )
        return
    try:
        await _run_suboperations(assoc, ctx, cmd, refs, target, (assoc.calling_aet, cmd.message_id))
    finally:
        await target.release()


# Used by scu.open_association to propose contexts for the stored syntaxes.
FALLBACK_SYNTAXES = (EXPLICIT_VR_LE, IMPLICIT_VR_LE)
