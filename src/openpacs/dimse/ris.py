"""Modality Worklist (C-FIND, 1.2.840.10008.5.1.4.31) and MPPS (N-CREATE / N-SET, 1.2.840.10008.3.1.2.3.3) as SCP:
translate DIMSE to services.worklist and its answers (matches, MppsRefusal) back to responses and status codes."""

from __future__ import annotations

import logging
import struct
import time
from typing import TYPE_CHECKING, Any

from pydicom import Dataset
from pydicom.datadict import tag_for_keyword
from pydicom.uid import generate_uid

from ..services import worklist as wl
from ..services.types import Status
from . import commands
from .commands import Command
from .negotiation import AcceptedContext
from .operations import _audit_query, _decode_identifier, _encode_identifier, _final

if TYPE_CHECKING:
    from .association import Association

log = logging.getLogger("openpacs.dimse")

IDENTIFIER_DOES_NOT_MATCH = 0xA900
NO_SUCH_SOP_CLASS = 0x0118
CLASS_INSTANCE_CONFLICT = 0x0119


async def handle(assoc: Association, ctx: AcceptedContext, cmd: Command, chunks: list[bytes | memoryview]) -> None:
    if ctx.service == "worklist":
        await worklist_find(assoc, ctx, cmd, chunks)
    elif cmd.field == commands.N_CREATE_RQ:
        await n_create(assoc, ctx, cmd, chunks)
    else:
        await n_set(assoc, ctx, cmd, chunks)


def _service(assoc: Association) -> wl.WorklistService:
    return wl.for_context(assoc.endpoint.ctx)


async def _blocking(assoc: Association, fn: Any, *args: Any) -> Any:
    return await assoc.loop.run_in_executor(assoc.endpoint.executor, fn, *args)


# ---- Modality Worklist C-FIND -------------------------------------------------------------------------------------


async def worklist_find(assoc: Association, ctx: AcceptedContext, cmd: Command,
                        chunks: list[bytes | memoryview]) -> None:
    mid = cmd.message_id
    try:
        identifier = _decode_identifier(ctx, chunks)
    except Exception as exc:
        _audit_query(assoc, ctx, None, 4, f"undecodable identifier: {exc}")
        _final(assoc, ctx.context_id, cmd, commands.C_FIND_RSP, Status.CANNOT_UNDERSTAND,
               comment=f"bad identifier: {exc}")
        return
    started = time.perf_counter()
    service = _service(assoc)
    try:
        if ctx.little_endian and not ctx.deflated:  # encoded straight from the rows (no pydicom per match)
            matches: list[bytes] = await _blocking(assoc, service.find_encoded, identifier, ctx.implicit)
        else:
            found: list[Dataset] = await _blocking(assoc, service.find, identifier)
            matches = [_encode_identifier(ctx, ds) for ds in found]
    except wl.WorklistError as exc:
        log.info("worklist C-FIND from %s refused: %s", assoc._who(), exc)
        _audit_query(assoc, ctx, identifier, 4, f"refused: {exc}")
        _final(assoc, ctx.context_id, cmd, commands.C_FIND_RSP, IDENTIFIER_DOES_NOT_MATCH, comment=str(exc))
        return
    _audit_query(assoc, ctx, identifier, 0, f"{len(matches)} worklist item(s)")
    log.debug("worklist C-FIND from %s: %d match(es) in %.1f ms", assoc._who(), len(matches),
              (time.perf_counter() - started) * 1000)
    pending = {commands.AFFECTED_SOP_CLASS_UID: ctx.abstract_syntax}
    for raw in matches:
        if assoc.is_cancelled(mid):
            _final(assoc, ctx.context_id, cmd, commands.C_FIND_RSP, Status.CANCEL)
            return
        assoc.send_command(ctx.context_id, commands.response(commands.C_FIND_RSP, cmd, Status.PENDING, dataset=True,
                                                             extra=pending))
        assoc.send_dataset(ctx.context_id, raw)
        await assoc.drain()
    _final(assoc, ctx.context_id, cmd, commands.C_FIND_RSP, Status.SUCCESS)
    monitor = getattr(assoc.endpoint.ctx, "monitor", None)
    if monitor is not None:
        try:
            monitor.queried("dimse", "WORKLIST", time.perf_counter() - started, assoc.calling_aet)
        except Exception:  # noqa: BLE001 - metrics never break an association
            log.debug("monitor.queried failed", exc_info=True)


# ---- MPPS N-CREATE / N-SET ----------------------------------------------------------------------------------------


