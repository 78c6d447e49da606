"""QIDO-RS builds its DICOM JSON straight from the index rows (QueryService.find_json) instead of pydicom Datasets:
the JSON must be exactly what the pydicom path gives (``dataset_to_json`` of ``QueryService.find``), at every level,
with and without includefield=all, for ordinary and for odd index values.

The data set: instances stored through the ingest path (PN with ideographic and phonetic groups, non-ASCII text,
empty values, a study of CT and MR series, RequestAttributesSequence, DS/IS values) and rows written by the bulk
loader with values ingest would not produce (padded and non-integer IS, exponent DS, backslashes in single-valued
attributes, empty strings). Runs on SQLite and PostgreSQL."""

from __future__ import annotations

from typing import Any

import pytest
from core_factory import MR, instance, part10, store
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from starlette.requests import Request

from openpacs.dicom.json import dataset_to_json, dumps
from openpacs.dicomweb.qido import build_query
from openpacs.index.query import attributes_for
from openpacs.index.writer import NewInstance
from openpacs.services.bulk import BulkLoader
from openpacs.services.query import QueryService
from openpacs.services.types import Level

CT = "1.2.840.10008.5.1.4.1.1.2"
UIDS: dict[str, str] = {}


def uid(name: str) -> str:
    return UIDS.setdefault(name, generate_uid(entropy_srcs=["qido-fastpath", name]))


def _rq(sps: str, rp: str) -> list[Dataset]:
    item = Dataset()
    item.ScheduledProcedureStepID = sps
    item.RequestedProcedureID = rp
    return [item]


def _ingested() -> list[Dataset]:
    out = []
    # a study of CT and MR series (ModalitiesInStudy CT\MR), request attributes, DS and IS values
    for i, (se, mod, extra) in enumerate([
        ("se1", "CT", {"RequestAttributesSequence": _rq("SPS1", "RP1"), "SliceThickness": "2.5"}),
        ("se1", "CT", {"RequestAttributesSequence": _rq("SPS1", "RP1"), "SliceThickness": "2.5"}),
        ("se2", "MR", {"NumberOfFrames": 3}),
    ]):
        out.append(instance(
            patient_id="FP1", patient_name="Doe^John^^Dr.", study_uid=uid("st1"), series_uid=uid(se),
            sop_uid=uid(f"i1.{i}"), modality=mod, sop_class=MR if mod == "MR" else CT,
            StudyDate="20200115", StudyTime="083000", AccessionNumber="ACC1", StudyID="1",
            StudyDescription="CT Chest", ReferringPhysicianName="Welby^Marcus", PatientBirthDate="19700101",
            PatientSex="M", PatientSize="1.70", PatientWeight="70", PatientAge="050Y", SeriesNumber=i // 2 + 1,
            SeriesDescription=f"series {se}", InstanceNumber=i + 1, SeriesDate="20200115", BodyPartExamined="CHEST",
            InstitutionName="General Hospital", Manufacturer="ACME",
            NameOfPhysiciansReadingStudy=["Reader^One", "Reader^Two"], **extra))
    # PN with all three groups, non-ASCII text everywhere
    out.append(instance(
        patient_id="FP2", patient_name="Yamada^Tarou=山田^太郎=やまだ^たろう", study_uid=uid("st2"),
        series_uid=uid("se3"), sop_uid=uid("i2"), modality="MR", sop_class=MR,
        StudyDate="20211231", StudyTime="141500.250", AccessionNumber="ACC2", StudyDescription="Übersicht Kopf",
        ReferringPhysicianName="Müller^Jürgen", OtherPatientNames=["Yamada^T", "山田^太郎"], PatientSex="F",
        SeriesDescription="T2 ax – øre", InstitutionName="Hôpital Saint-Éloi", InstanceNumber=1))
    # empty values: no name, sex, accession, description, date; series without number
    out.append(instance(
        patient_id="FP3", patient_name="", study_uid=uid("st3"), series_uid=uid("se4"), sop_uid=uid("i3"),
        modality="OT", AccessionNumber="", PatientSex="", StudyDescription="", ReferringPhysicianName=""))
    return out


