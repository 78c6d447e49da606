"""Orthanc as a real remote peer of OpenPACS: both servers started on free loopback ports, each configured with the
other (Orthanc's JSON ``DicomModalities`` / ``DicomWeb.Servers``, OpenPACS's TOML ``[remote_aes.ORTHANC]``).

Covered: Orthanc -> OpenPACS C-STORE (data set bytes as sent, compressed syntaxes included), Orthanc's C-FIND against
OpenPACS (wildcard / date range), Orthanc's C-MOVE from OpenPACS to itself, DCMTK movescu asking OpenPACS to C-MOVE to
Orthanc, and Orthanc's DICOMweb client STOW-RS into / WADO-RS retrieve from OpenPACS's /dicom-web.
Needs the Debian packages orthanc and orthanc-dicomweb (skipped without them unless OPENPACS_TEST_REQUIRE_ALL=1) and
DCMTK for the seeding / movescu / wire-capture parts."""

from __future__ import annotations

import io
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest
import requests
from helpers import dcmtk, dicomdata
from helpers.orthanc import Orthanc, find_dicomweb_plugin, find_orthanc
from helpers.server import OpenPACSServer, make_server, stop_cleanly
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

warnings.filterwarnings("ignore", module="pydicom")

REQUIRE_ALL = os.environ.get("OPENPACS_TEST_REQUIRE_ALL", "") not in ("", "0", "false")
ORTHANC_PEER = "openpacs"  # OpenPACS's name in Orthanc's DicomModalities and DicomWeb.Servers
AS_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'


def _missing(what: str) -> None:
    if REQUIRE_ALL:
        pytest.fail(f"{what} (OPENPACS_TEST_REQUIRE_ALL is set)", pytrace=False)
    pytest.skip(what)


@pytest.fixture(scope="session")
def require_orthanc() -> None:
    if find_orthanc() is None:
        _missing("Orthanc not found (apt-get install orthanc; or set OPENPACS_TEST_ORTHANC)")


@pytest.fixture(scope="session")
def require_orthanc_dicomweb(require_orthanc) -> None:
    if find_dicomweb_plugin() is None:
        _missing(
            "Orthanc DICOMweb plugin not found (apt-get install orthanc-dicomweb; "
            "or set OPENPACS_TEST_ORTHANC_DICOMWEB)"
        )


# ---------------------------------------------------------------------------------------------------------------
# the two peers


@dataclass
class Peers:
    openpacs: OpenPACSServer
    orthanc: Orthanc

    @property
    def web(self) -> str:
        return f"http://127.0.0.1:{self.openpacs.http_port}/dicom-web"


@pytest.fixture(scope="module")
def peers(request, backend, require_orthanc, tmp_path_factory):
    base = tmp_path_factory.mktemp(f"orthanc-peer-{backend}")
    srv = make_server(request, base, backend)
    orthanc = Orthanc(
        base / "orthanc",
        aet="ORTHANC",
        modalities={ORTHANC_PEER: (srv.aet, "127.0.0.1", srv.dicom_port)},
        dicomweb_servers={ORTHANC_PEER: f"http://127.0.0.1:{srv.http_port}/dicom-web/"},
        dicomweb_plugin=find_dicomweb_plugin(),
    )
    srv.remote_aes = {"ORTHANC": (orthanc.aet, "127.0.0.1", orthanc.dicom_port)}
    try:
        orthanc.start()
        srv.start()
    except BaseException:
        orthanc.stop()
        if srv.proc is not None:
            srv.kill()
        raise
    yield Peers(srv, orthanc)
    try:
        stop_cleanly(srv)
    finally:
        orthanc.stop()


# ---------------------------------------------------------------------------------------------------------------
# data


def _to_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _reuid(name: str, **attrs: object) -> bytes:
    """A pydicom test file (pixel data kept as encoded) under new SOP Instance UID and the given attributes."""
    ds = pydicom.dcmread(dicomdata.testdata_file(name))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    for k, v in attrs.items():
        setattr(ds, k, v)
    return _to_bytes(ds)


def _synthetic(fill: int, **attrs: object) -> bytes:
    ds = dicomdata.small_image(rows=16, cols=16, fill=fill)
    ds.Modality = "CT"
    for k, v in attrs.items():
        setattr(ds, k, v)
    return dicomdata.part10_bytes(ds)


@dataclass
class SeedStudy:
    patient_id: str
    name: str
    date: str
    uid: str = field(default_factory=generate_uid)
    files: dict[str, bytes] = field(default_factory=dict)  # SOP Instance UID -> Part 10 bytes


