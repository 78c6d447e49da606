"""The archive against real DCMTK peers, on the SQLite and the PostgreSQL index: echo, storage of pydicom's test
files in their own transfer syntax, byte-exact retrieval (C-GET into getscu, C-MOVE into a storescp), C-FIND with every
matching rule at every level of both information models, sub-operation counts and failure statuses."""

from __future__ import annotations

import pydicom
import pytest
from helpers import dcmtk
from helpers.dicomdata import CONFORMANCE_FILES, build_query_dataset, dataset_bytes, prepare_conformance_files
from helpers.server import make_server, stop_cleanly

pytestmark = pytest.mark.usefixtures("require_dcmtk")

IMPLICIT_VR_LE = "1.2.840.10008.1.2"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
FILE_IDS = [n for n, _ in CONFORMANCE_FILES] + ["rtstruct (synthetic)"]


# ------------------------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def conformance(tmp_path_factory):
    return {c.name: c for c in prepare_conformance_files(tmp_path_factory.mktemp("conformance"))}


@pytest.fixture(scope="module")
def wire_bytes(conformance, require_dcmtk, tmp_path_factory):
    """What storescu actually puts on the wire for each file (it re-encodes the data set, e.g. re-deflates), captured
    by a bit-preserving DCMTK storescp: the reference a byte-exact retrieve is compared with."""
    scp = dcmtk.StoreSCP(tmp_path_factory.mktemp("reference") / "rx", aet="REFSCP").start()
    ref: dict[str, bytes] = {}
    try:
        for c in conformance.values():
            scp.clear()
            res = dcmtk.store(scp.port, [c.path], "-R", dcmtk.STORESCU_PROPOSE[c.transfer_syntax], aet="REFSCP")
            statuses = dcmtk.parse_store_log(res.output)
            assert statuses.get(str(c.path)) == "Success", f"reference storescp refused {c.name}:\n{res.output}"
            (received,) = scp.files()
            meta = pydicom.dcmread(received, stop_before_pixels=True).file_meta
            assert meta.TransferSyntaxUID == c.transfer_syntax, f"storescu did not send {c.name} in its own syntax"
            ref[c.name] = dataset_bytes(received)
    finally:
        scp.stop()
    return ref


@pytest.fixture(scope="module")
def stored_conformance(server, conformance):
    """Each file sent with the storescu option that proposes its own transfer syntax; name -> storescu status."""
    statuses: dict[str, str] = {}
    outputs: dict[str, str] = {}
    for c in conformance.values():
        res = dcmtk.store(server.dicom_port, [c.path], "-R", dcmtk.STORESCU_PROPOSE[c.transfer_syntax])
        statuses[c.name] = dcmtk.parse_store_log(res.output).get(str(c.path), f"no response (exit {res.returncode})")
        outputs[c.name] = res.output
    return statuses, outputs


@pytest.fixture(scope="module")
def find_server(request, backend, storescp, tmp_path_factory):
    """A second server holding only the synthetic query data set, so C-FIND results can be compared exactly."""
    base = tmp_path_factory.mktemp(f"find-{backend}")
    srv = make_server(request, base, backend, remote_aes={"DESTSCP": ("DESTSCP", "127.0.0.1", storescp.port)})
    srv.start()
    yield srv
    stop_cleanly(srv)


@pytest.fixture(scope="module")
def qds(find_server, tmp_path_factory):
    data = build_query_dataset(tmp_path_factory.mktemp("query-ds"))
    res = dcmtk.store(find_server.dicom_port, data.files)
    statuses = dcmtk.parse_store_log(res.output)
    bad = {f: statuses.get(str(f)) for f in data.files if statuses.get(str(f)) != "Success"}
    assert not bad, f"storing the query data set failed: {bad}\n{res.output[-5000:]}"
    return data


def find(srv, tmp_path, model, level, keys):
    return dcmtk.find(srv.dicom_port, model, level, keys, tmp_path / "find")


# ------------------------------------------------------------------------------------------------------------------
# echo, store, byte-exact retrieve


def test_echo(server):
    res = dcmtk.echo(server.dicom_port)
    assert res.returncode == 0, res.output


