"""The serving process and the DICOM workers run on uvloop when it is installed (it is a dependency)."""

from __future__ import annotations

import asyncio

from openpacs import eventloop


def test_run_uses_uvloop_and_returns_the_result() -> None:
    async def which() -> tuple[str, int]:
        await asyncio.sleep(0)
        return type(asyncio.get_running_loop()).__module__, 42

    module, value = eventloop.run(which())
    assert module.startswith("uvloop")
    assert value == 42
