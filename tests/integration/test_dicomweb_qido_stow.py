"""QIDO-RS, STOW-RS and DELETE against the real server (`openpacs serve` on free ports), driven by dicomweb-client,
requests and raw sockets: every QIDO level and matching rule, the STOW status matrix with its failure reasons, and
hostile request bodies that must end in a clean 4xx while the server stays up."""

from __future__ import annotations

import gzip
import io
import socket
import uuid
import warnings
import zlib
from pathlib import Path

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from helpers import dicomdata
from helpers.server import OpenPACSServer, make_server, stop_cleanly

warnings.filterwarnings("ignore", module="pydicom")

MULTIPART = 'multipart/related; type="application/dicom"; boundary={b}'


@pytest.fixture(scope="module")
def srv(request, backend, tmp_path_factory) -> OpenPACSServer:
    base = tmp_path_factory.mktemp(f"dicomweb-{backend}")
    s = make_server(request, base, backend)
    s.start()
    yield s
    stop_cleanly(s)


@pytest.fixture(scope="module")
def base(srv: OpenPACSServer) -> str:
    return f"http://127.0.0.1:{srv.http_port}/dicom-web"


@pytest.fixture(scope="module")
def client(base: str) -> DICOMwebClient:
    return DICOMwebClient(url=base)


@pytest.fixture(scope="module")
def data(client: DICOMwebClient, tmp_path_factory) -> tuple[dicomdata.QueryDataSet, pydicom.Dataset]:
    """The synthetic query data set, stored through STOW-RS by dicomweb-client (one request)."""
    qd = dicomdata.build_query_dataset(tmp_path_factory.mktemp("qido-files"), prefix="W")
    response = client.store_instances([pydicom.dcmread(f) for f in qd.files])
    return qd, response


def multipart(parts: list[bytes], boundary: str = "stowtest") -> bytes:
    out = b""
    for p in parts:
        out += b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n"
    return out + b"--" + boundary.encode() + b"--\r\n"


def post(base: str, parts: list[bytes], path: str = "/studies", **headers: str) -> requests.Response:
    h = {"Content-Type": MULTIPART.format(b="stowtest"), "Accept": "application/dicom+json"}
    h.update(headers)
    return requests.post(base + path, data=multipart(parts), headers=h, timeout=60)


def new_instance(study: str | None = None, patient: str = "STOW1", **attrs: object) -> bytes:
    ds = dicomdata.small_image()
    ds.StudyInstanceUID = study or pydicom.uid.generate_uid()
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    ds.PatientID = patient
    ds.PatientName = "Stow^Test"
    ds.Modality = "CT"
    for k, v in attrs.items():
        setattr(ds, k, v)
    return dicomdata.part10_bytes(ds)


def seq(body: dict, tag: str) -> list[dict]:
    return body.get(tag, {}).get("Value", [])


def val(item: dict, tag: str):
    v = item.get(tag, {}).get("Value")
    return v[0] if v else None


def alive(srv: OpenPACSServer, base: str) -> None:
    assert srv.running, srv.log_tail()
    assert requests.get(f"http://127.0.0.1:{srv.http_port}/healthz", timeout=10).status_code == 200
    assert requests.get(base + "/studies", params={"limit": "1"}, timeout=10).status_code in (200, 204)


# ---------------------------------------------------------------------------------------------------------------------
# STOW-RS happy path (the data fixture) and QIDO-RS


def test_stow_response_references_every_instance(data, base) -> None:
    qd, response = data
    refs = response.ReferencedSOPSequence
    assert len(refs) == len(qd.files)
    assert "FailedSOPSequence" not in response
    by_uid = {i.uid: (st, se) for _, st, se, i in qd.instances()}
    for item in refs:
        st, se = by_uid[item.ReferencedSOPInstanceUID]
        assert item.RetrieveURL == f"{base}/studies/{st.uid}/series/{se.uid}/instances/{item.ReferencedSOPInstanceUID}"
        assert "WarningReason" not in item


def test_search_all_levels(data, client) -> None:
    qd, _ = data
    studies = client.search_for_studies(search_filters={"PatientID": "WQP00*"})
    assert {val(s, "0020000D") for s in studies} == {st.uid for _, st in qd.studies()}
    series = client.search_for_series(search_filters={"PatientID": "WQP00*"})
    assert {val(s, "0020000E") for s in series} == {se.uid for _, _, se in qd.series()}
    instances = client.search_for_instances(search_filters={"PatientID": "WQP00*"})
    assert {val(i, "00080018") for i in instances} == {i.uid for *_, i in qd.instances()}
    p, st = qd.study("WACC101")
    in_study = client.search_for_series(study_instance_uid=st.uid)
    assert {val(s, "0020000E") for s in in_study} == {se.uid for se in st.series}
    in_study_i = client.search_for_instances(study_instance_uid=st.uid)
    assert {val(i, "00080018") for i in in_study_i} == {i.uid for i in st.instances}
    se = st.series[1]
    in_series = client.search_for_instances(study_instance_uid=st.uid, series_instance_uid=se.uid)
    assert {val(i, "00080018") for i in in_series} == {i.uid for i in se.instances}