def _make_study(patient_id: str, name: str, date: str, n_native: int, compressed: tuple[str, ...] = ()) -> SeedStudy:
    st = SeedStudy(patient_id, name, date)
    common = dict(
        PatientID=patient_id,
        PatientName=name,
        StudyDate=date,
        StudyTime="101500",
        StudyInstanceUID=st.uid,
        AccessionNumber=patient_id[-6:],
        StudyID="1",
        PatientBirthDate="19700101",
        PatientSex="O",
        ReferringPhysicianName="",
    )
    series = generate_uid()
    for i in range(n_native):
        data = _synthetic(0x10 * (i + 1), SeriesInstanceUID=series, SeriesNumber=1, InstanceNumber=i + 1, **common)
        st.files[pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID] = data
    for j, name_ in enumerate(compressed):
        data = _reuid(name_, SeriesInstanceUID=generate_uid(), SeriesNumber=2 + j, InstanceNumber=1, **common)
        st.files[pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID] = data
    return st


@pytest.fixture(scope="module")
def seeded(peers, require_dcmtk, tmp_path_factory) -> dict[str, SeedStudy]:
    """Studies stored into OpenPACS only (DCMTK storescu proposing each file's own syntax); Orthanc has none."""
    # the OPEER* patient IDs keep the queries clear of the other tests' data in the same index
    studies = {
        "alpha": _make_study("OPEERA01", "PEER^ALPHA", "20200105", 2, ("MR_small_jp2klossless.dcm",)),
        "beta": _make_study("OPEERB02", "PEER^BETA", "20210615", 1, ("MR_small_jpeg_ls_lossless.dcm",)),
        "gamma": _make_study("OPEERC03", "OTHER^GAMMA", "20221231", 2),
        "delta": _make_study("OPEERD04", "PEERLESS^DELTA", "20190303", 1),
        "eps": _make_study("OPEERE05", "PEER^EPSILON", "20230101", 1),
    }
    d = tmp_path_factory.mktemp("seed")
    by_ts: dict[str, list[Path]] = {}
    for key, st in studies.items():
        for sop, data in st.files.items():
            p = d / f"{key}-{sop}.dcm"
            p.write_bytes(data)
            ts = str(pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID)
            by_ts.setdefault(ts, []).append(p)
    for ts, paths in by_ts.items():
        res = dcmtk.store(peers.openpacs.dicom_port, paths, dcmtk.STORESCU_PROPOSE[ts], aet=peers.openpacs.aet).check()
        statuses = dcmtk.parse_store_log(res.output)
        assert all(s == "Success" for s in statuses.values()) and len(statuses) == len(paths), res.output[-3000:]
    return studies


# ---------------------------------------------------------------------------------------------------------------
# helpers


def _multipart(resp: requests.Response) -> list[tuple[str, bytes]]:
    """(content type, body) of each part of a multipart/related response (independent of OpenPACS's own parser)."""
    ctype = resp.headers["Content-Type"]
    m = re.search(r'boundary="?([^";]+)"?', ctype)
    assert m and ctype.lower().startswith("multipart/related"), ctype
    delim = b"--" + m.group(1).encode()
    body = resp.content
    parts = []
    for chunk in body.split(delim)[1:]:
        if chunk.startswith(b"--"):
            break
        head, _, payload = chunk.partition(b"\r\n\r\n")
        assert payload.endswith(b"\r\n"), "part not terminated by CRLF before the boundary"
        headers = dict(
            (k.strip().lower(), v.strip())
            for k, _, v in (line.partition(":") for line in head.decode("latin-1").split("\r\n") if ":" in line)
        )
        parts.append((headers.get("content-type", ""), payload[:-2]))
    return parts


def _openpacs_as_stored(peers: Peers, study: str, series: str, sop: str) -> bytes:
    r = requests.get(
        f"{peers.web}/studies/{study}/series/{series}/instances/{sop}", headers={"Accept": AS_STORED}, timeout=60
    )
    assert r.status_code == 200, f"WADO-RS {sop}: {r.status_code} {r.text[:500]}"
    parts = _multipart(r)
    assert len(parts) == 1, [p[0] for p in parts]
    return parts[0][1]


def _dataset(data: bytes) -> bytes:
    """The data set part of a Part 10 file (what went over the wire), never empty."""
    ds = dicomdata.split_meta(data)[1]
    assert len(ds) > 64, f"no data set after the file meta ({len(data)} bytes in all)"
    return ds


