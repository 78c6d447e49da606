"""services/qc_edit.py on both backends: edits, merges, splits and moves keep the counters, the query engine and the
served DICOM in agreement; the history holds who/what/old/new; undo restores the prior state."""

from __future__ import annotations

import io

import pytest
from core_factory import instance, store
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import select

from openpacs.index.schema import changes, patients, series, studies
from openpacs.services.qc_edit import QCEditError, QCEditService
from openpacs.services.types import Query


@pytest.fixture
def qc(ctx):
    return QCEditService(ctx.index, ctx.retrieve.patients)


def _study(ctx, pid="P1", name="Doe^John", n_series=2, per_series=2, **attrs):
    st = generate_uid()
    ses = [generate_uid() for _ in range(n_series)]
    sops = []
    for k, se in enumerate(ses):
        for _ in range(per_series):
            ds = instance(patient_id=pid, patient_name=name, study_uid=st, series_uid=se, SeriesNumber=str(k + 1),
                          StudyDescription="Original", AccessionNumber="ACC" + st[-4:], **attrs)
            assert store(ctx, ds).status == 0
            sops.append(str(ds.SOPInstanceUID))
    return st, ses, sops


def find(ctx, level, keys, **filters):
    return list(ctx.query.find(Query(level=level, filters=filters, return_keys=keys)))


def served(ctx, study_uid, sop=None):
    refs = ctx.retrieve.list_instances(study_uid, sop_uid=sop)
    return [dcmread(io.BytesIO(ctx.retrieve.read_file(r))) for r in refs]


def counts(ctx, study_uid):
    with ctx.index.engine.connect() as c:
        r = c.execute(select(studies.c.num_series, studies.c.num_instances)
                      .where(studies.c.study_instance_uid == study_uid)).first()
    return tuple(r) if r else None


def test_edit_study_and_patient_everywhere_and_undo(ctx, qc):
    st, ses, sops = _study(ctx)
    other, _, _ = _study(ctx, pid="P9", n_series=1)
    raw_before = ctx.store.read(ctx.retrieve.list_instances(st)[0].blob_key)
    assert ctx.retrieve.list_instances(st)[0].qc_key is None
    assert ctx.retrieve.read_file(ctx.retrieve.list_instances(st)[0]) == raw_before  # untouched: byte-identical
    e1 = qc.edit("STUDY", st, {"StudyDescription": "Corrected", "AccessionNumber": "A9"}, "alice")
    assert e1["old"]["values"] == {"StudyDescription": "Original", "AccessionNumber": "ACC" + st[-4:]}
    assert e1["new"]["values"] == {"StudyDescription": "Corrected", "AccessionNumber": "A9"}
    assert e1["user"] == "alice" and e1["operation"] == "edit" and e1["study_uids"] == [st]
    [ds] = find(ctx, "STUDY", ["StudyDescription", "AccessionNumber"], StudyInstanceUID=st)
    assert (ds.StudyDescription, ds.AccessionNumber) == ("Corrected", "A9")
    assert all(d.StudyDescription == "Corrected" and d.AccessionNumber == "A9" for d in served(ctx, st))
    # the stored file is never rewritten
    assert ctx.store.read(ctx.retrieve.list_instances(st)[0].blob_key) == raw_before
    ref = ctx.retrieve.list_instances(other)[0]  # another study keeps the byte-identical path
    assert ref.qc_key is None and ctx.retrieve.read_file(ref) == ctx.store.read(ref.blob_key)
    e2 = qc.edit("PATIENT", "P1", {"PatientName": "Roe^Jane", "PatientBirthDate": "19800102"}, "alice")
    [p] = find(ctx, "PATIENT", ["PatientName", "PatientBirthDate"], PatientID="P1")
    assert (str(p.PatientName), p.PatientBirthDate) == ("Roe^Jane", "19800102")
    assert find(ctx, "STUDY", ["StudyInstanceUID"], PatientName="roe*")  # the _norm column follows
    assert all(str(d.PatientName) == "Roe^Jane" for d in served(ctx, st))
    with ctx.index.engine.connect() as c:
        feed = [r.change_type for r in c.execute(select(changes.c.change_type).order_by(changes.c.seq))]
    assert "UpdatedStudy" in feed and "UpdatedPatient" in feed
    qc.undo(e2["id"], "bob")
    qc.undo(e1["id"], "bob")
    assert all(str(d.PatientName) == "Doe^John" and d.StudyDescription == "Original" for d in served(ctx, st))
    [ds] = find(ctx, "STUDY", ["StudyDescription", "PatientName"], StudyInstanceUID=st)
    assert ds.StudyDescription == "Original" and str(ds.PatientName) == "Doe^John"
    h = qc.history()
    assert [x["id"] for x in h] == [e2["id"], e1["id"]] and all(x["undone_by"] == "bob" for x in h)
    with pytest.raises(QCEditError) as ei:
        qc.undo(e1["id"], "bob")
    assert ei.value.kind == "conflict"


