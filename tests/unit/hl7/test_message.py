"""hl7/message.py: character sets from MSH-18, escape sequences, field access over python-hl7, ACK building."""

from __future__ import annotations

import hl7
import pytest
from hypothesis import given
from hypothesis import strategies as st

from openpacs.hl7 import message as m


def raw(body: str = "PID|1||123", version: str = "2.5", charset: str = "", encoding: str = "ascii",
        control_id: str = "C1") -> bytes:
    msh = f"MSH|^~\\&|RIS|HOSP|PACS|RAD|20250101||ADT^A08^ADT_A01|{control_id}|P|{version}"
    if charset:
        msh += "||||||" + charset
    return (msh + "\r" + body).encode(encoding)


@pytest.mark.parametrize("charset, encoding, name", [
    ("", "ascii", "Smith"),
    ("ASCII", "ascii", "Smith"),
    ("8859/1", "latin-1", "Müller"),
    ("UNICODE UTF-8", "utf-8", "Ωmega 山田"),
    ("8859/5", "iso8859-5", "Иванов"),
])
def test_charsets(charset: str, encoding: str, name: str) -> None:
    msg = m.parse(raw(f"PID|1||123||{name}^A", charset=charset, encoding=encoding))
    assert msg.charset == charset
    assert msg.value(msg.segment("PID"), 5) == name
    msh = m.build_ack("AA", msg).decode(encoding).split("\r")[0].split("|")
    assert (msh[17] if len(msh) > 17 else "") == charset  # MSH-18 of the ACK mirrors the message


def test_unlabelled_non_ascii_is_read_as_utf8_then_latin1() -> None:
    assert m.parse(raw("PID|1||1||Zoë".encode().decode("latin-1"), encoding="latin-1")).codec in ("utf-8", "latin-1")
    msg = m.parse("MSH|^~\\&|A|B|C|D|1||ADT^A08|1|P|2.5\rPID|1||1||Zoë".encode())
    assert msg.value(msg.segment("PID"), 5) == "Zoë"
    msg = m.parse("MSH|^~\\&|A|B|C|D|1||ADT^A08|1|P|2.5\rPID|1||1||Zoë".encode("latin-1"))
    assert msg.value(msg.segment("PID"), 5) == "Zoë"


def test_declared_charset_that_does_not_decode_is_rejected() -> None:
    with pytest.raises(m.HL7Error) as e:
        m.parse(raw("PID|1||1||\xff\xfe".encode("latin-1").decode("latin-1"), charset="UNICODE UTF-8",
                    encoding="latin-1"))
    assert e.value.ack_code == "AR" and e.value.location == "MSH^1^18"
    with pytest.raises(m.HL7Error):
        m.parse(raw(charset="EBCDIC"))


@pytest.mark.parametrize("text, expected", [
    ("a\\F\\b", "a|b"), ("a\\S\\b", "a^b"), ("a\\T\\b", "a&b"), ("a\\R\\b", "a~b"), ("a\\E\\b", "a\\b"),
    ("\\X41\\", "A"), ("caf\\XC3A9\\", "café"), ("line1\\.br\\line2", "line1\rline2"), ("\\H\\bold\\N\\", "bold"),
    ("no escapes", "no escapes"), ("unterminated \\F", "unterminated \\F"), ("\\Q\\", "\\Q\\"),
    ("\\Xzz\\", "\\Xzz\\"), ("\\.sp2\\x", "\r\rx"),
])
def test_unescape(text: str, expected: str) -> None:
    assert m.unescape(text, m.Delimiters(), "utf-8") == expected


def test_hex_escape_in_latin1_is_one_byte_per_character() -> None:
    assert m.unescape("\\XE9\\", m.Delimiters(), "latin-1") == "é"
    # python-hl7's own unescape turns each byte into a code point: wrong for UTF-8, which is why we do our own
    assert hl7.parse(raw("PID|1||1")).unescape("\\XC3A9\\") != "é"


def test_custom_delimiters() -> None:
    text = "MSH#*@!$#A#B#C#D#1##ADT*A08#9#P#2.5\rPID#1##ID1*!*$HOSP@X#"
    msg = m.parse(text.encode())
    assert msg.control_id == "9" and msg.type_trigger == "ADT^A08"
    reps = msg.reps(msg.segment("PID"), 3)
    assert reps[0][0] == ["ID1"]


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), max_size=60))
def test_escape_round_trip(value: str) -> None:
    d = m.Delimiters()
    assert m.unescape(m.escape(value, d), d, "utf-8") == value


@given(st.text(alphabet="|^~&\\ab\r", max_size=30))
def test_escaped_text_holds_no_delimiters(value: str) -> None:
    out = m.escape(value)
    assert not set(out) & set("|^~&\r")


