"""The event loop every OpenPACS process runs on: uvloop when it is installed (it comes with ``uvicorn[standard]``),
else the standard library's.

uvloop's transports write large buffers without copying what the socket did not take into a Python ``bytearray``
(the standard selector transport does): that copy was half of the event loop's time while streaming a WADO-RS series.

Each process also keeps glibc's allocator from handing large buffers back to the kernel (``tune_allocator``): a
WADO-RS series is read in 4 MB pieces, and with the defaults each piece was a fresh mmap, page-faulted and zeroed by
the kernel, then unmapped: half of the server's time on a 26 MB series (perf: exc_page_fault, clear_page_erms).
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


MMAP_THRESHOLD = 64 << 20  # allocations below this come from the heap, and are reused once freed
TRIM_THRESHOLD = 256 << 20  # free heap kept before any is returned to the kernel


def tune_allocator() -> bool:
    """glibc only (``mallopt``); elsewhere nothing changes. The environment's MALLOC_* settings win."""
    import ctypes
    import ctypes.util
    import os

    if os.environ.get("MALLOC_MMAP_THRESHOLD_") or os.environ.get("MALLOC_TRIM_THRESHOLD_"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(mallopt(m_mmap_threshold, MMAP_THRESHOLD)) and bool(mallopt(m_trim_threshold, TRIM_THRESHOLD))


def run(main: Coroutine[Any, Any, T]) -> T:
    tune_allocator()
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)


def run_child(main: Coroutine[Any, Any, None], settings: Any, tag: str) -> None:
    """The body of a spawned child process of ``openpacs serve`` (a DIMSE worker, the jobs process): SIGINT is
    ignored (the serving process decides when its children stop), logging carries ``tag`` and the pid, then
    ``main`` runs on this module's loop."""
    import os
    import signal

    from .logs import configure as configure_logging

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    configure_logging(settings.log_level, settings.log_format, process_tag=f"{tag}:{os.getpid()}")
    try:
        run(main)
    except KeyboardInterrupt:
        pass
