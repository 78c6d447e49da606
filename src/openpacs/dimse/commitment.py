"""Storage Commitment Push Model SCP (1.2.840.10008.1.20.1, PS3.4 Annex J): N-ACTION-RQ in, N-ACTION-RSP, then the
result as an N-EVENT-REPORT-RQ, translated from services.commitment.

The report goes on the requester's association while it is open, else (or when the node's
``commit_new_association`` asks for it) on a new association we open to the requester's configured AE, proposing
the SOP class with SCP/SCU role selection SCU=0, SCP=1: on that association we are the SCP of the SOP class and
send the N-EVENT-REPORT (PS3.4 J.3.3).

The SCU side (send jobs with ``commit``, dimse/sender.py): ``request_commitment`` opens an association with only
the Storage Commitment Push Model context, sends the N-ACTION-RQ (Transaction UID, Referenced SOP Sequence) and
keeps the association open while the job waits. The peer's N-EVENT-REPORT-RQ may come on that association (a
``_Requestor`` association answers it instead of aborting like a C-MOVE sub-association) or on a new association to
our DICOM listener (operations.dispatch hands N-EVENT-REPORT on a commitment context to ``n_event_report``). Both
paths write the report into the waiting job's payload through the index (services.commitment.record_report), which
the job polls: one path, whichever process of the node (DIMSE worker processes on PostgreSQL) took the report, and
only a running job that asked this very Transaction UID of this AE accepts it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import TYPE_CHECKING, Any

from pydicom import Dataset
from pydicom.sequence import Sequence

from ..config import RemoteAE
from ..services import commitment as sc
from ..services.types import Status
from . import access, commands, pdu
from .association import STA6, Association, AssociationClosed
from .commands import Command
from .negotiation import EXPLICIT_VR_LE, IMPLICIT_VR_LE, STORAGE_COMMITMENT_PUSH, AcceptedContext, classify
from .operations import _decode_identifier, _encode_identifier, _final

if TYPE_CHECKING:
    from .server import Endpoint

log = logging.getLogger("openpacs.dimse")

WELL_KNOWN_INSTANCE = "1.2.840.10008.1.20.1.1"  # Storage Commitment Push Model SOP Instance
REQUEST_STORAGE_COMMITMENT = 1  # Action Type ID
EVENT_SUCCESS = 1  # Event Type ID: every instance committed
EVENT_FAILURES = 2  # Event Type ID: some (or all) failed

# N-ACTION-RSP statuses (PS3.7 C.4)
MISSING_ATTRIBUTE = 0x0120
INVALID_ATTRIBUTE_VALUE = 0x0106
NO_SUCH_SOP_INSTANCE = 0x0112
NO_SUCH_SOP_CLASS = 0x0118
CLASS_INSTANCE_CONFLICT = 0x0119
NO_SUCH_ACTION = 0x0123
PROCESSING_FAILURE = 0x0110

NEW_ASSOCIATION_ATTEMPTS = 3
RETRY_DELAY = 2.0

_REPORTS: set[asyncio.Future[Any]] = set()  # reports still being verified or delivered (strong references)


class _Refused(Exception):
    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status = status
        self.comment = comment


def _request(ds: Dataset) -> tuple[str, list[sc.Reference]]:
    """Transaction UID and references of an N-ACTION Action Information, or _Refused."""
    transaction = str(ds.get("TransactionUID", "") or "").strip()
    if not transaction:
        raise _Refused(MISSING_ATTRIBUTE, "no Transaction UID")
    if len(transaction) > 64 or not all(c.isdigit() or c == "." for c in transaction):
        raise _Refused(INVALID_ATTRIBUTE_VALUE, "Transaction UID is not a UID")
    items = ds.get("ReferencedSOPSequence")
    if not items:
        raise _Refused(MISSING_ATTRIBUTE, "no Referenced SOP Sequence")
    refs: list[sc.Reference] = []
    for item in items:
        sop_class = str(item.get("ReferencedSOPClassUID", "") or "").strip()
        sop_instance = str(item.get("ReferencedSOPInstanceUID", "") or "").strip()
        if not sop_class or not sop_instance:
            raise _Refused(MISSING_ATTRIBUTE, "a Referenced SOP Sequence item lacks its SOP class or instance UID")
        refs.append(sc.Reference(sop_class, sop_instance))
    return transaction, refs


async def n_action(assoc: Association, ctx: AcceptedContext, cmd: Command, chunks: list[bytes | memoryview]) -> None:
    rsp = commands.N_ACTION_RSP
    sop_class = cmd.get(commands.REQUESTED_SOP_CLASS_UID, "")
    instance = cmd.get(commands.REQUESTED_SOP_INSTANCE_UID, "")
    extra: dict[int, Any] = {
        commands.AFFECTED_SOP_CLASS_UID: ctx.abstract_syntax,
        commands.AFFECTED_SOP_INSTANCE_UID: instance or WELL_KNOWN_INSTANCE,
    }

    def refuse(status: int, comment: str) -> None:
        log.info("storage commitment N-ACTION from %s refused: 0x%04X %s", assoc._who(), status, comment)
        _final(assoc, ctx.context_id, cmd, rsp, status, comment=comment, extra=extra)

    if sop_class != ctx.abstract_syntax:
        refuse(CLASS_INSTANCE_CONFLICT if sop_class else NO_SUCH_SOP_CLASS,
               "SOP class differs from the presentation context")
        return
    if instance != WELL_KNOWN_INSTANCE:
        refuse(NO_SUCH_SOP_INSTANCE, f"the SOP instance is {WELL_KNOWN_INSTANCE}")
        return
    if cmd.get(commands.ACTION_TYPE_ID) != REQUEST_STORAGE_COMMITMENT:
        refuse(NO_SUCH_ACTION, "Action Type ID must be 1 (request storage commitment)")
        return
    if not chunks:
        refuse(MISSING_ATTRIBUTE, "no Action Information")
        return
    try:
        transaction, refs = _request(_decode_identifier(ctx, chunks))
    except _Refused as e:
        refuse(e.status, e.comment)
        return
    except Exception as exc:  # noqa: BLE001 - an undecodable data set is the peer's problem, not ours
        refuse(PROCESSING_FAILURE, f"undecodable Action Information: {exc}")
        return
    log.info("storage commitment %s from %s: %d instance(s)", transaction, assoc._who(), len(refs))
    _final(assoc, ctx.context_id, cmd, rsp, Status.SUCCESS,
           extra={**extra, commands.ACTION_TYPE_ID: REQUEST_STORAGE_COMMITMENT})
    task = asyncio.ensure_future(_report(assoc, ctx, transaction, refs))
    _REPORTS.add(task)
    task.add_done_callback(_REPORTS.discard)


def _storable(sop_class_uid: str) -> bool:
    kind = classify(sop_class_uid)
    return kind is not None and kind[0] == "store"


def _report_dataset(aet: str, transaction: str, result: sc.CommitmentResult) -> Dataset:
    ds = Dataset()
    ds.TransactionUID = transaction
    if result.committed:
        ds.RetrieveAETitle = aet
        items = []
        for ref in result.committed:
            item = Dataset()
            item.ReferencedSOPClassUID = ref.sop_class_uid
            item.ReferencedSOPInstanceUID = ref.sop_instance_uid
            items.append(item)
        ds.ReferencedSOPSequence = Sequence(items)
    if result.failed:
        failed = []
        for ref, reason in result.failed:
            item = Dataset()
            item.ReferencedSOPClassUID = ref.sop_class_uid
            item.ReferencedSOPInstanceUID = ref.sop_instance_uid
            item.FailureReason = reason
            failed.append(item)
        ds.FailedSOPSequence = Sequence(failed)
    return ds


def requester(settings: Any, calling_aet: str, address: str) -> RemoteAE | None:
    """The configured remote AE of the requester: the one matching its address, else the first with its title."""
    known = access.known_peer(settings, calling_aet, address)
    if known is not None:
        return known
    return next((r for r in access.remote_aes(settings).values() if r.aet.strip() == calling_aet), None)


async def _report(assoc: Association, ctx: AcceptedContext, transaction: str, refs: list[sc.Reference]) -> None:
    endpoint = assoc.endpoint
    service = sc.for_context(endpoint.ctx)
    calling, address = assoc.calling_aet, assoc.peer_address
    try:
        result: sc.CommitmentResult = await assoc.loop.run_in_executor(
            endpoint.executor,
            functools.partial(service.verify, refs, departments=assoc.departments, supported=_storable),
        )
    except Exception:  # noqa: BLE001 - verify catches its own failures; this is a bug, reported as failures
        log.exception("storage commitment %s: verification failed", transaction)
        result = sc.CommitmentResult(failed=[(r, sc.PROCESSING_FAILURE) for r in refs])
    _audit(endpoint, calling, address, transaction, result)
    event = EVENT_SUCCESS if result.all_committed else EVENT_FAILURES
    ds = _report_dataset(endpoint.settings.aet, transaction, result)
    summary = f"{len(result.committed)} committed, {len(result.failed)} failed"
    remote = requester(endpoint.settings, calling, address)
    if (remote is None or not remote.commit_new_association) and assoc.state == STA6:
        try:
            status = await _send_report(assoc, ctx, ds, event)
            log.info("storage commitment %s reported to %s on its association (%s): status 0x%04X",
                     transaction, assoc._who(), summary, status)
            return
        except (AssociationClosed, TimeoutError) as exc:
            log.warning("storage commitment %s: no N-EVENT-REPORT-RSP from %s on its association (%s)",
                        transaction, assoc._who(), exc or type(exc).__name__)
    if remote is None:
        log.warning("storage commitment %s (%s): %s's association has closed and %s is not a configured remote AE: "
                    "the report cannot be delivered", transaction, summary, calling, calling)
        return
    await _report_on_new_association(endpoint, remote, transaction, ds, event, summary)


async def _send_report(target: Association, ctx: AcceptedContext, ds: Dataset, event: int) -> int:
    elements = {
        commands.AFFECTED_SOP_CLASS_UID: STORAGE_COMMITMENT_PUSH,
        commands.COMMAND_FIELD: commands.N_EVENT_REPORT_RQ,
        commands.AFFECTED_SOP_INSTANCE_UID: WELL_KNOWN_INSTANCE,
        commands.EVENT_TYPE_ID: event,
    }
    rsp = await asyncio.wait_for(
        target.send_request(ctx.context_id, elements, _encode_identifier(ctx, ds)),
        timeout=target.settings.dimse_timeout,
    )
    return int(rsp.get(commands.STATUS, 0xC000))


async def _report_on_new_association(
    endpoint: Endpoint, remote: RemoteAE, transaction: str, ds: Dataset, event: int, summary: str
) -> None:
    from .scu import associate

    contexts = [pdu.PresentationContextRQ(1, STORAGE_COMMITMENT_PUSH, [EXPLICIT_VR_LE, IMPLICIT_VR_LE])]
    roles = {STORAGE_COMMITMENT_PUSH: pdu.RoleSelection(STORAGE_COMMITMENT_PUSH, scu_role=False, scp_role=True)}
    where = f"{remote.aet}@{remote.host}:{remote.port}"
    for attempt in range(1, NEW_ASSOCIATION_ATTEMPTS + 1):
        if attempt > 1:
            await asyncio.sleep(RETRY_DELAY * (attempt - 1))
        proposed = {1: AcceptedContext(1, STORAGE_COMMITMENT_PUSH, "", "commit", "", peer_is_scu=True,
                                       peer_is_scp=False)}
        try:
            target = await associate(endpoint, remote.host, remote.port, remote.aet, contexts, proposed,
                                     roles=roles, tls=remote.tls)
        except Exception as exc:  # noqa: BLE001 - unreachable or rejecting: try again
            log.warning("storage commitment %s: cannot associate with %s (attempt %d of %d): %s",
                        transaction, where, attempt, NEW_ASSOCIATION_ATTEMPTS, exc or type(exc).__name__)
            continue
        try:
            ctx = target.contexts.get(1)
            if ctx is None:
                log.warning("storage commitment %s: %s did not accept the Storage Commitment Push Model context: "
                            "the report cannot be delivered", transaction, where)
                return
            status = await _send_report(target, ctx, ds, event)
            log.info("storage commitment %s reported to %s on a new association (%s): status 0x%04X",
                     transaction, where, summary, status)
            return
        except (AssociationClosed, TimeoutError) as exc:
            log.warning("storage commitment %s: report to %s not answered (attempt %d of %d): %s",
                        transaction, where, attempt, NEW_ASSOCIATION_ATTEMPTS, exc or type(exc).__name__)
        finally:
            await target.release()
    log.error("storage commitment %s (%s): the report could not be delivered to %s", transaction, summary, where)


def _audit(endpoint: Endpoint, calling: str, address: str, transaction: str, result: sc.CommitmentResult) -> None:
    """DICOM Instances Accessed (110103): the requester learnt which of its instances we keep."""
    services, aet = endpoint.ctx, endpoint.settings.aet
    outcome = 0 if result.all_committed else (8 if not result.committed else 4)
    detail = (f"storage commitment {transaction}: {len(result.committed)} committed, "
              f"{len(result.failed)} failed")

    def record() -> None:
        patients = access.study_patients(services, result.study_uids)
        access.audit(services, "InstancesAccessed", calling, address, action="R", outcome=outcome, destination=aet,
                     study_uids=result.study_uids,
                     patient_id="\\".join(dict.fromkeys(p for p in patients.values() if p)), detail=detail)

    endpoint.in_background(record)


# -- SCU: N-ACTION to a peer, N-EVENT-REPORT from it ----------------------------------------------------------------

NO_SUCH_EVENT_TYPE = 0x0113
UNKNOWN_TRANSACTION = PROCESSING_FAILURE


def _report_lists(ds: Dataset) -> tuple[str, list[str], list[tuple[str, int | None]]]:
    transaction = str(ds.get("TransactionUID", "") or "").strip()
    committed = [str(i.get("ReferencedSOPInstanceUID", "") or "").strip()
                 for i in ds.get("ReferencedSOPSequence") or []]
    failed: list[tuple[str, int | None]] = []
    for item in ds.get("FailedSOPSequence") or []:
        reason = item.get("FailureReason")
        failed.append((str(item.get("ReferencedSOPInstanceUID", "") or "").strip(),
                       int(reason) if reason is not None else None))
    return transaction, [u for u in committed if u], [(u, r) for u, r in failed if u]


async def n_event_report(assoc: Association, ctx: AcceptedContext, cmd: Command,
                         chunks: list[bytes | memoryview]) -> None:
    """A peer reports the result of storage commitment we asked for (on our N-ACTION's association or a new one)."""
    rsp = commands.N_EVENT_REPORT_RSP
    event = cmd.get(commands.EVENT_TYPE_ID)
    extra: dict[int, Any] = {
        commands.AFFECTED_SOP_CLASS_UID: ctx.abstract_syntax,
        commands.AFFECTED_SOP_INSTANCE_UID: cmd.get(commands.AFFECTED_SOP_INSTANCE_UID) or WELL_KNOWN_INSTANCE,
    }
    if event is not None:
        extra[commands.EVENT_TYPE_ID] = event
    reporter = assoc.called_aet if assoc._requestor is not None else assoc.calling_aet

    def answer(status: int, comment: str = "") -> None:
        if status:
            log.warning("storage commitment N-EVENT-REPORT from %s refused: 0x%04X %s", assoc._who(), status,
                        comment)
        _final(assoc, ctx.context_id, cmd, rsp, status, comment=comment, extra=extra)

    if event not in (EVENT_SUCCESS, EVENT_FAILURES):
        answer(NO_SUCH_EVENT_TYPE, "Event Type ID must be 1 or 2")
        return
    if not chunks:
        answer(MISSING_ATTRIBUTE, "no Event Information")
        return
    try:
        transaction, committed, failed = _report_lists(_decode_identifier(ctx, chunks))
    except Exception as exc:  # noqa: BLE001 - an undecodable report is the peer's problem
        answer(PROCESSING_FAILURE, f"undecodable Event Information: {exc}")
        return
    endpoint = assoc.endpoint
    accepted = await assoc.loop.run_in_executor(
        endpoint.executor, sc.record_report, endpoint.ctx.index, transaction, reporter, committed, failed)
    if not accepted:
        answer(UNKNOWN_TRANSACTION, "no send job waits for this Transaction UID from this AE")
        return
    log.info("storage commitment %s: report from %s (%d committed, %d failed)", transaction, assoc._who(),
             len(committed), len(failed))
    answer(0x0000)


class _Requestor(Association):
    """Our N-ACTION's association: the peer may send the N-EVENT-REPORT-RQ on it (PS3.4 J.3.3)."""

    def _on_message(self, context_id: int, cmd: Command, chunks: list[bytes | memoryview] | None) -> None:
        ctx = self.contexts.get(context_id)
        if cmd.field == commands.N_EVENT_REPORT_RQ and ctx is not None and ctx.service == "commit":
            self.track(asyncio.ensure_future(n_event_report(self, ctx, cmd, chunks or [])))
            return
        super()._on_message(context_id, cmd, chunks)


async def request_commitment(endpoint: Endpoint, remote: RemoteAE, refs: list[sc.Reference],
                             transaction: str) -> Association:
    """Associate with ``remote`` and ask it to commit ``refs`` (N-ACTION-RQ, Action Type 1). Returns the open
    association (release it once the report is in); raises ConnectionError when the peer cannot be reached,
    PermanentError-worthy ``LookupError`` when it does not offer storage commitment, RuntimeError on a refusal."""
    from ..dicom.header import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

    settings = endpoint.settings
    contexts = [pdu.PresentationContextRQ(1, STORAGE_COMMITMENT_PUSH, [EXPLICIT_VR_LE, IMPLICIT_VR_LE])]
    proposed = {1: AcceptedContext(1, STORAGE_COMMITMENT_PUSH, "", "commit", "", peer_is_scu=False,
                                   peer_is_scp=True)}
    rq = pdu.AssociateRQ(
        protocol_version=1, called_aet=remote.aet, calling_aet=settings.aet, application_context=pdu.APPLICATION_CONTEXT,
        contexts=contexts,
        user=pdu.UserInformation(max_length=settings.max_pdu if settings.max_pdu > 0 else 0,
                                 implementation_class_uid=IMPLEMENTATION_CLASS_UID,
                                 implementation_version_name=IMPLEMENTATION_VERSION_NAME, roles={}),
    )
    where = f"{remote.aet} at {remote.host}:{remote.port}"
    try:
        _, assoc = await asyncio.wait_for(endpoint.loop.create_connection(
            lambda: _Requestor(endpoint, requestor=(rq, proposed)), remote.host, remote.port,
            ssl=endpoint.client_tls if remote.tls else None, server_hostname=remote.host if remote.tls else None,
            ssl_handshake_timeout=settings.artim_timeout if remote.tls else None), timeout=settings.network_timeout)
        await asyncio.wait_for(assoc.established, timeout=settings.artim_timeout + 1)
    except (OSError, TimeoutError, AssociationClosed) as exc:
        raise ConnectionError(f"storage commitment: cannot associate with {where}: "
                              f"{exc or type(exc).__name__}") from exc
    ctx = assoc.contexts.get(1)
    if ctx is None:
        assoc.abort("no storage commitment context")
        raise LookupError(f"{remote.aet} does not accept the Storage Commitment Push Model (1.2.840.10008.1.20.1)")
    ds = Dataset()
    ds.TransactionUID = transaction
    items = []
    for ref in refs:
        item = Dataset()
        item.ReferencedSOPClassUID = ref.sop_class_uid
        item.ReferencedSOPInstanceUID = ref.sop_instance_uid
        items.append(item)
    ds.ReferencedSOPSequence = Sequence(items)
    elements = {
        commands.REQUESTED_SOP_CLASS_UID: STORAGE_COMMITMENT_PUSH,
        commands.COMMAND_FIELD: commands.N_ACTION_RQ,
        commands.REQUESTED_SOP_INSTANCE_UID: WELL_KNOWN_INSTANCE,
        commands.ACTION_TYPE_ID: REQUEST_STORAGE_COMMITMENT,
    }
    try:
        rsp = await asyncio.wait_for(assoc.send_request(1, elements, _encode_identifier(ctx, ds)),
                                     timeout=settings.dimse_timeout)
    except (AssociationClosed, TimeoutError) as exc:
        assoc.abort("no N-ACTION-RSP")
        raise ConnectionError(f"storage commitment: no N-ACTION response from {where}: "
                              f"{exc or type(exc).__name__}") from exc
    status = int(rsp.get(commands.STATUS, 0xC000))
    if status != 0x0000:
        comment = str(rsp.get(commands.ERROR_COMMENT, "") or "").strip()
        await assoc.release()
        raise RuntimeError(f"storage commitment refused by {remote.aet}: N-ACTION status 0x{status:04X}"
                           + (f" {comment}" if comment else ""))
    log.info("storage commitment %s asked of %s: %d instance(s)", transaction, where, len(refs))
    return assoc
