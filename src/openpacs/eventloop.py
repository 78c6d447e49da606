"""The event loop every OpenPACS process runs on: uvloop when it is installed (it comes with ``uvicorn[standard]``),
else the standard library's.

uvloop's transports write large buffers without copying what the socket did not take into a Python ``bytearray``
(the standard selector transport does): that copy was half of the event loop's time while streaming a WADO-RS series.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; kept optional for odd platforms
        return None
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T]) -> T:
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)
