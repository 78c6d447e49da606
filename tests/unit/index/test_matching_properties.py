"""Property tests: the SQL engine (QueryService.find), the in-memory matcher (match_in_memory) and a tiny reference
implementation of PS3.4 C.2.2.2 agree on random names, descriptions, dates, modality lists and query strings."""

from __future__ import annotations

import random
import re

import pytest
from core_factory import instance, store
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from openpacs.config import Settings
from openpacs.context import build_context
from openpacs.services.query import match_in_memory
from openpacs.services.types import Query

ALPHABET = "aAbB^_%é"
MODALITIES = ["CT", "MR", "CR", "PT", "SR"]


def ref_wild(pattern: str, value: str | None) -> bool:
    """Reference single value / wildcard matching: '*' any sequence, '?' one character, all else literal."""
    if pattern in ("", "*"):
        return True
    if value is None:
        return False
    rx = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(rx, value, re.S) is not None


def ref_range(query: str, value: str | None) -> bool:
    if query == "":
        return True
    if not value:
        return False
    if "-" not in query:
        return value == query
    lo, hi = query.split("-")
    return (not lo or value >= lo) and (not hi or value <= hi)


def _rand_text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(n))


def _build_rows():
    rng = random.Random(1234)
    rows = []
    for i in range(40):
        name = _rand_text(rng, rng.randint(0, 5))
        desc = _rand_text(rng, rng.randint(0, 4))
        date = "" if i % 9 == 0 else f"2020{rng.randint(1, 3):02d}{rng.randint(1, 28):02d}"
        mods = rng.sample(MODALITIES, rng.randint(1, 3))
        rows.append((f"PP{i:03d}", name, desc, date, mods))
    return rows


ROWS = _build_rows()


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def pctx(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("props")
    if request.param == "sqlite":
        url = f"sqlite:///{tmp / 'index.sqlite'}"
    else:
        url = request.getfixturevalue("pg_cluster").create_database("props")
    ctx = build_context(Settings(data_dir=tmp / "data", index_url=url))
    for pid, name, desc, date, mods in ROWS:
        study = None
        for m in mods:
            ds = instance(patient_id=pid, patient_name=name, modality=m, StudyDescription=desc, StudyDate=date,
                          study_uid=study)
            study = ds.StudyInstanceUID
            assert store(ctx, ds).status == 0
    yield ctx
    ctx.close()


def sql_ids(ctx, **filters) -> set[str]:
    q = Query(level="STUDY", filters=filters, return_keys=["PatientID"])
    return {ds.PatientID for ds in ctx.query.find(q)}


patterns = st.text(alphabet=ALPHABET + "*?", max_size=5)
PROPS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@PROPS
@given(pattern=patterns)
def test_person_name_matching(pctx, pattern):
    pattern = pattern.strip(" ")
    expected = {pid for pid, name, *_ in ROWS if ref_wild(pattern.upper(), name.upper())}
    assert sql_ids(pctx, PatientName=pattern) == expected
    assert {pid for pid, name, *_ in ROWS if match_in_memory("PN", pattern, name)} == expected


@PROPS
@given(pattern=patterns)
def test_case_sensitive_text_matching(pctx, pattern):
    expected = {pid for pid, _n, desc, *_ in ROWS if ref_wild(pattern, desc)}
    assert sql_ids(pctx, StudyDescription=pattern) == expected
    assert {pid for pid, _n, desc, *_ in ROWS if match_in_memory("LO", pattern, desc)} == expected


dates = st.builds(lambda m, d: f"2020{m:02d}{d:02d}", st.integers(1, 3), st.integers(1, 28))


@PROPS
@given(lo=st.one_of(st.just(""), dates), hi=st.one_of(st.just(""), dates), single=st.booleans())
def test_date_matching(pctx, lo, hi, single):
    if single:
        query = lo
    else:
        if not lo and not hi:
            return  # "-" alone is not a range
        query = f"{lo}-{hi}"
    expected = {pid for pid, _n, _d, date, _m in ROWS if ref_range(query, date)}
    assert sql_ids(pctx, StudyDate=query) == expected
    assert {pid for pid, _n, _d, date, _m in ROWS if match_in_memory("DA", query, date)} == expected


@PROPS
@given(values=st.lists(st.text(alphabet="CTMRPS*?", min_size=1, max_size=3), min_size=1, max_size=3))
def test_modalities_in_study_matching(pctx, values):
    query = "\\".join(values)
    expected = {pid for pid, *_r, mods in ROWS if any(ref_wild(v, m) for v in values for m in mods)}
    if any(v in ("*",) for v in values):
        expected = {r[0] for r in ROWS}
    assert sql_ids(pctx, ModalitiesInStudy=query) == expected
    assert {pid for pid, *_r, mods in ROWS if match_in_memory("CS", query, "\\".join(mods))} == expected