def _bulk_rows(blob_key: str, size: int) -> list[NewInstance]:
    """Index values ingest would not write: the pydicom path decides their encoding, the fast path must agree."""
    rows = []
    odd = [
        # (series_number, instance_number, patient_size, patient_weight, study_id, accession, modality, number_of_frames)
        (" 7", "-3", "1e3", " 70 ", "A\\B", "", "CT", "12.0"),
        ("12.0", "+4", "-0.5", "80.25", "", "X\\\\Y", "", ""),
        ("", "", "", "", "7", "ACC\\", "SR", None),
        (None, "0012", "0070", "1.0", "Ñ", "Ünï", "MR", "1"),
    ]
    for n, (sn, inum, psize, pweight, sid, acc, mod, frames) in enumerate(odd):
        name = ["Bulk^Odd", "Bulk^Ödd=ブルク", "", "=Ideo^Only"][n]
        pv = {"patient_id": f"FB{n}", "patient_name": name, "patient_birth_date": "" if n % 2 else "19800101",
              "patient_sex": ["O", "", "M", "F"][n], "other_patient_names": ["A^B\\C^D", "", None, "X\\"][n]}
        stv = {"study_instance_uid": uid(f"bst{n}"), "study_date": "20260101", "study_time": "", "study_id": sid,
               "accession_number": acc, "study_description": ["", "desc\\with backslash", None, "Ĳssel"][n],
               "referring_physician_name": ["", "Ref^Doc", "A^B=C^D", "Ref^Ö\\Other^X"][n],
               "patient_size": psize, "patient_weight": pweight, "patient_age": ["", "030Y", None, "1"][n]}
        for se in range(2):
            sv = {"series_instance_uid": uid(f"bse{n}.{se}"), "modality": mod if se == 0 else "CT",
                  "series_number": sn, "series_description": ["", "Ser\\ies", None, "Sérié"][n],
                  "institution_name": ["", "Inst", None, "Ïnst"][n]}
            for i in range(2):
                iv = {"sop_instance_uid": uid(f"bi{n}.{se}.{i}"), "sop_class_uid": CT, "instance_number": inum,
                      "number_of_frames": frames, "rows": [512, None, 0, 1][n], "columns": 256,
                      "bits_allocated": [16, 8, None, 16][n], "acquisition_number": ["1", "", " 2", None][n]}
                rows.append(NewInstance(values={"PATIENT": pv, "STUDY": stv, "SERIES": sv, "IMAGE": iv},
                                        blob_key=blob_key, size=size, sha256="0" * 64,
                                        transfer_syntax_uid=ExplicitVRLittleEndian, calling_aet="BULK", source="BULK"))
    return rows


@pytest.fixture
def data(ctx: Any) -> Any:
    for ds in _ingested():
        assert store(ctx, ds).status == 0
    blob = ctx.store.put([part10(instance(SliceThickness="1.25"))])  # every bulk row's stored file (shared)
    ctx.store.sync_pending()
    stats = BulkLoader(ctx.index, batch_size=5).load(_bulk_rows(blob.key, blob.size))
    assert stats.instances == 16
    return ctx


def _request(query: str) -> Request:
    return Request({"type": "http", "method": "GET", "path": "/", "query_string": query.encode(), "headers": []})


PARAMS = [
    "",
    "includefield=all",
    "includefield=all&limit=3&offset=1",
    "PatientName=*",
    "fuzzymatching=true&PatientName=doe",
    "PatientName=Yamada*",
    "StudyDate=20200101-20211231&includefield=all",
    "ModalitiesInStudy=MR&includefield=all",
    "includefield=InstitutionName,NameOfPhysiciansReadingStudy,OtherPatientNames,PatientSize,PatientWeight",
    "includefield=QueryRetrieveLevel,00080080",
    'emptyvaluematching=true&AccessionNumber=""&includefield=all',
    "includefield=RequestAttributesSequence",
    "RequestAttributesSequence.ScheduledProcedureStepID=SPS1",
    "includefield=SliceThickness",  # not indexed: read from the stored files, the pydicom path
]


def _cases() -> list[tuple[Level, dict[str, str], str]]:
    st1 = {"StudyInstanceUID": uid("st1")}
    paths: list[tuple[Level, dict[str, str]]] = [
        ("STUDY", {}), ("SERIES", {}), ("SERIES", st1), ("IMAGE", {}), ("IMAGE", st1),
        ("IMAGE", {**st1, "SeriesInstanceUID": uid("se1")}),
    ]
    return [(level, path, p) for level, path in paths for p in PARAMS]