def test_default_attributes_and_typing(data, client, base) -> None:
    qd, _ = data
    p, st = qd.study("WACC100")
    (s,) = client.search_for_studies(search_filters={"AccessionNumber": "WACC100"})
    for tag in (
        "00080020",
        "00080030",
        "00080050",
        "00080056",
        "00080061",
        "00080090",
        "00081190",
        "00100010",
        "00100020",
        "00100030",
        "00100040",
        "0020000D",
        "00200010",
        "00201206",
        "00201208",
    ):
        assert tag in s, tag
    assert s["00100010"] == {"vr": "PN", "Value": [{"Alphabetic": "Doe^John"}]}
    assert s["00201206"] == {"vr": "IS", "Value": [2]}
    assert s["00201208"] == {"vr": "IS", "Value": [5]}
    assert s["00080056"]["Value"] == ["ONLINE"]
    assert s["00081190"]["Value"] == [f"{base}/studies/{st.uid}"]
    (se,) = client.search_for_series(study_instance_uid=st.uid, search_filters={"SeriesNumber": "1"})
    for tag in ("00080060", "0008103E", "0020000E", "00200011", "00201209", "00081190"):
        assert tag in se, tag
    assert se["00200011"] == {"vr": "IS", "Value": [1]}
    assert se["00081190"]["Value"] == [f"{base}/studies/{st.uid}/series/{st.series[0].uid}"]
    inst = client.search_for_instances(study_instance_uid=st.uid, series_instance_uid=st.series[0].uid)
    for i in inst:
        for tag in ("00080016", "00080018", "00200013", "00280010", "00280011", "00280100", "00081190", "00080056"):
            assert tag in i, tag
        assert i["00280010"] == {"vr": "US", "Value": [8]}
    all_series = client.search_for_series(search_filters={"AccessionNumber": "WACC100"})
    assert all("00100020" in x and "00080050" in x for x in all_series)  # study attributes on /series


def _accessions(results: list[dict]) -> set[str]:
    return {val(r, "00080050") for r in results}


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({"PatientID": "WQP001"}, {"WACC100", "WACC101"}),  # single value
        ({"PatientName": "Doe^John"}, {"WACC100", "WACC101"}),  # PN exact
        ({"PatientName": "DOE^JOHN"}, {"WACC100", "WACC101"}),  # PN case-insensitive
        ({"PatientName": "doe*"}, {"WACC100", "WACC101", "WACC200"}),  # wildcard *, case-insensitive
        ({"PatientName": "Smith?on*"}, {"WACC400"}),  # wildcard ?
        ({"AccessionNumber": "WXR*"}, {"WXR300"}),
        ({"StudyDate": "20200101-20201231"}, {"WACC100", "WACC200"}),  # range
        ({"StudyDate": "-20191231"}, {"WXR300"}),  # open start
        ({"StudyDate": "20230101-"}, {"WACC400"}),  # open end
        ({"StudyDate": "20200116"}, {"WACC200"}),
        ({"StudyTime": "140000-150000"}, {"WACC101"}),  # time range vs fractional seconds
        ({"ModalitiesInStudy": "MR"}, {"WACC101"}),
        ({"Modality": "PT"}, {"WACC400"}),  # a series key at study level (relational)
        ({"ReferringPhysicianName": "WELBY*"}, {"WACC100", "WACC200"}),
        ({"PatientBirthDate": "19700101", "PatientSex": "M"}, {"WACC100", "WACC101"}),
    ],
)
def test_matching_rules_studies(data, client, filters, expected) -> None:
    results = client.search_for_studies(search_filters={**filters, "PatientID": filters.get("PatientID", "WQP*")})
    assert _accessions(results) == expected


def test_uid_list_matching(data, client, base) -> None:
    qd, _ = data
    a, b = qd.study("WACC100")[1].uid, qd.study("WACC301")[1].uid
    # repeated parameter (what dicomweb-client sends for a list), comma- and backslash-separated lists
    r1 = client.search_for_studies(search_filters={"StudyInstanceUID": [a, b]})
    r2 = requests.get(f"{base}/studies?StudyInstanceUID={a},{b}", timeout=10).json()
    r3 = requests.get(f"{base}/studies?StudyInstanceUID={a}%5C{b}", timeout=10).json()
    for r in (r1, r2, r3):
        assert {val(x, "0020000D") for x in r} == {a, b}
    series = qd.study("WACC101")[1].series
    rs = client.search_for_series(search_filters={"SeriesInstanceUID": [series[0].uid, series[2].uid]})
    assert {val(x, "0020000E") for x in rs} == {series[0].uid, series[2].uid}


def test_matching_rules_series_and_instances(data, client) -> None:
    qd, _ = data
    ct = client.search_for_series(search_filters={"Modality": "CT", "PatientID": "WQP*"})
    assert {val(x, "0020000E") for x in ct} == {se.uid for _, _, se in qd.series() if se.modality == "CT"}
    desc = client.search_for_series(search_filters={"SeriesDescription": "AXIAL*", "PatientID": "WQP*"})
    assert {val(x, "0008103E") for x in desc} == {"AXIAL 5mm", "AXIAL 1mm"}
    sr = client.search_for_instances(
        search_filters={"SOPClassUID": "1.2.840.10008.5.1.4.1.1.88.11", "PatientID": "WQP*"}
    )
    assert len(sr) == 1
    inst2 = client.search_for_instances(search_filters={"InstanceNumber": "2", "Modality": "CT", "PatientID": "WQP*"})
    assert len(inst2) == sum(1 for *_, se, i in qd.instances() if se.modality == "CT" and i.number == 2)