def test_field_access_repetitions_components_subcomponents() -> None:
    msg = m.parse(raw("PID|1||A1^^^HOSP&1.2.3&ISO^MR~B2^^^OTH||Fam^Giv^Mid^Jr^Dr"))
    pid = msg.segment("PID")
    reps = msg.reps(pid, 3)
    assert len(reps) == 2
    assert reps[0][3] == ["HOSP", "1.2.3", "ISO"] and reps[1][0] == ["B2"]
    assert msg.value(pid, 3, 4, rep=0, sub=2) == "1.2.3"
    assert msg.value(pid, 5, 4) == "Jr" and msg.value(pid, 99) == "" and msg.reps(pid, 4) == []


@pytest.mark.parametrize("data", [
    b"", b"garbage", b"MSH", b"MSH|", b"PID|1||x\rMSH|^~\\&|", b"MSH|^~\\&|A|B\rpid|lowercase",
    b"MSH|^~\\&|A|B|C|D|1||ADT^A01|1|P|2.5\r\x00", b"MSHa^~\\&|A", b"MSH|^^^^|A",
])
def test_unparseable_messages_are_rejected(data: bytes) -> None:
    with pytest.raises(m.HL7Error) as e:
        m.check_header(m.parse(data))
    assert e.value.ack_code == "AR"


@pytest.mark.parametrize("version, ok", [("2.3", True), ("2.3.1", True), ("2.4", True), ("2.5.1", True),
                                         ("2.8", True), ("2.2", False), ("3.0", False), ("", False)])
def test_versions(version: str, ok: bool) -> None:
    msg = m.parse(raw(version=version))
    if ok:
        m.check_header(msg)
    else:
        with pytest.raises(m.HL7Error) as e:
            m.check_header(msg)
        assert e.value.location == "MSH^1^12"


def test_ack_mirrors_the_message() -> None:
    msg = m.parse(raw(control_id="X|1".replace("|", "\\F\\"), version="2.7"))
    ack = hl7.parse(m.build_ack("AA", msg).decode())
    msh = ack.segment("MSH")
    assert str(msh[3]) == "PACS" and str(msh[5]) == "RIS" and str(msh[6]) == "HOSP"
    assert str(msh[9]) == "ACK^A08^ACK" and str(msh[12]) == "2.7"
    assert str(ack.segment("MSA")[1]) == "AA" and str(ack.segment("MSA")[2]) == "X\\F\\1"


def test_ack_err_segments_by_version() -> None:
    e = m.error(m.REQUIRED_FIELD_MISSING, "PID-3 is empty", "PID^1^3")
    modern = hl7.parse(m.build_ack("AE", m.parse(raw(version="2.5")), err=e).decode())
    err = modern.segment("ERR")
    assert str(err[2]) == "PID^1^3" and str(err[3][0][0]) == "101" and str(err[4]) == "E"
    assert str(err[8]) == "PID-3 is empty"
    old = hl7.parse(m.build_ack("AE", m.parse(raw(version="2.4")), err=e).decode())
    assert str(old.segment("ERR")[1]) == "PID^1^3^101&Required field missing&HL70357"
    assert str(old.segment("MSA")[3]) == "PID-3 is empty"


def test_ack_for_unparseable_salvages_the_header() -> None:
    data = b"MSH|^~\\&|LAB|WARD|PACS|RAD|2025||ADT^A01|CTRL9|P|2.4\rPID|\x00"
    ack = m.build_ack("AR", None, raw=data, err=m.rejected(m.DATA_TYPE_ERROR, "bad"))
    parsed = hl7.parse(ack.decode())
    assert str(parsed.segment("MSA")[2]) == "CTRL9" and str(parsed.segment("MSH")[5]) == "LAB"
    assert str(parsed.segment("MSH")[12]) == "2.4"
    assert m.build_ack("AR", None, raw=b"\xff\xfe junk").startswith(b"MSH|^~\\&|OPENPACS")


_MSH = b"MSH|^~\\&|RIS|HOSP|PACS|RAD|2025||ADT^A08|C1|P|2.5\r"


@given(st.binary(max_size=300))
def test_any_bytes_parse_or_are_rejected(data: bytes) -> None:
    for candidate in (data, _MSH + data, _MSH[:40] + data):
        try:
            msg = m.parse(candidate)
            m.check_header(msg)
            for seg in msg.parsed:
                for n in range(len(seg)):
                    msg.reps(seg, n)
        except m.HL7Error as e:
            assert e.ack_code in ("AR", "AE")
        ack = m.build_ack("AR", None, raw=candidate)
        assert ack.startswith(b"MSH|") and b"\rMSA|AR|" in ack


@given(st.text(alphabet="PID|^~&\\0123456789ABC\r", max_size=120))
def test_adt_mapping_never_crashes(body: str) -> None:
    from openpacs.hl7 import adt

    try:
        msg = m.parse(_MSH + body.encode())
    except m.HL7Error:
        return
    for seg in msg.segments("PID"):
        try:
            adt.demographics(msg, seg)
        except m.HL7Error as e:
            assert e.ack_code == "AE" and e.location.startswith("PID")
