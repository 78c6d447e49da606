"""The upper layer state machine, driven byte by byte on a fake transport."""

from __future__ import annotations

import struct

import pytest

from openpacs.config import RemoteAE
from openpacs.dimse import commands, pdu
from openpacs.dimse.negotiation import EXPLICIT_VR_LE, IMPLICIT_VR_LE, STUDY_ROOT_GET, VERIFICATION

from ._support import CT, Harness, associate_rq, echo_rq, pdata, store_rq_command


@pytest.fixture
def h():  # type: ignore[no-untyped-def]
    harness = Harness(max_pdu=65536)
    yield harness
    harness.close()


def _abort_reason(h: Harness) -> tuple[int, int]:
    pdus = h.transport.pdus()
    assert pdus and pdus[-1][0] == pdu.A_ABORT, pdus
    body = pdus[-1][1]
    assert h.transport.closing
    return body[2], body[3]


def _responses(h: Harness) -> list[commands.Command]:
    out = []
    for ptype, body in h.transport.pdus():
        assert ptype == pdu.P_DATA_TF
        if body[5] & 1:
            out.append(commands.decode_command(body[6:]))
    return out


def test_associate_echo_release(h: Harness) -> None:
    ac = h.associate()
    assert ac.user.max_length == 65536
    results = {c.context_id: (c.result, c.transfer_syntax) for c in ac.contexts}
    assert results == {1: (0, IMPLICIT_VR_LE), 3: (0, EXPLICIT_VR_LE)}
    h.feed(echo_rq(5), step=7)  # fragmented reads
    (rsp,) = _responses(h)
    assert (
        rsp.field == commands.C_ECHO_RSP
        and rsp[commands.STATUS] == 0
        and rsp[commands.MESSAGE_ID_BEING_RESPONDED_TO] == 5
    )
    h.feed(pdu.encode_release_rq())
    assert h.transport.pdus() == [(pdu.A_RELEASE_RP, b"\0\0\0\0")]
    assert h.assoc.state == "Sta13"


def test_store_streams_fragments_without_joining(h: Harness) -> None:
    h.associate()
    data = bytes(range(256)) * 1000  # 256 KB in 4 PDVs spread over PDUs of various sizes
    msg = pdata(3, 0x03, store_rq_command(1))
    parts = [data[i : i + 60000] for i in range(0, len(data), 60000)]
    for i, part in enumerate(parts):
        msg += pdata(3, 0x02 if i == len(parts) - 1 else 0x00, part)
    h.feed(msg, step=9000)
    (rsp,) = _responses(h)
    assert rsp.field == commands.C_STORE_RSP and rsp[commands.STATUS] == 0
    (call,) = h.endpoint.ctx.ingest.calls
    assert call[0] == data and call[1] == EXPLICIT_VR_LE and call[2] == CT and call[3] == "1.2.3.4.5"
    assert call[4].calling_aet == "TESTSCU" and call[4].protocol == "DIMSE"


def test_store_failure_status_is_answered(h: Harness) -> None:
    h.associate()
    h.endpoint.ctx.ingest.status = 0xA900
    h.feed(pdata(3, 0x03, store_rq_command(2)) + pdata(3, 0x02, b"\x08\x00\x16\x00"))
    (rsp,) = _responses(h)
    assert rsp[commands.STATUS] == 0xA900


def test_store_sop_class_must_match_context(h: Harness) -> None:
    h.associate()
    h.feed(pdata(3, 0x03, store_rq_command(2, sop_class="1.2.840.10008.5.1.4.1.1.4")) + pdata(3, 0x02, b"xx"))
    (rsp,) = _responses(h)
    assert rsp[commands.STATUS] == 0x0122
    assert not h.endpoint.ctx.ingest.calls


def test_pdu_longer_than_our_maximum_is_aborted_unbuffered(h: Harness) -> None:
    h.associate()
    h.feed(struct.pack(">BBI", pdu.P_DATA_TF, 0, 65537) + b"\0" * 10)
    assert _abort_reason(h) == (pdu.ABORT_SOURCE_PROVIDER, pdu.ABORT_INVALID_PARAMETER)
    assert h.assoc._big is None


def test_huge_declared_associate_rq_is_aborted(h: Harness) -> None:
    h.feed(struct.pack(">BBI", pdu.A_ASSOCIATE_RQ, 0, 0xFFFFFFF0))
    assert _abort_reason(h) == (2, pdu.ABORT_INVALID_PARAMETER)


def test_second_associate_rq_is_aborted(h: Harness) -> None:
    h.associate()
    h.feed(associate_rq())
    assert _abort_reason(h) == (2, pdu.ABORT_UNEXPECTED_PDU)
    assert h.endpoint.closed == [h.assoc]


