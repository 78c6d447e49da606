"""The one query engine: PS3.4 C.2.2.2 matching at every level, relational keys, header keys, paging, identifiers.

Runs on SQLite and PostgreSQL (module-scoped data set per backend)."""

from __future__ import annotations

import pytest
from core_factory import MR, SRC, instance, store
from pydicom import Dataset
from pydicom.uid import generate_uid

from openpacs.config import Settings
from openpacs.context import build_context
from openpacs.services.query import QueryError, match_in_memory
from openpacs.services.types import Query, Status

UIDS: dict[str, str] = {}


def uid(name: str) -> str:
    return UIDS.setdefault(name, generate_uid())


def _rq(sps: str, rp: str) -> list[Dataset]:
    item = Dataset()
    item.ScheduledProcedureStepID = sps
    item.RequestedProcedureID = rp
    return [item]


# (patient id, name, birth, sex) -> studies (name, date, time, accession, description, referring) -> series
# (name, modality, description, request attributes, [instance names]) ; instances get InstanceNumber 1..n
SPEC = [
    (("P1", "Doe^John", "19700101", "M"), [
        ("st1", "20200115", "083000", "ACC100", "CT Chest", "Welby^Marcus", [
            ("se1", "CT", "Axial 5mm", ("SPS1", "RP1"), ["i1", "i2"]),
            ("se2", "MR", "T1 sag", ("SPS2", "RP1"), ["i3"]),
        ]),
        ("st2", "20210620", "141500.250", "ACC101", "MR brain", "House^Gregory", [
            ("se3", "MR", "T2 ax", None, ["i4"]),
        ]),
    ]),
    (("P2", "doe^jane", "19851231", "F"), [
        ("st3", "20200116", "235959", "acc200", "ct abdomen", "welby^marcus", [
            ("se4", "CT", "AXIAL 1mm", ("SPS3", "RP3"), ["i5"]),
        ]),
    ]),
    (("P3", "Smith^Anna", "20000229", "F"), [
        ("st4", "20191231", "000000", "XR300", "Chest PA", "", [("se5", "CR", "PA", None, ["i6"])]),
    ]),
    (("P4", "Smithson^Bob", "", "O"), [
        ("st5", "", "", "ACC_4%", "no date", "Quinn^M", [("se6", "PT", "WB", None, ["i7"]), ("se7", "CT", "CTAC", None, ["i8"])]),
    ]),
]


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def qctx(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("query")
    if request.param == "sqlite":
        url = f"sqlite:///{tmp / 'index.sqlite'}"
    else:
        url = request.getfixturevalue("pg_cluster").create_database("query")
    ctx = build_context(Settings(data_dir=tmp / "data", index_url=url))
    for (pid, name, birth, sex), studies in SPEC:
        for st, date, time_, acc, desc, referring, series in studies:
            for se, modality, sdesc, rq, insts in series:
                for n, i in enumerate(insts, start=1):
                    attrs = dict(PatientBirthDate=birth, PatientSex=sex, StudyDate=date, StudyTime=time_,
                                 AccessionNumber=acc, StudyDescription=desc, ReferringPhysicianName=referring,
                                 SeriesDescription=sdesc, InstanceNumber=n, SeriesNumber=int(se[2:]),
                                 OperatorsName=f"Op^{se}", ContentDate=date)
                    if rq:
                        attrs["RequestAttributesSequence"] = _rq(*rq)
                    ds = instance(patient_id=pid, patient_name=name, study_uid=uid(st), series_uid=uid(se),
                                  sop_uid=uid(i), modality=modality, sop_class=MR if modality == "MR" else
                                  "1.2.840.10008.5.1.4.1.1.2", **attrs)
                    out = store(ctx, ds)
                    assert out.status == 0, out
    yield ctx
    ctx.close()


def names(ds_list, key):
    inv = {v: k for k, v in UIDS.items()}
    out = set()
    for ds in ds_list:
        v = ds.get(key)
        v = str(v.value) if hasattr(v, "value") else str(v)
        out.add(inv.get(v, v))
    return out


LEVEL_KEY = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID", "IMAGE": "SOPInstanceUID"}


def find(ctx, level, **filters):
    q = Query(level=level, filters={k: v for k, v in filters.items()}, return_keys=[LEVEL_KEY[level]])
    return list(ctx.query.find(q))


def hits(ctx, level, **filters) -> set[str]:
    return names(find(ctx, level, **filters), LEVEL_KEY[level])


# -- single value, universal, wildcard ---------------------------------------------------------------------------


def test_single_value_each_level(qctx):
    assert hits(qctx, "PATIENT", PatientID="P1") == {"P1"}
    assert hits(qctx, "STUDY", AccessionNumber="ACC100") == {"st1"}
    assert hits(qctx, "SERIES", Modality="MR") == {"se2", "se3"}
    assert hits(qctx, "IMAGE", InstanceNumber="2") == {"i2"}
    assert hits(qctx, "IMAGE", InstanceNumber="2\\") == {"i2"}  # an empty alternative is ignored
    assert hits(qctx, "STUDY", StudyDate="20200115") == {"st1"}
    assert hits(qctx, "STUDY", StudyTime="141500.250") == {"st2"}
    assert hits(qctx, "PATIENT", PatientBirthDate="20000229") == {"P3"}


def test_universal_matching(qctx):
    everyone = {"P1", "P2", "P3", "P4"}
    assert hits(qctx, "PATIENT", PatientName="") == everyone
    assert hits(qctx, "PATIENT", PatientName="*") == everyone
    # universal matching also returns entities with no value for the key
    assert hits(qctx, "STUDY", StudyDate="") == {"st1", "st2", "st3", "st4", "st5"}
    assert hits(qctx, "STUDY", ReferringPhysicianName="*") == {"st1", "st2", "st3", "st4", "st5"}


def test_returned_values(qctx):
    [ds] = find(qctx, "STUDY", AccessionNumber="ACC100", PatientName="", StudyDate="", ModalitiesInStudy="",
                NumberOfStudyRelatedInstances="", NumberOfStudyRelatedSeries="")
    assert str(ds.PatientName) == "Doe^John" and ds.StudyDate == "20200115"
    assert set(ds.ModalitiesInStudy) == {"CT", "MR"}
    assert ds.NumberOfStudyRelatedInstances == 3 and ds.NumberOfStudyRelatedSeries == 2
    assert ds.StudyInstanceUID == uid("st1")


def test_wildcards(qctx):
    assert hits(qctx, "STUDY", AccessionNumber="ACC1*") == {"st1", "st2"}
    assert hits(qctx, "STUDY", AccessionNumber="ACC10?") == {"st1", "st2"}
    assert hits(qctx, "STUDY", AccessionNumber="ACC1?") == set()
    assert hits(qctx, "STUDY", AccessionNumber="*300") == {"st4"}
    assert hits(qctx, "STUDY", AccessionNumber="A*C*0") == {"st1"}
    assert hits(qctx, "SERIES", SeriesDescription="*xial*") == {"se1"}  # case-sensitive
    assert hits(qctx, "SERIES", SeriesDescription="*XIAL*") == {"se4"}


def test_wildcard_metacharacters_of_sql_are_literal(qctx):
    assert hits(qctx, "STUDY", AccessionNumber="ACC_4%") == {"st5"}
    assert hits(qctx, "STUDY", AccessionNumber="ACC_*") == {"st5"}
    assert hits(qctx, "STUDY", AccessionNumber="ACC%*") == set()
    assert hits(qctx, "STUDY", AccessionNumber="ACC__4%") == set()
    assert hits(qctx, "STUDY", AccessionNumber="ACC?4?") == {"st5"}
    assert hits(qctx, "STUDY", AccessionNumber="ACC\\_4%") == set()


def test_case_sensitivity(qctx):
    # PN: case-insensitive (default setting)
    assert hits(qctx, "PATIENT", PatientName="doe^john") == {"P1"}
    assert hits(qctx, "PATIENT", PatientName="DOE*") == {"P1", "P2"}
    assert hits(qctx, "STUDY", ReferringPhysicianName="WELBY^MARCUS") == {"st1", "st3"}
    # other VRs: case-sensitive, with and without wildcards
    assert hits(qctx, "STUDY", AccessionNumber="acc100") == set()
    assert hits(qctx, "STUDY", AccessionNumber="acc*") == {"st3"}
    assert hits(qctx, "STUDY", StudyDescription="ct*") == {"st3"}
    assert hits(qctx, "STUDY", StudyDescription="CT*") == {"st1"}


def test_pn_case_sensitive_when_configured(make_ctx):
    ctx = make_ctx(pn_case_insensitive=False)
    store(ctx, instance(patient_name="Doe^John", patient_id="X1"))
    assert hits(ctx, "PATIENT", PatientName="Doe^John") == {"X1"}
    assert hits(ctx, "PATIENT", PatientName="doe^john") == set()
    assert hits(ctx, "PATIENT", PatientName="Doe*") == {"X1"}
    assert hits(ctx, "PATIENT", PatientName="DOE*") == set()


def test_person_name_component_groups(ctx):
    """A name without "=" also matches the alphabetic group of a name stored with ideographic and phonetic groups,
    in SQL (PatientName) and in the stored-header matcher (OperatorsName); a value with groups matches as a whole."""
    jp = "Yamada^Tarou=山田^太郎=やまだ^たろう"
    store(ctx, instance(patient_name=jp, patient_id="JP1", OperatorsName=jp))
    store(ctx, instance(patient_name="Yamada^Tarouko", patient_id="JP2", OperatorsName="Yamada^Tarouko"))
    for name in ("Yamada^Tarou", "yamada^tarou", "*^Tarou", "Yamada^Tar?u", jp, "Yamada^Tarou=*", "*=山田*"):
        assert hits(ctx, "PATIENT", PatientName=name) == {"JP1"}, name
        assert hits(ctx, "IMAGE", OperatorsName=name) == {pn_sop(ctx, "JP1")}, name
    assert hits(ctx, "PATIENT", PatientName="Yamada^Tarou*") == {"JP1", "JP2"}
    assert hits(ctx, "PATIENT", PatientName="山田^太郎") == set()  # only the alphabetic group stands alone


def pn_sop(ctx, pid: str) -> str:
    [ds] = find(ctx, "IMAGE", PatientID=pid)
    return str(ds.SOPInstanceUID)


def test_pn_case_insensitive_on_other_person_name_attributes(ctx):
    store(ctx, instance(patient_id="X1", NameOfPhysiciansReadingStudy="Reader^Rita"))
    assert hits(ctx, "STUDY", NameOfPhysiciansReadingStudy="Reader^Rita") != set()
    assert hits(ctx, "STUDY", NameOfPhysiciansReadingStudy="reader^rita") != set()
    assert hits(ctx, "STUDY", NameOfPhysiciansReadingStudy="READER*") != set()
    assert hits(ctx, "STUDY", NameOfPhysiciansReadingStudy="READER^X") == set()


# -- ranges ------------------------------------------------------------------------------------------------------


def test_date_ranges(qctx):
    assert hits(qctx, "STUDY", StudyDate="20200101-20201231") == {"st1", "st3"}
    assert hits(qctx, "STUDY", StudyDate="20200115-20200115") == {"st1"}
    assert hits(qctx, "STUDY", StudyDate="20200116-") == {"st3", "st2"}
    assert hits(qctx, "STUDY", StudyDate="-20200115") == {"st1", "st4"}  # the study without a date never matches
    assert hits(qctx, "STUDY", StudyDate="2020.01.15-2020.01.16") == {"st1", "st3"}  # ACR-NEMA style
    assert hits(qctx, "PATIENT", PatientBirthDate="19700101-19900101") == {"P1", "P2"}
    assert hits(qctx, "IMAGE", ContentDate="20210101-") == {"i4"}


def test_time_ranges(qctx):
    assert hits(qctx, "STUDY", StudyTime="080000-090000") == {"st1"}
    assert hits(qctx, "STUDY", StudyTime="1415-1415") == {"st2"}  # 14:15:xx is in 14:15
    assert hits(qctx, "STUDY", StudyTime="14-") == {"st2", "st3"}
    assert hits(qctx, "STUDY", StudyTime="-0830") == {"st1", "st4"}
    assert hits(qctx, "STUDY", StudyTime="23:59:59-") == {"st3"}


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def short_times(request, tmp_path):
    """Studies whose times were sent with less than second precision (HHMM, HH) and with ACR-NEMA colons."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'index.sqlite'}"
    else:
        url = request.getfixturevalue("pg_cluster").create_database("shorttimes")
    ctx = build_context(Settings(data_dir=tmp_path / "data", index_url=url))
    for name, time_ in (("hhmm", "0915"), ("hh", "11"), ("colons", "13:05:30"), ("full", "091459.999")):
        ds = instance(patient_id="PT", study_uid=uid("t-" + name), series_uid=uid("ts-" + name),
                      sop_uid=uid("ti-" + name), StudyDate="20220301", StudyTime=time_)
        assert store(ctx, ds).status == 0
    yield ctx
    ctx.close()


def test_time_ranges_against_times_stored_with_less_precision(short_times):
    # "0915" is 09:15:00 for range matching; a plain string compare would put it before "091000"
    def t(value: str) -> set[str]:
        return {n[2:] for n in hits(short_times, "STUDY", StudyTime=value)}

    assert t("091000-092000") == {"hhmm", "full"}
    assert t("091500-091500") == {"hhmm"}
    assert t("0915-") == {"hhmm", "hh", "colons"}
    assert t("-091459") == {"full"}
    assert t("110000-110000") == {"hh"}
    assert t("130530-130530") == {"colons"}
    assert t("1300-1310") == {"colons"}


@pytest.mark.parametrize("bad", ["2020-13", "abc-", "-", "2020011"])
def test_bad_date_is_an_identifier_error(qctx, bad):
    with pytest.raises(QueryError) as e:
        find(qctx, "STUDY", StudyDate=bad)
    assert e.value.status == Status.IDENTIFIER_MISMATCH


@pytest.mark.parametrize(("level", "key", "bad"), [
    ("STUDY", "StudyDate", "2024*"),  # no wildcards on dates, indexed...
    ("SERIES", "ContentDate", "2020*"),  # ...or matched in a stored header
    ("SERIES", "ContentDate", "abc"),
    ("STUDY", "StudyTime", "99-"),  # hour 99
    ("STUDY", "StudyTime", "1261"),  # minute 61
    ("IMAGE", "InstanceNumber", "abc"),  # IS, held as text
    ("IMAGE", "SliceThickness", "abc"),  # DS, from the header
    ("IMAGE", "Rows", "abc"),  # US, held as a number
    ("STUDY", "StudyDate", "20200101-20201301"),
])
def test_typed_values_are_checked_the_same_everywhere(qctx, level, key, bad):
    with pytest.raises(QueryError) as e:
        find(qctx, level, **{key: bad})
    assert e.value.status == Status.IDENTIFIER_MISMATCH and key in str(e.value)


def test_typed_values_that_are_fine(qctx):
    assert hits(qctx, "SERIES", ContentDate="19000101-") >= {"se1"}
    assert hits(qctx, "STUDY", StudyTime="0830-0831") == {"st1"}
    assert hits(qctx, "STUDY", StudyDate="2020.01.15") == {"st1"}  # ACR-NEMA form
    assert hits(qctx, "IMAGE", InstanceNumber="2") == {"i2"}
    assert hits(qctx, "IMAGE", InstanceNumber="2\\") == {"i2"}  # an empty alternative is ignored
    assert hits(qctx, "IMAGE", InstanceNumber='""') == set()


# -- UID lists ---------------------------------------------------------------------------------------------------


def test_uid_lists(qctx):
    assert hits(qctx, "STUDY", StudyInstanceUID=f"{uid('st1')}\\{uid('st4')}") == {"st1", "st4"}
    assert hits(qctx, "STUDY", StudyInstanceUID=uid("st2")) == {"st2"}
    assert hits(qctx, "IMAGE", SOPInstanceUID="\\".join(uid(f"i{n}") for n in range(1, 9))) == {f"i{n}" for n in range(1, 9)}
    assert hits(qctx, "STUDY", StudyInstanceUID="1.2.3.4") == set()
    with pytest.raises(QueryError):
        find(qctx, "STUDY", StudyInstanceUID="1.2.*")


def test_long_uid_list(qctx):
    many = [generate_uid() for _ in range(1500)] + [uid("se3")]
    assert hits(qctx, "SERIES", SeriesInstanceUID="\\".join(many)) == {"se3"}


def test_person_name_alternatives(qctx):
    """A backslash separates alternatives for person names too (no PN value holds one), in SQL and in the stored-
    header matcher alike."""
    assert hits(qctx, "PATIENT", PatientName="Doe^John\\Smith^Anna") == {"P1", "P3"}
    assert hits(qctx, "PATIENT", PatientName="doe^j*\\smithson*") == {"P1", "P2", "P4"}
    assert hits(qctx, "SERIES", OperatorsName="Op^se4\\op^SE6") == {"se4", "se6"}


def test_sop_classes_in_study(qctx):
    assert hits(qctx, "STUDY", SOPClassesInStudy=MR) == {"st1", "st2"}


# -- multi-valued ModalitiesInStudy ------------------------------------------------------------------------------


def test_modalities_in_study(qctx):
    assert hits(qctx, "STUDY", ModalitiesInStudy="MR") == {"st1", "st2"}
    assert hits(qctx, "STUDY", ModalitiesInStudy="CT") == {"st1", "st3", "st5"}
    assert hits(qctx, "STUDY", ModalitiesInStudy="CT\\CR") == {"st1", "st3", "st4", "st5"}
    assert hits(qctx, "STUDY", ModalitiesInStudy="C*") == {"st1", "st3", "st4", "st5"}
    assert hits(qctx, "STUDY", ModalitiesInStudy="P?") == {"st5"}
    assert hits(qctx, "STUDY", ModalitiesInStudy="M") == set()


def test_modalities_wildcard_does_not_span_values(qctx):
    """st1 has CT\\MR: 'C*R' must not match across the value separator (neither CT nor MR matches it)."""
    assert hits(qctx, "STUDY", ModalitiesInStudy="C*R") == {"st4"}
    assert hits(qctx, "STUDY", ModalitiesInStudy="*T*M*") == set()


# -- sequence matching -------------------------------------------------------------------------------------------


def test_request_attributes_sequence_matching(qctx):
    q = Query(level="SERIES", sequence_filters={"ScheduledProcedureStepID": "SPS1"},
              return_keys=["SeriesInstanceUID", "RequestAttributesSequence"])
    out = list(qctx.query.find(q))
    assert names(out, "SeriesInstanceUID") == {"se1"}
    assert out[0].RequestAttributesSequence[0].ScheduledProcedureStepID == "SPS1"
    assert out[0].RequestAttributesSequence[0].RequestedProcedureID == "RP1"
    q = Query(level="SERIES", sequence_filters={"RequestedProcedureID": "RP*"}, return_keys=["SeriesInstanceUID"])
    assert names(qctx.query.find(q), "SeriesInstanceUID") == {"se1", "se2", "se4"}
    # at the study level it is relational: a study with any matching series
    q = Query(level="STUDY", sequence_filters={"RequestedProcedureID": "RP1"}, return_keys=["StudyInstanceUID"])
    assert names(qctx.query.find(q), "StudyInstanceUID") == {"st1"}


def test_request_attributes_sequence_from_identifier(qctx):
    ident = Dataset()
    ident.QueryRetrieveLevel = "SERIES"
    ident.SeriesInstanceUID = ""
    ident.RequestAttributesSequence = _rq("SPS3", "")
    q = qctx.query.from_identifier(ident, "STUDY")
    assert q.sequence_filters == {"ScheduledProcedureStepID": "SPS3"}
    assert names(qctx.query.find(q), "SeriesInstanceUID") == {"se4"}


# -- relational and header keys ----------------------------------------------------------------------------------


def test_relational_keys_from_lower_levels(qctx):
    assert hits(qctx, "PATIENT", Modality="CR") == {"P3"}
    assert hits(qctx, "PATIENT", SOPInstanceUID=uid("i5")) == {"P2"}
    assert hits(qctx, "STUDY", SeriesDescription="T2*") == {"st2"}
    assert hits(qctx, "STUDY", InstanceNumber="2") == {"st1"}
    assert hits(qctx, "SERIES", SOPInstanceUID=uid("i8")) == {"se7"}
    assert hits(qctx, "STUDY", NumberOfSeriesRelatedInstances="2") == {"st1"}


def test_values_of_lower_level_keys_agree_with_them(qctx):
    """A study found by one of its series' attributes shows that series' value, not another's (st1 has a CT series
    first and an MR series); an image-level key likewise picks the instance that matched."""
    [ds] = find(qctx, "STUDY", StudyInstanceUID=uid("st1"), Modality="MR")
    assert ds.Modality == "MR"
    [ds] = find(qctx, "STUDY", StudyInstanceUID=uid("st1"), Modality="CT")
    assert ds.Modality == "CT"
    [ds] = find(qctx, "STUDY", StudyInstanceUID=uid("st1"), SOPInstanceUID=uid("i3"))
    assert ds.SOPInstanceUID == uid("i3")
    [ds] = find(qctx, "SERIES", SeriesInstanceUID=uid("se1"), InstanceNumber="2")
    assert ds.InstanceNumber == 2
    [ds] = find(qctx, "PATIENT", PatientID="P1", StudyDescription="MR*")
    assert ds.StudyDescription == "MR brain"
    # a study-level key matched through EXISTS, with a key from the header: one SQL statement for both
    [ds] = find(qctx, "PATIENT", PatientID="P1", ModalitiesInStudy="MR", StudyDescription="MR*", PatientComments="")
    assert ds.StudyDescription == "MR brain"


def test_upper_level_keys_constrain_lower_levels(qctx):
    assert hits(qctx, "SERIES", PatientID="P1", Modality="MR") == {"se2", "se3"}
    assert hits(qctx, "IMAGE", StudyInstanceUID=uid("st1"), SeriesInstanceUID=uid("se1")) == {"i1", "i2"}
    assert hits(qctx, "IMAGE", PatientName="smith*") == {"i6", "i7", "i8"}


def test_non_indexed_keys_matched_from_stored_header(qctx):
    assert hits(qctx, "SERIES", OperatorsName="Op^se4") == {"se4"}
    assert hits(qctx, "SERIES", OperatorsName="op^SE4") == {"se4"}  # PN: case-insensitive here too
    assert hits(qctx, "SERIES", OperatorsName="Op^se?") == {f"se{n}" for n in range(1, 8)}
    [ds] = find(qctx, "IMAGE", SOPInstanceUID=uid("i5"), OperatorsName="", PatientBirthDate="")
    assert str(ds.OperatorsName) == "Op^se4" and ds.PatientBirthDate == "19851231"
    # a private or unknown-to-the-index tag as 8 hex digits
    q = Query(level="IMAGE", filters={"SOPInstanceUID": uid("i1")}, return_keys=["00280010"])
    [ds] = list(qctx.query.find(q))
    assert ds.Rows == 1


def test_paging(qctx):
    all_ = [ds.StudyInstanceUID for ds in qctx.query.find(Query(level="STUDY", return_keys=["StudyInstanceUID"]))]
    assert len(all_) == 5
    page = [ds.StudyInstanceUID for ds in qctx.query.find(Query(level="STUDY", return_keys=["StudyInstanceUID"],
                                                                 limit=2, offset=1))]
    assert page == all_[1:3]
    assert list(qctx.query.find(Query(level="STUDY", limit=0))) == []
    # paging with a header-matched key counts only the entities that pass it
    q = Query(level="SERIES", filters={"OperatorsName": "Op^se?"}, return_keys=["SeriesInstanceUID"], limit=3, offset=2)
    got = [ds.SeriesInstanceUID for ds in qctx.query.find(q)]
    full = [ds.SeriesInstanceUID for ds in qctx.query.find(Query(level="SERIES", filters={"OperatorsName": "Op^se?"},
                                                                  return_keys=["SeriesInstanceUID"]))]
    assert got == full[2:5]


def test_fuzzy_person_names(qctx):
    q = Query(level="PATIENT", filters={"PatientName": "jo"}, return_keys=["PatientID"], fuzzy=True)
    assert names(qctx.query.find(q), "PatientID") == {"P1"}
    q = Query(level="PATIENT", filters={"PatientName": "smi"}, return_keys=["PatientID"], fuzzy=True)
    assert names(qctx.query.find(q), "PatientID") == {"P3", "P4"}
    q = Query(level="PATIENT", filters={"PatientName": "ohn"}, return_keys=["PatientID"], fuzzy=True)
    assert names(qctx.query.find(q), "PatientID") == set()


def test_empty_value_matching(qctx):
    """PS3.4 C.2.2.2.1: with Empty Value Matching a key of "" matches empty or absent values, indexed or not."""

    def evm(level, **filters):
        q = Query(level=level, filters=filters, return_keys=[LEVEL_KEY[level]], empty_value_matching=True)
        return names(qctx.query.find(q), LEVEL_KEY[level])

    assert evm("STUDY", ReferringPhysicianName='""') == {"st4"}
    assert evm("STUDY", StudyDate='""') == {"st5"}
    assert evm("STUDY", StudyDate='""', StudyTime='""') == {"st5"}
    assert evm("PATIENT", PatientBirthDate='""') == {"P4"}
    assert evm("STUDY", AccessionNumber='""') == set()
    # not in the index: matched in the stored headers, where it is absent from every series
    assert evm("SERIES", PerformedProcedureStepDescription='""') == {f"se{n}" for n in range(1, 8)}
    assert evm("SERIES", OperatorsName='""') == set()
    # without it, "" is an ordinary value that no stored name has
    assert hits(qctx, "STUDY", ReferringPhysicianName='""') == set()


def test_numeric_attribute_query(qctx):
    assert hits(qctx, "IMAGE", Rows="1") == {f"i{n}" for n in range(1, 9)}
    assert hits(qctx, "IMAGE", Rows="2") == set()


def test_bad_numeric_value_is_an_error_status_not_a_crash(qctx):
    with pytest.raises(QueryError):
        find(qctx, "IMAGE", Rows="abc")


def test_departments_scope(qctx):
    q = Query(level="STUDY", return_keys=["StudyInstanceUID"], departments=("nowhere",))
    assert list(qctx.query.find(q)) == []


def test_cancel(qctx):
    calls = []

    def cancelled():
        calls.append(1)
        return len(calls) > 2

    got = list(qctx.query.find(Query(level="IMAGE", return_keys=["SOPInstanceUID"]), cancelled=cancelled))
    assert len(got) == 2


# -- from_identifier ---------------------------------------------------------------------------------------------


def _ident(level, **kw):
    ds = Dataset()
    if level is not None:
        ds.QueryRetrieveLevel = level
    for k, v in kw.items():
        setattr(ds, k, v)
    return ds


@pytest.mark.parametrize("model,level,ok", [
    ("PATIENT", "PATIENT", True), ("PATIENT", "STUDY", True), ("PATIENT", "SERIES", True), ("PATIENT", "IMAGE", True),
    ("STUDY", "PATIENT", False), ("STUDY", "STUDY", True), ("STUDY", "SERIES", True), ("STUDY", "IMAGE", True),
    ("STUDY", "FOO", False), ("STUDY", None, False), ("PATIENT", "", False), ("WORKLIST", "STUDY", False),
])
def test_from_identifier_levels(qctx, model, level, ok):
    ident = _ident(level, PatientID="P1")
    if ok:
        q = qctx.query.from_identifier(ident, model)
        assert q.level == level and q.filters["PatientID"] == "P1"
        assert q.patient_root == (model == "PATIENT")
    else:
        with pytest.raises(QueryError) as e:
            qctx.query.from_identifier(ident, model)
        assert e.value.status == Status.IDENTIFIER_MISMATCH


def test_from_identifier_keys(qctx):
    ident = _ident("STUDY", PatientName="Doe*", StudyDate="20200101-", ModalitiesInStudy=["CT", "MR"],
                   StudyInstanceUID="", SpecificCharacterSet="ISO_IR 100")
    ident.add_new(0x00091010, "LO", "")  # a private return key
    q = qctx.query.from_identifier(ident, "STUDY")
    assert q.filters["PatientName"] == "Doe*"
    assert q.filters["ModalitiesInStudy"] == "CT\\MR"
    assert q.filters["StudyInstanceUID"] == ""
    assert "SpecificCharacterSet" not in q.filters and "QueryRetrieveLevel" not in q.filters
    assert "00091010" in q.filters
    assert names(qctx.query.find(q), "StudyInstanceUID") == {"st1", "st2", "st3"}  # PN case-insensitive


def test_find_results_carry_query_retrieve_level(qctx):
    q = qctx.query.from_identifier(_ident("SERIES", SeriesInstanceUID=uid("se1"), Modality=""), "STUDY")
    [ds] = list(qctx.query.find(q))
    assert ds.QueryRetrieveLevel == "SERIES" and ds.Modality == "CT"


# -- the in-memory matcher ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("vr,query,stored,expected", [
    ("LO", "", None, True), ("LO", "*", None, True), ("LO", "a", None, False),
    ("LO", "abc", "abc", True), ("LO", "ABC", "abc", False), ("PN", "DOE^J*", "Doe^John", True),
    ("LO", "a*c", "abbbc", True), ("LO", "a?c", "abbc", False), ("CS", "CT\\MR", "MR", True),
    ("CS", "MR", "CT\\MR", True), ("DA", "20200101-20200131", "20200115", True),
    ("DA", "20200101-20200131", "20200201", False), ("DA", "-20200131", "", False),
    ("TM", "10-11", "113000", True), ("TM", "10-11", "120000", False),
    ("LO", "a.c", "abc", False), ("LO", "a(b", "a(b", True), ("PN", "Roe^R\\doe^j*", "Doe^John", True),
])
def test_match_in_memory(vr, query, stored, expected):
    assert match_in_memory(vr, query, stored) is expected


def test_stored_via_ingest_source():
    assert SRC.protocol == "TEST"