class _Counting:
    """Counts QueryService._dataset calls (the pydicom path) while installed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        original = QueryService._dataset

        def counted(svc: QueryService, *args: Any) -> Dataset:
            self.calls += 1
            return original(svc, *args)

        monkeypatch.setattr(QueryService, "_dataset", counted)


def _both(ctx: Any, level: Level, path: dict[str, str], params: str,
          departments: tuple[str, ...] | None = None) -> tuple[list[Any], list[Any]]:
    q, _warnings, _cap = build_query(_request(params), level, path)
    q.departments = departments
    slow = [dataset_to_json(ds) for ds in ctx.query.find(q)]
    fast = list(ctx.query.find_json(q))
    return slow, fast


@pytest.mark.parametrize(("level", "path", "params"), _cases())
def test_fast_json_is_the_pydicom_json(data: Any, monkeypatch: pytest.MonkeyPatch, level: Level,
                                       path: dict[str, str], params: str) -> None:
    slow, _ = _both(data, level, path, params)
    counter = _Counting(monkeypatch)
    q = build_query(_request(params), level, path)[0]
    fast = list(data.query.find_json(q))
    assert fast == slow  # (some combinations match nothing: the level test below checks the data set)
    assert [list(j) for j in fast] == [list(j) for j in slow]  # the same keys in the same (tag) order
    assert dumps(fast) == dumps(slow)  # and the same bytes (70 == 70.0 for ==, not in JSON)
    visible = {a.keyword for a in attributes_for(level)} | {"QueryRetrieveLevel", "RequestAttributesSequence"}
    if "SliceThickness" in params or not {*q.filters, *q.return_keys} <= visible:
        # a key the index does not hold at this level, read from the files: the pydicom path, once per result
        assert counter.calls == len(fast)
        if "SliceThickness" in params:
            assert {"vr": "DS", "Value": [2.5]} in [j["00180050"] for j in fast] or level == "STUDY" and not path
    else:
        assert counter.calls == 0  # every key indexed: no pydicom Dataset built


def test_the_data_set_has_what_the_comparison_is_about(data: Any) -> None:
    """Guards the comparison above against a data set that no longer exercises it."""
    slow, fast = _both(data, "STUDY", {}, "includefield=all")
    assert fast == slow and dumps(fast) == dumps(slow) and len(fast) == 7
    by_pid = {j["00100020"]["Value"][0]: j for j in fast}
    p1, p2, p3 = by_pid["FP1"], by_pid["FP2"], by_pid["FP3"]
    assert p1["00080061"] == {"vr": "CS", "Value": ["CT", "MR"]}
    assert p1["00101020"] == {"vr": "DS", "Value": [1.7]} and p1["00101030"] == {"vr": "DS", "Value": [70]}
    assert p1["00081060"]["Value"] == [{"Alphabetic": "Reader^One"}, {"Alphabetic": "Reader^Two"}]
    assert p1["00201206"] == {"vr": "IS", "Value": [2]} and "00080005" not in p1
    assert p2["00100010"]["Value"] == [{"Alphabetic": "Yamada^Tarou", "Ideographic": "山田^太郎",
                                        "Phonetic": "やまだ^たろう"}]
    assert p2["00080005"] == {"vr": "CS", "Value": ["ISO_IR 192"]}
    assert p3["00100010"] == {"vr": "PN"} and p3["00080050"] == {"vr": "SH"} and p3["00081030"] == {"vr": "LO"}
    odd = by_pid["FB0"]
    assert odd["00200010"] == {"vr": "SH", "Value": ["A", "B"]}  # a backslash splits, as in the pydicom path
    assert odd["00101020"] == {"vr": "DS", "Value": [1000.0]}
    assert odd["00101030"] == {"vr": "DS", "Value": [70]}
    series, fast_series = _both(data, "SERIES", {}, "includefield=all&PatientID=FB*")
    assert fast_series == series and dumps(fast_series) == dumps(series) and len(series) == 8
    assert {str(j.get("00200011", {}).get("Value")) for j in series} >= {"[7]", "[12]"}
    sq = _both(data, "SERIES", {"StudyInstanceUID": uid("st1")}, "")[1]
    assert {"00400009": {"vr": "SH", "Value": ["SPS1"]}, "00401001": {"vr": "SH", "Value": ["RP1"]}} in [
        j["00400275"].get("Value", [None])[0] for j in sq]


@pytest.mark.parametrize("departments", [(), ("NOWHERE",), None])
def test_department_scope_is_the_same(data: Any, departments: tuple[str, ...] | None) -> None:
    slow, fast = _both(data, "STUDY", {}, "includefield=all", departments)
    assert fast == slow and dumps(fast) == dumps(slow)
    assert (len(fast) == 7) == (departments is None)