def _uids(data: bytes) -> tuple[str, str, str, str]:
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    return ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, str(ds.file_meta.TransferSyntaxUID)


def _pixel_value(data: bytes) -> bytes:
    """The Pixel Data element's value as encoded (native bytes, or the encapsulated fragments with their items)."""
    ds = pydicom.dcmread(io.BytesIO(data))
    return bytes(ds.PixelData)


def _decoded(data: bytes):
    return pydicom.dcmread(io.BytesIO(data)).pixel_array


def _orthanc_files_of_study(orthanc: Orthanc, study_uid: str) -> dict[str, bytes]:
    oid = orthanc.find_study(study_uid)
    if oid is None:
        return {}
    out = {}
    for inst in orthanc.get(f"/studies/{oid}/instances"):
        data = orthanc.instance_file(inst["ID"])
        out[_uids(data)[2]] = data
    return out


def _orthanc_forget(orthanc: Orthanc, study_uid: str) -> None:
    oid = orthanc.find_study(study_uid)
    if oid is not None:
        orthanc.delete(f"/studies/{oid}")
    assert orthanc.find_study(study_uid) is None


def _assert_same_instances(got: dict[str, bytes], expected: dict[str, bytes], what: str) -> None:
    """Same SOP Instance UIDs, same transfer syntax, the same encoded pixel data value and the same decoded pixels."""
    assert set(got) == set(expected), (
        f"{what}: missing {set(expected) - set(got)}, unexpected {set(got) - set(expected)}"
    )
    for sop, data in expected.items():
        assert _uids(got[sop])[3] == _uids(data)[3], f"{what}: {sop} changed transfer syntax"
        assert _pixel_value(got[sop]) == _pixel_value(data), f"{what}: {sop} pixel data differs"
        assert (_decoded(got[sop]) == _decoded(data)).all(), f"{what}: {sop} decoded pixels differ"


# ---------------------------------------------------------------------------------------------------------------
# 1. Orthanc -> OpenPACS C-STORE

STORE_FILES = [
    "CT_small.dcm",  # explicit VR little endian
    "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS lossless
    "JPEG2000.dcm",  # JPEG 2000 (lossy)
    "SC_rgb_jpeg_dcmtk.dcm",  # JPEG baseline
    "MR_small_implicit.dcm",  # implicit VR little endian (same SOP Instance UID as the JPEG-LS file: re-UIDed)
]


@pytest.fixture(scope="module")
def capture(peers, require_dcmtk, tmp_path_factory):
    """A DCMTK storescp (+B: writes exactly the data set it receives) registered in Orthanc as modality "capture": the
    reference for what Orthanc puts on the wire. Orthanc's C-STORE SCU re-encodes through DCMTK (group lengths and
    trailing padding of the file are dropped), so the file given to Orthanc is not what OpenPACS receives."""
    scp = dcmtk.StoreSCP(tmp_path_factory.mktemp("capture") / "received", aet="CAPTURE").start()
    peers.orthanc.request("PUT", "/modalities/capture", json={"AET": scp.aet, "Host": "127.0.0.1", "Port": scp.port})
    yield scp
    scp.stop()


def test_orthanc_cstore_to_openpacs_is_byte_identical(peers, capture) -> None:
    o = peers.orthanc
    originals: dict[str, bytes] = {}
    ids = []
    for name in STORE_FILES:
        data = _reuid(name) if name == "MR_small_implicit.dcm" else Path(dicomdata.testdata_file(name)).read_bytes()
        answer = o.upload(data)
        assert answer["Status"] == "Success", answer
        ids.append(answer["ID"])
        originals[_uids(data)[2]] = data

    job = o.post(f"/modalities/{ORTHANC_PEER}/store", {"Resources": ids, "Synchronous": True})
    assert job is not None and job.get("FailedInstancesCount", 0) == 0, job
    assert job["InstancesCount"] == len(ids), job
    capture.clear()
    o.post("/modalities/capture/store", {"Resources": ids, "Synchronous": True})
    on_the_wire = {_uids(p.read_bytes())[2]: p.read_bytes() for p in capture.files()}
    assert set(on_the_wire) == set(originals)

    for sop, data in originals.items():
        study, series, _, ts = _uids(data)
        stored = _openpacs_as_stored(peers, study, series, sop)
        assert _uids(stored)[3] == ts, f"{sop}: stored as {_uids(stored)[3]}, sent as {ts}"
        assert _uids(on_the_wire[sop])[3] == ts, f"Orthanc sent {sop} to CAPTURE in another syntax"
        assert _dataset(stored) == _dataset(on_the_wire[sop]), (
            f"{sop} ({ts}): data set bytes in OpenPACS differ from those Orthanc sends"
        )
        # and every element of the original file (bar the trailing padding Orthanc drops) is there, pixels included
        a = pydicom.dcmread(io.BytesIO(stored))
        b = pydicom.dcmread(io.BytesIO(data))
        assert [(e.tag, e.value) for e in a if e.tag != 0xFFFCFFFC] == [
            (e.tag, e.value) for e in b if e.tag != 0xFFFCFFFC
        ], sop
        assert _pixel_value(stored) == _pixel_value(data)