def test_edit_validation_and_conflicts(ctx, qc):
    st, ses, _ = _study(ctx, n_series=1)
    _study(ctx, pid="P2")
    for bad in ({"StudyInstanceUID": "1.2"}, {"StudyDate": "2020-01-01"}, {"Nope": "x"}):
        with pytest.raises(QCEditError) as e:
            qc.edit("STUDY", st, bad, "a")
        assert e.value.kind == "invalid"
    with pytest.raises(QCEditError) as e:
        qc.edit("STUDY", "1.2.3", {"StudyDescription": "x"}, "a")
    assert e.value.kind == "unknown"
    with pytest.raises(QCEditError) as e:
        qc.edit("PATIENT", "P1", {"PatientID": "P2"}, "a")
    assert e.value.kind == "conflict"
    e1 = qc.edit("SERIES", ses[0], {"SeriesDescription": "Axial"}, "a")
    qc.edit("SERIES", ses[0], {"SeriesDescription": "Axial 2"}, "a")
    with pytest.raises(QCEditError) as e:  # a later edit of the same value must be undone first
        qc.undo(e1["id"], "a")
    assert e.value.kind == "conflict"
    assert all(d.SeriesDescription == "Axial 2" for d in served(ctx, st))


def test_split_series_to_new_study_merge_back_and_undo(ctx, qc):
    st, ses, sops = _study(ctx, n_series=3, per_series=2)
    e = qc.split(st, "alice", series_uids=[ses[2]], attributes={"StudyDescription": "Split off"})
    new = e["new"]["series"][ses[2]]
    assert new != st and e["new"]["new_study"] is True and sorted(e["study_uids"]) == sorted([st, new])
    assert counts(ctx, st) == (2, 4) and counts(ctx, new) == (1, 2)
    rows = find(ctx, "STUDY", ["StudyInstanceUID", "NumberOfStudyRelatedInstances"], PatientID="P1")
    assert sorted((r.StudyInstanceUID, int(r.NumberOfStudyRelatedInstances)) for r in rows) == sorted(
        [(st, 4), (new, 2)])
    moved = served(ctx, new)
    assert len(moved) == 2 and {d.StudyInstanceUID for d in moved} == {new}
    assert {d.StudyDescription for d in moved} == {"Split off"} and {d.SeriesInstanceUID for d in moved} == {ses[2]}
    assert {d.StudyInstanceUID for d in served(ctx, st)} == {st}
    with ctx.index.engine.connect() as c:
        p = c.execute(select(patients.c.num_studies, patients.c.num_instances)
                      .where(patients.c.patient_id == "P1")).one()
    assert tuple(p) == (2, 6)
    m = qc.merge_studies(new, st, "alice")
    assert counts(ctx, new) is None and counts(ctx, st) == (3, 6)
    assert {d.StudyInstanceUID for d in served(ctx, st)} == {st} and len(served(ctx, st)) == 6
    qc.undo(m["id"], "bob")  # the split study comes back, with its UID and attributes
    assert counts(ctx, new) == (1, 2) and {d.StudyDescription for d in served(ctx, new)} == {"Split off"}
    qc.undo(e["id"], "bob")
    assert counts(ctx, new) is None and counts(ctx, st) == (3, 6)
    assert [d.StudyInstanceUID for d in served(ctx, st)] == [st] * 6


