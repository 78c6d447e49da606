"""DIMSE command sets (PS3.7 9.3, E.1): group 0000 in Implicit VR Little Endian, decoded and encoded by hand.

A command set is a handful of short elements; going through pydicom for each C-STORE would cost more than the rest
of the hot path, so this reads and writes the bytes directly.
"""

from __future__ import annotations

import struct
from typing import Any

C_STORE_RQ = 0x0001
C_STORE_RSP = 0x8001
C_GET_RQ = 0x0010
C_GET_RSP = 0x8010
C_FIND_RQ = 0x0020
C_FIND_RSP = 0x8020
C_MOVE_RQ = 0x0021
C_MOVE_RSP = 0x8021
C_ECHO_RQ = 0x0030
C_ECHO_RSP = 0x8030
C_CANCEL_RQ = 0x0FFF
N_EVENT_REPORT_RQ = 0x0100
N_EVENT_REPORT_RSP = 0x8100
N_SET_RQ = 0x0120
N_SET_RSP = 0x8120
N_CREATE_RQ = 0x0140
N_CREATE_RSP = 0x8140
N_ACTION_RQ = 0x0130
N_ACTION_RSP = 0x8130

NO_DATASET = 0x0101
DATASET_PRESENT = 0x0001

# Element numbers in group 0000
AFFECTED_SOP_CLASS_UID = 0x0002
REQUESTED_SOP_CLASS_UID = 0x0003
COMMAND_FIELD = 0x0100
MESSAGE_ID = 0x0110
MESSAGE_ID_BEING_RESPONDED_TO = 0x0120
MOVE_DESTINATION = 0x0600
PRIORITY = 0x0700
COMMAND_DATA_SET_TYPE = 0x0800
STATUS = 0x0900
OFFENDING_ELEMENT = 0x0901
ERROR_COMMENT = 0x0902
ERROR_ID = 0x0903
AFFECTED_SOP_INSTANCE_UID = 0x1000
REQUESTED_SOP_INSTANCE_UID = 0x1001
EVENT_TYPE_ID = 0x1002
ACTION_TYPE_ID = 0x1008
REMAINING = 0x1020
COMPLETED = 0x1021
FAILED = 0x1022
WARNING = 0x1023
MOVE_ORIGINATOR_AET = 0x1030
MOVE_ORIGINATOR_MESSAGE_ID = 0x1031

_US = frozenset(
    {
        COMMAND_FIELD,
        MESSAGE_ID,
        MESSAGE_ID_BEING_RESPONDED_TO,
        PRIORITY,
        COMMAND_DATA_SET_TYPE,
        STATUS,
        ERROR_ID,
        REMAINING,
        COMPLETED,
        FAILED,
        WARNING,
        MOVE_ORIGINATOR_MESSAGE_ID,
        EVENT_TYPE_ID,
        ACTION_TYPE_ID,
    }
)
_UI = frozenset(
    {AFFECTED_SOP_CLASS_UID, REQUESTED_SOP_CLASS_UID, AFFECTED_SOP_INSTANCE_UID, REQUESTED_SOP_INSTANCE_UID}
)
_TEXT = frozenset({MOVE_DESTINATION, ERROR_COMMENT, MOVE_ORIGINATOR_AET})
_ELEMENT = struct.Struct("<HHI")
_US_VALUE = struct.Struct("<H")


class CommandError(ValueError):
    """A command set that cannot be decoded: a DIMSE protocol error, answered with A-ABORT."""


class Command(dict[int, Any]):
    """Decoded command elements keyed by element number (the group is always 0000)."""

    @property
    def field(self) -> int:
        return self.get(COMMAND_FIELD, -1)  # type: ignore[no-any-return]

    @property
    def message_id(self) -> int:
        return self.get(MESSAGE_ID, 0)  # type: ignore[no-any-return]

    @property
    def has_dataset(self) -> bool:
        return self.get(COMMAND_DATA_SET_TYPE, NO_DATASET) != NO_DATASET


def decode_command(data: bytes | memoryview) -> Command:
    cmd = Command()
    view = memoryview(data)
    end = len(view)
    pos = 0
    while pos < end:
        if end - pos < 8:
            raise CommandError("truncated command element header")
        group, elem, length = _ELEMENT.unpack_from(view, pos)
        pos += 8
        if group != 0 or length > end - pos:
            raise CommandError(f"invalid command element ({group:04X},{elem:04X}) length {length}")
        value = view[pos : pos + length]
        pos += length
        if elem in _US:
            if length != 2:
                raise CommandError(f"command element (0000,{elem:04X}) must be 2 bytes")
            cmd[elem] = _US_VALUE.unpack(value)[0]
        elif elem in _UI or elem in _TEXT:
            cmd[elem] = bytes(value).decode("ascii", "replace").rstrip("\0 ").strip()
        elif elem != 0:
            cmd[elem] = bytes(value)
    if COMMAND_FIELD not in cmd:
        raise CommandError("command set without Command Field")
    return cmd


def encode_command(elements: dict[int, Any]) -> bytes:
    """Encode ``{element: value}`` (ints for US, str for UI/AE/LO, bytes as-is) with its group length."""
    parts = []
    for elem in sorted(elements):
        value = elements[elem]
        if value is None:
            continue
        if elem in _US:
            raw = _US_VALUE.pack(value & 0xFFFF)
        elif isinstance(value, str):
            raw = value.encode("ascii", "replace")
            if len(raw) % 2:
                raw += b"\0" if elem in _UI else b" "
        else:
            raw = bytes(value)
        parts.append(_ELEMENT.pack(0, elem, len(raw)) + raw)
    body = b"".join(parts)
    return _ELEMENT.pack(0, 0, 4) + struct.pack("<I", len(body)) + body


def response(
    field: int,
    request: Command,
    status: int,
    *,
    dataset: bool = False,
    comment: str = "",
    extra: dict[int, Any] | None = None,
) -> bytes:
    """The response command for ``request``: the RSP field, echoing the affected SOP class/instance."""
    elements: dict[int, Any] = {
        COMMAND_FIELD: field,
        MESSAGE_ID_BEING_RESPONDED_TO: request.message_id,
        COMMAND_DATA_SET_TYPE: DATASET_PRESENT if dataset else NO_DATASET,
        STATUS: status,
    }
    sop_class = request.get(AFFECTED_SOP_CLASS_UID)
    if sop_class:
        elements[AFFECTED_SOP_CLASS_UID] = sop_class
    if field in (C_STORE_RSP,) and request.get(AFFECTED_SOP_INSTANCE_UID):
        elements[AFFECTED_SOP_INSTANCE_UID] = request[AFFECTED_SOP_INSTANCE_UID]
    if comment and status not in (0x0000, 0xFF00, 0xFF01, 0xFE00):
        # LO: at most 64 characters, no backslash (it would split the comment into several values), no control
        # characters (a malformed data set's values may be quoted in it)
        elements[ERROR_COMMENT] = "".join("/" if c == "\\" else " " if ord(c) < 32 else c for c in comment)[:64]
    if extra:
        elements.update(extra)
    return encode_command(elements)
