"""retrieve.resolve: unique keys at the level and above, UID lists, errors with the identifier status."""

from __future__ import annotations

import pytest
from core_factory import instance, store
from pydicom import Dataset
from pydicom.uid import generate_uid

from openpacs.services.query import QueryError
from openpacs.services.types import Status


@pytest.fixture
def data(ctx):
    st1, st2 = generate_uid(), generate_uid()
    se1, se2, se3 = generate_uid(), generate_uid(), generate_uid()
    dss = [
        instance(patient_id="R1", study_uid=st1, series_uid=se1),
        instance(patient_id="R1", study_uid=st1, series_uid=se1),
        instance(patient_id="R1", study_uid=st1, series_uid=se2),
        instance(patient_id="R2", study_uid=st2, series_uid=se3),
    ]
    for ds in dss:
        assert store(ctx, ds).status == 0
    return ctx, dict(st1=st1, st2=st2, se1=se1, se2=se2, se3=se3), [str(d.SOPInstanceUID) for d in dss]


def ident(level, **kw):
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for k, v in kw.items():
        setattr(ds, k, v)
    return ds


def sops(refs):
    return [r.sop_instance_uid for r in refs]


def test_study_level(data):
    ctx, u, s = data
    refs = ctx.retrieve.resolve(ident("STUDY", StudyInstanceUID=u["st1"]), "STUDY")
    assert sops(refs) == s[:3]
    r = refs[0]
    assert (r.study_instance_uid, r.series_instance_uid) == (u["st1"], u["se1"])
    assert r.blob_key and r.size > 0 and len(r.sha256) == 64


def test_uid_list_and_levels(data):
    ctx, u, s = data
    assert sops(ctx.retrieve.resolve(ident("STUDY", StudyInstanceUID=[u["st1"], u["st2"]]), "STUDY")) == s
    assert sops(ctx.retrieve.resolve(ident("SERIES", SeriesInstanceUID=f"{u['se2']}\\{u['se3']}"), "STUDY")) == s[2:]
    assert sops(ctx.retrieve.resolve(ident("IMAGE", SOPInstanceUID=[s[1], s[3]]), "STUDY")) == [s[1], s[3]]
    assert sops(ctx.retrieve.resolve(ident("PATIENT", PatientID="R2"), "PATIENT")) == [s[3]]


def test_upper_keys_constrain(data):
    ctx, u, s = data
    # a series UID with the wrong study names nothing
    assert ctx.retrieve.resolve(ident("SERIES", StudyInstanceUID=u["st2"], SeriesInstanceUID=u["se1"]), "STUDY") == []
    assert sops(ctx.retrieve.resolve(ident("SERIES", StudyInstanceUID=u["st1"], SeriesInstanceUID=u["se1"]),
                                     "STUDY")) == s[:2]
    assert ctx.retrieve.resolve(ident("STUDY", PatientID="R2", StudyInstanceUID=u["st1"]), "PATIENT") == []


def test_unknown_uid_names_nothing(data):
    ctx, _u, _s = data
    assert ctx.retrieve.resolve(ident("STUDY", StudyInstanceUID="1.2.3"), "STUDY") == []


@pytest.mark.parametrize("model,identifier", [
    ("STUDY", ident("PATIENT", PatientID="R1")),  # no PATIENT level in Study Root
    ("STUDY", ident("FOO", StudyInstanceUID="1.2")),
    ("STUDY", ident("STUDY")),  # unique key missing
    ("STUDY", ident("STUDY", StudyInstanceUID="")),
    ("STUDY", ident("SERIES", StudyInstanceUID="1.2")),  # the level's own unique key is missing
    ("STUDY", ident("STUDY", StudyInstanceUID="1.2.*")),
    ("PATIENT", ident("PATIENT", PatientID="R*")),
    ("PATIENT", ident("PATIENT", PatientID="R1\\R2")),
])
def test_errors(data, model, identifier):
    ctx, _u, _s = data
    with pytest.raises(QueryError) as e:
        ctx.retrieve.resolve(identifier, model)
    assert e.value.status == Status.IDENTIFIER_MISMATCH


def test_no_level(data):
    ctx, _u, _s = data
    ds = Dataset()
    ds.StudyInstanceUID = "1.2"
    with pytest.raises(QueryError):
        ctx.retrieve.resolve(ds, "STUDY")


def test_departments(data):
    ctx, u, _s = data
    assert ctx.retrieve.resolve(ident("STUDY", StudyInstanceUID=u["st1"]), "STUDY", departments=("x",)) == []


def test_list_instances_and_read(data):
    ctx, u, s = data
    refs = ctx.retrieve.list_instances(u["st1"], u["se1"])
    assert sops(refs) == s[:2]
    assert sops(ctx.retrieve.list_instances(u["st1"], sop_uid=s[2])) == [s[2]]
    data_ = ctx.retrieve.read_file(refs[0])
    assert data_[128:132] == b"DICM"