def test_echo_find_server(find_server):
    assert dcmtk.echo(find_server.dicom_port).returncode == 0


@pytest.mark.parametrize("name", FILE_IDS)
def test_store_in_own_transfer_syntax(name, stored_conformance, conformance):
    statuses, outputs = stored_conformance
    assert statuses[name] == "Success", f"{name} ({conformance[name].transfer_syntax}):\n{outputs[name][-4000:]}"


@pytest.mark.parametrize("name", FILE_IDS)
def test_get_returns_identical_bytes(name, server, stored_conformance, conformance, wire_bytes, tmp_path):
    c = conformance[name]
    got = dcmtk.get(server.dicom_port, "study", "IMAGE",
                    {"StudyInstanceUID": c.study_uid, "SeriesInstanceUID": c.series_uid,
                     "SOPInstanceUID": c.sop_instance_uid},
                    tmp_path / "get", prefer=dcmtk.RETRIEVE_PREFER[c.transfer_syntax])
    assert len(got.files) == 1, f"getscu received {len(got.files)} files:\n{got.output[-5000:]}"
    meta = pydicom.dcmread(got.files[0], stop_before_pixels=True).file_meta
    if c.transfer_syntax == IMPLICIT_VR_LE:
        # getscu 3.6.7 cannot offer Implicit VR alone (its +xi proposes Explicit VR only), so the server must convert:
        # the data set must still be equal element by element
        assert meta.TransferSyntaxUID in (IMPLICIT_VR_LE, EXPLICIT_VR_LE)
        assert pydicom.dcmread(got.files[0]) == pydicom.dcmread(c.path)
    else:
        assert meta.TransferSyntaxUID == c.transfer_syntax
        assert dataset_bytes(got.files[0]) == wire_bytes[name], f"{name}: retrieved data set differs from what was sent"
    assert got.final_counts().get("completed") == 1, got.output[-3000:]
    assert got.final_status() == 0x0000


@pytest.mark.parametrize("name", FILE_IDS)
def test_move_returns_identical_bytes(name, server, stored_conformance, conformance, wire_bytes, storescp):
    c = conformance[name]
    storescp.clear()
    moved = dcmtk.move(server.dicom_port, "study", "IMAGE",
                       {"StudyInstanceUID": c.study_uid, "SeriesInstanceUID": c.series_uid,
                        "SOPInstanceUID": c.sop_instance_uid}, "DESTSCP")
    files = storescp.files()
    assert len(files) == 1, f"storescp received {len(files)} files:\n{moved.output[-5000:]}"
    assert files[0].name.endswith(c.sop_instance_uid)
    meta = pydicom.dcmread(files[0], stop_before_pixels=True).file_meta
    assert meta.TransferSyntaxUID == c.transfer_syntax
    assert dataset_bytes(files[0]) == wire_bytes[name], f"{name}: moved data set differs from what was sent"
    counts = moved.final_counts()
    assert counts.get("completed") == 1 and counts.get("failed", 0) == 0 and counts.get("warning", 0) == 0, counts
    assert moved.final_status() == 0x0000


def test_restore_identical_is_success(server, stored_conformance, conformance):
    """Duplicate SOP Instance UID with identical bytes: success, nothing new."""
    c = conformance["CT_small.dcm"]
    before = len(server.blob_files())
    res = dcmtk.store(server.dicom_port, [c.path], "-R", dcmtk.STORESCU_PROPOSE[c.transfer_syntax])
    assert dcmtk.parse_store_log(res.output).get(str(c.path)) == "Success", res.output
    assert len(server.blob_files()) == before


# ------------------------------------------------------------------------------------------------------------------
# C-MOVE / C-GET of whole studies: counts and statuses


def test_move_study_counts(find_server, qds, storescp):
    p, st = qds.study("ACC101")
    storescp.clear()
    moved = dcmtk.move(find_server.dicom_port, "study", "STUDY", {"StudyInstanceUID": st.uid}, "DESTSCP")
    assert moved.final_status() == 0x0000, moved.output[-5000:]
    assert moved.final_counts().get("completed") == len(st.instances)
    assert moved.final_counts().get("failed", 0) == 0
    received = {f.name.split(".", 1)[1] for f in storescp.files()}
    assert received == {i.uid for i in st.instances}


