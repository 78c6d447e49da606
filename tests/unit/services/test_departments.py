"""Department rules: a change made elsewhere (another node, another process) reaches the cached rules at once."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from openpacs.index.db import Index
from openpacs.services import departments as D


@pytest.fixture
def index(index_url: str) -> Any:
    ix = Index(index_url)
    yield ix
    ix.close()


@pytest.fixture
def other_node(index_url: str) -> Any:
    """The same index opened by another node (its own change bus: a bump there does not call this one's callbacks)."""
    ix = Index(index_url)
    yield ix
    ix.close()


US = {"SERIES": {"modality": "US"}, "STUDY": {}}


@pytest.mark.parametrize("uptime", [5.0, 1_000_000.0])
def test_a_rule_added_elsewhere_classifies_the_next_study(index: Index, other_node: Index, monkeypatch,
                                                           uptime: float) -> None:
    """The caches' TTL is long (config_cache_seconds); the change feed marks the rules stale. That must hold on a
    machine up for less than the TTL too: monotonic time starts at boot (a CI run once found it stale-proof there)."""
    clock = [uptime]
    monkeypatch.setattr(D, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    here = D.DepartmentService(index, reload_every=3600.0)
    elsewhere = D.DepartmentService(other_node, reload_every=3600.0)
    here.ensure_standard()
    assert here.classify(US) is None  # no rules yet: loaded, and cached for an hour
    elsewhere.add_rule("cardiology", modality="US", priority=1)
    clock[0] += 1.0
    assert here.classify(US) is None  # the TTL alone would wait an hour
    here._mark_stale()  # what the change feed calls when the "departments" epoch moves
    assert here.classify(US) == "cardiology"
    assert here.classify({"SERIES": {"modality": "CT"}, "STUDY": {}}) is None
