"""services/remote_qr.py, the pure parts: QIDO-RS style parameters -> C-FIND identifier / QIDO-RS parameters, the
retrieve request checks, C-FIND results as DICOM JSON, and the streaming multipart reader of WADO-RS answers."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydicom.dataset import Dataset

from openpacs.config import RemoteAE, RemoteDicomweb
from openpacs.services import remote_qr as rq

DIMSE = rq.Remote("PACS", ae=RemoteAE(aet="PACS", host="127.0.0.1", port=104))
WEB = rq.Remote("WEB", web=RemoteDicomweb(url="http://127.0.0.1:1/dicom-web"))


def test_study_query_keys_become_the_identifier() -> None:
    q = rq.build_query("STUDY", [("PatientID", "P1"), ("PatientName", "DOE^J*"), ("StudyDate", "20240101-20241231"),
                                 ("AccessionNumber", "A1"), ("ModalitiesInStudy", "CT"), ("limit", "5")])
    assert q.limit == 5
    ds = rq.identifier(q)
    assert ds.QueryRetrieveLevel == "STUDY"
    assert ds.PatientID == "P1" and str(ds.PatientName) == "DOE^J*" and ds.StudyDate == "20240101-20241231"
    assert ds.AccessionNumber == "A1" and ds.ModalitiesInStudy == "CT"
    # the QIDO-RS default attributes are asked for, empty (universal matching)
    for kw in ("StudyInstanceUID", "StudyDescription", "NumberOfStudyRelatedInstances", "PatientBirthDate"):
        assert kw in ds and ds[kw].value in ("", None), kw


def test_tags_includefield_and_uid_lists() -> None:
    q = rq.build_query("STUDY", [("00100020", "P2"), ("includefield", "InstitutionName,00081030"),
                                 ("StudyInstanceUID", "1.2.3,1.2.4"), ("StudyInstanceUID", "1.2.5")])
    assert q.filters["PatientID"] == "P2"
    assert q.filters["StudyInstanceUID"] == "1.2.3\\1.2.4\\1.2.5"
    assert "InstitutionName" in q.return_keys and "StudyDescription" in q.return_keys
    ds = rq.identifier(q)
    assert ds.StudyInstanceUID == ["1.2.3", "1.2.4", "1.2.5"]
    assert "InstitutionName" in ds


def test_series_and_instance_levels_take_the_path_uids() -> None:
    q = rq.build_query("SERIES", [("Modality", "MR"), ("StudyInstanceUID", "9.9")], {"StudyInstanceUID": "1.2.3"})
    ds = rq.identifier(q)
    assert ds.QueryRetrieveLevel == "SERIES" and ds.StudyInstanceUID == "1.2.3" and ds.Modality == "MR"
    assert "SeriesInstanceUID" in ds and "NumberOfSeriesRelatedInstances" in ds
    # QIDO-RS: the path UIDs go into the URL, the rest are parameters
    assert ("Modality", "MR") in q.qido_params() and all(k != "StudyInstanceUID" for k, _ in q.qido_params())
    q = rq.build_query("IMAGE", [], {"StudyInstanceUID": "1.2.3", "SeriesInstanceUID": "1.2.3.4"})
    ds = rq.identifier(q)
    assert ds.QueryRetrieveLevel == "IMAGE" and ds.SeriesInstanceUID == "1.2.3.4" and "SOPInstanceUID" in ds


@pytest.mark.parametrize("params, message", [
    ([("NoSuchKeyword", "x")], "NoSuchKeyword"),
    ([("StudyInstanceUID", "abc")], "not a valid UID"),
    ([("limit", "0")], "limit"),
    ([("limit", "many")], "limit"),
    ([("PatientID", "a"), ("PatientID", "b")], "more than once"),
    ([("ReferencedSeriesSequence", "")], "sequence"),
    ([("RequestAttributesSequence.ScheduledProcedureStepID", "1")], "sequence"),
    ([("PatientName", "A\x00B")], "control"),
    ([("fuzzymatching", "maybe")], "fuzzymatching"),
])
def test_bad_query_parameters(params, message) -> None:
    with pytest.raises(rq.RemoteQueryError, match=message):
        rq.build_query("STUDY", params)


def test_limit_is_capped() -> None:
    assert rq.build_query("STUDY", [("limit", "999999")]).limit == rq.MAX_RESULTS
    assert rq.build_query("STUDY", []).limit == rq.DEFAULT_LIMIT


def test_result_json_drops_the_query_bookkeeping() -> None:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = "M\u00fcller^Hans"
    ds.StudyInstanceUID = "1.2.3"
    j = rq.result_json(ds)
    assert "00080052" not in j and "00080005" not in j
    assert j["00100010"] == {"vr": "PN", "Value": [{"Alphabetic": "M\u00fcller^Hans"}]}
    assert j["0020000D"]["Value"] == ["1.2.3"]


def test_retrieve_requests() -> None:
    r = rq.validate_request(DIMSE, "study", ["1.2.3", " 1.2.3 ", "1.2.4"])
    assert (r.level, r.uids, r.method) == ("STUDY", ["1.2.3", "1.2.4"], "move")
    assert rq.validate_request(DIMSE, "INSTANCE", ["1.5"], "1.2", "1.3", "get").level == "IMAGE"
    assert rq.validate_request(WEB, "SERIES", ["1.3"], "1.2").method == "wado"
    assert rq.validate_request(DIMSE, "PATIENT", ["PAT 1"]).uids == ["PAT 1"]
    for args, message in [
        ((DIMSE, "STUDY", []), "nothing to retrieve"),
        ((DIMSE, "STUDY", ["x.y"]), "not a valid UID"),
        ((DIMSE, "VOLUME", ["1.2"]), "level"),
        ((DIMSE, "SERIES", ["1.2"]), "StudyInstanceUID"),
        ((DIMSE, "IMAGE", ["1.2"], "1.1"), "SeriesInstanceUID"),
        ((DIMSE, "PATIENT", ["P*"]), "wildcard"),
        ((WEB, "PATIENT", ["P1"]), "patients"),
    ]:
        with pytest.raises(rq.RemoteQueryError, match=message):
            rq.validate_request(*args)
    with pytest.raises(rq.RemoteQueryError, match="one of move, get"):
        rq.validate_request(DIMSE, "STUDY", ["1.2"], method="wado")
    with pytest.raises(rq.RemoteQueryError, match="one of wado"):
        rq.validate_request(WEB, "STUDY", ["1.2"], method="get")


def test_get_contexts_one_per_syntax_within_the_limit() -> None:
    r = rq.Retriever.__new__(rq.Retriever)
    ctxs = r._get_contexts(["1.2.840.10008.5.1.4.1.1.2"], rq.STUDY_GET)
    assert ctxs[0][0] == rq.STUDY_GET
    assert [ts for _, (ts,) in ctxs[1:]] == list(rq.GET_SYNTAXES)
    many = r._get_contexts([f"1.2.3.{i}" for i in range(40)], rq.STUDY_GET)
    assert len(many) <= rq.MAX_CONTEXTS and all(len(ts) == len(rq.GET_SYNTAXES) for _, ts in many[1:])
    assert len(r._get_contexts([], rq.STUDY_GET)) - 1 == len(rq.COMMON_STORAGE)


# ---- multipart ------------------------------------------------------------------------------------------------


def _multipart(parts: list[bytes], boundary: bytes = b"b0und") -> bytes:
    out = b"preamble to ignore\r\n"
    for p in parts:
        out += b"--" + boundary + b"\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n"
    return out + b"--" + boundary + b"--\r\n"


def test_boundary_of_content_type() -> None:
    assert rq.multipart_boundary('multipart/related; type="application/dicom"; boundary="a b"') == b"a b"
    assert rq.multipart_boundary("multipart/related; boundary=xyz; type=application/dicom") == b"xyz"
    assert rq.multipart_boundary("application/dicom") is None


@given(parts=st.lists(st.binary(max_size=300), max_size=5), size=st.integers(min_value=1, max_value=64))
def test_split_multipart_any_chunking(parts: list[bytes], size: int) -> None:
    body = _multipart(parts)
    chunks = iter([body[i:i + size] for i in range(0, len(body), size)])
    assert list(rq.split_multipart(chunks, b"b0und")) == parts


def test_split_multipart_truncated() -> None:
    body = _multipart([b"x" * 100])[:-12]
    with pytest.raises(rq.RemoteUnavailable, match="closing boundary"):
        list(rq.split_multipart(iter([body]), b"b0und"))
