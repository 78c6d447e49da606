"""The STOW-RS client's reading of a Store Instances Response (dicomweb/sender.py parse_response)."""

from __future__ import annotations

import json

import pytest

from openpacs.dicomweb.sender import describe_reason, parse_response


def _ref(uid: str, reason: int | None = None) -> dict:
    item = {"00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]},
            "00081155": {"vr": "UI", "Value": [uid]}}
    if reason is not None:
        item["00081197"] = {"vr": "US", "Value": [reason]}
    else:
        item["00081190"] = {"vr": "UR", "Value": [f"http://peer/dicom-web/studies/1/series/2/instances/{uid}"]}
    return item


def test_stored_and_failed_instances():
    body = json.dumps({
        "00081190": {"vr": "UR", "Value": ["http://peer/dicom-web/studies/1"]},
        "00081199": {"vr": "SQ", "Value": [_ref("1.1"), _ref("1.2")]},
        "00081198": {"vr": "SQ", "Value": [_ref("1.3", 0xA700), _ref("1.4", 0x0122)]},
    }).encode()
    r = parse_response(body)
    assert r.listed
    assert r.stored == {"1.1", "1.2"}
    assert r.failed == {"1.3": 0xA700, "1.4": 0x0122}


def test_a_one_element_array_and_missing_failure_reason():
    item = _ref("9.9")
    del item["00081190"]
    body = json.dumps([{"00081198": {"vr": "SQ", "Value": [item]}}])
    r = parse_response(body)
    assert r.failed == {"9.9": None} and r.stored == set()


def test_an_instance_listed_in_both_counts_as_failed():
    body = json.dumps({"00081199": {"vr": "SQ", "Value": [_ref("1.1")]},
                       "00081198": {"vr": "SQ", "Value": [_ref("1.1", 0x0110)]}})
    r = parse_response(body)
    assert r.stored == set() and r.failed == {"1.1": 0x0110}


@pytest.mark.parametrize("body", [b"", b"  \n", b"{}"])
def test_empty_responses_list_nothing(body):
    r = parse_response(body)
    assert not r.listed and r.stored == set() and r.failed == {}


@pytest.mark.parametrize("body", [b"<NativeDicomModel/>", b"42", b'"text"'])
def test_not_dicom_json_is_an_error(body):
    with pytest.raises(ValueError):
        parse_response(body)


def test_items_without_uid_or_odd_values_are_skipped():
    body = json.dumps({"00081199": {"vr": "SQ", "Value": [{}, "junk", {"00081155": {"vr": "UI"}}, _ref("2.2")]},
                       "00081198": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": ["3.3"]},
                                                           "00081197": {"vr": "US", "Value": ["x"]}}]}})
    r = parse_response(body)
    assert r.stored == {"2.2"} and r.failed == {"3.3": None}


def test_describe_reason():
    assert describe_reason(0xA700) == "Failure Reason 0xA700 (out of resources)"
    assert describe_reason(0x1234) == "Failure Reason 0x1234"
    assert "no Failure Reason" in describe_reason(None)
