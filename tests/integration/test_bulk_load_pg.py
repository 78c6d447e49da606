"""The bulk index-load path on PostgreSQL (COPY): the same answers as normal ingest, in the query engine and from a
served instance over DCMTK findscu.

The corpus and the comparison are tests/unit/services/test_bulk.py's (loaded from there): one database gets the
instances through IngestService, another through services.bulk.BulkLoader in small chunks.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from helpers import dcmtk
from helpers.server import OpenPACSServer, stop_cleanly
from sqlalchemy import func, select

from openpacs.config import Settings
from openpacs.context import build_context
from openpacs.index.schema import instances
from openpacs.services.bulk import BulkLoader

pytestmark = pytest.mark.postgres

_UNIT = Path(__file__).resolve().parents[1] / "unit"
sys.path.insert(0, str(_UNIT))
_spec = importlib.util.spec_from_file_location("bulk_cases", _UNIT / "services" / "test_bulk.py")
assert _spec is not None and _spec.loader is not None
cases = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cases)


@pytest.fixture(scope="module")
def loaded(pg_cluster, tmp_path_factory):
    """(normal context, bulk context), each on its own fresh PostgreSQL database, holding the same corpus."""
    tmp = tmp_path_factory.mktemp("bulkpg")
    made = []
    for name in ("normal", "bulk"):
        url = pg_cluster.create_database(f"bulk_{name}")
        made.append(build_context(Settings(data_dir=tmp / name, index_url=url)))
    normal, bulk = made
    data = cases.corpus(8, seed="pg")
    for ds in data:
        assert normal.ingest.store_file(cases.part10(ds), cases.SRC).status == 0
    first = data[:40]  # a part ingested normally first: the bulk load extends its patients, studies and series
    for ds in first:
        assert bulk.ingest.store_file(cases.part10(ds), cases.SRC).status == 0
    stats = BulkLoader(bulk.index, batch_size=53).load(cases.new_instance(bulk, ds) for ds in data)
    assert stats.instances == len(data) - len(first) and stats.skipped == len(first)
    yield normal, bulk, data
    for c in made:
        c.close()


def test_query_engine_answers_alike(loaded):
    normal, bulk, data = loaded
    want, got = cases.answers(normal), cases.answers(bulk)
    assert len(got["studies"]) == len({d.StudyInstanceUID for d in data})
    for k in want:
        assert got[k] == want[k], k
    with bulk.index.engine.connect() as c:
        assert c.execute(select(func.count()).select_from(instances)).scalar() == len(data)


def _cfind(port: int, out: Path, level: str, keys: dict[str, str]) -> list[tuple[str, ...]]:
    rsp = dcmtk.find(port, "study", level, keys, out)
    return sorted(tuple(str(ds.get(k, "")) for k in keys) for ds in rsp)


def test_served_cfind_answers_alike(loaded, require_dcmtk, tmp_path):
    normal, bulk, _ = loaded
    servers = []
    try:
        for name, ctx in (("normal", normal), ("bulk", bulk)):
            srv = OpenPACSServer(tmp_path / name, index_url=ctx.settings.index_url, aet="OPENPACS")
            srv.start()
            servers.append(srv)
        queries = [
            ("STUDY", {"StudyInstanceUID": "", "PatientID": "", "PatientName": "", "ModalitiesInStudy": "",
                       "NumberOfStudyRelatedSeries": "", "NumberOfStudyRelatedInstances": "", "AccessionNumber": ""}),
            ("STUDY", {"PatientName": "*PATIENT00*", "StudyInstanceUID": "", "NumberOfStudyRelatedInstances": ""}),
            ("STUDY", {"ModalitiesInStudy": "MR", "StudyInstanceUID": ""}),
            ("SERIES", {"StudyInstanceUID": "", "SeriesInstanceUID": "", "Modality": "",
                        "NumberOfSeriesRelatedInstances": ""}),
        ]
        for i, (level, keys) in enumerate(queries):
            a = _cfind(servers[0].dicom_port, tmp_path / f"a{i}", level, keys)
            b = _cfind(servers[1].dicom_port, tmp_path / f"b{i}", level, keys)
            assert a and a == b, (level, keys)
    finally:
        for s in servers:
            stop_cleanly(s)


def test_normal_ingest_after_a_bulk_load(loaded):
    """The bulk path took its ids from the sequences: a normal store afterwards gets fresh ones (no unique
    violation), and joins the bulk-loaded patient's counters."""
    _, bulk, data = loaded
    ds = cases.instance(patient_id="BP00001", patient_name="Bench^Patient001", modality="MR")
    assert bulk.ingest.store_file(cases.part10(ds), cases.SRC).status == 0
    [p] = cases.find(bulk, "PATIENT", ["PatientID", "NumberOfPatientRelatedStudies"], PatientID="BP00001")
    assert p["NumberOfPatientRelatedStudies"] == str(len({d.StudyInstanceUID for d in data
                                                          if d.PatientID == "BP00001"}) + 1)
