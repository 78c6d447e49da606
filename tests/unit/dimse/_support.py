"""Builders for the DIMSE unit tests: PDUs and a fake endpoint/transport to drive one Association by hand."""

from __future__ import annotations

import asyncio
import struct
from typing import Any

from openpacs.config import Settings
from openpacs.dimse import commands, pdu
from openpacs.dimse.association import Association
from openpacs.dimse.negotiation import EXPLICIT_VR_LE, IMPLICIT_VR_LE, VERIFICATION
from openpacs.services.types import StoreOutcome

CT = "1.2.840.10008.5.1.4.1.1.2"


def associate_rq(
    contexts: list[tuple[int, str, list[str]]] | None = None,
    *,
    called: str = "OPENPACS",
    calling: str = "TESTSCU",
    max_length: int = 16384,
    roles: dict[str, tuple[bool, bool]] | None = None,
) -> bytes:
    contexts = contexts or [(1, VERIFICATION, [IMPLICIT_VR_LE]), (3, CT, [EXPLICIT_VR_LE, IMPLICIT_VR_LE])]
    user = pdu.UserInformation(max_length=max_length, implementation_class_uid="1.2.3.4")
    for uid, (scu, scp) in (roles or {}).items():
        user.roles[uid] = pdu.RoleSelection(uid, scu, scp)
    pcs = [pdu.PresentationContextRQ(cid, a, ts) for cid, a, ts in contexts]
    return pdu.encode_associate_rq(called, calling, pcs, user)


def pdata(context_id: int, control: int, data: bytes) -> bytes:
    return pdu.pdata_header(context_id, control, len(data)) + data


def echo_rq(message_id: int = 1, context_id: int = 1) -> bytes:
    cmd = commands.encode_command(
        {
            commands.AFFECTED_SOP_CLASS_UID: VERIFICATION,
            commands.COMMAND_FIELD: commands.C_ECHO_RQ,
            commands.MESSAGE_ID: message_id,
            commands.COMMAND_DATA_SET_TYPE: commands.NO_DATASET,
        }
    )
    return pdata(context_id, 0x03, cmd)


def store_rq_command(message_id: int = 1, sop_class: str = CT, sop_instance: str = "1.2.3.4.5") -> bytes:
    return commands.encode_command(
        {
            commands.AFFECTED_SOP_CLASS_UID: sop_class,
            commands.COMMAND_FIELD: commands.C_STORE_RQ,
            commands.MESSAGE_ID: message_id,
            commands.PRIORITY: 0,
            commands.COMMAND_DATA_SET_TYPE: commands.DATASET_PRESENT,
            commands.AFFECTED_SOP_INSTANCE_UID: sop_instance,
        }
    )


class FakeIngest:
    def __init__(self, status: int = 0) -> None:
        self.status = status
        self.calls: list[tuple[bytes, str, str, str, Any]] = []
        self.study_of: dict[str, str] = {}  # SOP instance UID -> study UID reported in the outcome

    def store_dataset(self, chunks, ts, cls, inst, source):  # type: ignore[no-untyped-def]
        self.calls.append((b"".join(bytes(c) for c in chunks), ts, cls, inst, source))
        return StoreOutcome(self.status, sop_instance_uid=inst, study_instance_uid=self.study_of.get(inst, ""))


class FakeAudit:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def record(self, event: str, **kw: Any) -> None:
        self.events.append((event, kw))


class FakeCtx:
    def __init__(self) -> None:
        self.ingest = FakeIngest()
        self.audit = FakeAudit()


class InlineExecutor:
    """Runs executor jobs at once, so a test sees the response without threads."""

    def submit(self, fn, *args):  # type: ignore[no-untyped-def]
        import concurrent.futures

        f: concurrent.futures.Future[Any] = concurrent.futures.Future()
        try:
            f.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001
            f.set_exception(exc)
        return f

    def shutdown(self, wait: bool = True) -> None:
        pass


class FakeEndpoint:
    def __init__(self, settings: Settings, loop: asyncio.AbstractEventLoop) -> None:
        self.settings = settings
        self.loop = loop
        self.ctx = FakeCtx()
        self.executor = InlineExecutor()
        self.opened: list[Association] = []
        self.closed: list[Association] = []
        self.stores = 0

    def association_opened(self, a: Association) -> None:
        self.opened.append(a)

    def association_closed(self, a: Association) -> None:
        self.closed.append(a)

    def stores_started(self) -> None:
        self.stores += 1

    def stores_finished(self) -> None:
        self.stores -= 1

    def in_background(self, fn: Any) -> None:
        fn()


class FakeTransport(asyncio.Transport):
    def __init__(self, protocol: Association) -> None:
        super().__init__()
        self.protocol = protocol
        self.out = bytearray()
        self.closing = False

    def write(self, data: Any) -> None:
        self.out += bytes(data)

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            self.protocol.loop.call_soon(self.protocol.connection_lost, None)

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 40000)}.get(name, default)

    def pdus(self) -> list[tuple[int, bytes]]:
        """Split what was written into (type, body) and clear it."""
        out, data, pos = [], bytes(self.out), 0
        while pos + 6 <= len(data):
            ptype, length = struct.unpack_from(">BxI", data, pos)
            out.append((ptype, data[pos + 6 : pos + 6 + length]))
            pos += 6 + length
        self.out.clear()
        return out


class Harness:
    """One Association on a fake transport; ``feed`` pushes bytes in arbitrary slices, as the kernel would."""

    def __init__(self, **settings: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.settings = Settings(**settings)
        self.endpoint = FakeEndpoint(self.settings, self.loop)
        self.assoc = Association(self.endpoint)  # type: ignore[arg-type]
        self.transport = FakeTransport(self.assoc)
        self.assoc.connection_made(self.transport)

    def feed(self, data: bytes, step: int | None = None) -> None:
        pos = 0
        while pos < len(data) and not self.transport.closing:
            buf = self.assoc.get_buffer(-1)
            n = min(len(buf), len(data) - pos, step or len(data))
            buf[:n] = data[pos : pos + n]
            pos += n
            self.assoc.buffer_updated(n)
        self.run()

    def run(self, seconds: float = 0.0) -> None:
        self.loop.run_until_complete(asyncio.sleep(seconds))

    def associate(self, **kw: Any) -> pdu.AssociateAC:
        self.feed(associate_rq(**kw))
        ((ptype, body),) = self.transport.pdus()
        assert ptype == pdu.A_ASSOCIATE_AC, (ptype, body)
        return pdu.parse_associate_ac(memoryview(body))

    def close(self) -> None:
        if not self.transport.closing:
            self.transport.close()
        self.run()
        self.loop.close()