def test_move_patient_root_patient_level(find_server, qds, storescp):
    p = qds.patients[0]
    storescp.clear()
    moved = dcmtk.move(find_server.dicom_port, "patient", "PATIENT", {"PatientID": p.id}, "DESTSCP")
    expected = {i.uid for st in p.studies for i in st.instances}
    assert moved.final_status() == 0x0000, moved.output[-5000:]
    assert moved.final_counts().get("completed") == len(expected)
    assert {f.name.split(".", 1)[1] for f in storescp.files()} == expected


def test_get_study_counts(find_server, qds, tmp_path):
    p, st = qds.study("ACC100")
    got = dcmtk.get(find_server.dicom_port, "study", "STUDY", {"StudyInstanceUID": st.uid}, tmp_path / "get")
    assert got.final_status() == 0x0000, got.output[-5000:]
    assert got.final_counts().get("completed") == len(st.instances) == 5
    assert got.final_counts().get("failed", 0) == 0
    assert {str(pydicom.dcmread(f).SOPInstanceUID) for f in got.files} == {i.uid for i in st.instances}
    for f in got.files:
        original = next(i.path for i in st.instances if f.name.endswith(i.uid))
        assert dataset_bytes(f) == dataset_bytes(original)


def test_get_series_patient_root(find_server, qds, tmp_path):
    p, st = qds.study("ACC101")
    se = st.series[0]
    got = dcmtk.get(find_server.dicom_port, "patient", "SERIES",
                    {"PatientID": p.id, "StudyInstanceUID": st.uid, "SeriesInstanceUID": se.uid}, tmp_path / "get")
    assert got.final_status() == 0x0000, got.output[-5000:]
    assert {str(pydicom.dcmread(f).SOPInstanceUID) for f in got.files} == {i.uid for i in se.instances}


def test_move_unknown_destination_fails_a801(find_server, qds, storescp):
    p, st = qds.study("ACC100")
    storescp.clear()
    moved = dcmtk.move(find_server.dicom_port, "study", "STUDY", {"StudyInstanceUID": st.uid}, "NOSUCHAE")
    assert moved.final_status() == 0xA801, moved.output[-5000:]
    assert storescp.files() == []
    assert dcmtk.echo(find_server.dicom_port).returncode == 0


def test_move_of_nothing_completes_with_zero(find_server, qds, storescp):
    storescp.clear()
    moved = dcmtk.move(find_server.dicom_port, "study", "STUDY", {"StudyInstanceUID": "1.2.3.4.5.6.7.8.9.0"},
                       "DESTSCP")
    assert moved.final_status() == 0x0000, moved.output[-5000:]
    assert moved.final_counts().get("completed", 0) == 0
    assert moved.final_counts().get("failed", 0) == 0
    assert storescp.files() == []


def test_move_to_unreachable_destination_counts_failures(request, backend, find_server, qds, tmp_path):
    """A known destination that does not answer: the sub-operations fail and the final status says so."""
    from helpers.ports import free_port

    p, st = qds.study("ACC101")
    dead_port = free_port()
    # a server configured with a destination nobody listens on
    srv = make_server(request, tmp_path / "deadmove", backend, remote_aes={"DEADSCP": ("DEADSCP", "127.0.0.1", dead_port)})
    srv.start()
    try:
        res = dcmtk.store(srv.dicom_port, [i.path for i in st.instances])
        assert all(v == "Success" for v in dcmtk.parse_store_log(res.output).values()), res.output
        moved = dcmtk.move(srv.dicom_port, "study", "STUDY", {"StudyInstanceUID": st.uid}, "DEADSCP")
        status = moved.final_status()
        assert status is not None and status != 0x0000, moved.output[-5000:]
        # either a refused destination association (0xA801-like failure) or all sub-operations failed
        assert status in (0xA801, 0xA702, 0xA701, 0xA900, 0xC000) or (status & 0xF000) in (0xA000, 0xC000, 0xB000), hex(status)
        assert moved.final_counts().get("completed", 0) == 0
    finally:
        stop_cleanly(srv)