# ---------------------------------------------------------------------------------------------------------------
# 2. Orthanc's C-FIND against OpenPACS


def _orthanc_query(o: Orthanc, level: str, query: dict[str, str]) -> tuple[str, list[dict]]:
    q = o.post(f"/modalities/{ORTHANC_PEER}/query", {"Level": level, "Query": query})
    answers = o.get(f"/queries/{q['ID']}/answers?expand&simplify")
    return q["ID"], answers


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ({"PatientName": "PEER^*"}, {"alpha", "beta", "eps"}),
        ({"PatientName": "PEER*", "StudyDate": "-20201231"}, {"alpha", "delta"}),
        ({"PatientName": "*", "PatientID": "OPEER*", "StudyDate": "20210101-20221231"}, {"beta", "gamma"}),
        ({"PatientID": "OPEER*", "StudyDate": "20210615-"}, {"beta", "gamma", "eps"}),
        ({"PatientName": "P?ER^B*", "StudyDate": "20210615"}, {"beta"}),
        ({"PatientName": "NOBODY^*"}, set()),
    ],
    ids=["pn-wildcard", "pn-and-open-start-range", "closed-range", "open-end-range", "qmark-single-date", "none"],
)
def test_orthanc_cfind_studies(peers, seeded, query, expected) -> None:
    returned = {
        "PatientName": "",
        "PatientID": "",
        "StudyDate": "",
        "ModalitiesInStudy": "",
        "NumberOfStudyRelatedInstances": "",
    }
    _, answers = _orthanc_query(peers.orthanc, "Study", {**returned, **query})
    got = {a.get("StudyInstanceUID") for a in answers}
    want = {seeded[k].uid for k in expected}
    names = {v.uid: k for k, v in seeded.items()}
    assert got == want, (f"expected {sorted(expected)}, got {sorted(names.get(u, u) for u in got)}", answers)
    for a in answers:
        st = seeded[names[a["StudyInstanceUID"]]]
        assert a.get("PatientID") == st.patient_id and a.get("StudyDate") == st.date, a
        assert a.get("PatientName") == st.name, a
        assert int(a.get("NumberOfStudyRelatedInstances")) == len(st.files), a


# ---------------------------------------------------------------------------------------------------------------
# 3. Orthanc retrieves from OpenPACS with C-MOVE to itself


def test_orthanc_cmove_from_openpacs_to_itself(peers, seeded) -> None:
    o = peers.orthanc
    wanted = [seeded["alpha"], seeded["beta"], seeded["gamma"]]
    for st in wanted:
        _orthanc_forget(o, st.uid)
    qid, answers = _orthanc_query(
        o, "Study", {"PatientID": "OPEER*", "PatientName": "*A", "StudyDate": "20200101-20221231"}
    )
    assert {a["StudyInstanceUID"] for a in answers} == {st.uid for st in wanted}, answers
    o.post(f"/queries/{qid}/retrieve", {"TargetAet": o.aet, "Synchronous": True})
    for st in wanted:
        _assert_same_instances(_orthanc_files_of_study(o, st.uid), st.files, f"C-MOVE of {st.name} to Orthanc")
    # the other studies were not moved
    for key in ("delta", "eps"):
        assert o.find_study(seeded[key].uid) is None, key

    # the same through /modalities/{id}/move at SERIES level: only the compressed series of alpha
    st = seeded["alpha"]
    _orthanc_forget(o, st.uid)
    series_uid, sop = next((_uids(d)[1], s) for s, d in st.files.items() if _uids(d)[3] != ExplicitVRLittleEndian)
    o.post(
        f"/modalities/{ORTHANC_PEER}/move",
        {
            "Level": "Series",
            "Resources": [{"StudyInstanceUID": st.uid, "SeriesInstanceUID": series_uid}],
            "TargetAet": o.aet,
            "Synchronous": True,
        },
    )
    _assert_same_instances(_orthanc_files_of_study(o, st.uid), {sop: st.files[sop]}, "series C-MOVE")


