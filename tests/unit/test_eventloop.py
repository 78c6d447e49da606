"""The process runtime: glibc's allocator keeps freed large buffers for reuse (eventloop.tune_allocator)."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _run(code: str, **env: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**env, "PATH": "/usr/bin"},
                         check=True)
    return out.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_tune_allocator_applies_and_yields_to_the_environment() -> None:
    # a 4 MB buffer allocated and freed repeatedly: from the heap (reused), not a fresh mmap each time, once tuned
    probe = (
        "import resource, openpacs.eventloop as e; tuned = e.tune_allocator(); "
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt; "
        "[len(b'x' * (4 << 20)) for _ in range(50)]; "
        "print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)"
    )
    tuned, faults = _run(probe).split()
    assert tuned == "True"
    untuned_flag, untuned_faults = _run(probe, MALLOC_TRIM_THRESHOLD_="131072").split()
    assert untuned_flag == "False"  # an operator's MALLOC_* setting wins
    # 50 x 4 MB freshly mapped = 50 x 1024 page faults; reused heap memory faults once
    assert int(faults) < 5000 < int(untuned_faults)
