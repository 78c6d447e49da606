"""Query/retrieve from a remote archive (services/remote_qr.py, /api/nodes/{name}/studies and /retrieve), with Orthanc
as the remote: C-FIND through the API at the study, series and instance levels; retrieval by C-MOVE (Orthanc sends to
our AE title, our C-STORE SCP ingests) and by C-GET (our association, our handler ingests), byte-identical to what
Orthanc holds; QIDO-RS and WADO-RS against Orthanc's DICOMweb with basic auth; unknown and unreachable nodes, a UID
the remote does not have. Needs the Debian packages orthanc and orthanc-dicomweb (skipped without them unless
OPENPACS_TEST_REQUIRE_ALL=1)."""

from __future__ import annotations

import io
import os
import re
import time
import warnings
from dataclasses import dataclass, field

import pydicom
import pytest
import requests
from helpers import dicomdata
from helpers.orthanc import Orthanc, find_dicomweb_plugin, find_orthanc
from helpers.ports import free_port
from helpers.server import OpenPACSServer, stop_cleanly
from pydicom.uid import generate_uid

warnings.filterwarnings("ignore", module="pydicom")

REQUIRE_ALL = os.environ.get("OPENPACS_TEST_REQUIRE_ALL", "") not in ("", "0", "false")
AS_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'
ORTHANC_USER, ORTHANC_PASSWORD = "qr", "qr-secret"


def _missing(what: str) -> None:
    if REQUIRE_ALL:
        pytest.fail(f"{what} (OPENPACS_TEST_REQUIRE_ALL is set)", pytrace=False)
    pytest.skip(what)


# ---------------------------------------------------------------------------------------------------------------
# data: studies held by Orthanc only


@dataclass
class Study:
    patient_id: str
    name: str
    date: str
    accession: str
    modality: str
    uid: str = field(default_factory=generate_uid)
    files: dict[str, bytes] = field(default_factory=dict)  # SOP Instance UID -> Part 10 bytes
    series: dict[str, list[str]] = field(default_factory=dict)  # Series Instance UID -> SOP Instance UIDs


