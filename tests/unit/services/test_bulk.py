"""The bulk index-load path (services/bulk.py) gives the query engine the same answers as the normal ingest path.

The same few hundred instances go into one index through IngestService (C-STORE style) and into another through
BulkLoader (in small chunks, so studies and series span chunks and are extended); then C-FIND/QIDO-level queries
(counts, modalities, SOP classes, names, sizes, matching) must answer alike on both. SQLite here; PostgreSQL in
tests/integration/test_bulk_load_pg.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from core_factory import MR, SRC, instance, part10, store
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from openpacs.config import Settings
from openpacs.context import build_context
from openpacs.dicom.header import header_info, index_values
from openpacs.index.schema import changes, instances, patients, series, studies
from openpacs.index.writer import NewInstance
from openpacs.services.bulk import BulkLoader
from openpacs.services.types import Query

CT = "1.2.840.10008.5.1.4.1.1.2"


def corpus(n_patients: int = 6, seed: str = "b") -> list[Any]:
    """Patients with 1-3 studies, each of CT and MR series (two SOP classes), 4-9 instances per series."""
    out = []
    for p in range(n_patients):
        for st in range(1 + p % 3):
            study = generate_uid(entropy_srcs=[f"{seed}study{p}.{st}"])
            for se, mod in enumerate(("CT", "MR", "CT")[: 1 + (p + st) % 3]):
                ser = generate_uid(entropy_srcs=[f"{seed}series{p}.{st}.{se}"])
                for i in range(4 + (p + st + se) % 6):
                    out.append(instance(
                        patient_id=f"BP{p:05d}", patient_name=f"Bench^Patient{p:03d}", study_uid=study, series_uid=ser,
                        sop_uid=generate_uid(entropy_srcs=[f"{seed}sop{p}.{st}.{se}.{i}"]), modality=mod,
                        sop_class=MR if mod == "MR" else CT, pixels=64 + 2 * i,
                        StudyDate=f"202512{10 + st:02d}", AccessionNumber=f"ACC{p:03d}{st}", StudyID=str(st),
                        ReferringPhysicianName="Ref^Doc", StudyDescription=f"desc {p}", SeriesNumber=se + 1,
                        SeriesDescription=f"series {se}", InstanceNumber=i + 1, PatientSex="O"))
    return out


def new_instance(ctx: Any, ds: Any) -> NewInstance:
    """What the ingest service prepares for ``ds`` (blob written to the store), for the bulk path."""
    data = part10(ds)
    info = header_info(data)
    blob = ctx.store.put([data])
    ctx.store.sync_pending()
    return NewInstance(values=index_values(info), blob_key=blob.key, size=blob.size, sha256="0" * 64,
                       transfer_syntax_uid=info.transfer_syntax_uid, calling_aet="BULK", source="BULK")


def make(tmp: Path, name: str) -> Any:
    return build_context(Settings(data_dir=tmp / name, index_url=f"sqlite:///{tmp / name / 'index.sqlite'}"))


def find(ctx: Any, level: str, keys: list[str], **filters: str) -> list[dict[str, str]]:
    q = Query(level=level, filters={**dict.fromkeys(keys, ""), **filters})  # type: ignore[arg-type]
    out = [{k: "" if ds.get(k) is None else str(ds.get(k)) for k in keys} for ds in ctx.query.find(q)]
    return sorted(out, key=lambda d: sorted(d.items()))


STUDY_KEYS = ["StudyInstanceUID", "PatientID", "PatientName", "StudyDate", "AccessionNumber", "ModalitiesInStudy",
              "SOPClassesInStudy", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances", "StudyDescription",
              "ReferringPhysicianName"]
PATIENT_KEYS = ["PatientID", "PatientName", "NumberOfPatientRelatedStudies", "NumberOfPatientRelatedSeries",
                "NumberOfPatientRelatedInstances"]
SERIES_KEYS = ["SeriesInstanceUID", "StudyInstanceUID", "Modality", "SeriesNumber", "NumberOfSeriesRelatedInstances"]


def answers(ctx: Any) -> dict[str, Any]:
    """C-FIND/QIDO-level answers of an index, and the sizes the console shows."""
    out: dict[str, Any] = {
        "patients": find(ctx, "PATIENT", PATIENT_KEYS),
        "studies": find(ctx, "STUDY", STUDY_KEYS),
        "series": find(ctx, "SERIES", SERIES_KEYS),
        "images": len(find(ctx, "IMAGE", ["SOPInstanceUID"])),
        "pid": find(ctx, "STUDY", ["StudyInstanceUID"], PatientID="BP00004"),
        "name": find(ctx, "STUDY", ["StudyInstanceUID"], PatientName="*PATIENT00*"),
        "acc": find(ctx, "STUDY", ["StudyInstanceUID"], AccessionNumber="ACC0021"),
        "date": find(ctx, "STUDY", ["StudyInstanceUID"], StudyDate="20251211-20251212"),
        "mr": find(ctx, "STUDY", ["StudyInstanceUID"], ModalitiesInStudy="MR"),
        "mr_series": find(ctx, "SERIES", ["SeriesInstanceUID"], Modality="MR"),
    }
    with ctx.index.engine.connect() as c:
        out["sizes"] = sorted(c.execute(select(studies.c.study_instance_uid, studies.c.size_bytes)).all())
        out["series_sizes"] = sorted(c.execute(select(series.c.series_instance_uid, series.c.size_bytes)).all())
        out["patient_sizes"] = sorted(c.execute(select(patients.c.patient_id, patients.c.patient_name_norm)).all())
        out["change_types"] = sorted(c.execute(select(changes.c.change_type, func.count())
                                               .group_by(changes.c.change_type)).all())
    return out


@pytest.fixture
def pair(tmp_path: Path):
    a, b = make(tmp_path, "normal"), make(tmp_path, "bulk")
    yield a, b
    a.close()
    b.close()


def test_bulk_load_answers_as_normal_ingest(pair):
    normal, bulk = pair
    data = corpus()
    assert len(data) > 100
    for ds in data:  # Part 10 files as given (STOW-RS, import): the same bytes as the bulk path's blobs
        assert normal.ingest.store_file(part10(ds), SRC).status == 0
    stats = BulkLoader(bulk.index, batch_size=37).load(new_instance(bulk, ds) for ds in data)
    assert stats.instances == len(data) and stats.skipped == 0 and stats.batches > 3
    assert stats.patients == 6 and stats.studies == len({d.StudyInstanceUID for d in data})
    want, got = answers(normal), answers(bulk)
    assert got["studies"] and got["studies"] == want["studies"]
    # the derived lists were built: a study of CT and MR series, with both SOP classes
    assert any("CT" in s["ModalitiesInStudy"] and "MR" in s["ModalitiesInStudy"] and MR in s["SOPClassesInStudy"]
               for s in got["studies"])
    for k in want:
        assert got[k] == want[k], k
    assert bulk.index.counts() == normal.index.counts()


def test_bulk_load_extends_what_ingest_stored_and_skips_duplicates(pair):
    """Half of every series ingested normally first, then the whole corpus through the bulk path: the rest is
    added to the existing patients, studies and series, the first half is skipped as already indexed."""
    normal, bulk = pair
    data = corpus(4, seed="x")
    for ds in data:
        assert normal.ingest.store_file(part10(ds), SRC).status == 0
    first = data[::2]
    for ds in first:
        assert bulk.ingest.store_file(part10(ds), SRC).status == 0
    items = [new_instance(bulk, ds) for ds in data]
    stats = BulkLoader(bulk.index, batch_size=25).load(items + items[:10])
    assert stats.instances == len(data) - len(first)
    assert stats.skipped == len(first) + 10
    want, got = answers(normal), answers(bulk)
    for k in want:
        assert got[k] == want[k], k
    with bulk.index.engine.connect() as c:
        assert c.execute(select(func.count()).select_from(instances)).scalar() == len(data)


def test_bulk_names_are_normalised_and_sqlite_ids_stay_unique(pair):
    _, bulk = pair
    data = corpus(2, seed="n")
    BulkLoader(bulk.index, batch_size=10).load(new_instance(bulk, ds) for ds in data)
    # a normal store afterwards gets fresh ids (the bulk path left AUTOINCREMENT/max(id) consistent)
    out = store(bulk, instance(patient_id="NEW1", patient_name="New^One", sop_uid=generate_uid()))
    assert out.status == 0
    assert find(bulk, "PATIENT", ["PatientID"], PatientName="bench^patient001") == [{"PatientID": "BP00001"}]
    assert len(find(bulk, "PATIENT", ["PatientID"])) == 3