# ------------------------------------------------------------------------------------------------------------------
# C-FIND


LEVEL_KEY = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID",
             "IMAGE": "SOPInstanceUID"}


def _pids(qds, pred):
    return {p.id for p in qds.patients if pred(p)}


def _studies(qds, pred):
    return {st.uid for p, st in qds.studies() if pred(p, st)}


def _st(qds, acc):
    return qds.study(acc)[1]


# (id, model, level, keys(qds) -> dict, expected(qds) -> set of identifiers of the level)
FIND_CASES = [
    # PATIENT level, patient root
    ("patient-single", "patient", "PATIENT", lambda d: {"PatientID": "QP001"}, lambda d: {"QP001"}),
    ("patient-universal", "patient", "PATIENT", lambda d: {"PatientID": ""}, lambda d: _pids(d, lambda p: True)),
    ("patient-id-wildcard-q", "patient", "PATIENT", lambda d: {"PatientID": "QP00?"}, lambda d: _pids(d, lambda p: True)),
    ("patient-id-wildcard-star", "patient", "PATIENT", lambda d: {"PatientID": "*3"}, lambda d: {"QP003"}),
    ("patient-name-star", "patient", "PATIENT", lambda d: {"PatientName": "Smith*"}, lambda d: {"QP003", "QP004"}),
    ("patient-name-q", "patient", "PATIENT", lambda d: {"PatientName": "Sm?th^Anna"}, lambda d: {"QP003"}),
    ("patient-name-exact-no-prefix", "patient", "PATIENT", lambda d: {"PatientName": "Smith"}, lambda d: set()),
    ("patient-name-case-insensitive", "patient", "PATIENT", lambda d: {"PatientName": "DOE^JOHN"}, lambda d: {"QP001"}),
    ("patient-name-case-insensitive-wild", "patient", "PATIENT", lambda d: {"PatientName": "DOE*"},
     lambda d: {"QP001", "QP002"}),
    ("patient-birthdate-single", "patient", "PATIENT", lambda d: {"PatientBirthDate": "19851231"}, lambda d: {"QP002"}),
    ("patient-birthdate-range", "patient", "PATIENT", lambda d: {"PatientBirthDate": "19700101-19851231"},
     lambda d: {"QP001", "QP002"}),
    ("patient-birthdate-until", "patient", "PATIENT", lambda d: {"PatientBirthDate": "-19700101"},
     lambda d: {"QP001", "QP004"}),
    ("patient-birthdate-from", "patient", "PATIENT", lambda d: {"PatientBirthDate": "20000101-"}, lambda d: {"QP003"}),
    ("patient-sex-and-name", "patient", "PATIENT", lambda d: {"PatientSex": "M", "PatientName": "*o*"},
     lambda d: {"QP001", "QP004"}),
    ("patient-no-match", "patient", "PATIENT", lambda d: {"PatientID": "NOPE"}, lambda d: set()),
    # STUDY level, study root
    ("study-universal", "study", "STUDY", lambda d: {}, lambda d: _studies(d, lambda p, s: True)),
    ("study-uid-single", "study", "STUDY", lambda d: {"StudyInstanceUID": _st(d, "ACC200").uid},
     lambda d: {_st(d, "ACC200").uid}),
    ("study-uid-list", "study", "STUDY",
     lambda d: {"StudyInstanceUID": "\\".join([_st(d, "ACC100").uid, _st(d, "ACC400").uid, "1.2.3.999"])},
     lambda d: {_st(d, "ACC100").uid, _st(d, "ACC400").uid}),
    ("study-date-single", "study", "STUDY", lambda d: {"StudyDate": "20200115"}, lambda d: {_st(d, "ACC100").uid}),
    ("study-date-range", "study", "STUDY", lambda d: {"StudyDate": "20200101-20201231"},
     lambda d: _studies(d, lambda p, s: "20200101" <= s.date <= "20201231")),
    ("study-date-from", "study", "STUDY", lambda d: {"StudyDate": "20220101-"},
     lambda d: _studies(d, lambda p, s: s.date >= "20220101")),
    ("study-date-until", "study", "STUDY", lambda d: {"StudyDate": "-20200115"},
     lambda d: _studies(d, lambda p, s: s.date <= "20200115")),
    ("study-time-range", "study", "STUDY", lambda d: {"StudyTime": "080000-150000"},
     lambda d: {_st(d, a).uid for a in ("ACC100", "ACC101", "ACC301", "ACC400")}),
    ("study-time-from", "study", "STUDY", lambda d: {"StudyTime": "230000-"}, lambda d: {_st(d, "ACC200").uid}),
    ("study-date-and-time", "study", "STUDY", lambda d: {"StudyDate": "20200116", "StudyTime": "-120000"},
     lambda d: set()),
    ("study-accession-single", "study", "STUDY", lambda d: {"AccessionNumber": "XR300"}, lambda d: {_st(d, "XR300").uid}),
    ("study-accession-wildcard", "study", "STUDY", lambda d: {"AccessionNumber": "ACC1*"},
     lambda d: {_st(d, "ACC100").uid, _st(d, "ACC101").uid}),
    ("study-accession-q", "study", "STUDY", lambda d: {"AccessionNumber": "ACC?0?"},
     lambda d: _studies(d, lambda p, s: s.accession.startswith("ACC"))),
    ("study-modalities-mr", "study", "STUDY", lambda d: {"ModalitiesInStudy": "MR"}, lambda d: {_st(d, "ACC101").uid}),
    ("study-modalities-ct", "study", "STUDY", lambda d: {"ModalitiesInStudy": "CT"},
     lambda d: _studies(d, lambda p, s: "CT" in s.modalities)),
    ("study-referring-case-insensitive", "study", "STUDY", lambda d: {"ReferringPhysicianName": "WELBY^MARCUS"},
     lambda d: {_st(d, "ACC100").uid, _st(d, "ACC200").uid}),
    ("study-description-wildcard", "study", "STUDY", lambda d: {"StudyDescription": "*ABDOMEN"},
     lambda d: {_st(d, "ACC200").uid, _st(d, "ACC301").uid}),
    ("study-patient-name", "study", "STUDY", lambda d: {"PatientName": "doe^j*"},
     lambda d: _studies(d, lambda p, s: p.id in ("QP001", "QP002"))),
    ("study-patient-id", "study", "STUDY", lambda d: {"PatientID": "QP003"},
     lambda d: _studies(d, lambda p, s: p.id == "QP003")),
    ("study-sequence-match", "study", "STUDY", lambda d: {"ProcedureCodeSequence[0].CodeValue": "P-MR1"},
     lambda d: {_st(d, "ACC101").uid}),
    ("study-study-id", "study", "STUDY", lambda d: {"StudyID": "S1"},
     lambda d: _studies(d, lambda p, s: s.study_id == "S1")),
    # STUDY level, patient root (hierarchical: under one patient)
    ("pstudy-universal", "patient", "STUDY", lambda d: {"PatientID": "QP003"},
     lambda d: _studies(d, lambda p, s: p.id == "QP003")),
    ("pstudy-date-from", "patient", "STUDY", lambda d: {"PatientID": "QP001", "StudyDate": "20210101-"},
     lambda d: {_st(d, "ACC101").uid}),
    ("pstudy-accession-wild", "patient", "STUDY", lambda d: {"PatientID": "QP003", "AccessionNumber": "XR*"},
     lambda d: {_st(d, "XR300").uid}),
    # SERIES level
    ("series-universal", "study", "SERIES", lambda d: {"StudyInstanceUID": _st(d, "ACC101").uid},
     lambda d: {se.uid for se in _st(d, "ACC101").series}),
    ("series-modality", "study", "SERIES", lambda d: {"StudyInstanceUID": _st(d, "ACC101").uid, "Modality": "MR"},
     lambda d: {se.uid for se in _st(d, "ACC101").series if se.modality == "MR"}),
    ("series-description-q", "study", "SERIES",
     lambda d: {"StudyInstanceUID": _st(d, "ACC101").uid, "SeriesDescription": "T? *"},
     lambda d: {se.uid for se in _st(d, "ACC101").series if se.description.startswith("T")}),
    ("series-number", "study", "SERIES", lambda d: {"StudyInstanceUID": _st(d, "ACC101").uid, "SeriesNumber": "3"},
     lambda d: {_st(d, "ACC101").series[2].uid}),
    ("series-uid-list", "study", "SERIES",
     lambda d: {"StudyInstanceUID": _st(d, "ACC101").uid,
                "SeriesInstanceUID": f"{_st(d, 'ACC101').series[0].uid}\\{_st(d, 'ACC101').series[2].uid}"},
     lambda d: {_st(d, "ACC101").series[0].uid, _st(d, "ACC101").series[2].uid}),
    ("series-body-part", "study", "SERIES",
     lambda d: {"StudyInstanceUID": _st(d, "ACC400").uid, "BodyPartExamined": "WHOLEBODY", "Modality": "PT"},
     lambda d: {_st(d, "ACC400").series[0].uid}),
    ("pseries-modality", "patient", "SERIES",
     lambda d: {"PatientID": "QP001", "StudyInstanceUID": _st(d, "ACC101").uid, "Modality": "SR"},
     lambda d: {_st(d, "ACC101").series[2].uid}),
    ("pseries-universal", "patient", "SERIES",
     lambda d: {"PatientID": "QP004", "StudyInstanceUID": _st(d, "ACC400").uid},
     lambda d: {se.uid for se in _st(d, "ACC400").series}),
    # IMAGE level
    ("image-universal", "study", "IMAGE",
     lambda d: {"StudyInstanceUID": _st(d, "ACC100").uid, "SeriesInstanceUID": _st(d, "ACC100").series[0].uid},
     lambda d: {i.uid for i in _st(d, "ACC100").series[0].instances}),
    ("image-number", "study", "IMAGE",
     lambda d: {"StudyInstanceUID": _st(d, "ACC100").uid, "SeriesInstanceUID": _st(d, "ACC100").series[0].uid,
                "InstanceNumber": "2"},
     lambda d: {_st(d, "ACC100").series[0].instances[1].uid}),
    ("image-uid-list", "study", "IMAGE",
     lambda d: {"StudyInstanceUID": _st(d, "ACC100").uid, "SeriesInstanceUID": _st(d, "ACC100").series[0].uid,
                "SOPInstanceUID": "\\".join(i.uid for i in _st(d, "ACC100").series[0].instances[::2])},
     lambda d: {i.uid for i in _st(d, "ACC100").series[0].instances[::2]}),
    ("image-sop-class", "study", "IMAGE",
     lambda d: {"StudyInstanceUID": _st(d, "ACC400").uid, "SeriesInstanceUID": _st(d, "ACC400").series[0].uid,
                "SOPClassUID": "1.2.840.10008.5.1.4.1.1.128"},
     lambda d: {i.uid for i in _st(d, "ACC400").series[0].instances}),
    ("image-sop-class-other", "study", "IMAGE",
     lambda d: {"StudyInstanceUID": _st(d, "ACC400").uid, "SeriesInstanceUID": _st(d, "ACC400").series[0].uid,
                "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2"},
     lambda d: set()),
    ("pimage-single", "patient", "IMAGE",
     lambda d: {"PatientID": "QP002", "StudyInstanceUID": _st(d, "ACC200").uid,
                "SeriesInstanceUID": _st(d, "ACC200").series[0].uid,
                "SOPInstanceUID": _st(d, "ACC200").series[0].instances[2].uid},
     lambda d: {_st(d, "ACC200").series[0].instances[2].uid}),
    ("pimage-universal", "patient", "IMAGE",
     lambda d: {"PatientID": "QP002", "StudyInstanceUID": _st(d, "ACC200").uid,
                "SeriesInstanceUID": _st(d, "ACC200").series[0].uid},
     lambda d: {i.uid for i in _st(d, "ACC200").series[0].instances}),
]