def _offending(keywords: list[str]) -> bytes:
    tags = [tag_for_keyword(k) for k in keywords]
    return b"".join(struct.pack("<HH", t >> 16, t & 0xFFFF) for t in tags if t is not None)


def _refused(assoc: Association, ctx: AcceptedContext, cmd: Command, rsp: int, uid: str,
             e: wl.MppsRefusal) -> None:
    log.info("%s %s from %s refused: 0x%04X %s", "N-CREATE" if rsp == commands.N_CREATE_RSP else "N-SET", uid,
             assoc._who(), e.status, e.comment)
    extra: dict[int, Any] = {commands.AFFECTED_SOP_CLASS_UID: ctx.abstract_syntax,
                             commands.AFFECTED_SOP_INSTANCE_UID: uid}
    if e.offending:
        extra[commands.OFFENDING_ELEMENT] = _offending(e.offending)
    if e.error_id is not None:
        extra[commands.ERROR_ID] = e.error_id
    _final(assoc, ctx.context_id, cmd, rsp, e.status, comment=e.comment, extra=extra)


async def _dataset(assoc: Association, ctx: AcceptedContext, cmd: Command, chunks: list[bytes | memoryview],
                   rsp: int, uid: str) -> Dataset | None:
    extra = {commands.AFFECTED_SOP_CLASS_UID: ctx.abstract_syntax, commands.AFFECTED_SOP_INSTANCE_UID: uid}
    if not chunks:
        _final(assoc, ctx.context_id, cmd, rsp, wl.MISSING_ATTRIBUTE, comment="no data set", extra=extra)
        return None
    try:
        return _decode_identifier(ctx, chunks)
    except Exception as exc:  # noqa: BLE001
        _final(assoc, ctx.context_id, cmd, rsp, wl.PROCESSING_FAILURE, comment=f"undecodable data set: {exc}",
               extra=extra)
        return None


async def n_create(assoc: Association, ctx: AcceptedContext, cmd: Command, chunks: list[bytes | memoryview]) -> None:
    rsp = commands.N_CREATE_RSP
    sop_class = cmd.get(commands.AFFECTED_SOP_CLASS_UID, "")
    uid = cmd.get(commands.AFFECTED_SOP_INSTANCE_UID, "") or generate_uid()  # the SCP assigns one if absent
    if sop_class != ctx.abstract_syntax:
        _final(assoc, ctx.context_id, cmd, rsp, CLASS_INSTANCE_CONFLICT if sop_class else NO_SUCH_SOP_CLASS,
               comment="SOP class differs from the presentation context")
        return
    ds = await _dataset(assoc, ctx, cmd, chunks, rsp, uid)
    if ds is None:
        return
    try:
        await _blocking(assoc, _service(assoc).mpps_create, uid, ds, assoc.calling_aet)
    except wl.MppsRefusal as e:
        _refused(assoc, ctx, cmd, rsp, uid, e)
        return
    log.info("MPPS %s created IN PROGRESS by %s", uid, assoc._who())
    _final(assoc, ctx.context_id, cmd, rsp, Status.SUCCESS,
           extra={commands.AFFECTED_SOP_CLASS_UID: ctx.abstract_syntax, commands.AFFECTED_SOP_INSTANCE_UID: uid})


async def n_set(assoc: Association, ctx: AcceptedContext, cmd: Command, chunks: list[bytes | memoryview]) -> None:
    rsp = commands.N_SET_RSP
    sop_class = cmd.get(commands.REQUESTED_SOP_CLASS_UID, "")
    uid = cmd.get(commands.REQUESTED_SOP_INSTANCE_UID, "")
    if sop_class != ctx.abstract_syntax or not uid:
        _final(assoc, ctx.context_id, cmd, rsp, CLASS_INSTANCE_CONFLICT if sop_class else NO_SUCH_SOP_CLASS,
               comment="SOP class differs from the presentation context" if uid else "no Requested SOP Instance",
               extra={commands.AFFECTED_SOP_CLASS_UID: ctx.abstract_syntax})
        return
    ds = await _dataset(assoc, ctx, cmd, chunks, rsp, uid)
    if ds is None:
        return
    try:
        status = await _blocking(assoc, _service(assoc).mpps_set, uid, ds)
    except wl.MppsRefusal as e:
        _refused(assoc, ctx, cmd, rsp, uid, e)
        return
    log.info("MPPS %s set %s by %s", uid, status, assoc._who())
    _final(assoc, ctx.context_id, cmd, rsp, Status.SUCCESS,
           extra={commands.AFFECTED_SOP_CLASS_UID: ctx.abstract_syntax, commands.AFFECTED_SOP_INSTANCE_UID: uid})
