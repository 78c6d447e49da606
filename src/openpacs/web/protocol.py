"""uvicorn's HTTP protocol with the limits a hospital-facing listener needs and uvicorn lacks.

- A request's headers must arrive within ``header_timeout`` seconds of the connection (TLS handshake included) or
  of the previous response: a client that opens connections and trickles bytes ("slowloris") cannot hold them open.
- At most ``max_connections`` connections at once, counted from the TCP accept (before any TLS handshake); one
  more is closed at once. Each connection holds a file descriptor: unbounded, they would starve the blob store, the
  index and the DICOM listener of descriptors.

For HTTPS the server listens on plain TCP and this protocol starts TLS itself (``loop.start_tls``), so that both
limits also hold for connections that never finish a handshake.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from asyncio.sslproto import SSLProtocol
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("openpacs.web")


def guarded_protocol(
    header_timeout: float, max_connections: int, tls: ssl.SSLContext | None = None
) -> type[HttpToolsProtocol]:
    state = {"open": 0, "refusing": False}

    class GuardedHttpProtocol(HttpToolsProtocol):
        _header_timer: asyncio.TimerHandle | None = None
        _raw: asyncio.BaseTransport | None = None
        _counted = False
        _started = False  # uvicorn's own connection_made ran (after the TLS handshake, for HTTPS)
        _early: list[bytes]

        def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
            self._raw = transport
            self._early = []
            state["open"] += 1
            self._counted = True
            if state["open"] > max_connections:
                if not state["refusing"]:
                    log.warning("HTTP: %d connections open (http_max_connections): closing new ones", max_connections)
                    state["refusing"] = True
                self._release()
                transport.close()
                return
            state["refusing"] = False
            self._arm()
            if tls is None:
                self._start(transport)  # type: ignore[arg-type]
                return
            # TLS put between the socket and this protocol now, in this callback (what loop.start_tls does, but
            # without a task switch in which the ClientHello could reach the HTTP parser)
            done: asyncio.Future[None] = self.loop.create_future()
            tls_layer = SSLProtocol(self.loop, self, tls, done, server_side=True, call_connection_made=False,
                                    ssl_handshake_timeout=header_timeout)  # type: ignore[arg-type]
            transport.set_protocol(tls_layer)
            tls_layer.connection_made(transport)
            done.add_done_callback(lambda f: self._handshake_done(f, tls_layer, transport))

        def _handshake_done(
            self, done: asyncio.Future[None], tls_layer: SSLProtocol, raw: asyncio.BaseTransport
        ) -> None:
            error = done.exception() if not done.cancelled() else asyncio.CancelledError()
            if error is not None or raw.is_closing():
                log.info("HTTPS: handshake with %s failed: %s", raw.get_extra_info("peername"), error or "closed")
                raw.close()
                self._release()
                return
            self._start(tls_layer._app_transport)  # the TLS transport this protocol talks through

        def _start(self, transport: asyncio.Transport) -> None:
            self._started = True
            super().connection_made(transport)
            early, self._early = self._early, []
            for data in early:
                super().data_received(data)

        def data_received(self, data: bytes) -> None:
            if not self._started:  # the TLS layer can hand over a request before _handshake_done has run
                self._early.append(data)
                return
            super().data_received(data)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if self._header_timer is None:  # the next request of a kept-alive connection
                self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._release()
            if self._started:
                super().connection_lost(exc)

        def _release(self) -> None:
            """This connection no longer counts (called once whichever way it ends)."""
            self._disarm()
            if self._counted:
                self._counted = False
                state["open"] -= 1

        def _arm(self) -> None:
            self._header_timer = self.loop.call_later(header_timeout, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            transport = self.transport if self._started else self._raw
            if transport is not None and not transport.is_closing():
                log.info("HTTP: closing %s: no complete request headers within %.0f s", self.client or "a client",
                         header_timeout)
                transport.close()
                if not self._started:
                    self._release()

    return GuardedHttpProtocol


def protocol_kwargs(settings: Any) -> dict[str, Any]:
    """uvicorn.Config keywords: the guarded protocol, doing TLS itself when HTTPS is on (uvicorn then listens on
    plain TCP)."""
    from ..dimse.access import tls_context  # the BCP195 floor of DICOM TLS; client certificates optional

    tls = tls_context(settings, ssl.CERT_OPTIONAL) if settings.tls_cert and settings.http_tls else None
    return {"http": guarded_protocol(settings.http_header_timeout, settings.http_max_connections, tls)}
