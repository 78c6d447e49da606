"""The MLLP listener (HL7 v2 over TCP, optionally TLS) in the serving process's event loop.

Framing: <VT> message <FS><CR>. Bytes outside a frame are ignored; a message larger than ``hl7_max_message`` is
answered AR (its header salvaged for MSA-2) and skipped to its <FS>, the connection stays up. A connection idle for
``hl7_idle_timeout`` seconds is closed. Each connection handles its messages one after the other (an ACK is sent,
after the commit, before the next message of that connection is applied); the dispatcher orders all connections.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import ssl
from typing import Any

from .dispatch import Dispatcher

log = logging.getLogger("openpacs.hl7")

VT, FS, CR = b"\x0b", b"\x1c", b"\r"
HEADER_KEEP = 4096  # of an oversized message: enough of MSH for the AR
# each has register(dispatcher, ctx)
HANDLER_MODULES = ["openpacs.hl7.adt", "openpacs.hl7.orders", "openpacs.hl7.reports"]


def build_dispatcher(ctx: Any) -> Dispatcher:
    d = Dispatcher(ctx, application=ctx.settings.aet)
    for name in HANDLER_MODULES:
        importlib.import_module(name).register(d, ctx)
    return d


def frame(message: bytes) -> bytes:
    return VT + message + FS + CR


class MLLPServer:
    def __init__(self, settings: Any, dispatcher: Dispatcher) -> None:
        self.settings = settings
        self.dispatcher = dispatcher
        self.connections = 0
        self.server: asyncio.AbstractServer | None = None

    def tls_context(self) -> ssl.SSLContext | None:
        if not self.settings.hl7_tls:
            return None
        # the BCP195 server context of DICOM TLS (mutual TLS when tls_ca is set), built in one place
        from ..dimse.access import tls_context  # noqa: PLC0415

        return tls_context(self.settings)

    async def start(self) -> asyncio.AbstractServer:
        self.server = await asyncio.start_server(
            self._connection, self.settings.hl7_host, self.settings.hl7_port, ssl=self.tls_context(),
            ssl_handshake_timeout=30 if self.settings.hl7_tls else None, limit=1 << 20, backlog=256)
        return self.server

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer_info = writer.get_extra_info("peername")
        peer = f"{peer_info[0]}:{peer_info[1]}" if isinstance(peer_info, tuple) else str(peer_info or "")
        if self.connections >= self.settings.hl7_max_connections:
            log.warning("HL7: refused a connection from %s: hl7_max_connections (%d) reached", peer,
                        self.settings.hl7_max_connections)
            writer.close()
            return
        self.connections += 1
        try:
            await self._serve(reader, writer, peer)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError) as e:
            log.debug("HL7: connection from %s ended: %r", peer, e)
        except Exception:
            log.exception("HL7: connection from %s failed", peer)
        finally:
            self.connections -= 1
            try:
                writer.close()
                await asyncio.wait_for(writer.wait_closed(), timeout=5)
            except Exception:
                pass

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str) -> None:
        limit = self.settings.hl7_max_message
        idle = self.settings.hl7_idle_timeout
        buf = bytearray()
        in_frame = False
        skipped = 0  # bytes of an oversized message thrown away so far (its head is kept in buf)
        while True:
            try:
                async with asyncio.timeout(idle if idle > 0 else None):  # no task per read (wait_for makes one)
                    chunk = await reader.read(1 << 16)
            except TimeoutError:
                log.info("HL7: closing %s after %.0f s without data", peer, idle)
                return
            if not chunk:
                return
            data = memoryview(chunk)
            while data:
                if not in_frame:
                    start = bytes(data).find(VT)
                    if start < 0:
                        break  # noise between frames (a lone CR after FS, keep-alive bytes): ignored
                    data = data[start + 1 :]
                    in_frame = True
                    buf.clear()
                    skipped = 0
                    continue
                view = bytes(data)
                end = view.find(FS)
                restart = view.find(VT)
                cut = end if restart < 0 or (0 <= end < restart) else restart
                piece = data if cut < 0 else data[:cut]
                if skipped or len(buf) + len(piece) > limit:
                    room = max(0, HEADER_KEEP - len(buf))
                    buf += piece[:room]
                    skipped += len(piece) - min(room, len(piece))
                else:
                    buf += piece
                if cut < 0:
                    break
                refuse = None
                if cut == restart:  # a new frame began before this one ended: this one was cut short
                    refuse = "the message was cut short: a new MLLP frame (<VT>) began before its <FS>"
                    data = data[cut:]
                else:
                    data = data[cut + 1 :]
                    in_frame = False
                if skipped:
                    refuse = f"message larger than hl7_max_message ({limit} bytes)"
                ack = await self.dispatcher.handle(bytes(buf), peer, refuse=refuse)
                buf.clear()
                skipped = 0
                if cut == restart:
                    in_frame = False
                writer.write(frame(ack))
                await writer.drain()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


async def serve_hl7(ctx: Any, stop: asyncio.Event, ready: asyncio.Event | None = None) -> None:
    """Run the listener until ``stop`` is set (``hl7_port = 0``: return at once)."""
    settings = ctx.settings
    if not settings.hl7_port:
        if ready is not None:
            ready.set()
        return
    dispatcher = build_dispatcher(ctx)
    dispatcher.start()
    server = MLLPServer(settings, dispatcher)
    try:
        await server.start()
    except BaseException:
        await asyncio.to_thread(dispatcher.close)
        raise
    finally:
        if ready is not None:  # also when the port is taken: serve then reports the error and stops
            ready.set()
    log.info("HL7 MLLP%s listening on %s:%d", " (TLS)" if settings.hl7_tls else "", settings.hl7_host,
             settings.hl7_port)
    try:
        await stop.wait()
    finally:
        await server.close()
        await asyncio.to_thread(dispatcher.close)