@pytest.mark.parametrize("ptype", [0x00, 0x08, 0x7F, 0xFF])
def test_unknown_pdu_type_is_aborted(h: Harness, ptype: int) -> None:
    h.associate()
    h.feed(struct.pack(">BBI", ptype, 0, 4) + b"\0\0\0\0")
    assert _abort_reason(h) == (2, pdu.ABORT_UNRECOGNIZED_PDU)


def test_pdata_before_association_is_aborted(h: Harness) -> None:
    h.feed(echo_rq())
    assert _abort_reason(h) == (2, pdu.ABORT_UNEXPECTED_PDU)


@pytest.mark.parametrize(
    "bad",
    [
        struct.pack(">BBII", pdu.A_RELEASE_RQ, 0, 5, 0) + b"\0",  # wrong length
        struct.pack(">BBI", pdu.P_DATA_TF, 0, 3) + b"abc",  # no room for a PDV
        struct.pack(">BBIIBB", pdu.P_DATA_TF, 0, 6, 500, 1, 3),  # PDV longer than its PDU
        struct.pack(">BBIIBB", pdu.P_DATA_TF, 0, 6, 1, 1, 3),  # PDV item length < 2
        pdata(7, 0x03, b"x"),  # context never accepted
        pdata(3, 0x02, b"dataset without command"),
        pdata(1, 0x03, b"\x00\x00\x00\x01\xff\xff\x00\x00"),  # undecodable command
        struct.pack(">BBI", pdu.A_ASSOCIATE_AC, 0, 100),  # an AC sent to an acceptor
    ],
)
def test_malformed_pdus_abort(h: Harness, bad: bytes) -> None:
    h.associate()
    h.feed(bad)
    source, reason = _abort_reason(h)
    assert source == pdu.ABORT_SOURCE_PROVIDER and reason in (
        pdu.ABORT_INVALID_PARAMETER,
        pdu.ABORT_UNEXPECTED_PARAMETER,
        pdu.ABORT_UNEXPECTED_PDU,
    )


def test_truncated_associate_rq_items_abort(h: Harness) -> None:
    raw = bytearray(associate_rq())
    struct.pack_into(">H", raw, 6 + pdu.FIXED_ASSOCIATE_LENGTH + 2, 0x7FFF)
    h.feed(bytes(raw))
    assert _abort_reason(h) == (2, pdu.ABORT_INVALID_PARAMETER)


def test_abort_from_peer_closes_silently(h: Harness) -> None:
    h.associate()
    h.feed(pdu.encode_abort(0, 0))
    assert h.transport.closing and h.transport.pdus() == []


def test_called_ae_check() -> None:
    h = Harness(check_called_aet=True, aet="OPENPACS")
    h.feed(associate_rq(called="SOMEONE"))
    ((ptype, body),) = h.transport.pdus()
    assert ptype == pdu.A_ASSOCIATE_RJ and tuple(body[1:]) == (1, 1, 7)
    h.close()


def test_unknown_calling_ae_rejected_and_permissions() -> None:
    h = Harness(dicom_accept_unknown=False)
    h.settings.remote_aes = {"M": RemoteAE("TESTSCU", "127.0.0.1", 104, allow=("echo",))}
    h.feed(associate_rq(calling="STRANGER"))
    ((ptype, body),) = h.transport.pdus()
    assert ptype == pdu.A_ASSOCIATE_RJ and tuple(body[1:]) == (1, 1, 3)
    h.close()
    h = Harness(dicom_accept_unknown=False)
    h.settings.remote_aes = {"M": RemoteAE("TESTSCU", "10.9.9.9", 104)}  # right title, wrong host
    h.feed(associate_rq())
    assert h.transport.pdus()[0][0] == pdu.A_ASSOCIATE_RJ
    h.close()
    h = Harness(dicom_accept_unknown=False)
    h.settings.remote_aes = {"M": RemoteAE("TESTSCU", "localhost", 104, allow=("echo",))}
    h.associate()
    h.feed(echo_rq(1) + pdata(3, 0x03, store_rq_command(2)) + pdata(3, 0x02, b"xx"))
    echo, store = _responses(h)
    assert echo[commands.STATUS] == 0 and store[commands.STATUS] == 0x0124
    h.close()


def test_max_associations_rejection() -> None:
    h = Harness()
    h.assoc._reject_limit = True
    h.feed(associate_rq())
    ((ptype, body),) = h.transport.pdus()
    assert ptype == pdu.A_ASSOCIATE_RJ and tuple(body[1:]) == (2, 3, 2)  # transient, presentation, local limit
    h.close()