def test_percent_decoding(data, base) -> None:
    r = requests.get(f"{base}/studies?PatientName=DOE%5EJOHN*&PatientID=WQP*", timeout=10)
    assert r.status_code == 200
    assert _accessions(r.json()) == {"WACC100", "WACC101"}
    r = requests.get(f"{base}/studies?PatientName=Doe%5Ejohn&PatientID=WQP%2A", timeout=10)
    assert _accessions(r.json()) == {"WACC100", "WACC101"}


def test_includefield(data, base) -> None:
    q = {"AccessionNumber": "WACC100"}
    plain = requests.get(f"{base}/studies", params=q, timeout=10).json()[0]
    assert "00081030" in plain  # StudyDescription is a default here
    r = requests.get(f"{base}/studies", params={**q, "includefield": "00080080,InstitutionName"}, timeout=10).json()[0]
    assert "00080080" in r
    r = requests.get(
        f"{base}/studies", params=[*q.items(), ("includefield", "PatientAge"), ("includefield", "00101020")], timeout=10
    ).json()[0]
    assert "00101010" in r and "00101020" in r
    r = requests.get(f"{base}/studies", params={**q, "includefield": "all"}, timeout=10).json()[0]
    assert len(r) > len(plain)
    r = requests.get(f"{base}/studies", params={**q, "includefield": "ProcedureCodeSequence"}, timeout=10).json()[0]
    code = r["00081032"]["Value"][0]
    assert code["00080100"]["Value"] == ["P-CT1"]  # from the stored header: not an indexed attribute


def test_limit_offset(data, client) -> None:
    qd, _ = data
    seen: list[str] = []
    for offset in range(0, 8, 2):
        page = client.search_for_studies(search_filters={"PatientID": "WQP*"}, limit=2, offset=offset)
        assert len(page) <= 2
        seen += [val(s, "0020000D") for s in page]
    assert len(seen) == len(set(seen)) == len(qd.studies())


def test_fuzzymatching_accepted(data, client) -> None:
    r = client.search_for_studies(search_filters={"PatientName": "Doe^John", "PatientID": "WQP*"}, fuzzymatching=True)
    assert {"WACC100", "WACC101"} <= _accessions(r)


def test_accept_negotiation(data, base) -> None:
    q = {"AccessionNumber": "WACC100"}
    for accept, media in [
        (None, "application/dicom+json"),
        ("application/json", "application/json"),
        ("application/dicom+json, application/json", "application/dicom+json"),
        ("*/*", "application/dicom+json"),
        ("application/*;q=0.5, text/html", "application/dicom+json"),
    ]:
        h = {"Accept": accept} if accept else {}
        r = requests.get(f"{base}/studies", params=q, headers=h, timeout=10)
        assert r.status_code == 200 and r.headers["content-type"].startswith(media), (accept, r.headers)
    r = requests.get(f"{base}/studies", params=q, headers={"Accept": "application/dicom+xml"}, timeout=10)
    assert r.status_code == 406  # XML results are multipart only (PS3.18 8.7.3.2)


def test_results_as_dicom_xml(data, base) -> None:
    """multipart/related; type="application/dicom+xml" (required by PS3.18): one NativeDicomModel per result, the
    same attributes as the JSON results."""
    import xml.etree.ElementTree as ET

    from openpacs.dicomweb.multipart import MultipartParser, parse_media_type

    q = {"AccessionNumber": "WACC10*", "includefield": "StudyDescription"}
    as_json = requests.get(f"{base}/studies", params=q, timeout=10).json()
    r = requests.get(f"{base}/studies", params=q, timeout=10,
                     headers={"Accept": 'multipart/related; type="application/dicom+xml"'})
    assert r.status_code == 200, r.text
    media, params = parse_media_type(r.headers["content-type"])
    assert media == "multipart/related" and params["type"] == "application/dicom+xml"
    parser = MultipartParser(params["boundary"])
    parts = parser.feed(r.content)
    parser.close()
    assert len(parts) == len(as_json) >= 1
    ns = {"d": "http://dicom.nema.org/PS3.19/models/NativeDICOM"}
    for part, obj in zip(parts, as_json, strict=True):
        assert part.headers["content-type"] == "application/dicom+xml"
        root = ET.fromstring(part.content)
        assert root.tag == f"{{{ns['d']}}}NativeDicomModel"
        tags = {a.get("tag") for a in root.findall("d:DicomAttribute", ns)}
        assert tags == set(obj)
        uid = root.find("d:DicomAttribute[@keyword='StudyInstanceUID']/d:Value", ns)
        assert uid is not None and uid.text == obj["0020000D"]["Value"][0]
        name = root.find("d:DicomAttribute[@tag='00100010']/d:PersonName/d:Alphabetic/d:FamilyName", ns)
        assert name is not None and name.text == obj["00100010"]["Value"][0]["Alphabetic"].split("^")[0]
    r = requests.get(
        f"{base}/studies", params={**q, "accept": "application/json"}, headers={"Accept": "text/html"}, timeout=10
    )
    assert r.status_code == 200
    # q-values decide between the two (RFC 9110 12.5.1); at equal preference JSON, the default
    xml_first = 'multipart/related; type="application/dicom+xml", application/dicom+json; q=0.1'
    r = requests.get(f"{base}/studies", params=q, timeout=10, headers={"Accept": xml_first})
    assert r.headers["content-type"].startswith("multipart/related")
    json_first = 'multipart/related; type="application/dicom+xml"; q=0.2, application/dicom+json; q=0.5'
    r = requests.get(f"{base}/studies", params=q, timeout=10, headers={"Accept": json_first})
    assert r.headers["content-type"].startswith("application/dicom+json")
    both = 'multipart/related; type="application/dicom+xml", */*'
    r = requests.get(f"{base}/studies", params=q, timeout=10, headers={"Accept": both})
    assert r.headers["content-type"].startswith("application/dicom+json")


