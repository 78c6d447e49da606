"""IOCM rejection notes: a KOS received through ingest hides its instances from the one query engine and from
retrieval, with the counters excluding them; restore brings them back; the purge deletes them after the delay."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from core_factory import instance, store
from pydicom import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import select, update

from openpacs.index.schema import instances
from openpacs.services import iocm
from openpacs.services.types import Query


def _study(ctx: Any, n_series: int = 2, per_series: int = 3) -> tuple[str, list[list[Dataset]]]:
    study = generate_uid()
    out = []
    for s in range(n_series):
        series_uid = generate_uid()
        items = [instance(study_uid=study, series_uid=series_uid, patient_id="IOCM1", patient_name="Reject^Me",
                          SeriesNumber=s + 1, InstanceNumber=i + 1, modality="CT" if s == 0 else "MR")
                 for i in range(per_series)]
        for ds in items:
            assert store(ctx, ds).ok
        out.append(items)
    return study, out


def _find(ctx: Any, level: str, **filters: str) -> list[Dataset]:
    q = Query(level=level, filters=dict(filters))  # type: ignore[arg-type]
    keys = {"IMAGE": ["SOPInstanceUID"], "SERIES": ["SeriesInstanceUID", "Modality"]}.get(level, [])
    q.return_keys += keys + ["NumberOfStudyRelatedInstances", "NumberOfStudyRelatedSeries", "NumberOfSeriesRelatedInstances",
                      "ModalitiesInStudy", "NumberOfPatientRelatedInstances"]
    return list(ctx.query.find(q))


def _note(study: str, refs: list[Dataset], code: str = "113001") -> Dataset:
    first = refs[0]
    ds = iocm.build_rejection_note(code, first, [(str(r.SeriesInstanceUID), str(r.SOPClassUID),
                                                  str(r.SOPInstanceUID)) for r in refs])
    return ds


def test_rejection_note_through_ingest_hides_instances(ctx: Any) -> None:
    study, series = _study(ctx)
    rejected = series[0][:2]
    note = _note(study, rejected)
    assert store(ctx, note).ok  # a C-STORE like any other
    images = _find(ctx, "IMAGE", StudyInstanceUID=study)
    uids = {str(d.SOPInstanceUID) for d in images}
    assert not uids & {str(d.SOPInstanceUID) for d in rejected}
    assert len(images) == 6 - 2 + 1  # the note itself is an ordinary instance
    (st,) = _find(ctx, "STUDY", StudyInstanceUID=study)
    assert int(st.NumberOfStudyRelatedInstances) == 5
    assert int(st.NumberOfStudyRelatedSeries) == 3
    counts = {str(s.SeriesInstanceUID): int(s.NumberOfSeriesRelatedInstances)
              for s in _find(ctx, "SERIES", StudyInstanceUID=study)}
    assert counts[str(series[0][0].SeriesInstanceUID)] == 1
    refs = ctx.retrieve.list_instances(study)
    assert {r.sop_instance_uid for r in refs} == uids
    ds = Dataset()
    ds.QueryRetrieveLevel, ds.SOPInstanceUID = "IMAGE", str(rejected[0].SOPInstanceUID)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, str(rejected[0].SeriesInstanceUID)
    assert ctx.retrieve.resolve(ds, "STUDY") == []
    (r,) = ctx.iocm.search("rejected")
    assert r["reason"] == "113001" and r["num_instances"] == 2 and r["source"] == "network"


def test_whole_series_rejected_vanishes_and_modalities_follow(ctx: Any) -> None:
    study, series = _study(ctx)
    r = ctx.iocm.reject(study, "113037", series_uids=[str(series[1][0].SeriesInstanceUID)], actor="qa")
    assert r["num_instances"] == 3 and r["source"] == "console" and r["actor"] == "qa"
    got = {str(s.SeriesInstanceUID) for s in _find(ctx, "SERIES", StudyInstanceUID=study)}
    assert str(series[1][0].SeriesInstanceUID) not in got
    (st,) = _find(ctx, "STUDY", StudyInstanceUID=study)
    assert "MR" not in list(st.ModalitiesInStudy)
    assert _find(ctx, "STUDY", ModalitiesInStudy="MR", PatientID="IOCM1") == []
    assert _find(ctx, "STUDY", Modality="MR", PatientID="IOCM1") == []
    # restore: back, counters and lists included, and the note is gone
    ctx.iocm.restore(r["id"], actor="qa")
    (st,) = _find(ctx, "STUDY", StudyInstanceUID=study)
    assert int(st.NumberOfStudyRelatedInstances) == 6 and "MR" in list(st.ModalitiesInStudy)
    assert len(ctx.retrieve.list_instances(study)) == 6
    assert ctx.iocm.get(r["id"])["state"] == "restored"
    with pytest.raises(iocm.IOCMError):
        ctx.iocm.restore(r["id"])


def test_whole_study_rejected_leaves_only_the_note(ctx: Any) -> None:
    study, series = _study(ctx, 1, 2)
    ctx.iocm.reject(study, "113038")
    (st,) = _find(ctx, "STUDY", StudyInstanceUID=study)
    assert int(st.NumberOfStudyRelatedInstances) == 1  # the KO note
    assert [str(d.Modality) for d in _find(ctx, "SERIES", StudyInstanceUID=study)] == ["KO"]
    with pytest.raises(iocm.IOCMError):
        ctx.iocm.reject(study, "999999")


def test_not_a_rejection_note_is_ignored(ctx: Any) -> None:
    study, series = _study(ctx, 1, 2)
    note = _note(study, series[0])
    note.ConceptNameCodeSequence[0].CodeValue = "113000"  # "Of Interest": an ordinary key object selection
    assert store(ctx, note).ok
    assert len(_find(ctx, "IMAGE", StudyInstanceUID=study)) == 3
    assert ctx.iocm.search("all") == []


def test_purge_deletes_only_old_rejections(ctx: Any) -> None:
    # the audit trail is append-only and shared across PostgreSQL tests: its events are checked in
    # tests/integration/test_iocm.py, not left here for other suites' audit queries to find
    ctx.iocm.audit = None
    study, series = _study(ctx, 1, 3)
    r = ctx.iocm.reject(study, "113039", sop_uids=[str(series[0][0].SOPInstanceUID)])
    assert ctx.iocm.purge()["deleted"] == 0  # younger than rejected_purge_days
    with ctx.index.write_engine.begin() as c:
        c.execute(update(instances).where(instances.c.rejected.is_not(None))
                  .values(rejected_at=datetime.now(UTC) - timedelta(days=31)))
    out = ctx.iocm.purge()
    assert out["deleted"] == 1
    with ctx.index.engine.connect() as c:
        left = c.execute(select(instances.c.sop_instance_uid)).scalars().all()
    assert str(series[0][0].SOPInstanceUID) not in left and len(left) == 3  # 2 + note
    assert ctx.iocm.get(r["id"])["state"] == "purged"
    (st,) = _find(ctx, "STUDY", StudyInstanceUID=study)
    assert int(st.NumberOfStudyRelatedInstances) == 3