@pytest.mark.parametrize("case", FIND_CASES, ids=[c[0] for c in FIND_CASES])
def test_find(case, find_server, qds, tmp_path):
    _, model, level, keys_fn, expected_fn = case
    keys = dict(keys_fn(qds))
    key = LEVEL_KEY[level]
    keys.setdefault(key, "")
    results = find(find_server, tmp_path, model, level, keys)
    got = [str(r.get(key, "")) for r in results]
    assert len(got) == len(set(got)), f"duplicate responses: {got}"
    assert set(got) == expected_fn(qds)


def test_find_returns_requested_attributes(find_server, qds, tmp_path):
    p, st = qds.study("ACC101")
    (r,) = find(find_server, tmp_path, "study", "STUDY",
                {"StudyInstanceUID": st.uid, "PatientName": "", "PatientID": "", "StudyDate": "", "StudyTime": "",
                 "AccessionNumber": "", "ModalitiesInStudy": "", "NumberOfStudyRelatedSeries": "",
                 "NumberOfStudyRelatedInstances": "", "StudyDescription": ""})
    assert str(r.PatientName) == p.name
    assert r.PatientID == p.id
    assert r.StudyDate == st.date
    assert r.AccessionNumber == st.accession
    assert r.StudyDescription == st.description
    assert set(r.ModalitiesInStudy) == {"MR", "SR"}
    assert int(r.NumberOfStudyRelatedSeries) == 3
    assert int(r.NumberOfStudyRelatedInstances) == 5
    assert r.QueryRetrieveLevel == "STUDY"