def test_split_instances_into_another_study_and_move_instance(ctx, qc):
    a, a_ses, a_sops = _study(ctx, pid="PA", name="A^A", n_series=1, per_series=3)
    b, b_ses, b_sops = _study(ctx, pid="PB", name="B^B", n_series=1, per_series=1)
    e = qc.split(a, "alice", instance_uids=a_sops[:2], into=b)
    assert counts(ctx, a) == (1, 1) and counts(ctx, b) == (2, 3)
    moved = served(ctx, b, a_sops[0])[0]
    assert moved.StudyInstanceUID == b and moved.SeriesInstanceUID not in (a_ses[0], b_ses[0])
    assert str(moved.PatientName) == "B^B" and moved.PatientID == "PB"  # the target's patient module
    imgs = find(ctx, "IMAGE", ["SOPInstanceUID"], StudyInstanceUID=b)
    assert {d.SOPInstanceUID for d in imgs} == {*a_sops[:2], b_sops[0]}
    mv = qc.move_instance(a_sops[2], "alice", series_uid=b_ses[0])
    assert counts(ctx, a) is None and counts(ctx, b) == (2, 4)
    with ctx.index.engine.connect() as c:
        assert c.execute(select(patients.c.id).where(patients.c.patient_id == "PA")).first() is None
    d = served(ctx, b, a_sops[2])[0]
    assert (d.StudyInstanceUID, d.SeriesInstanceUID, d.PatientID) == (b, b_ses[0], "PB")
    qc.undo(mv["id"], "bob")
    assert counts(ctx, a) == (1, 1)
    d = served(ctx, a, a_sops[2])[0]
    assert (d.StudyInstanceUID, d.SeriesInstanceUID, d.PatientID) == (a, a_ses[0], "PA")
    with pytest.raises(QCEditError):  # an instance of another study
        qc.split(a, "alice", instance_uids=[b_sops[0]])
    qc.undo(e["id"], "bob")
    assert counts(ctx, a) == (1, 3) and counts(ctx, b) == (1, 1)
    assert {x.SeriesInstanceUID for x in served(ctx, a)} == {a_ses[0]}
    with ctx.index.engine.connect() as c:
        assert c.execute(select(series.c.id).where(series.c.study_fk == select(studies.c.id).where(
            studies.c.study_instance_uid == b).scalar_subquery())).all().__len__() == 1


def test_merge_patients_and_undo(ctx, qc):
    a, _, _ = _study(ctx, pid="PA", name="A^A")
    b, _, _ = _study(ctx, pid="PB", name="B^B")
    e = qc.merge_patients("PA", "PB", "alice")
    assert [r.PatientID for r in find(ctx, "STUDY", ["PatientID"], StudyInstanceUID=a)] == ["PB"]
    assert find(ctx, "PATIENT", ["PatientID"], PatientID="PA") == []
    [p] = find(ctx, "PATIENT", ["NumberOfPatientRelatedStudies"], PatientID="PB")
    assert int(p.NumberOfPatientRelatedStudies) == 2
    assert {(x.PatientID, str(x.PatientName)) for x in served(ctx, a)} == {("PB", "B^B")}
    qc.undo(e["id"], "bob")
    assert {(x.PatientID, str(x.PatientName)) for x in served(ctx, a)} == {("PA", "A^A")}
    [p] = find(ctx, "PATIENT", ["NumberOfPatientRelatedStudies"], PatientID="PA")
    assert int(p.NumberOfPatientRelatedStudies) == 1



def test_patient_id_change_and_move_instance_to_a_study(ctx, qc):
    a, a_ses, a_sops = _study(ctx, pid="OLD", n_series=1, per_series=2)
    b, _, _ = _study(ctx, pid="OTHER", name="Other^One", n_series=1, per_series=1)
    e = qc.edit("PATIENT", "OLD", {"PatientID": "NEW", "IssuerOfPatientID": "HOSP"}, "alice")
    assert {(d.PatientID, d.IssuerOfPatientID) for d in served(ctx, a)} == {("NEW", "HOSP")}
    assert find(ctx, "PATIENT", ["PatientID"], PatientID="OLD") == []
    mv = qc.move_instance(a_sops[0], "alice", study_uid=b)
    [d] = served(ctx, b, a_sops[0])
    assert d.StudyInstanceUID == b and d.SeriesInstanceUID != a_ses[0] and str(d.PatientName) == "Other^One"
    assert counts(ctx, a) == (1, 1) and counts(ctx, b) == (2, 2)
    with pytest.raises(QCEditError) as ei:  # undoing the ID change first is fine; the move stays
        qc.move_instance(a_sops[0], "alice", study_uid=b)
    assert ei.value.kind == "invalid"
    qc.undo(mv["id"], "bob")
    assert counts(ctx, b) == (1, 1) and [x.SeriesInstanceUID for x in served(ctx, a)] == [a_ses[0]] * 2
    with ctx.index.engine.connect() as c:  # the series the move made is gone again
        assert c.execute(select(series.c.id).where(series.c.study_fk == select(studies.c.id).where(
            studies.c.study_instance_uid == b).scalar_subquery())).all().__len__() == 1
    qc.undo(e["id"], "bob")
    assert {(d.PatientID, d.get("IssuerOfPatientID", "")) for d in served(ctx, a)} == {("OLD", "")}
    [p] = find(ctx, "PATIENT", ["PatientID", "IssuerOfPatientID"], PatientID="OLD")
    assert not p.get("IssuerOfPatientID")
