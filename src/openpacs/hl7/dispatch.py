"""Message dispatch: parse, drop duplicates, apply with the handler registered for the type^trigger, log, ACK.

One ordered writer: every message of every connection goes through one queue to one thread, in the order received,
so that messages about a patient apply in order (and SQLite has one writer anyway). The thread takes what is
queued (a group commit, as ingest does): one transaction for the group, a savepoint per message, so that a message
applies completely or not at all while a commit carries several. ACKs are released only after the commit.

Handlers are registered by message type and trigger event: ``dispatcher.register("ADT", ["A01", "A08"], fn)``.
A handler runs inside the message's savepoint with ``Apply`` (the message, the open connection, the services) and
returns an ``Outcome``; it raises ``HL7Error`` (``message.error``: AE, ``message.rejected``: AR) to refuse, and
queues work for after the commit (audit events, notifications) with ``Apply.after_commit``.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import exc
from sqlalchemy.engine import Connection

from ..services.patients import _stamp, sql
from . import message as m

log = logging.getLogger("openpacs.hl7")


@dataclass
class Outcome:
    patient_id: str = ""
    detail: str = ""


@dataclass
class Apply:
    """What a handler gets: the parsed message, the open connection of its transaction, the application context."""

    msg: m.Message
    conn: Connection
    ctx: Any
    peer: str = ""
    after: list[Callable[[], None]] = field(default_factory=list)

    def after_commit(self, fn: Callable[[], None]) -> None:
        self.after.append(fn)


Handler = Callable[[Apply], Outcome]


@dataclass
class _Item:
    raw: bytes
    peer: str
    future: asyncio.Future[bytes]
    loop: asyncio.AbstractEventLoop
    refuse: str | None = None  # framing trouble (oversized, cut short): AR whatever the content
    parsed: m.Message | m.HL7Error | None = None  # parsed before queueing (beside the writer, not in its thread)
    received: datetime | None = None


def _parse(raw: bytes) -> m.Message | m.HL7Error:
    try:
        return m.parse(raw)
    except m.HL7Error as e:
        return e
    except Exception as e:  # never let a parser bug reach the listener
        log.exception("HL7: parser failed")
        return m.rejected(m.DATA_TYPE_ERROR, f"cannot parse the message: {e.__class__.__name__}")


class Dispatcher:
    MAX_GROUP = 64

    def __init__(self, ctx: Any, application: str = "OPENPACS", facility: str = "") -> None:
        self.ctx = ctx
        self.application = application
        self.facility = facility
        self.handlers: dict[tuple[str, str], Handler] = {}
        self._q: queue.Queue[_Item | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self.applied = 0

    # -- registry --------------------------------------------------------------------------------------------
    def register(self, message_type: str, triggers: Iterable[str], handler: Handler) -> None:
        """Handle ``message_type`` (MSH-9.1) with these trigger events (MSH-9.2; ``"*"``: any)."""
        for t in triggers:
            self.handlers[(message_type.upper(), t.upper())] = handler

    def handler_for(self, msg: m.Message) -> Handler:
        h = self.handlers.get((msg.message_type, msg.trigger)) or self.handlers.get((msg.message_type, "*"))
        if h is not None:
            return h
        if any(k[0] == msg.message_type for k in self.handlers):
            raise m.rejected(m.UNSUPPORTED_EVENT, f"{msg.type_trigger} is not supported (trigger event)", "MSH^1^9^2")
        raise m.rejected(m.UNSUPPORTED_MESSAGE_TYPE, f"message type {msg.message_type!r} is not supported",
                         "MSH^1^9^1")

    # -- the writer ------------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="hl7-writer", daemon=True)
            self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            self._q.put(None)
            self._thread.join(timeout=30)
            self._thread = None

    async def handle(self, raw: bytes, peer: str = "", refuse: str | None = None) -> bytes:
        """The ACK for one message, once it is applied and committed (or refused and logged)."""
        self.start()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bytes] = loop.create_future()
        received = datetime.now(UTC)
        parsed = None
        if refuse is None:
            # in the event loop for the usual small message (it runs while the writer waits on the database);
            # a large one in a worker thread, so that the loop keeps serving the other connections
            parsed = _parse(raw) if len(raw) < 65536 else await asyncio.to_thread(_parse, raw)
        self._q.put(_Item(raw, peer, fut, loop, refuse, parsed, received))
        return await fut

    def handle_sync(self, raw: bytes, peer: str = "") -> bytes:
        """For tests and tools without an event loop: the same path, one message."""
        ack, after = self._apply_group([_Item(raw, peer, None, None)])[0]  # type: ignore[arg-type]
        for fn in after:
            fn()
        return ack

    def _loop(self) -> None:
        while True:
            first = self._q.get()
            if first is None:
                return
            group = [first]
            stop = False
            while len(group) < self.MAX_GROUP:
                try:
                    nxt = self._q.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                group.append(nxt)
            try:
                results = self._apply_group(group)
            except Exception as e:  # the index is unusable: no ACK (the sender resends), the listener stays up
                log.error("HL7: %d message(s) not applied, no ACK sent: %r", len(group), e)
                for it in group:
                    it.loop.call_soon_threadsafe(_set_exception, it.future, e)
            else:
                for it, (ack, after) in zip(group, results, strict=True):
                    for fn in after:
                        try:
                            fn()
                        except Exception:
                            log.exception("HL7: after-commit action failed")
                    it.loop.call_soon_threadsafe(_set_result, it.future, ack)
            if stop:
                return

    def _apply_group(self, group: list[_Item]) -> list[tuple[bytes, list[Callable[[], None]]]]:
        for attempt in range(10):
            try:
                with self.ctx.index.write_engine.begin() as conn:
                    results = [self._apply_one(conn, it) for it in group]
                self.applied += len(group)
                return results
            except exc.OperationalError as e:  # locked / serialisation / connection lost: the whole group again
                if attempt == 9:
                    raise
                log.warning("HL7: index write retry %d after %s", attempt + 1, e.__class__.__name__)
                time.sleep(0.05 * (attempt + 1))
        raise AssertionError("unreachable")

    def _apply_one(self, conn: Connection, it: _Item) -> tuple[bytes, list[Callable[[], None]]]:
        received = it.received or datetime.now(UTC)
        msg: m.Message | None = None
        row: dict[str, Any] = dict(received_at=received, peer=it.peer, size=len(it.raw), message_type="",
                                   control_id="", sending_application="", sending_facility="", version="",
                                   charset="", patient_id=None, error=None, error_location=None)
        after: list[Callable[[], None]] = []
        try:
            if it.refuse:
                h = m.salvage_header(it.raw)
                row.update({k: v for k, v in h.items() if k in row})
                raise m.rejected(m.DATA_TYPE_ERROR, it.refuse)
            parsed = it.parsed if it.parsed is not None else _parse(it.raw)
            if isinstance(parsed, m.HL7Error):
                raise parsed
            msg = parsed
            row.update(message_type=msg.type_trigger, control_id=msg.control_id,
                       sending_application=msg.sending_application, sending_facility=msg.sending_facility,
                       version=msg.version, charset=msg.charset)
            m.check_header(msg)
            first = sql(conn, "SELECT id, ack, result FROM hl7_messages WHERE control_id = :c"
                              " AND sending_application = :a AND sending_facility = :f ORDER BY id LIMIT 1",
                        {"c": msg.control_id, "a": msg.sending_application, "f": msg.sending_facility}).first()
            if first is not None:
                ack = first.ack.encode(msg.codec, "replace")
                row.update(result=first.result, error=f"duplicate of message #{first.id}: not applied again")
                self._log(conn, row, msg.text, first.ack)
                self._count(row)
                return ack, after
            handler = self.handler_for(msg)
            job = Apply(msg, conn, self.ctx, it.peer)
            sql(conn, "SAVEPOINT hl7_message")  # the message applies whole or not at all (plain SQL: per message)
            try:
                outcome = handler(job)
            except BaseException:
                sql(conn, "ROLLBACK TO SAVEPOINT hl7_message")
                sql(conn, "RELEASE SAVEPOINT hl7_message")
                raise
            sql(conn, "RELEASE SAVEPOINT hl7_message")
            row.update(patient_id=outcome.patient_id or None, error=outcome.detail or None)
            ack = m.build_ack("AA", msg, application=self.application, facility=self.facility)
            after = job.after
            row["result"] = "AA"
        except m.HL7Error as e:
            if msg is None and not row["control_id"]:
                h = m.salvage_header(it.raw)
                row.update({k: v[:200] for k, v in h.items() if k in row})
            ack = m.build_ack(e.ack_code, msg, raw=it.raw, err=e, application=self.application,
                              facility=self.facility)
            row.update(result=e.ack_code, error=e.text, error_location=e.location or None)
            if msg is not None and row["patient_id"] is None:
                row["patient_id"] = msg.value(msg.segment("PID"), 3) or None
        except exc.OperationalError:
            raise
        except Exception as e:  # a bug in a handler: this message is refused, the others still apply
            log.exception("HL7: handler for %s failed", row["message_type"])
            err = m.error(m.INTERNAL_ERROR, f"internal error: {e.__class__.__name__}")
            ack = m.build_ack("AE", msg, raw=it.raw, err=err, application=self.application, facility=self.facility)
            row.update(result="AE", error=f"internal error: {e!r}"[:2000])
        text = msg.text if msg is not None else it.raw[:65536].decode("utf-8", "replace")
        codec = msg.codec if msg is not None else "latin-1"
        self._log(conn, row, text, ack.decode(codec, "replace"))
        self._count(row)
        return ack, after

    def _count(self, row: dict[str, Any]) -> None:
        monitor = getattr(self.ctx, "monitor", None)
        if monitor is not None:
            monitor.hl7(row["message_type"][:16], row.get("result", ""))

    @staticmethod
    def _log(conn: Connection, row: dict[str, Any], text: str, ack: str) -> None:
        values = {**row, "raw": text.replace("\x00", ""), "ack": ack, "received_at": _stamp(conn, row["received_at"])}
        cols = sorted(values)
        sql(conn, f"INSERT INTO hl7_messages ({', '.join(cols)}) VALUES ({', '.join(':' + c for c in cols)})", values)


def _set_result(fut: asyncio.Future[bytes], value: bytes) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future[bytes], e: BaseException) -> None:
    if not fut.done():
        fut.set_exception(e)