def _to_bytes(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _make_study(patient_id: str, name: str, date: str, accession: str, modality: str, n_native: int,
                files: tuple[str, ...] = ()) -> Study:
    st = Study(patient_id, name, date, accession, modality)
    common = dict(PatientID=patient_id, PatientName=name, StudyDate=date, StudyTime="093000", StudyInstanceUID=st.uid,
                  AccessionNumber=accession, StudyID="1", PatientBirthDate="19650412", PatientSex="F",
                  ReferringPhysicianName="", StudyDescription=f"{modality} remote")
    series = generate_uid()
    for i in range(n_native):
        ds = dicomdata.small_image(rows=16, cols=16, fill=0x11 * (i + 1))
        for k, v in dict(common, Modality=modality, SeriesInstanceUID=series, SeriesNumber=1,
                         InstanceNumber=i + 1).items():
            setattr(ds, k, v)
        data = dicomdata.part10_bytes(ds)
        st.files[str(ds.SOPInstanceUID)] = data
        st.series.setdefault(series, []).append(str(ds.SOPInstanceUID))
    for j, fname in enumerate(files):  # pydicom test files in their own syntax (implicit VR, JPEG-LS, J2K ...)
        ds = pydicom.dcmread(dicomdata.testdata_file(fname))
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        se = generate_uid()
        for k, v in dict(common, SeriesInstanceUID=se, SeriesNumber=2 + j, InstanceNumber=1).items():
            setattr(ds, k, v)
        if ds.file_meta.TransferSyntaxUID.is_compressed:
            # encapsulated Pixel Data is OB (PS3.5 A.4); these test files say OW, which Orthanc (DCMTK) corrects
            # when it sends them, so what it holds would not be what it sends
            ds["PixelData"].VR = "OB"
        if 0xFFFCFFFC in ds:  # Data Set Trailing Padding: DCMTK (Orthanc) drops it when it sends
            del ds[0xFFFCFFFC]
        st.files[str(ds.SOPInstanceUID)] = _to_bytes(ds)
        st.series.setdefault(se, []).append(str(ds.SOPInstanceUID))
    return st


STUDIES = {
    "move": ("RQR0001", "REMOTE^ALPHA", "20240105", "RQRACC1", "CT", 3, ("MR_small_implicit.dcm",)),
    "get": ("RQR0001", "REMOTE^ALPHA", "20230310", "RQRACC2", "MR", 2, ("MR_small_jpeg_ls_lossless.dcm",)),
    "web": ("RQR0002", "REMOTE^BETA", "20220707", "RQRACC3", "CT", 2, ("MR_small_jp2klossless.dcm",)),
    "series": ("RQR0003", "REMOTE^GAMMA", "20210101", "RQRACC4", "CT", 2, ("CT_small.dcm",)),
}


@dataclass
class Env:
    openpacs: OpenPACSServer
    orthanc: Orthanc
    studies: dict[str, Study]

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.openpacs.http_port}/api"

    @property
    def web(self) -> str:
        return f"http://127.0.0.1:{self.openpacs.http_port}/dicom-web"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    if find_orthanc() is None:
        _missing("Orthanc not found (apt-get install orthanc; or set OPENPACS_TEST_ORTHANC)")
    plugin = find_dicomweb_plugin()
    if plugin is None:
        _missing("Orthanc DICOMweb plugin not found (apt-get install orthanc-dicomweb)")
    base = tmp_path_factory.mktemp("remote-qr")
    srv = OpenPACSServer(base / "data", settings={"job_backoff_seconds": 1.0})
    orthanc = Orthanc(base / "orthanc", aet="ORTHANC", modalities={"openpacs": (srv.aet, "127.0.0.1", srv.dicom_port)},
                      dicomweb_plugin=plugin,
                      extra={"AuthenticationEnabled": True, "RegisteredUsers": {ORTHANC_USER: ORTHANC_PASSWORD}})
    orthanc.session.auth = (ORTHANC_USER, ORTHANC_PASSWORD)
    srv.remote_aes = {"ORTHANC": (orthanc.aet, "127.0.0.1", orthanc.dicom_port),
                      "DOWN": ("DOWN", "127.0.0.1", free_port())}
    srv.extra_toml = (
        f'[remote_dicomweb.ORTHANCWEB]\nurl = "http://127.0.0.1:{orthanc.http_port}/dicom-web"\n'
        f'username = "{ORTHANC_USER}"\npassword = "{ORTHANC_PASSWORD}"\n\n'
        f'[remote_dicomweb.DOWNWEB]\nurl = "http://127.0.0.1:{free_port()}/dicom-web"\ntimeout = 5.0\n'
    )
    try:
        orthanc.start()
        srv.start()
    except BaseException:
        orthanc.stop()
        if srv.proc is not None:
            srv.kill()
        raise
    studies = {key: _make_study(*spec) for key, spec in STUDIES.items()}
    for st in studies.values():
        for data in st.files.values():
            orthanc.upload(data)
    yield Env(srv, orthanc, studies)
    try:
        stop_cleanly(srv)
    finally:
        orthanc.stop()


# ---------------------------------------------------------------------------------------------------------------
# helpers


def _value(j: dict, tag: str):
    v = (j.get(tag) or {}).get("Value") or [None]
    return v[0]


def _get(env: Env, path: str, **params) -> requests.Response:
    return requests.get(env.api + path, params=params, timeout=120)