# ---------------------------------------------------------------------------------------------------------------
# 4. DCMTK movescu asks OpenPACS to C-MOVE to Orthanc


@pytest.mark.parametrize(("model", "level", "key"), [("study", "STUDY", "beta"), ("patient", "PATIENT", "eps")])
def test_movescu_openpacs_to_orthanc(peers, seeded, model, level, key) -> None:
    o = peers.orthanc
    st = seeded[key]
    _orthanc_forget(o, st.uid)
    keys = {"StudyInstanceUID": st.uid} if level == "STUDY" else {"PatientID": st.patient_id}
    res = dcmtk.move(peers.openpacs.dicom_port, model, level, keys, "ORTHANC", aet=peers.openpacs.aet)
    res.result.check()
    assert res.final_status() == 0x0000, res.output[-4000:]
    counts = res.final_counts()
    assert counts.get("completed") == len(st.files), counts
    assert counts.get("failed", 0) == 0 and counts.get("warning", 0) == 0, counts
    assert counts.get("remaining", 0) == 0, counts
    _assert_same_instances(_orthanc_files_of_study(o, st.uid), st.files, f"movescu {level} -> ORTHANC")

    # a destination OpenPACS does not know: refused with 0xA801 and nothing sent
    bad = dcmtk.move(peers.openpacs.dicom_port, model, level, keys, "NOSUCHAE", aet=peers.openpacs.aet)
    assert bad.final_status() == 0xA801, bad.output[-4000:]


# ---------------------------------------------------------------------------------------------------------------
# 5. Orthanc's DICOMweb client: STOW-RS into OpenPACS, WADO-RS retrieve back


def _stow(peers: Peers, files: list[bytes]) -> None:
    """STOW-RS into OpenPACS with requests (a short RFC 2046 boundary), to give the WADO-RS test its data."""
    boundary = "openpacs-test-boundary"
    body = (
        b"".join(
            b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + f + b"\r\n" for f in files
        )
        + b"--"
        + boundary.encode()
        + b"--\r\n"
    )
    r = requests.post(
        f"{peers.web}/studies",
        data=body,
        timeout=60,
        headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json",
        },
    )
    assert r.status_code == 200, r.text[:1000]


def test_orthanc_dicomweb_stow_into_openpacs(peers, require_orthanc_dicomweb) -> None:
    o = peers.orthanc
    st = _make_study("OPEERW06", "WEB^STOW", "20240202", 2, ("emri_small_jpeg_ls_lossless.dcm",))
    for data in st.files.values():
        assert o.upload(data)["Status"] == "Success"
    oid = o.find_study(st.uid)
    assert oid
    o.post(f"/dicom-web/servers/{ORTHANC_PEER}/stow", {"Resources": [oid], "Synchronous": True})

    # every instance is in OpenPACS, data set as Orthanc stored (and sent) it: the plugin posts the file itself
    for sop, data in st.files.items():
        study, series, _, ts = _uids(data)
        stored = _openpacs_as_stored(peers, study, series, sop)
        assert _uids(stored)[3] == ts
        assert _dataset(stored) == _dataset(data), f"STOW of {sop}: data set differs"
    r = requests.get(f"{peers.web}/studies", params={"StudyInstanceUID": st.uid}, timeout=30)
    assert r.status_code == 200 and len(r.json()) == 1, r.text[:500]


def test_orthanc_dicomweb_retrieve_from_openpacs(peers, require_orthanc_dicomweb) -> None:
    o = peers.orthanc
    st = _make_study("OPEERW07", "WEB^WADO", "20240303", 2, ("emri_small_jpeg_ls_lossless.dcm", "JPEG2000.dcm"))
    _stow(peers, list(st.files.values()))
    assert o.find_study(st.uid) is None

    o.post(f"/dicom-web/servers/{ORTHANC_PEER}/retrieve", {"Resources": [{"Study": st.uid}], "Synchronous": True})
    got = _orthanc_files_of_study(o, st.uid)
    assert set(got) == set(st.files), (set(got), set(st.files))
    for sop, data in st.files.items():
        # the plugin asks for transfer-syntax=*: the instances come back as stored, data set byte for byte
        assert _uids(got[sop])[3] == _uids(data)[3], f"{sop}: transcoded on a transfer-syntax=* retrieve"
        assert _dataset(got[sop]) == _dataset(data), f"WADO-RS of {sop}: data set differs"
        assert _pixel_value(got[sop]) == _pixel_value(data)
