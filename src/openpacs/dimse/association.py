"""One DICOM association on asyncio: the PS3.8 upper layer state machine and DIMSE message assembly.

Event-driven (no polling). Bytes are received straight into per-PDU buffers (``BufferedProtocol``): a PDU that does not
fit the staging buffer gets its own ``bytearray`` of exactly its declared length, which was first checked against our
maximum, and the data set fragments handed to the ingest service are memoryviews into those buffers, never joined.

States used (PS3.8 Table 9-10): Sta2 (waiting for A-ASSOCIATE-RQ, ARTIM running), Sta5 (requestor waiting for the
AC), Sta6 (established), Sta7 (requestor waiting for A-RELEASE-RP), Sta13 (waiting for the peer to close, ARTIM
running). Any PDU that is malformed or not allowed in the current state is answered with A-ABORT (service provider,
with the PS3.8 reason) and the connection is closed.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import struct
from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from .. import logs
from ..dicom.header import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from ..services.types import Source
from . import access, commands, pdu
from .commands import Command
from .negotiation import AcceptedContext, negotiate

if TYPE_CHECKING:
    from .server import Endpoint

log = logging.getLogger("openpacs.dimse")

STA2, STA5, STA6, STA7, STA13, CLOSED = "Sta2", "Sta5", "Sta6", "Sta7", "Sta13", "Sta1"
STAGE_SIZE = 256 * 1024
ASSOCIATE_RQ_LIMIT = 1024 * 1024  # an A-ASSOCIATE-RQ larger than this is not a real one
HARD_PDU_LIMIT = 256 * 1024 * 1024  # when max_pdu is 0 ("unlimited")
_HEADER = struct.Struct(">BxI")
_PDV = struct.Struct(">IBB")
_U32 = struct.Struct(">I")

WARNING_STATUSES = frozenset({0x0107, 0x0116})


def status_kind(status: int) -> str:
    if status == 0x0000:
        return "success"
    if 0xB000 <= status <= 0xBFFF or status in WARNING_STATUSES:
        return "warning"
    if status in (0xFF00, 0xFF01):
        return "pending"
    if status == 0xFE00:
        return "cancel"
    return "failure"


def _association_ids() -> Iterator[str]:
    prefix = f"{os.getpid() % 0x10000:04x}"
    for n in itertools.count(1):
        yield f"{prefix}-{n}"


_ASSOCIATION_IDS = _association_ids()


class AssociationClosed(Exception):
    pass


class Association(asyncio.BufferedProtocol):
    def __init__(
        self,
        endpoint: Endpoint,
        *,
        reject_limit: bool = False,
        requestor: tuple[pdu.AssociateRQ, dict[int, AcceptedContext]] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.id = next(_ASSOCIATION_IDS)  # in every log line of this association (logs.association_id)
        self.settings = endpoint.settings
        self.loop = endpoint.loop
        self.transport: asyncio.Transport | None = None
        self.state = STA2
        self.peer_address = ""
        self.calling_aet = ""
        self.called_aet = ""
        self.source = Source("DIMSE")
        self.contexts: dict[int, AcceptedContext] = {}
        self.allowed: frozenset[str] = frozenset()
        self.departments: tuple[str, ...] | None = None  # department scope of find/move/get (None: all)
        self.tls = False
        self.tls_peer = ""  # subject CN of the peer's verified TLS certificate
        # study UID -> instances received on this association: one audit event per study, when it ends
        self.stored_studies: dict[str, int] = {}
        self.store_refusals: list[str] = []  # C-STOREs refused 0x0124 by ingest (store scope): one alert at the end
        self.peer_max_pdu = 0
        self._reject_limit = reject_limit
        limit = self.settings.max_pdu if self.settings.max_pdu > 0 else HARD_PDU_LIMIT
        self._max_pdu = min(limit, HARD_PDU_LIMIT)
        # receive buffers
        self._stage = bytearray(STAGE_SIZE)
        self._stage_view = memoryview(self._stage)
        self._pos = 0
        self._end = 0
        self._big: bytearray | None = None
        self._big_view: memoryview | None = None
        self._big_pos = 0
        self._big_type = 0
        # DIMSE message assembly
        self._cmd_parts: list[bytes] = []
        self._cmd_context = 0
        self._pending_cmd: Command | None = None
        self._pending_context = 0
        self._ds_chunks: list[bytes | memoryview] = []
        # operations
        self._queue: deque[tuple[int, Command, list[bytes | memoryview] | None]] = deque()
        self._busy = False
        self._release_pending = False
        self._cancelled: set[int] = set()
        self._rsp_waiters: dict[int, asyncio.Future[Command]] = {}
        self._next_message_id = 1
        self.tasks: set[asyncio.Future[Any]] = set()
        # flow control and timers
        self._can_write = asyncio.Event()
        self._can_write.set()
        self._last_rx = self.loop.time()
        self._artim_start = self._last_rx
        self._watchdog: asyncio.TimerHandle | None = None
        # requestor mode (C-MOVE sub-association)
        self._requestor = requestor
        self.established: asyncio.Future[None] = self.loop.create_future()
        self._released: asyncio.Future[None] = self.loop.create_future()
        self.closed: asyncio.Future[None] = self.loop.create_future()

    # ---- transport callbacks -----------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        logs.association_id.set(self.id)
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        peer = transport.get_extra_info("peername")
        self.peer_address = str(peer[0]) if peer else ""
        if transport.get_extra_info("ssl_object") is not None:
            self.tls = True
            self.tls_peer = access.peer_certificate_name(transport)
        self._artim_start = self._last_rx = self.loop.time()
        self.endpoint.association_opened(self)
        if self._requestor is not None:
            rq, _ = self._requestor
            self.calling_aet, self.called_aet = rq.calling_aet, rq.called_aet
            self._write(pdu.encode_associate_rq(rq.called_aet, rq.calling_aet, rq.contexts, rq.user))
            self.state = STA5
        self._schedule_watchdog()

    def connection_lost(self, exc: Exception | None) -> None:
        logs.association_id.set(self.id)
        was = self.state
        self.state = CLOSED
        if self._watchdog is not None:
            self._watchdog.cancel()
        for waiter in self._rsp_waiters.values():
            if not waiter.done():
                waiter.set_exception(AssociationClosed("association closed"))
        self._rsp_waiters.clear()
        for msg_id in list(self._running_ids()):
            self._cancelled.add(msg_id)
        for fut in (self.established, self._released):
            if not fut.done():
                fut.set_exception(AssociationClosed(f"connection closed in {was}"))
                fut.exception()  # mark retrieved
        if not self.closed.done():
            self.closed.set_result(None)
        if self.stored_studies:
            self._audit_received()
        if self.store_refusals:
            refusals, self.store_refusals = self.store_refusals, []
            access.security_alert(
                self.endpoint.ctx,
                self.calling_aet,
                self.peer_address,
                "110132",
                f"C-STORE refused (0x0124) for {len(refusals)} instance(s): {refusals[0]}",
                destination=self.settings.aet,
            )
        self.endpoint.association_closed(self)

    def _audit_received(self) -> None:
        """DICOM Instances Transferred (action C) for each study received on this association, once, at its end:
        the C-STORE hot path only counts."""
        studies, self.stored_studies = self.stored_studies, {}
        services, calling, address, aet = self.endpoint.ctx, self.calling_aet, self.peer_address, self.settings.aet
        detail_tls = f" over TLS ({self.tls_peer})" if self.tls else ""

        def record() -> None:
            patients = access.study_patients(services, studies)
            for uid, count in studies.items():
                access.audit(
                    services,
                    "InstancesTransferred",
                    calling,
                    address,
                    action="C",
                    destination=aet,
                    study_uids=[uid],
                    patient_id=patients.get(uid, ""),
                    detail=f"C-STORE: {count} instance(s) received{detail_tls}",
                )

        self.endpoint.in_background(record)

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._big_view is not None:
            return self._big_view[self._big_pos :]
        if STAGE_SIZE - self._end < 8192:
            self._compact()
        return self._stage_view[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        logs.association_id.set(self.id)  # the context its callbacks and the tasks they start run in
        try:
            self._received(nbytes)
        except Exception:  # a bug must cost one association, never the server
            log.exception("internal error on the association with %s", self._who())
            self._abort(pdu.ABORT_REASON_NOT_SPECIFIED, "internal error")

    def _received(self, nbytes: int) -> None:
        self._last_rx = self.loop.time()
        if self._big_view is not None:
            self._big_pos += nbytes
            if self._big_pos == len(self._big_view):
                body, ptype = self._big_view, self._big_type
                self._big = self._big_view = None
                self._handle_pdu(ptype, body, owned=True)
            return
        self._end += nbytes
        self._parse_stage()

    def eof_received(self) -> bool | None:
        return None  # close our side too

    # ---- PDU level ---------------------------------------------------------------------------------------
    def _compact(self) -> None:
        n = self._end - self._pos
        if n and self._pos:
            self._stage[0:n] = self._stage[self._pos : self._end]
        self._pos, self._end = 0, n

    def _parse_stage(self) -> None:
        view = self._stage_view
        while self.state != CLOSED:
            avail = self._end - self._pos
            if avail < 6:
                break
            ptype, length = _HEADER.unpack_from(view, self._pos)
            if not self._check_header(ptype, length):
                return
            if avail >= 6 + length:
                start = self._pos + 6
                self._pos = start + length
                self._handle_pdu(ptype, view[start : start + length], owned=False)
            else:
                big = bytearray(length)
                have = avail - 6
                big[:have] = view[self._pos + 6 : self._end]
                self._pos = self._end = 0
                self._big, self._big_view, self._big_pos, self._big_type = big, memoryview(big), have, ptype
                return
        if self._pos == self._end:
            self._pos = self._end = 0

    def _check_header(self, ptype: int, length: int) -> bool:
        """Decide on the 6-byte header alone, so that nothing hostile is ever buffered."""
        state = self.state
        if ptype == pdu.P_DATA_TF:
            if state not in (STA6, STA7, STA13):
                return self._abort(pdu.ABORT_UNEXPECTED_PDU, f"P-DATA-TF in state {state}")
            if length > self._max_pdu:
                return self._abort(
                    pdu.ABORT_INVALID_PARAMETER, f"P-DATA-TF of {length} bytes exceeds our maximum PDU {self._max_pdu}"
                )
            if length < 6:
                return self._abort(pdu.ABORT_INVALID_PARAMETER, f"P-DATA-TF of {length} bytes holds no PDV")
            return True
        if ptype == pdu.A_ASSOCIATE_RQ:
            if state != STA2:
                return self._abort(pdu.ABORT_UNEXPECTED_PDU, f"A-ASSOCIATE-RQ in state {state}")
            if not pdu.FIXED_ASSOCIATE_LENGTH <= length <= ASSOCIATE_RQ_LIMIT:
                return self._abort(pdu.ABORT_INVALID_PARAMETER, f"A-ASSOCIATE-RQ declares {length} bytes")
            return True
        if ptype in (pdu.A_ASSOCIATE_AC, pdu.A_ASSOCIATE_RJ):
            if state != STA5:
                return self._abort(
                    pdu.ABORT_UNEXPECTED_PDU, f"A-ASSOCIATE-{'AC' if ptype == 2 else 'RJ'} in state {state}"
                )
            limit = ASSOCIATE_RQ_LIMIT if ptype == pdu.A_ASSOCIATE_AC else 4
            if length > limit or (ptype == pdu.A_ASSOCIATE_RJ and length != 4):
                return self._abort(pdu.ABORT_INVALID_PARAMETER, f"A-ASSOCIATE-AC/RJ declares {length} bytes")
            return True
        if ptype in (pdu.A_RELEASE_RQ, pdu.A_RELEASE_RP):
            name = "A-RELEASE-RQ" if ptype == pdu.A_RELEASE_RQ else "A-RELEASE-RP"
            if length != 4:
                return self._abort(pdu.ABORT_INVALID_PARAMETER, f"{name} declares {length} bytes")
            if ptype == pdu.A_RELEASE_RQ and state not in (STA6, STA7, STA13):
                return self._abort(pdu.ABORT_UNEXPECTED_PDU, f"{name} in state {state}")
            if ptype == pdu.A_RELEASE_RP and state != STA7:
                return self._abort(pdu.ABORT_UNEXPECTED_PDU, f"{name} in state {state}")
            return True
        if ptype == pdu.A_ABORT:
            if length != 4:
                self._close(f"malformed A-ABORT ({length} bytes) received")
                return False
            return True
        return self._abort(pdu.ABORT_UNRECOGNIZED_PDU, f"unrecognized PDU type 0x{ptype:02X}")

    def _handle_pdu(self, ptype: int, body: memoryview, owned: bool) -> None:
        if ptype == pdu.P_DATA_TF:
            if self.state == STA13:
                return  # PS3.8 AA-6: ignored after our A-RELEASE-RP
            self._handle_pdata(body, owned)
        elif ptype == pdu.A_ASSOCIATE_RQ:
            self._handle_associate_rq(body)
        elif ptype == pdu.A_ASSOCIATE_AC:
            self._handle_associate_ac(body)
        elif ptype == pdu.A_ASSOCIATE_RJ:
            result, source, reason = body[1], body[2], body[3]
            if not self.established.done():
                self.established.set_exception(
                    AssociationClosed(f"association rejected (result {result}, source {source}, reason {reason})")
                )
            self._close(
                f"association rejected by {self.called_aet} (result {result}, source {source}, reason {reason})"
            )
        elif ptype == pdu.A_RELEASE_RQ:
            self._handle_release_rq()
        elif ptype == pdu.A_RELEASE_RP:
            if not self._released.done():
                self._released.set_result(None)
            self._close("")
        elif ptype == pdu.A_ABORT:
            source, reason = body[2], body[3]
            self._close(f"A-ABORT received from {self._who()} (source {source}, reason {reason})")

    def _handle_pdata(self, body: memoryview, owned: bool) -> None:
        end = len(body)
        pos = 0
        contexts = self.contexts
        while pos < end:
            if end - pos < 6:
                self._abort(pdu.ABORT_INVALID_PARAMETER, "truncated PDV item in P-DATA-TF")
                return
            item_len, context_id, control = _PDV.unpack_from(body, pos)
            if item_len < 2 or pos + 4 + item_len > end:
                self._abort(pdu.ABORT_INVALID_PARAMETER, f"PDV item length {item_len} does not fit its P-DATA-TF")
                return
            if context_id not in contexts:
                self._abort(pdu.ABORT_INVALID_PARAMETER, f"PDV for presentation context {context_id}, not accepted")
                return
            fragment = body[pos + 6 : pos + 4 + item_len]
            pos += 4 + item_len
            if control & 1:
                if self._pending_cmd is not None or (self._cmd_parts and context_id != self._cmd_context):
                    self._abort(pdu.ABORT_UNEXPECTED_PARAMETER, "command fragment while a data set fragment was due")
                    return
                self._cmd_parts.append(bytes(fragment))
                self._cmd_context = context_id
                if control & 2:
                    raw = b"".join(self._cmd_parts)
                    self._cmd_parts = []
                    try:
                        cmd = commands.decode_command(raw)
                    except commands.CommandError as exc:
                        self._abort(pdu.ABORT_INVALID_PARAMETER, f"undecodable command set: {exc}")
                        return
                    if cmd.has_dataset:
                        self._pending_cmd, self._pending_context = cmd, context_id
                    else:
                        self._on_message(context_id, cmd, None)
            else:
                if self._pending_cmd is None or context_id != self._pending_context:
                    self._abort(pdu.ABORT_UNEXPECTED_PARAMETER, "data set fragment without its command")
                    return
                if len(fragment):
                    self._ds_chunks.append(fragment if owned else bytes(fragment))
                if control & 2:
                    cmd, chunks = self._pending_cmd, self._ds_chunks
                    self._pending_cmd, self._ds_chunks = None, []
                    self._on_message(context_id, cmd, chunks)
            if self.state == CLOSED:
                return

    def _handle_associate_rq(self, body: memoryview) -> None:
        try:
            rq = pdu.parse_associate_rq(body)
        except pdu.PDUError as exc:
            self._abort(exc.reason, f"malformed A-ASSOCIATE-RQ: {exc}")
            return
        self.calling_aet, self.called_aet = rq.calling_aet, rq.called_aet
        self.source = Source("DIMSE", rq.calling_aet, rq.called_aet, self.peer_address)
        if self._reject_limit:
            self._reject(
                (pdu.RJ_TRANSIENT, pdu.RJ_SOURCE_PRESENTATION, pdu.RJ_PRESENTATION_LOCAL_LIMIT),
                f"local limit exceeded (max_associations={self.settings.max_associations})",
                reason="limit",
            )
            return
        if not rq.protocol_version & 1:
            self._reject(
                (pdu.RJ_PERMANENT, pdu.RJ_SOURCE_ACSE, pdu.RJ_ACSE_PROTOCOL_VERSION),
                f"protocol version {rq.protocol_version:#x} not supported",
                reason="protocol",
            )
            return
        if rq.application_context != pdu.APPLICATION_CONTEXT:
            self._reject(
                (pdu.RJ_PERMANENT, pdu.RJ_SOURCE_USER, pdu.RJ_USER_APP_CONTEXT_NOT_SUPPORTED),
                f"application context {rq.application_context} not supported",
                reason="protocol",
            )
            return
        refusal = access.check_association(self.settings, rq.calling_aet, rq.called_aet, self.peer_address)
        if refusal is not None:
            self._reject(*refusal, alert=True, reason="access")
            return
        self.allowed = access.allowed_operations(self.settings, rq.calling_aet, self.peer_address)
        self.departments = access.department_scope(self.settings, rq.calling_aet, self.peer_address)
        if self.departments is not None:  # store scope: no instances added to another department's study (0x0124)
            self.source = Source(
                "DIMSE", rq.calling_aet, rq.called_aet, self.peer_address, departments=self.departments
            )
        results, self.contexts, roles = negotiate(rq)
        self.peer_max_pdu = rq.user.max_length
        user = pdu.UserInformation(
            max_length=self.settings.max_pdu if self.settings.max_pdu > 0 else 0,
            implementation_class_uid=IMPLEMENTATION_CLASS_UID,
            implementation_version_name=IMPLEMENTATION_VERSION_NAME,
            async_ops=(1, 1) if rq.user.async_ops is not None else None,
            roles=roles,
        )
        self._write(pdu.encode_associate_ac(rq.called_aet, rq.calling_aet, results, user))
        self.state = STA6
        self._last_rx = self.loop.time()
        if not self.established.done():
            self.established.set_result(None)
        monitor = getattr(self.endpoint.ctx, "monitor", None)
        if monitor is not None:
            monitor.association_accepted(rq.calling_aet, self.peer_address)
        if not self.contexts:
            log.info("association from %s: no presentation context accepted", self._who())

    def _handle_associate_ac(self, body: memoryview) -> None:
        try:
            ac = pdu.parse_associate_ac(body)
        except pdu.PDUError as exc:
            self._abort(exc.reason, f"malformed A-ASSOCIATE-AC: {exc}")
            return
        assert self._requestor is not None
        _, proposed = self._requestor
        for pc in ac.contexts:
            ctx = proposed.get(pc.context_id)
            if pc.result == pdu.PC_ACCEPTANCE and ctx is not None:
                ctx.transfer_syntax = pc.transfer_syntax
                self.contexts[pc.context_id] = ctx
        self.peer_max_pdu = ac.user.max_length
        self.state = STA6
        if not self.established.done():
            self.established.set_result(None)

    def _handle_release_rq(self) -> None:
        if self.state == STA7:  # release collision: we are the requestor, answer and wait for our RP
            self._write(pdu.encode_release_rp())
            return
        if self.state == STA13:
            return
        if self._busy or self._queue or self._pending_cmd is not None:
            self._release_pending = True
            return
        self._send_release_rp()

    def _send_release_rp(self) -> None:
        self._release_pending = False
        self._write(pdu.encode_release_rp())
        self.state = STA13
        self._artim_start = self.loop.time()

    def _reject(self, rj: tuple[int, int, int], why: str, alert: bool = False, reason: str = "other") -> None:
        log.warning("association from %s rejected: %s", self._who(), why)
        monitor = getattr(self.endpoint.ctx, "monitor", None)
        if monitor is not None:
            monitor.association_rejected(reason, self.calling_aet, self.peer_address)
        if alert:  # access control, not a protocol or load matter: a Security Alert (node authentication)
            access.security_alert(
                self.endpoint.ctx,
                self.calling_aet,
                self.peer_address,
                "110126",
                f"A-ASSOCIATE-RJ: {why}",
                destination=self.called_aet,
            )
        self._write(pdu.encode_associate_rj(*rj))
        self.state = STA13
        self._artim_start = self.loop.time()

    def _abort(self, reason: int, why: str, source: int = pdu.ABORT_SOURCE_PROVIDER) -> bool:
        """Send A-ABORT and close; returns False so header checks can ``return self._abort(...)``."""
        if self.state != CLOSED and self.transport is not None:
            log.warning("association with %s aborted: %s", self._who(), why)
            self.transport.write(pdu.encode_abort(source, reason))
            self._close("")
        return False

    def abort(self, why: str) -> None:
        self._abort(pdu.ABORT_REASON_NOT_SPECIFIED, why)

    def _close(self, why: str) -> None:
        if why:
            log.info("%s", why)
        self.state = CLOSED
        self._big = self._big_view = None
        if self.transport is not None:
            self.transport.close()

    def _who(self) -> str:
        return f"{self.calling_aet or '?'}@{self.peer_address}"

    # ---- timers ------------------------------------------------------------------------------------------
    def _schedule_watchdog(self) -> None:
        s = self.settings
        step = max(0.02, min(1.0, s.artim_timeout / 4, s.dimse_timeout / 4, s.network_timeout / 4))
        self._watchdog = self.loop.call_later(step, self._watch)

    def _watch(self) -> None:
        if self.state == CLOSED:
            return
        s = self.settings
        now = self.loop.time()
        if self.state in (STA2, STA13, STA5, STA7):
            if now - self._artim_start > s.artim_timeout:
                if self.state == STA2:
                    log.warning(
                        "connection from %s closed: no A-ASSOCIATE-RQ within %.1fs (ARTIM)",
                        self.peer_address,
                        s.artim_timeout,
                    )
                elif self.state in (STA5, STA7):
                    log.warning(
                        "association with %s closed: no answer within %.1fs (ARTIM)", self._who(), s.artim_timeout
                    )
                self._close("")
                return
        elif self.state == STA6:
            idle = now - self._last_rx
            partial = self._big_view is not None or self._cmd_parts or self._pending_cmd is not None
            if (partial or self._rsp_waiters) and idle > s.dimse_timeout:
                self._abort(
                    pdu.ABORT_REASON_NOT_SPECIFIED, f"DIMSE timeout: nothing received for {idle:.1f}s mid-message"
                )
                return
            if not (partial or self._busy or self._queue or self._rsp_waiters) and idle > s.network_timeout:
                self._abort(pdu.ABORT_REASON_NOT_SPECIFIED, f"network timeout: idle for {idle:.1f}s")
                return
        self._schedule_watchdog()

    # ---- sending -----------------------------------------------------------------------------------------
    def _write(self, data: bytes) -> None:
        if data and self.transport is not None and self.state != CLOSED:
            self.transport.write(data)

    def send_command(self, context_id: int, raw: bytes) -> None:
        self._write(pdu.pdata_header(context_id, 0x03, len(raw)) + raw)

    def send_dataset(self, context_id: int, data: bytes | memoryview) -> None:
        if self.state == CLOSED or self.transport is None:
            raise AssociationClosed("association closed")
        view = memoryview(data)
        size = len(view)
        step = (self.peer_max_pdu - 6) if self.peer_max_pdu > 6 else 16 * 1024 * 1024
        pos = 0
        out: list[bytes | memoryview] = []
        while True:
            piece = view[pos : pos + step]
            pos += len(piece)
            last = pos >= size
            out.append(pdu.pdata_header(context_id, 0x02 if last else 0x00, len(piece)))
            out.append(piece)
            if last:
                break
        # one writelines for the whole data set: a peer with a small maximum PDU (storescp: 16 KB) would otherwise
        # cost a send(2) per PDU; uvloop hands the pieces to the kernel together (writev)
        self.transport.writelines(out)

    async def drain(self) -> None:
        if self.state == CLOSED:
            raise AssociationClosed("association closed")
        if not self._can_write.is_set():
            await self._can_write.wait()

    def new_message_id(self) -> int:
        mid = self._next_message_id
        self._next_message_id = mid % 0xFFFF + 1
        return mid

    async def send_c_store(
        self,
        context_id: int,
        sop_class_uid: str,
        sop_instance_uid: str,
        dataset: bytes | memoryview,
        originator: tuple[str, int] | None = None,
    ) -> Command:
        """Send a C-STORE-RQ (C-GET or C-MOVE sub-operation) and wait for its response command."""
        elements: dict[int, Any] = {
            commands.AFFECTED_SOP_CLASS_UID: sop_class_uid,
            commands.COMMAND_FIELD: commands.C_STORE_RQ,
            commands.PRIORITY: 0,
            commands.AFFECTED_SOP_INSTANCE_UID: sop_instance_uid,
        }
        if originator is not None:
            elements[commands.MOVE_ORIGINATOR_AET] = originator[0]
            elements[commands.MOVE_ORIGINATOR_MESSAGE_ID] = originator[1]
        rsp = await self._exchange(context_id, elements, dataset)
        monitor = getattr(self.endpoint.ctx, "monitor", None)
        if monitor is not None and status_kind(rsp.get(commands.STATUS, 0xC000)) != "failure":
            # the peer: the C-MOVE destination on a sub-association we requested, else the C-GET SCU itself
            monitor.retrieved("dimse", len(dataset), self.called_aet if self._requestor else self.calling_aet)
        return rsp

    async def send_request(
        self, context_id: int, elements: dict[int, Any], dataset: bytes | memoryview | None = None
    ) -> Command:
        """Send a request (e.g. N-EVENT-REPORT-RQ) with a new Message ID and wait for its response command."""
        if self.state != STA6:
            raise AssociationClosed(f"association not established ({self.state})")
        return await self._exchange(context_id, elements, dataset)

    async def _exchange(
        self, context_id: int, elements: dict[int, Any], dataset: bytes | memoryview | None
    ) -> Command:
        """Number the request (Message ID, Command Data Set Type), send it and its data set, await the response."""
        mid = self.new_message_id()
        elements = {
            **elements,
            commands.MESSAGE_ID: mid,
            commands.COMMAND_DATA_SET_TYPE: commands.NO_DATASET if dataset is None else commands.DATASET_PRESENT,
        }
        waiter: asyncio.Future[Command] = self.loop.create_future()
        self._rsp_waiters[mid] = waiter
        self._last_rx = self.loop.time()  # the DIMSE timeout counts from the request
        self.send_command(context_id, commands.encode_command(elements))
        if dataset is not None:
            self.send_dataset(context_id, dataset)
        return await waiter

    async def release(self) -> None:
        """Requestor side: A-RELEASE-RQ, wait for the RP (ARTIM bounded), close."""
        if self.state != STA6:
            return
        self._write(pdu.encode_release_rq())
        self.state = STA7
        self._artim_start = self.loop.time()
        try:
            await self._released
        except AssociationClosed:
            pass
        self._close("")

    # ---- DIMSE dispatch ----------------------------------------------------------------------------------
    def _on_message(self, context_id: int, cmd: Command, chunks: list[bytes | memoryview] | None) -> None:
        field = cmd.field
        if field == commands.C_CANCEL_RQ:
            self._cancelled.add(cmd.get(commands.MESSAGE_ID_BEING_RESPONDED_TO, -1))
            return
        if field & 0x8000:
            waiter = self._rsp_waiters.pop(cmd.get(commands.MESSAGE_ID_BEING_RESPONDED_TO, -1), None)
            if waiter is not None and not waiter.done():
                waiter.set_result(cmd)
            else:
                log.info("unexpected DIMSE response 0x%04X from %s ignored", field, self._who())
            return
        if self._requestor is not None:
            self._abort(pdu.ABORT_UNEXPECTED_PARAMETER, f"DIMSE request 0x{field:04X} on our C-MOVE sub-association")
            return
        self._queue.append((context_id, cmd, chunks))
        if not self._busy:
            self._next()

    def is_cancelled(self, message_id: int) -> bool:
        return message_id in self._cancelled or self.state == CLOSED

    def _running_ids(self) -> set[int]:
        return {cmd.message_id for _, cmd, _ in self._queue} | set(self._running)

    _running: set[int] = frozenset()  # type: ignore[assignment]

    def _next(self) -> None:
        from . import operations

        while self._queue and not self._busy and self.state != CLOSED:
            context_id, cmd, chunks = self._queue.popleft()
            self._busy = True
            self._running = {cmd.message_id}
            operations.dispatch(self, context_id, cmd, chunks)
        if not self._busy and self._release_pending and self.state == STA6:
            self._send_release_rp()

    def operation_done(self, message_id: int) -> None:
        self._busy = False
        self._running = set()
        self._cancelled.discard(message_id)
        self._next()

    def track(self, fut: asyncio.Future[Any], done: Callable[[asyncio.Future[Any]], None] | None = None) -> None:
        self.tasks.add(fut)
        fut.add_done_callback(self.tasks.discard)
        if done is not None:
            fut.add_done_callback(done)