def _wait_job(env: Env, job_id: int, timeout: float = 90.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        j = requests.get(f"{env.api}/jobs/{job_id}", timeout=30).json()
        if j["state"] in ("done", "failed", "cancelled"):
            return j
        if j["state"] == "pending" and j.get("error"):  # a failed attempt waiting for its retry
            return j
        assert time.monotonic() < deadline, f"job {job_id} still {j['state']}: {j}\n{env.openpacs.log_tail(5000)}"
        time.sleep(0.2)


def _multipart(resp: requests.Response) -> list[bytes]:
    ctype = resp.headers["Content-Type"]
    m = re.search(r'boundary="?([^";]+)"?', ctype)
    assert m, ctype
    out = []
    for chunk in resp.content.split(b"--" + m.group(1).encode())[1:]:
        if chunk.startswith(b"--"):
            break
        out.append(chunk.partition(b"\r\n\r\n")[2][:-2])
    return out


def _openpacs_stored(env: Env, study: str) -> dict[str, bytes]:
    r = requests.get(f"{env.web}/studies/{study}", headers={"Accept": AS_STORED}, timeout=60)
    assert r.status_code == 200, f"WADO-RS {study}: {r.status_code} {r.text[:300]}"
    out = {}
    for part in _multipart(r):
        out[str(pydicom.dcmread(io.BytesIO(part), stop_before_pixels=True).SOPInstanceUID)] = part
    return out


def _assert_byte_identical(env: Env, st: Study) -> None:
    got = _openpacs_stored(env, st.uid)
    assert set(got) == set(st.files), f"missing {set(st.files) - set(got)}, unexpected {set(got) - set(st.files)}"
    for sop in st.files:
        oid = env.orthanc.find_instance(sop)
        assert oid is not None
        held = env.orthanc.instance_file(oid)
        a, b = dicomdata.split_meta(got[sop])[1], dicomdata.split_meta(held)[1]
        at = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        assert a == b, f"{sop}: data set bytes differ at {at} ({len(a)} vs {len(b)}): {a[at-16:at+16]!r} {b[at-16:at+16]!r}"
        ts_got = pydicom.dcmread(io.BytesIO(got[sop]), stop_before_pixels=True).file_meta.TransferSyntaxUID
        ts_held = pydicom.dcmread(io.BytesIO(held), stop_before_pixels=True).file_meta.TransferSyntaxUID
        assert ts_got == ts_held, sop


def _retrieve(env: Env, node: str, body: dict) -> dict:
    r = requests.post(f"{env.api}/nodes/{node}/retrieve", json=body, timeout=60)
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["kind"] == "retrieve" and job["state"] in ("pending", "running"), job
    return job


def _qido_count(env: Env, study: str) -> int:
    r = requests.get(f"{env.web}/studies/{study}/instances", timeout=30)
    return 0 if r.status_code == 204 else len(r.json())


# ---------------------------------------------------------------------------------------------------------------
# 1. C-FIND through the API


def test_cfind_studies_series_instances(env: Env) -> None:
    r = _get(env, "/nodes/ORTHANC/studies", PatientID="RQR0001")
    assert r.status_code == 200, r.text
    found = {_value(j, "0020000D"): j for j in r.json()}
    move, get = env.studies["move"], env.studies["get"]
    assert set(found) == {move.uid, get.uid}
    j = found[move.uid]
    assert _value(j, "00100020") == "RQR0001"
    assert _value(j, "00100010") == {"Alphabetic": "REMOTE^ALPHA"}
    assert _value(j, "00080020") == "20240105"
    assert _value(j, "00080050") == "RQRACC1"
    assert set((j.get("00080061") or {}).get("Value", [])) == {"CT", "MR"}
    assert int(_value(j, "00201208")) == len(move.files)
    assert "00080052" not in j  # QueryRetrieveLevel is the query's, not the study's

    # the other QIDO keys: name wildcard, date range, accession, modality
    r = _get(env, "/nodes/ORTHANC/studies", PatientName="REMOTE^AL*", StudyDate="20240101-")
    assert [_value(j, "0020000D") for j in r.json()] == [move.uid], r.text
    r = _get(env, "/nodes/ORTHANC/studies", AccessionNumber="RQRACC2")
    assert [_value(j, "0020000D") for j in r.json()] == [get.uid], r.text
    r = _get(env, "/nodes/ORTHANC/studies", PatientID="RQR*", limit="1")
    assert r.status_code == 200 and len(r.json()) == 1 and r.headers.get("X-Result-Truncated") == "true"

    r = _get(env, f"/nodes/ORTHANC/studies/{move.uid}/series")
    assert r.status_code == 200, r.text
    series = {_value(j, "0020000E"): j for j in r.json()}
    assert set(series) == set(move.series)
    assert sorted(_value(j, "00080060") for j in series.values()) == ["CT", "MR"]

    some = next(iter(move.series))
    r = _get(env, f"/nodes/ORTHANC/studies/{move.uid}/series/{some}/instances")
    assert r.status_code == 200, r.text
    assert {_value(j, "00080018") for j in r.json()} == set(move.series[some])

    r = _get(env, "/nodes/ORTHANC/patients", PatientID="RQR0002")
    assert r.status_code == 200 and [_value(j, "00100010") for j in r.json()] == [{"Alphabetic": "REMOTE^BETA"}]

    archives = {a["name"]: a for a in requests.get(f"{env.api}/remote-archives", timeout=30).json()}
    assert archives["ORTHANC"]["protocol"] == "dimse" and archives["ORTHANCWEB"]["protocol"] == "dicomweb"


# ---------------------------------------------------------------------------------------------------------------
# 2./3. retrieval by C-MOVE and by C-GET, byte-identical


def test_retrieve_by_cmove_is_byte_identical(env: Env) -> None:
    st = env.studies["move"]
    assert _qido_count(env, st.uid) == 0
    job = _wait_job(env, _retrieve(env, "ORTHANC", {"level": "STUDY", "uids": [st.uid], "method": "move"})["id"])
    assert job["state"] == "done", job
    assert job["done"] == job["total"] == len(st.files) and job["failed"] == 0, job
    assert job["bytes"] > 0
    assert job["payload"]["remote"]["completed"] == len(st.files), job["payload"]
    assert _qido_count(env, st.uid) == len(st.files)
    _assert_byte_identical(env, st)


def test_retrieve_by_cget_is_byte_identical(env: Env) -> None:
    st = env.studies["get"]
    assert _qido_count(env, st.uid) == 0
    job = _wait_job(env, _retrieve(env, "ORTHANC", {"level": "STUDY", "StudyInstanceUID": st.uid,
                                                     "method": "get"})["id"])
    assert job["state"] == "done", job
    assert job["done"] == job["total"] == len(st.files) and job["failed"] == 0, job
    assert job["payload"]["remote"]["completed"] == len(st.files), job["payload"]
    assert _qido_count(env, st.uid) == len(st.files)
    _assert_byte_identical(env, st)


def test_retrieve_one_series_by_cmove(env: Env) -> None:
    st = env.studies["series"]
    series = next(se for se, sops in st.series.items() if len(sops) > 1)
    job = _wait_job(env, _retrieve(env, "ORTHANC", {"level": "SERIES", "uids": [series],
                                                     "StudyInstanceUID": st.uid})["id"])
    assert job["state"] == "done" and job["done"] == job["total"] == len(st.series[series]), job
    assert _qido_count(env, st.uid) == len(st.series[series])


# ---------------------------------------------------------------------------------------------------------------
# 4. QIDO-RS and WADO-RS against Orthanc's DICOMweb


def test_dicomweb_peer_query_and_retrieve(env: Env) -> None:
    st = env.studies["web"]
    r = _get(env, "/nodes/ORTHANCWEB/studies", PatientID="RQR0002")
    assert r.status_code == 200, r.text
    assert [_value(j, "0020000D") for j in r.json()] == [st.uid]
    assert _value(r.json()[0], "00080050") == "RQRACC3"
    r = _get(env, f"/nodes/ORTHANCWEB/studies/{st.uid}/series")
    assert r.status_code == 200 and {_value(j, "0020000E") for j in r.json()} == set(st.series), r.text

    r = requests.post(f"{env.api}/nodes/ORTHANCWEB/retrieve", json={"level": "STUDY", "uids": [st.uid],
                                                                    "method": "move"}, timeout=30)
    assert r.status_code == 400 and "wado" in r.json()["detail"], r.text
    job = _wait_job(env, _retrieve(env, "ORTHANCWEB", {"level": "STUDY", "uids": [st.uid]})["id"])
    assert job["state"] == "done", job
    assert job["done"] == job["total"] == len(st.files), job
    _assert_byte_identical(env, st)


# ---------------------------------------------------------------------------------------------------------------
# 5. bad input


def test_unknown_down_and_missing(env: Env) -> None:
    r = _get(env, "/nodes/NOSUCH/studies", PatientID="X")
    assert r.status_code == 404, r.text
    r = requests.post(f"{env.api}/nodes/NOSUCH/retrieve", json={"level": "STUDY", "uids": ["1.2.3"]}, timeout=30)
    assert r.status_code == 404, r.text

    t0 = time.monotonic()
    r = _get(env, "/nodes/DOWN/studies", PatientID="X")
    assert r.status_code in (502, 504), r.text
    assert "DOWN" in r.json()["detail"] and "127.0.0.1" in r.json()["detail"], r.text
    r = _get(env, "/nodes/DOWNWEB/studies", PatientID="X")
    assert r.status_code in (502, 504) and "cannot reach" in r.json()["detail"], r.text
    assert time.monotonic() - t0 < 30

    r = _get(env, "/nodes/ORTHANC/studies", NoSuchKeyword="1")
    assert r.status_code == 400 and "NoSuchKeyword" in r.json()["detail"], r.text
    r = _get(env, "/nodes/ORTHANC/studies", StudyInstanceUID="not-a-uid")
    assert r.status_code == 400, r.text
    r = requests.post(f"{env.api}/nodes/ORTHANC/retrieve", json={"level": "STUDY", "uids": []}, timeout=30)
    assert r.status_code == 400, r.text
    r = requests.post(f"{env.api}/nodes/ORTHANC/retrieve", json={"level": "SERIES", "uids": ["1.2.3"]}, timeout=30)
    assert r.status_code == 400 and "StudyInstanceUID" in r.json()["detail"], r.text

    missing = generate_uid()
    for method in ("move", "get"):
        job = _wait_job(env, _retrieve(env, "ORTHANC", {"level": "STUDY", "uids": [missing], "method": method})["id"])
        assert job["state"] == "failed", job
        assert "holds no instance" in job["error"] and missing in job["error"], job
    job = _wait_job(env, _retrieve(env, "ORTHANCWEB", {"level": "STUDY", "uids": [missing]})["id"])
    assert job["state"] == "failed" and "holds no instance" in job["error"], job

    # the server is unaffected
    assert requests.get(f"{env.api}/nodes/ORTHANC/studies", params={"PatientID": "RQR0003"},
                        timeout=60).status_code == 200


# ---------------------------------------------------------------------------------------------------------------
# the console's "Query remote" page


def test_console_query_remote_and_retrieve(env: Env, chromium_path, artifacts) -> None:
    from helpers.browser import CHROMIUM_ARGS
    from playwright.sync_api import expect, sync_playwright

    st = env.studies["series"]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 900})
            page.set_default_timeout(60000)
            page.goto(f"http://127.0.0.1:{env.openpacs.http_port}/ui/#/remote")
            expect(page.get_by_role("heading", name="Query remote archive")).to_be_visible()
            page.get_by_label("Remote archive").select_option("ORTHANC")
            page.get_by_label("Patient ID").fill("RQR0003")
            page.get_by_label("Retrieve by").select_option("move")
            page.click("#remote-search")
            expect(page.get_by_role("heading", name="1 study on ORTHANC")).to_be_visible()
            expect(page.get_by_role("cell", name="RQRACC4")).to_be_visible()
            page.get_by_role("button", name=f"Retrieve study {st.uid}").click()
            expect(page.locator("[data-job-state=done]")).to_be_visible()
            assert f"{len(st.files)}/{len(st.files)}" in page.locator("[data-job-state=done]").inner_text()
            page.screenshot(path=str(artifacts / "console-query-remote.png"), full_page=True)

            page.get_by_label("Remote archive").select_option("DOWN")
            page.click("#remote-search")
            expect(page.locator("[data-remote-error]")).to_contain_text("DOWN")
        finally:
            browser.close()
    assert _qido_count(env, st.uid) == len(st.files)


