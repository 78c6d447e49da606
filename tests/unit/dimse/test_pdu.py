"""PDU parsing and encoding, including hostile variants of the A-ASSOCIATE-RQ."""

from __future__ import annotations

import struct

import pytest
from pynetdicom.pdu import A_ASSOCIATE_AC as PyAC
from pynetdicom.pdu import A_ASSOCIATE_RQ as PyRQ

from openpacs.dimse import pdu
from openpacs.dimse.negotiation import EXPLICIT_VR_LE, IMPLICIT_VR_LE, VERIFICATION

from ._support import CT, associate_rq


def body(raw: bytes) -> memoryview:
    return memoryview(raw)[6:]


def test_associate_rq_round_trip_and_pynetdicom_agrees() -> None:
    raw = associate_rq(roles={CT: (False, True)})
    rq = pdu.parse_associate_rq(body(raw))
    assert (rq.called_aet, rq.calling_aet) == ("OPENPACS", "TESTSCU")
    assert rq.application_context == pdu.APPLICATION_CONTEXT
    assert [(c.context_id, c.abstract_syntax, c.transfer_syntaxes) for c in rq.contexts] == [
        (1, VERIFICATION, [IMPLICIT_VR_LE]),
        (3, CT, [EXPLICIT_VR_LE, IMPLICIT_VR_LE]),
    ]
    assert rq.user.max_length == 16384
    assert rq.user.roles[CT].scp_role and not rq.user.roles[CT].scu_role
    theirs = PyRQ()
    theirs.decode(raw)
    assert theirs.calling_ae_title == "TESTSCU"
    assert len(theirs.presentation_context) == 2


def test_associate_ac_decodes_with_pynetdicom() -> None:
    user = pdu.UserInformation(
        max_length=1 << 20,
        implementation_class_uid="1.2.3",
        implementation_version_name="X",
        roles={CT: pdu.RoleSelection(CT, False, True)},
    )
    raw = pdu.encode_associate_ac("OPENPACS", "TESTSCU", [pdu.PresentationContextAC(1, 0, IMPLICIT_VR_LE)], user)
    theirs = PyAC()
    theirs.decode(raw)
    assert theirs.presentation_context[0].transfer_syntax == IMPLICIT_VR_LE
    ours = pdu.parse_associate_ac(body(raw))
    assert ours.user.max_length == 1 << 20 and ours.user.roles[CT].scp_role


def test_fixed_pdus() -> None:
    assert pdu.encode_associate_rj(2, 3, 2) == b"\x03\x00\x00\x00\x00\x04\x00\x02\x03\x02"
    assert pdu.encode_abort(2, 6) == b"\x07\x00\x00\x00\x00\x04\x00\x00\x02\x06"
    assert pdu.encode_release_rp() == b"\x06\x00\x00\x00\x00\x04\x00\x00\x00\x00"
    assert pdu.pdata_header(5, 3, 10) == b"\x04\x00\x00\x00\x00\x10\x00\x00\x00\x0c\x05\x03"


def _mutate_length(raw: bytes, offset: int, value: int) -> bytes:
    out = bytearray(raw)
    struct.pack_into(">H", out, offset, value)
    return bytes(out)


def test_truncated_and_overflowing_items_are_refused() -> None:
    raw = associate_rq()
    first_item = 6 + pdu.FIXED_ASSOCIATE_LENGTH
    with pytest.raises(pdu.PDUError):
        pdu.parse_associate_rq(body(_mutate_length(raw, first_item + 2, 0xFFFF)))  # item overflows the PDU
    with pytest.raises(pdu.PDUError):
        pdu.parse_associate_rq(body(raw[:-3]))  # cut inside the user information
    with pytest.raises(pdu.PDUError):
        pdu.parse_associate_rq(body(raw[: 6 + 40]))  # shorter than the fixed fields
    for cut in range(6 + pdu.FIXED_ASSOCIATE_LENGTH, len(raw) - 1, 7):
        try:
            pdu.parse_associate_rq(body(raw[:cut]))
        except pdu.PDUError:
            continue


def test_missing_parts_are_refused() -> None:
    with pytest.raises(pdu.PDUError, match="presentation context"):
        pdu.parse_associate_rq(body(pdu.encode_associate_rq("A", "B", [], pdu.UserInformation(16384, "1.2"))))
    even = pdu.encode_associate_rq(
        "A", "B", [pdu.PresentationContextRQ(2, CT, [IMPLICIT_VR_LE])], pdu.UserInformation(0, "1.2")
    )
    with pytest.raises(pdu.PDUError, match="context ID"):
        pdu.parse_associate_rq(body(even))
    no_ts = pdu.encode_associate_rq("A", "B", [pdu.PresentationContextRQ(1, CT, [])], pdu.UserInformation(0, "1.2"))
    with pytest.raises(pdu.PDUError):
        pdu.parse_associate_rq(body(no_ts))


def test_unknown_items_are_ignored() -> None:
    raw = bytearray(associate_rq())
    extra = bytes((0x77, 0, 0, 3)) + b"abc"
    raw += extra
    struct.pack_into(">I", raw, 2, len(raw) - 6)
    assert len(pdu.parse_associate_rq(body(bytes(raw))).contexts) == 2
