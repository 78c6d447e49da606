from __future__ import annotations

from io import BytesIO

import pytest
from pynetdicom.dsutils import decode

from openpacs.dimse import commands

from ._support import CT, store_rq_command


def test_store_command_decodes_and_matches_pydicom() -> None:
    raw = store_rq_command(7, CT, "1.2.3.4.5")
    cmd = commands.decode_command(raw)
    assert cmd.field == commands.C_STORE_RQ and cmd.message_id == 7 and cmd.has_dataset
    assert cmd[commands.AFFECTED_SOP_CLASS_UID] == CT
    assert cmd[commands.AFFECTED_SOP_INSTANCE_UID] == "1.2.3.4.5"
    ds = decode(BytesIO(raw), True, True)
    assert ds.CommandGroupLength == len(raw) - 12
    assert ds.AffectedSOPInstanceUID == "1.2.3.4.5"


def test_response_echoes_request() -> None:
    req = commands.decode_command(store_rq_command(9))
    rsp = commands.decode_command(commands.response(commands.C_STORE_RSP, req, 0xA900, comment="x" * 100))
    assert rsp.field == commands.C_STORE_RSP
    assert rsp[commands.MESSAGE_ID_BEING_RESPONDED_TO] == 9
    assert rsp[commands.STATUS] == 0xA900
    assert not rsp.has_dataset
    assert len(rsp[commands.ERROR_COMMENT]) == 64
    ok = commands.decode_command(commands.response(commands.C_STORE_RSP, req, 0, comment="fine"))
    assert commands.ERROR_COMMENT not in ok
    # a malformed value quoted in the comment: one LO value, no backslash (pynetdicom read "a\\b" as VM 2)
    bad = commands.decode_command(commands.response(commands.C_STORE_RSP, req, 0xA900,
                                                    comment="UID '1.2\\3\n' invalid"))
    assert bad[commands.ERROR_COMMENT] == "UID '1.2/3 ' invalid"


@pytest.mark.parametrize(
    "raw",
    [
        b"\x00\x00\x00\x01",  # truncated header
        b"\x08\x00\x16\x00\x02\x00\x00\x00ab",  # not group 0000
        b"\x00\x00\x00\x01\xff\xff\x00\x00\x00",  # length beyond the end
        b"\x00\x00\x10\x01\x04\x00\x00\x00\x01\x00\x00\x00",  # US of 4 bytes
        b"",  # no command field
    ],
)
def test_hostile_commands(raw: bytes) -> None:
    with pytest.raises(commands.CommandError):
        commands.decode_command(raw)