def test_orthanc_as_cstore_destination_of_a_send_job(env: Env) -> None:
    """A send job (the C-STORE SCU of dimse/sender.py) with Orthanc as the destination: what Orthanc then holds is
    byte for byte the data set OpenPACS stored, compressed syntax included."""
    st = _make_study("RQRSEND1", "SEND^TO^ORTHANC", "20261201", "RQRSND", "CT", 2, ("MR_small_jpeg_ls_lossless.dcm",))
    for data in st.files.values():
        r = requests.post(f"{env.web}/studies", data=_stow_body(data), timeout=60,
                          headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=XBOUNDX'})
        assert r.status_code == 200, r.text
    stored = _openpacs_stored(env, st.uid)
    r = requests.post(f"{env.api}/studies/{st.uid}/send", json={"destination": "ORTHANC"}, timeout=60)
    assert r.status_code == 202, r.text
    job = _wait_job(env, r.json()["id"])
    assert job["state"] == "done" and job["done"] == 3, job
    for sop, part in stored.items():
        oid = env.orthanc.find_instance(sop)
        assert oid, f"{sop} not in Orthanc"
        assert dicomdata.split_meta(env.orthanc.instance_file(oid))[1] == dicomdata.split_meta(part)[1]


def _stow_body(data: bytes) -> bytes:
    return (b"--XBOUNDX\r\nContent-Type: application/dicom\r\n\r\n" + data + b"\r\n--XBOUNDX--\r\n")