def test_no_results_is_204(data, base) -> None:
    r = requests.get(f"{base}/studies", params={"PatientID": "NOBODY"}, timeout=10)
    assert r.status_code == 204 and r.content == b""
    r = requests.get(f"{base}/studies", params={"PatientID": "NOBODY", "emptyresultstatus": "200"}, timeout=10)
    assert r.status_code == 200 and r.json() == []


@pytest.mark.parametrize(
    ("query", "needle"),
    [
        ("NotAnAttribute=1", "NotAnAttribute"),
        ("limit=-1", "limit"),
        ("limit=abc", "limit"),
        ("offset=1.5", "offset"),
        ("fuzzymatching=maybe", "fuzzymatching"),
        ("includefield=Bogus", "Bogus"),
        ("StudyDate=notadate", "StudyDate"),
        ("PatientID=a&PatientID=b", "PatientID"),
    ],
)
def test_bad_parameters_are_400_with_reason(data, base, query, needle) -> None:
    r = requests.get(f"{base}/studies?{query}", timeout=10)
    assert r.status_code == 400, r.text
    assert needle.lower() in r.json()["error"].lower()
    assert "Warning" in r.headers


def test_reasons_quoting_non_latin1_input_are_escaped(data, base) -> None:
    """The Warning header quotes the reason; header values are Latin-1, so a client's "€" is escaped (was a 500)."""
    r = requests.get(f"{base}/studies", params={"StudyDate": "€"}, timeout=10)
    assert r.status_code == 400 and "\\u20ac" in r.headers["Warning"]
    assert requests.get(f"{base}/studies?%80=1", timeout=10).status_code == 400


def test_stow_with_a_non_latin1_uid_stores_the_valid_data_sets(base) -> None:
    """One valid data set and one whose SOP Instance UID holds a "€": the valid one is stored and reported (202),
    the other fails with its reason, and the response is never a 500."""
    import json

    good = pydicom.dcmread(io.BytesIO(new_instance()))
    bad = pydicom.dcmread(io.BytesIO(new_instance()))
    docs = [good.to_json_dict(bulk_data_threshold=1 << 30), bad.to_json_dict(bulk_data_threshold=1 << 30)]
    docs[1]["00080018"]["Value"] = ["1.2.3.€"]
    r = _post_json(base, _json_and_bulk([("application/dicom+json", json.dumps(docs).encode(), None)]))
    assert r.status_code == 202, r.text
    (ref,) = seq(r.json(), "00081199")
    assert val(ref, "00081155") == good.SOPInstanceUID
    r.headers.get("Warning", "").encode("latin-1")  # a valid header


def test_bad_uid_in_path(data, base) -> None:
    assert requests.get(f"{base}/studies/1.2.*/series", timeout=10).status_code == 400


# ---------------------------------------------------------------------------------------------------------------------
# STOW-RS status matrix


def test_qido_empty_value_matching(base) -> None:
    """PS3.18 8.3.4.5: emptyvaluematching=true makes AccessionNumber="" find the study that has none."""
    empty_study, other_study = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    r = post(base, [new_instance(empty_study, patient="EVM1", AccessionNumber=""),
                    new_instance(other_study, patient="EVM1", AccessionNumber="EVM-ACC")])
    assert r.status_code == 200, r.text
    q = {"PatientID": "EVM1", "AccessionNumber": '""'}
    r = requests.get(f"{base}/studies", params={**q, "emptyvaluematching": "true"}, timeout=10)
    assert r.status_code == 200, r.text
    assert [val(x, "0020000D") for x in r.json()] == [empty_study]
    r = requests.get(f"{base}/studies", params={**q, "emptyvaluematching": "false"}, timeout=10)
    assert r.status_code == 204, r.text
    r = requests.get(f"{base}/studies", params={"PatientID": "EVM1", "multiplevaluematching": "true",
                                                "AccessionNumber": "EVM-ACC\\NONE"}, timeout=10)
    assert [val(x, "0020000D") for x in r.json()] == [other_study]
    r = requests.get(f"{base}/studies", params={"PatientID": "EVM1", "multiplevaluematching": "false",
                                                "AccessionNumber": "EVM-ACC\\NONE"}, timeout=10)
    assert r.status_code == 400 and "multiplevaluematching=false" in r.text
    for bad in ({"emptyvaluematching": "yes"}, {"multiplevaluematching": "1"}):
        r = requests.get(f"{base}/studies", params=bad, timeout=10)
        assert r.status_code == 400 and "true or false" in r.text