def test_negotiation_role_selection_and_rejections() -> None:
    h = Harness()
    ac = h.associate(
        contexts=[
            (1, STUDY_ROOT_GET, [EXPLICIT_VR_LE]),
            (3, CT, ["1.2.840.10008.1.2.4.50"]),  # JPEG baseline: stored as received
            (5, "1.2.840.10008.5.1.1.9", [IMPLICIT_VR_LE]),  # Basic Grayscale Print Management: not served
            (15, "1.2.840.10008.1.20.1", [IMPLICIT_VR_LE]),  # Storage Commitment Push Model
            (7, VERIFICATION, ["1.2.840.10008.1.2.4.50"]),  # echo in a compressed syntax
            (9, "1.2.3.999.1", [EXPLICIT_VR_LE]),  # unknown: taken as storage
            (11, "1.2.840.10008.5.1.4.31", [IMPLICIT_VR_LE]),  # Modality Worklist FIND
            (13, "1.2.840.10008.3.1.2.3.3", [EXPLICIT_VR_LE]),  # MPPS
        ],
        roles={CT: (False, True)},
    )
    results = {c.context_id: (c.result, c.transfer_syntax) for c in ac.contexts}
    assert results[1] == (0, EXPLICIT_VR_LE)
    assert results[3] == (0, "1.2.840.10008.1.2.4.50")
    assert results[5][0] == pdu.PC_ABSTRACT_SYNTAX_NOT_SUPPORTED
    assert results[7][0] == pdu.PC_TRANSFER_SYNTAXES_NOT_SUPPORTED
    assert results[9][0] == 0
    assert results[11] == (0, IMPLICIT_VR_LE) and results[13] == (0, EXPLICIT_VR_LE)
    assert (h.assoc.contexts[11].service, h.assoc.contexts[13].service) == ("worklist", "mpps")
    assert results[15] == (0, IMPLICIT_VR_LE) and h.assoc.contexts[15].service == "commit"
    assert ac.user.roles[CT].scp_role and not ac.user.roles[CT].scu_role
    assert h.assoc.contexts[3].peer_is_scp
    h.close()


def test_artim_closes_silent_connection() -> None:
    h = Harness(artim_timeout=0.1)
    h.run(0.4)
    assert h.transport.closing and h.transport.pdus() == []
    h.close()


def test_network_timeout_aborts_idle_association() -> None:
    h = Harness(network_timeout=0.1)
    h.associate()
    h.run(0.4)
    assert _abort_reason(h)[0] == pdu.ABORT_SOURCE_PROVIDER
    h.close()


def test_dimse_timeout_mid_message() -> None:
    h = Harness(dimse_timeout=0.1, network_timeout=100)
    h.associate()
    h.feed(pdata(3, 0x03, store_rq_command(1)) + pdata(3, 0x00, b"half"))
    h.run(0.4)
    assert _abort_reason(h)[0] == pdu.ABORT_SOURCE_PROVIDER
    h.close()


def test_release_waits_for_running_operation() -> None:
    h = Harness()
    h.associate()
    h.assoc._busy = True  # an operation still in progress
    h.feed(pdu.encode_release_rq())
    assert h.transport.pdus() == []
    h.assoc.operation_done(0)
    assert h.transport.pdus() == [(pdu.A_RELEASE_RP, b"\0\0\0\0")]
    h.close()


def test_mutated_streams_never_raise(caplog: pytest.LogCaptureFixture) -> None:
    """300 randomly mutated association streams: each ends in a normal exchange or an A-ABORT, never an exception."""
    import random

    rng = random.Random(1234)
    good = associate_rq() + echo_rq(1) + pdata(3, 0x03, store_rq_command(2)) + pdata(3, 0x02, b"\x08\x00" * 50)
    good += pdu.encode_release_rq()
    for _ in range(300):
        data = bytearray(good)
        for _ in range(rng.randint(1, 6)):
            op = rng.random()
            pos = rng.randrange(len(data))
            if op < 0.5:
                data[pos] = rng.randrange(256)
            elif op < 0.75:
                del data[pos : pos + rng.randint(1, 20)]
            else:
                data[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 20)))
        h = Harness(max_pdu=65536)
        h.feed(bytes(data), step=rng.randint(1, 4096))
        for ptype, _ in h.transport.pdus():
            assert ptype in (pdu.A_ASSOCIATE_AC, pdu.A_ASSOCIATE_RJ, pdu.P_DATA_TF, pdu.A_RELEASE_RP, pdu.A_ABORT)
        h.close()
    assert "internal error" not in caplog.text
