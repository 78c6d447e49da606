"""The DICOM listener when accept() fails (out of file descriptors): it pauses instead of spinning."""

from __future__ import annotations

import asyncio
import errno
import socket

from openpacs.dimse import server


def test_accept_failure_pauses_listening(monkeypatch) -> None:
    monkeypatch.setattr(server, "ACCEPT_PAUSE", 0.2)

    async def main() -> list[float]:
        loop = asyncio.get_running_loop()
        lsock = socket.create_server(("127.0.0.1", 0))
        lsock.setblocking(False)
        calls: list[float] = []

        def on_readable() -> None:
            calls.append(loop.time())
            if len(calls) == 1:  # EMFILE: the connection stays queued, the socket stays readable
                exc = OSError(errno.EMFILE, "Too many open files")
                server._Dispatcher._accept_failed(lsock, on_readable, "test", exc)
            else:
                conn, _ = lsock.accept()
                conn.close()

        loop.add_reader(lsock, on_readable)
        client = socket.create_connection(lsock.getsockname())
        await asyncio.sleep(0.6)
        loop.remove_reader(lsock)
        client.close()
        lsock.close()
        return calls

    calls = asyncio.run(main())
    # one failure, then one accept after the pause (spinning would call again at once, thousands of times)
    assert len(calls) == 2 and calls[1] - calls[0] >= 0.19


def test_other_accept_errors_do_not_pause(monkeypatch) -> None:
    """A connection aborted before accept() (ECONNABORTED) concerns that connection only: no pause."""
    from types import SimpleNamespace

    outcomes = iter([OSError(errno.ECONNABORTED, "Software caused connection abort"), BlockingIOError()])

    def accept():
        raise next(outcomes)

    paused: list[str] = []
    fake = SimpleNamespace(
        lsock=SimpleNamespace(accept=accept),
        _accept_failed=lambda *a: paused.append("paused"),
        dispatch=lambda conn, tls: None,
        accept=lambda: None,
    )
    fake._accept_all = lambda *a, **kw: server._Dispatcher._accept_all(fake, *a, **kw)  # type: ignore[arg-type]
    server._Dispatcher.accept(fake)  # type: ignore[arg-type]
    assert paused == []
    fake.lsock = SimpleNamespace(accept=lambda: (_ for _ in ()).throw(OSError(errno.EMFILE, "Too many open files")))
    server._Dispatcher.accept(fake)  # type: ignore[arg-type]
    assert paused == ["paused"]
