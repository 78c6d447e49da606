"""uvicorn's HTTP protocol with the two limits a hospital-facing listener needs and uvicorn lacks.

- A request's headers must arrive within ``header_timeout`` seconds of its first byte (or of the connection): a
  client that opens connections and trickles header bytes ("slowloris") cannot hold them open for ever.
- At most ``max_connections`` connections at once; one more is closed at once. Each connection holds a file
  descriptor: unbounded, they would starve the blob store, the index and the DICOM listener of descriptors.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("openpacs.web")


def guarded_protocol(header_timeout: float, max_connections: int) -> type[HttpToolsProtocol]:
    class GuardedHttpProtocol(HttpToolsProtocol):
        _header_timer: asyncio.TimerHandle | None = None
        _refused_logged = False

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                if not GuardedHttpProtocol._refused_logged:
                    log.warning("HTTP: %d connections open (http_max_connections): closing new ones", max_connections)
                    GuardedHttpProtocol._refused_logged = True
                transport.close()
                return
            GuardedHttpProtocol._refused_logged = False
            self._arm()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if self._header_timer is None:  # the next request of a kept-alive connection
                self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._header_timer = self.loop.call_later(header_timeout, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                log.info("HTTP: closing %s: no complete request headers within %.0f s", self.client, header_timeout)
                self.transport.close()

    return GuardedHttpProtocol


def protocol_kwargs(settings: Any) -> dict[str, Any]:
    """uvicorn.Config keywords for the guarded protocol."""
    return {"http": guarded_protocol(settings.http_header_timeout, settings.http_max_connections)}
