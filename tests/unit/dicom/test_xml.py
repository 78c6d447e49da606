"""PS3.19 Native DICOM Model writer: structure, empty values, and values no XML parser may choke on."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from openpacs.dicom.xml import NAMESPACE, json_to_xml

NS = {"d": NAMESPACE}


def test_structure_person_names_sequences_and_bulk() -> None:
    obj = {
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Doe^John^^Dr", "Ideographic": "山田^太郎"}]},
        "00180050": {"vr": "DS", "Value": [2.0, 0.75]},
        "00081140": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": ["1.2.3"]}}]},
        "7FE00010": {"vr": "OW", "BulkDataURI": "http://x/bulk/7FE00010"},
        "00281201": {"vr": "OW", "InlineBinary": "AAEC"},
        "00080090": {"vr": "PN"},
        "00185010": {"vr": "LO", "Value": ["a", None, "c"]},
    }
    root = ET.fromstring(json_to_xml(obj))
    assert root.tag == f"{{{NAMESPACE}}}NativeDicomModel"
    name = root.find("d:DicomAttribute[@keyword='PatientName']/d:PersonName[@number='1']", NS)
    assert name is not None
    assert [c.tag.split("}")[1] for c in name.find("d:Alphabetic", NS)] == ["FamilyName", "GivenName", "NamePrefix"]
    assert name.find("d:Ideographic/d:GivenName", NS).text == "太郎"
    assert [v.text for v in root.findall("d:DicomAttribute[@tag='00180050']/d:Value", NS)] == ["2", "0.75"]
    item = root.find("d:DicomAttribute[@tag='00081140']/d:Item[@number='1']", NS)
    assert item.find("d:DicomAttribute/d:Value", NS).text == "1.2.3"
    assert root.find("d:DicomAttribute[@tag='7FE00010']/d:BulkData", NS).get("uri") == "http://x/bulk/7FE00010"
    assert root.find("d:DicomAttribute[@tag='00281201']/d:InlineBinary", NS).text == "AAEC"
    assert list(root.find("d:DicomAttribute[@tag='00080090']", NS)) == []
    values = root.findall("d:DicomAttribute[@tag='00185010']/d:Value", NS)
    assert [(v.get("number"), v.text) for v in values] == [("1", "a"), ("2", None), ("3", "c")]


def test_hostile_values_stay_well_formed() -> None:
    obj = {"00081030": {"vr": "LO", "Value": ["</Value><script>alert(1)</script>\x01\x1b&amp;"]}}
    doc = json_to_xml(obj)
    assert b"<script>" not in doc
    value = ET.fromstring(doc).find("d:DicomAttribute/d:Value", NS).text
    assert value == "</Value><script>alert(1)</script>\ufffd\ufffd&amp;"


def test_private_attributes_name_their_creator() -> None:
    # (0009,0010) reserves block 10 of group 0009 for "ACME 1.0": (0009,10xx) are its elements (PS3.5 7.8.1)
    obj = {
        "00090010": {"vr": "LO", "Value": ["ACME 1.0"]},
        "00090011": {"vr": "LO", "Value": ["OTHER"]},
        "00091001": {"vr": "LO", "Value": ["in block 10"]},
        "00091102": {"vr": "US", "Value": [7]},
        "00093001": {"vr": "UN", "InlineBinary": "AA=="},  # block 30 has no creator in this data set
        "00081140": {"vr": "SQ", "Value": [{"00290010": {"vr": "LO", "Value": ["NESTED"]},
                                            "00291001": {"vr": "SH", "Value": ["x"]}}]},
    }
    root = ET.fromstring(json_to_xml(obj))

    def creator(path: str) -> str | None:
        return root.find(path, NS).get("privateCreator")

    # PS3.19 Table A.1.5-2: a private tag is written gggg00ee, its block named by privateCreator
    assert creator("d:DicomAttribute[@tag='00090001']") == "ACME 1.0"
    assert root.find("d:DicomAttribute[@tag='00090001']/d:Value", NS).text == "in block 10"
    assert creator("d:DicomAttribute[@tag='00090002']") == "OTHER"
    assert root.find("d:DicomAttribute[@tag='00091001']", NS) is None
    assert creator("d:DicomAttribute[@tag='00093001']") is None  # no creator to name: the whole tag is kept
    assert creator("d:DicomAttribute[@tag='00090010']") is None  # the creator element itself is not in a block
    assert creator("d:DicomAttribute[@tag='00081140']/d:Item/d:DicomAttribute[@tag='00290001']") == "NESTED"


def test_reading_back_what_we_write() -> None:
    """xml_to_json(json_to_xml(x)) == x: the STOW-RS reader of XML metadata and the WADO-RS writer agree, private
    blocks, person name groups, empty values, sequences and bulk data references included."""
    from openpacs.dicom.xml import xml_to_json

    obj = {
        "00090010": {"vr": "LO", "Value": ["ACME 1.0"]},
        "00091001": {"vr": "LO", "Value": ["in block 10"]},
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Doe^John^^Dr", "Ideographic": "山田^太郎"}]},
        "00180050": {"vr": "DS", "Value": ["2", "0.75"]},
        "00185010": {"vr": "LO", "Value": ["a", None, "c"]},
        "00080090": {"vr": "PN"},
        "00081140": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": ["1.2.3"]}}, {}]},
        "00281201": {"vr": "OW", "InlineBinary": "AAEC"},
        "7FE00010": {"vr": "OW", "BulkDataURI": "http://x/bulk/7FE00010"},
    }
    assert xml_to_json(json_to_xml(obj)) == obj


def test_reading_refuses_what_is_not_a_data_set() -> None:
    import pytest

    from openpacs.dicom.xml import DicomXMLError, xml_to_json

    for doc, why in [
        (b"<NativeDicomModel><DicomAttribute", "well-formed"),
        (b"<Other/>", "NativeDicomModel"),
        (b'<NativeDicomModel><DicomAttribute tag="0010" vr="LO"/></NativeDicomModel>', "8 hex"),
        (b'<NativeDicomModel><DicomAttribute tag="00100010" vr="pn"/></NativeDicomModel>', "vr"),
        (b'<NativeDicomModel><DicomAttribute tag="00090001" vr="LO" privateCreator="X"/></NativeDicomModel>',
         "private creator"),
        (b'<NativeDicomModel><DicomAttribute tag="7FE00010" vr="OW"><BulkData uuid="u"/></DicomAttribute>'
         b"</NativeDicomModel>", "uri"),
        (b'<?xml version="1.0" encoding="shift_jis"?><NativeDicomModel/>', "well-formed"),  # expat: multi-byte
        (b'<?xml version="1.0" encoding="no-such-charset"?><NativeDicomModel/>', "well-formed"),
        (b'<NativeDicomModel><DicomAttribute tag="00100020" vr="LO"/><DicomAttribute tag="00100020" vr="LO"/>'
         b"</NativeDicomModel>", "twice"),
    ]:
        with pytest.raises(DicomXMLError, match=why):
            xml_to_json(doc)


def test_private_element_whose_value_looks_like_a_creator() -> None:
    """(0009,1010) holding "B" is a data element of block 10, not a second reservation of "B": reading our XML back
    must not move (0009,1101) of block "B" onto (0009,1001)."""
    from openpacs.dicom.xml import xml_to_json

    obj = {
        "00090010": {"vr": "LO", "Value": ["A"]},
        "00090011": {"vr": "LO", "Value": ["B"]},
        "00091001": {"vr": "LO", "Value": ["in block A"]},
        "00091010": {"vr": "LO", "Value": ["B"]},
        "00091101": {"vr": "LO", "Value": ["in block B"]},
    }
    assert xml_to_json(json_to_xml(obj)) == obj