def test_find_patient_related_counts(find_server, qds, tmp_path):
    (r,) = find(find_server, tmp_path, "patient", "PATIENT",
                {"PatientID": "QP001", "PatientName": "", "PatientBirthDate": "", "PatientSex": "",
                 "NumberOfPatientRelatedStudies": "", "NumberOfPatientRelatedSeries": "",
                 "NumberOfPatientRelatedInstances": ""})
    assert str(r.PatientName) == "Doe^John"
    assert r.PatientBirthDate == "19700101"
    assert r.PatientSex == "M"
    assert int(r.NumberOfPatientRelatedStudies) == 2
    assert int(r.NumberOfPatientRelatedSeries) == 5
    assert int(r.NumberOfPatientRelatedInstances) == 10


def test_find_series_attributes(find_server, qds, tmp_path):
    p, st = qds.study("ACC100")
    results = find(find_server, tmp_path, "study", "SERIES",
                   {"StudyInstanceUID": st.uid, "SeriesInstanceUID": "", "Modality": "", "SeriesNumber": "",
                    "SeriesDescription": "", "NumberOfSeriesRelatedInstances": ""})
    by_uid = {r.SeriesInstanceUID: r for r in results}
    assert set(by_uid) == {se.uid for se in st.series}
    for se in st.series:
        r = by_uid[se.uid]
        assert r.Modality == se.modality
        assert int(r.SeriesNumber) == se.number
        assert r.SeriesDescription == se.description
        assert int(r.NumberOfSeriesRelatedInstances) == len(se.instances)


def test_find_cancel(find_server, qds, tmp_path):
    """findscu --cancel 1 on a query with many matches: the association ends normally, with a Cancel (0xFE00) final
    status unless the server had already sent every response, and the server keeps answering."""
    out = tmp_path / "cancel"
    out.mkdir()
    res = dcmtk.run("findscu", "-v", "-S", "--cancel", "1", "-X", "-od", str(out), "-k", "QueryRetrieveLevel=STUDY",
                    "-k", "StudyInstanceUID=", *dcmtk.peer_args(find_server.dicom_port, "OPENPACS"))
    assert res.returncode == 0, res.output
    import re

    final = re.findall(r"Received Final Find Response \(([^)]*)\)", res.output)
    assert final, res.output
    total = len(qds.studies())
    n = len(list(out.glob("rsp*.dcm")))
    assert final[-1].startswith(("Cancel", "Success")), res.output
    # pending responses already on the wire when the C-CANCEL arrived are fine; after Success, all were sent
    assert n <= total if final[-1].startswith("Cancel") else n == total
    assert dcmtk.echo(find_server.dicom_port).returncode == 0