def test_retrieve_capabilities_lists_what_the_routes_serve(base) -> None:
    """PS3.18 8.9 / Annex H: OPTIONS on the service root gives a WADL document; every GET it lists answers (with
    the first media type it offers) on a stored instance, i.e. the document describes real routes."""
    import xml.etree.ElementTree as ET

    inst = new_instance()
    assert post(base, [inst]).status_code == 200
    ds = pydicom.dcmread(io.BytesIO(inst))
    values = {"study": ds.StudyInstanceUID, "series": ds.SeriesInstanceUID, "instance": ds.SOPInstanceUID,
              "frames": "1", "path": "7FE00010"}
    r = requests.options(base + "/", timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/vnd.sun.wadl+xml")
    ns = {"w": "http://wadl.dev.java.net/2009/02"}
    root = ET.fromstring(r.content)
    assert root.find("w:resources", ns).get("base") == base + "/"
    gets: list[tuple[str, str, str]] = []

    def walk(el, prefix: str) -> None:
        for res in el.findall("w:resource", ns):
            path = prefix + "/" + res.get("path")
            for m in res.findall("w:method", ns):
                accept = m.find("w:request/w:param[@name='Accept']", ns)
                if m.get("name") == "GET":
                    gets.append((path, m.get("id"), accept.get("default")))
            walk(res, path)

    walk(root.find("w:resources", ns), "")
    ids = {i for _, i, _ in gets}
    assert {"SearchForStudies", "RetrieveStudy", "RetrieveSeriesMetadata", "RetrieveFrames", "RetrieveBulkdata",
            "RetrieveRenderedInstance", "SearchForStudySeriesInstances"} <= ids
    assert len(gets) >= 25
    for path, mid, accept in gets:
        url = base + path.format(**values)
        got = requests.get(url, headers={"Accept": accept}, params={"PatientID": ds.PatientID}
                           if mid.startswith("SearchFor") else None, timeout=30)
        assert got.status_code == 200, (mid, url, accept, got.status_code, got.text[:200])
    r = requests.options(base + "/", headers={"Accept": "application/json"}, timeout=10)
    assert r.status_code == 406


def test_stow_200_into_study_url(base) -> None:
    study = pydicom.uid.generate_uid()
    r = post(base, [new_instance(study), new_instance(study)], path=f"/studies/{study}")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["00081190"]["Value"] == [f"{base}/studies/{study}"]
    assert len(seq(body, "00081199")) == 2


def test_stow_202_partial(base) -> None:
    good = new_instance()
    r = post(base, [good, b"this is not DICOM at all" * 10])
    assert r.status_code == 202, r.text
    body = r.json()
    assert len(seq(body, "00081199")) == 1
    (failed,) = seq(body, "00081198")
    assert val(failed, "00081197") == 0xC000


def test_stow_409_none_stored_and_reasons(base) -> None:
    study = pydicom.uid.generate_uid()
    other = new_instance()  # another study than the URL's
    bad_uid = new_instance(SOPInstanceUID="1.2.abc")
    r = post(base, [other, b"\0" * 300, bad_uid], path=f"/studies/{study}")
    assert r.status_code == 409, r.text
    reasons = [val(f, "00081197") for f in seq(r.json(), "00081198")]
    assert reasons == [0x0110, 0xC000, 0xA900]
    assert not seq(r.json(), "00081199")
    # the instance of the other study was not stored
    sop = pydicom.dcmread(io.BytesIO(other)).SOPInstanceUID
    assert requests.get(f"{base}/instances", params={"SOPInstanceUID": sop}, timeout=10).status_code == 204


def test_stow_response_in_dicom_xml(base) -> None:
    """The Store Instances Response Module as a PS3.19 NativeDicomModel document when the client asks for XML."""
    import xml.etree.ElementTree as ET

    good = new_instance()
    sop = pydicom.dcmread(io.BytesIO(good)).SOPInstanceUID
    r = post(base, [good, b"this is not DICOM at all" * 10], Accept="application/dicom+xml")
    assert r.status_code == 202, r.text
    assert r.headers["content-type"].startswith("application/dicom+xml")
    ns = {"d": "http://dicom.nema.org/PS3.19/models/NativeDICOM"}
    root = ET.fromstring(r.content)
    assert root.tag == "{http://dicom.nema.org/PS3.19/models/NativeDICOM}NativeDicomModel"

    def items(tag: str) -> list:
        return root.findall(f"d:DicomAttribute[@tag='{tag}']/d:Item", ns)

    (ref,) = items("00081199")
    assert ref.find("d:DicomAttribute[@tag='00081155']/d:Value", ns).text == sop
    assert ref.find("d:DicomAttribute[@tag='00081190']/d:Value", ns).text.endswith(f"/instances/{sop}")
    (failed,) = items("00081198")
    assert failed.find("d:DicomAttribute[@tag='00081197']", ns).get("vr") == "US"
    assert int(failed.find("d:DicomAttribute[@tag='00081197']/d:Value", ns).text) == 0xC000
    # neither JSON nor XML acceptable: 406 before the body is stored
    other = new_instance()
    r = post(base, [other], Accept="text/html")
    assert r.status_code == 406, r.text
    sop2 = pydicom.dcmread(io.BytesIO(other)).SOPInstanceUID
    assert requests.get(f"{base}/instances", params={"SOPInstanceUID": sop2}, timeout=10).status_code == 204


def _json_and_bulk(body_parts: list[tuple[str, bytes, str | None]], boundary: str = "jsonbulk") -> bytes:
    out = b""
    for ctype, content, location in body_parts:
        head = f"--{boundary}\r\nContent-Type: {ctype}\r\n"
        if location:
            head += f"Content-Location: {location}\r\n"
        out += head.encode() + b"\r\n" + content + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def _post_json(base: str, body: bytes) -> requests.Response:
    ctype = 'multipart/related; type="application/dicom+json"; boundary=jsonbulk'
    return requests.post(base + "/studies", data=body, timeout=60,
                         headers={"Content-Type": ctype, "Accept": "application/dicom+json"})


def test_stow_metadata_and_bulk_data(base, client) -> None:
    """PS3.18 10.5.1.2: DICOM JSON written by pydicom (BulkDataURIs for the large binary values) and the bulk data in
    parts named by Content-Location; the instance is then retrieved by dicomweb-client, pixels equal."""
    import json

    ds = pydicom.dcmread(io.BytesIO(new_instance(PatientName="Json^Bulk")))
    ds.PixelData = bytes(range(256)) * (len(ds.PixelData) // 256) + bytes(len(ds.PixelData) % 256)
    bulk: dict[str, bytes] = {}

    def handler(elem: pydicom.DataElement) -> str:
        uri = f"urn:openpacs-test:{elem.tag:08X}"
        bulk[uri] = elem.value
        return uri

    meta = ds.to_json_dict(bulk_data_threshold=64, bulk_data_element_handler=handler)
    assert meta["7FE00010"]["BulkDataURI"] == "urn:openpacs-test:7FE00010"
    parts = [("application/dicom+json", json.dumps([meta]).encode(), None)]
    parts += [("application/octet-stream", data, uri) for uri, data in bulk.items()]
    r = _post_json(base, _json_and_bulk(parts))
    assert r.status_code == 200, r.text
    (ref,) = seq(r.json(), "00081199")
    assert val(ref, "00081155") == ds.SOPInstanceUID
    got = client.retrieve_instance(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    assert got.PixelData == ds.PixelData
    assert str(got.PatientName) == "Json^Bulk" and got.Rows == ds.Rows

    # small binary values inline (InlineBinary), no bulk parts at all
    ds2 = pydicom.dcmread(io.BytesIO(new_instance()))
    r = _post_json(base, _json_and_bulk([("application/dicom+json", json.dumps([ds2.to_json_dict(
        bulk_data_threshold=1 << 30)]).encode(), None)]))
    assert r.status_code == 200, r.text
    assert client.retrieve_instance(ds2.StudyInstanceUID, ds2.SeriesInstanceUID, ds2.SOPInstanceUID).PixelData == \
        ds2.PixelData


def _post_xml(base: str, body: bytes) -> requests.Response:
    ctype = 'multipart/related; type="application/dicom+xml"; boundary=jsonbulk'
    return requests.post(base + "/studies", data=body, timeout=60,
                         headers={"Content-Type": ctype, "Accept": "application/dicom+json"})


def test_stow_xml_metadata_written_by_dcmtk(base, client, require_dcmtk, tmp_path) -> None:
    """PS3.18 10.5.1.2 with DICOM XML: DCMTK's own PS3.19 writer (dcm2xml --native-format, binary values inline)
    makes the metadata of a GE CT with private blocks; the server stores it and dicomweb-client gets back the same
    pixels, names and private values (their gggg00ee tags put back in the block their privateCreator holds)."""
    import subprocess

    from helpers import dcmtk
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    # 8-bit pixels (OB): dcm2xml writes 16-bit (OW) InlineBinary big endian, where DICOM JSON, dcm4che and we take
    # the little-endian value field (PS3.18 F.2.7)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    for k in ("WindowCenter", "WindowWidth", "RescaleIntercept", "RescaleSlope", "SmallestImagePixelValue",
              "LargestImagePixelValue"):
        ds.pop(k, None)
    ds.PixelData = bytes(range(256)) * (ds.Rows * ds.Columns // 256)
    ds["PixelData"].VR = "OB"
    path = tmp_path / "ct.dcm"
    ds.save_as(path)
    xml = subprocess.run([dcmtk.find_tool("dcm2xml"), "--native-format", "+Eb", str(path)], capture_output=True,
                         check=True, env=dcmtk.dcmtk_env()).stdout
    assert b'privateCreator="GEMS_IDEN_01"' in xml and b"<InlineBinary>" in xml
    r = _post_xml(base, _json_and_bulk([("application/dicom+xml", xml, None)]))
    assert r.status_code == 200, r.text
    got = client.retrieve_instance(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    assert got.PixelData == ds.PixelData
    assert got.PatientName == ds.PatientName and got.ImagePositionPatient == ds.ImagePositionPatient
    assert got[0x00091001].value == ds[0x00091001].value == "GE_GENESIS_FF"
    assert got[0x00090010].value == "GEMS_IDEN_01"


def test_stow_xml_metadata_and_bulk_data(base, client) -> None:
    """Our own NativeDicomModel writer (WADO-RS metadata) read back by STOW-RS, pixel data as a bulk data part."""
    from openpacs.dicom.xml import json_to_xml

    ds = pydicom.dcmread(io.BytesIO(new_instance(PatientName="Xml^Bulk", PatientID="XMLBULK")))
    meta = ds.to_json_dict(bulk_data_threshold=64, bulk_data_element_handler=lambda e: f"urn:x:{e.tag:08X}")
    body = _json_and_bulk([("application/dicom+xml", json_to_xml(meta), None),
                           ("application/octet-stream", ds.PixelData, "urn:x:7FE00010")])
    r = _post_xml(base, body)
    assert r.status_code == 200, r.text
    got = client.retrieve_instance(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    assert got.PixelData == ds.PixelData and str(got.PatientName) == "Xml^Bulk" and got.Rows == ds.Rows
    # unusable XML fails its data set with the reason, never the request or the server
    ns = b'xmlns="http://dicom.nema.org/PS3.19/models/NativeDICOM"'
    bad = [
        b"<NativeDicomModel><DicomAttribute",  # not well-formed
        b"<Other/>",  # not a NativeDicomModel
        b"<NativeDicomModel " + ns + b'><DicomAttribute tag="00090001" vr="LO" privateCreator="NOBODY">'
        b"<Value number=\"1\">x</Value></DicomAttribute></NativeDicomModel>",  # a creator the data set lacks
        b'<!DOCTYPE x [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">'
        b'<!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;"><!ENTITY d "&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;">'
        b'<!ENTITY e "&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;"><!ENTITY f "&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;">'
        b'<!ENTITY g "&f;&f;&f;&f;&f;&f;&f;&f;&f;&f;"><!ENTITY h "&g;&g;&g;&g;&g;&g;&g;&g;&g;&g;">]>'
        b"<NativeDicomModel>&h;</NativeDicomModel>",  # entity expansion bomb
        b"<NativeDicomModel>" + b"<DicomAttribute tag='00081140' vr='SQ'><Item>" * 100
        + b"</Item></DicomAttribute>" * 100 + b"</NativeDicomModel>",  # nested past any IOD
    ]
    r = _post_xml(base, _json_and_bulk([("application/dicom+xml", b, None) for b in bad]))
    assert r.status_code == 409, r.text
    failed = seq(r.json(), "00081198")
    assert [val(f, "00081197") for f in failed] == [0xC000] * len(bad)


def test_stow_metadata_failures(srv, base) -> None:
    import json

    ds = pydicom.dcmread(io.BytesIO(new_instance()))
    meta = ds.to_json_dict(bulk_data_threshold=64, bulk_data_element_handler=lambda e: "urn:missing")
    no_uid = pydicom.dcmread(io.BytesIO(new_instance())).to_json_dict(bulk_data_threshold=1 << 30)
    del no_uid["00080018"]
    body = _json_and_bulk([
        ("application/dicom+json", json.dumps([meta, no_uid]).encode(), None),  # bulk part absent; no SOP UID
        ("application/dicom+json", b"{not json", None),
    ])
    r = _post_json(base, body)
    assert r.status_code == 409, r.text
    failed = seq(r.json(), "00081198")
    assert [val(f, "00081197") for f in failed] == [0xC000, 0xA900, 0xC000]
    assert val(failed[0], "00081155") == ds.SOPInstanceUID
    # hostile metadata: nesting deeper than any parser recursion, items that are not objects, attributes that are
    # not objects: each is a failed data set, never a server error
    body = _json_and_bulk([
        ("application/dicom+json", b"[" * 200_000 + b"]" * 200_000, None),
        ("application/dicom+json", b'[42, {"00080016": "x", "00080018": {"vr": "UI", "Value": [7]}}]', None),
    ])
    r = _post_json(base, body)
    assert r.status_code == 409, r.text
    assert [val(f, "00081197") for f in seq(r.json(), "00081198")] == [0xC000, 0xC000, 0xA900]
    # no metadata part at all is a bad request
    r = _post_json(base, _json_and_bulk([("application/octet-stream", b"x" * 10, "urn:x")]))
    assert r.status_code == 400 and "metadata" in r.text
    alive(srv, base)


def test_stow_duplicates(base) -> None:
    inst = new_instance()
    assert post(base, [inst]).status_code == 200
    r = post(base, [inst])  # identical: success, nothing new
    assert r.status_code == 200 and len(seq(r.json(), "00081199")) == 1
    ds = pydicom.dcmread(io.BytesIO(inst))
    ds.PatientName = "Changed^Content"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    r = post(base, [buf.getvalue()])  # same SOP Instance UID, different content: first kept, warning
    assert r.status_code == 202, r.text
    (item,) = seq(r.json(), "00081199")
    assert 0xB000 <= val(item, "00081196") <= 0xBFFF
    assert "Warning" in r.headers


def test_stow_gzip_body(base) -> None:
    study = pydicom.uid.generate_uid()
    body = gzip.compress(multipart([new_instance(study), new_instance(study)]))
    r = requests.post(
        base + "/studies",
        data=body,
        timeout=60,
        headers={"Content-Type": MULTIPART.format(b="stowtest"), "Content-Encoding": "gzip"},
    )
    assert r.status_code == 200, r.text
    assert len(seq(r.json(), "00081199")) == 2


@pytest.mark.parametrize(
    ("content_type", "body", "status"),
    [
        ("application/dicom", b"DICM", 415),
        ('multipart/related; type="application/vnd.example"; boundary=stowtest', None, 415),
        # XML metadata expected, only application/dicom parts sent: no metadata part
        ('multipart/related; type="application/dicom+xml"; boundary=stowtest', None, 400),
        ("multipart/related; type=application/dicom", None, 400),  # no boundary
        ('multipart/related; type="application/dicom"; boundary="bad boundary "', None, 400),
        ('multipart/related; type="application/dicom"; boundary=other', None, 400),  # boundary not in the body
        ('multipart/related; type="application/dicom"; boundary=stowtest', b"--stowtest--\r\n", 400),  # no parts
        ('multipart/related; type="application/dicom"; boundary=stowtest', "truncated", 400),
        ("", None, 415),
    ],
)
def test_stow_bad_requests(srv, base, content_type, body, status) -> None:
    full = multipart([new_instance()])
    if body is None:
        body = full
    elif body == "truncated":
        body = full[: len(full) // 2]
    r = requests.post(base + "/studies", data=body, headers={"Content-Type": content_type}, timeout=60)
    assert r.status_code == status, r.text
    assert r.json()["error"]
    alive(srv, base)


def test_stow_unsupported_content_encoding(srv, base) -> None:
    r = requests.post(
        base + "/studies",
        data=multipart([new_instance()]),
        timeout=60,
        headers={"Content-Type": MULTIPART.format(b="stowtest"), "Content-Encoding": "br"},
    )
    assert r.status_code == 415


def _raw_request(port: int, head: bytes, body: bytes = b"") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(head + body)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


def test_huge_content_length_claim_is_refused_without_reading(srv, base) -> None:
    head = (
        b"POST /dicom-web/studies HTTP/1.1\r\nHost: x\r\n"
        b'Content-Type: multipart/related; type="application/dicom"; boundary=stowtest\r\n'
        b"Content-Length: 4294967296\r\n\r\n"
    )
    reply = _raw_request(srv.http_port, head, b"--stowtest\r\n")
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    alive(srv, base)


def _hwm_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def test_gzip_bomb_is_refused_with_bounded_memory(srv, base) -> None:
    # 512 MB of zeros after a valid part header, about 0.5 MB gzipped
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    head = b"--stowtest\r\nContent-Type: application/dicom\r\n\r\n"
    zero = b"\0" * (1 << 20)
    body = c.compress(head) + b"".join(c.compress(zero) for _ in range(512)) + c.flush()
    before = _hwm_kb(srv.proc.pid)
    r = requests.post(
        base + "/studies",
        data=body,
        timeout=120,
        headers={"Content-Type": MULTIPART.format(b="stowtest"), "Content-Encoding": "gzip"},
    )
    assert r.status_code == 413, r.text
    assert "bomb" in r.json()["error"]
    assert _hwm_kb(srv.proc.pid) - before < 200 * 1024  # far below the 512 MB it would inflate to
    alive(srv, base)


def test_hostile_multipart_bodies_server_stays_up(srv, base) -> None:
    b = b"stowtest"
    bodies = [
        b"",
        b"--stowtest",
        b"--stowtest\r\n",
        b"--stowtest\r\nContent-Type: application/dicom\r\n",
        b"--stowtest\r\n" + b"X: y\r\n" * 5000 + b"\r\n",  # endless headers
        b"--stowtestXX\r\n\r\nabc\r\n--stowtest--",
        b"\r\n--stowtest\r\nno-colon\r\n\r\nabc\r\n--stowtest--",
        b"--stowtest\r\n\r\n" + b"\x00" * 100 + b"\r\n--stowtest--\r\n" + b"E" * 200_000,  # huge epilogue
        uuid.uuid4().bytes * 10_000,
    ]
    for body in bodies:
        r = requests.post(
            base + "/studies",
            data=body,
            timeout=60,
            headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={b.decode()}'},
        )
        assert 400 <= r.status_code < 500, (body[:60], r.status_code, r.text)
    alive(srv, base)


# ---------------------------------------------------------------------------------------------------------------------
# DELETE


def test_delete_instance_series_study(base) -> None:
    study = pydicom.uid.generate_uid()
    parts = [new_instance(study, patient="DEL1") for _ in range(3)]
    r = post(base, parts, path=f"/studies/{study}")
    assert r.status_code == 200
    dss = [pydicom.dcmread(io.BytesIO(p)) for p in parts]
    a = dss[0]
    url = f"{base}/studies/{study}/series/{a.SeriesInstanceUID}/instances/{a.SOPInstanceUID}"
    assert requests.delete(url, timeout=30).status_code == 204
    assert requests.delete(url, timeout=30).status_code == 404
    # a series addressed under the wrong study is not found, and not deleted
    wrong = f"{base}/studies/{pydicom.uid.generate_uid()}/series/{dss[1].SeriesInstanceUID}"
    assert requests.delete(wrong, timeout=30).status_code == 404
    assert requests.delete(f"{base}/studies/{study}/series/{dss[1].SeriesInstanceUID}", timeout=30).status_code == 204
    r = requests.get(f"{base}/studies/{study}/instances", timeout=30)
    assert [val(x, "00080018") for x in r.json()] == [dss[2].SOPInstanceUID]
    assert requests.delete(f"{base}/studies/{study}", timeout=30).status_code == 204
    assert requests.get(f"{base}/studies", params={"StudyInstanceUID": study}, timeout=30).status_code == 204
    assert requests.delete(f"{base}/studies/{study}", timeout=30).status_code == 404
    assert requests.delete(f"{base}/studies/not-a-uid", timeout=30).status_code == 400
