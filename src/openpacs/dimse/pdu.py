"""DICOM upper layer PDUs (PS3.8 9.3): lean parsing of what a peer sends and encoding of what we answer.

Only the association PDUs go through a structured parser; P-DATA-TF is walked in place by the association
(``association.py``) on a memoryview, so no data set byte is copied or decoded on the hot path.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

# PDU types
A_ASSOCIATE_RQ = 0x01
A_ASSOCIATE_AC = 0x02
A_ASSOCIATE_RJ = 0x03
P_DATA_TF = 0x04
A_RELEASE_RQ = 0x05
A_RELEASE_RP = 0x06
A_ABORT = 0x07

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"

# A-ABORT source (PS3.8 9.3.8)
ABORT_SOURCE_USER = 0
ABORT_SOURCE_PROVIDER = 2
# A-ABORT reasons when the source is the service provider
ABORT_REASON_NOT_SPECIFIED = 0
ABORT_UNRECOGNIZED_PDU = 1
ABORT_UNEXPECTED_PDU = 2
ABORT_UNRECOGNIZED_PARAMETER = 4
ABORT_UNEXPECTED_PARAMETER = 5
ABORT_INVALID_PARAMETER = 6

# A-ASSOCIATE-RJ (PS3.8 9.3.4): result, source, reason
RJ_PERMANENT = 1
RJ_TRANSIENT = 2
RJ_SOURCE_USER = 1
RJ_SOURCE_ACSE = 2
RJ_SOURCE_PRESENTATION = 3
RJ_USER_NO_REASON = 1
RJ_USER_APP_CONTEXT_NOT_SUPPORTED = 2
RJ_USER_CALLING_AE_NOT_RECOGNIZED = 3
RJ_USER_CALLED_AE_NOT_RECOGNIZED = 7
RJ_ACSE_PROTOCOL_VERSION = 2
RJ_PRESENTATION_CONGESTION = 1
RJ_PRESENTATION_LOCAL_LIMIT = 2

# Presentation context results (PS3.8 9.3.3.2)
PC_ACCEPTANCE = 0
PC_USER_REJECTION = 1
PC_NO_REASON = 2
PC_ABSTRACT_SYNTAX_NOT_SUPPORTED = 3
PC_TRANSFER_SYNTAXES_NOT_SUPPORTED = 4

FIXED_ASSOCIATE_LENGTH = 68  # protocol version .. reserved, before the variable items


class PDUError(Exception):
    """A malformed or unexpected PDU: answered with A-ABORT (service provider) and ``reason``."""

    def __init__(self, message: str, reason: int = ABORT_INVALID_PARAMETER) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class RoleSelection:
    sop_class_uid: str
    scu_role: bool
    scp_role: bool


@dataclass
class PresentationContextRQ:
    context_id: int
    abstract_syntax: str
    transfer_syntaxes: list[str]


@dataclass
class PresentationContextAC:
    context_id: int
    result: int
    transfer_syntax: str


@dataclass
class UserInformation:
    max_length: int = 0  # 0: no limit
    implementation_class_uid: str = ""
    implementation_version_name: str = ""
    async_ops: tuple[int, int] | None = None
    roles: dict[str, RoleSelection] = field(default_factory=dict)
    user_identity: bytes | None = None


@dataclass
class AssociateRQ:
    protocol_version: int
    called_aet: str
    calling_aet: str
    application_context: str
    contexts: list[PresentationContextRQ]
    user: UserInformation


@dataclass
class AssociateAC:
    protocol_version: int
    called_aet: str
    calling_aet: str
    application_context: str
    contexts: list[PresentationContextAC]
    user: UserInformation


def _uid(raw: memoryview | bytes, what: str) -> str:
    try:
        text = bytes(raw).decode("ascii")
    except UnicodeDecodeError:
        raise PDUError(f"{what} is not ASCII") from None
    return text.rstrip("\0 ").strip()


def _ae(raw: memoryview | bytes) -> str:
    return bytes(raw).decode("ascii", "replace").strip(" \0")


def _items(body: memoryview, start: int, what: str) -> list[tuple[int, memoryview]]:
    """Split a run of items (type, reserved, 2-byte length, value), refusing any that overflows its container."""
    out: list[tuple[int, memoryview]] = []
    pos, end = start, len(body)
    while pos < end:
        if end - pos < 4:
            raise PDUError(f"truncated item header in {what}")
        itype = body[pos]
        (ilen,) = struct.unpack_from(">H", body, pos + 2)
        if pos + 4 + ilen > end:
            raise PDUError(f"item 0x{itype:02X} in {what} declares {ilen} bytes, only {end - pos - 4} present")
        out.append((itype, body[pos + 4 : pos + 4 + ilen]))
        pos += 4 + ilen
    return out


def _parse_user_information(value: memoryview) -> UserInformation:
    user = UserInformation()
    seen_max = False
    for stype, sval in _items(value, 0, "user information"):
        if stype == 0x51:
            if len(sval) != 4:
                raise PDUError("maximum length sub-item must be 4 bytes")
            (user.max_length,) = struct.unpack(">I", sval)
            seen_max = True
        elif stype == 0x52:
            user.implementation_class_uid = _uid(sval, "implementation class UID")
        elif stype == 0x55:
            user.implementation_version_name = _ae(sval)
        elif stype == 0x53:
            if len(sval) != 4:
                raise PDUError("asynchronous operations window sub-item must be 4 bytes")
            user.async_ops = struct.unpack(">HH", sval)  # type: ignore[assignment]
        elif stype == 0x54:
            if len(sval) < 4:
                raise PDUError("truncated role selection sub-item")
            (ulen,) = struct.unpack_from(">H", sval, 0)
            if 2 + ulen + 2 != len(sval):
                raise PDUError("role selection sub-item length mismatch")
            uid = _uid(sval[2 : 2 + ulen], "role selection SOP class UID")
            user.roles[uid] = RoleSelection(uid, bool(sval[2 + ulen]), bool(sval[3 + ulen]))
        elif stype == 0x58:
            user.user_identity = bytes(sval)
        # 0x56/0x57 extended negotiation and unknown sub-items: ignored (PS3.8 9.3.1)
    if not seen_max:
        user.max_length = 0
    return user


def parse_associate_rq(body: memoryview) -> AssociateRQ:
    """Parse the variable field of an A-ASSOCIATE-RQ (``body`` excludes the 6-byte PDU header)."""
    return _parse_associate(body, rq=True)  # type: ignore[return-value]


def parse_associate_ac(body: memoryview) -> AssociateAC:
    return _parse_associate(body, rq=False)  # type: ignore[return-value]


def _parse_associate(body: memoryview, rq: bool) -> AssociateRQ | AssociateAC:
    if len(body) < FIXED_ASSOCIATE_LENGTH:
        raise PDUError(f"A-ASSOCIATE PDU of {len(body)} bytes is shorter than its fixed fields")
    (version,) = struct.unpack_from(">H", body, 0)
    called = _ae(body[4:20])
    calling = _ae(body[20:36])
    app_context = ""
    rq_contexts: list[PresentationContextRQ] = []
    ac_contexts: list[PresentationContextAC] = []
    user: UserInformation | None = None
    seen_ids: set[int] = set()
    for itype, value in _items(body, FIXED_ASSOCIATE_LENGTH, "A-ASSOCIATE"):
        if itype == 0x10:
            app_context = _uid(value, "application context name")
        elif itype == 0x20 and rq:
            if len(value) < 4:
                raise PDUError("truncated presentation context item")
            cid = value[0]
            if cid in seen_ids or cid % 2 == 0:
                raise PDUError(f"invalid or duplicate presentation context ID {cid}")
            seen_ids.add(cid)
            abstract: str | None = None
            syntaxes: list[str] = []
            for stype, sval in _items(value, 4, "presentation context"):
                if stype == 0x30:
                    if abstract is not None:
                        raise PDUError(f"presentation context {cid} has two abstract syntaxes")
                    abstract = _uid(sval, "abstract syntax")
                elif stype == 0x40:
                    syntaxes.append(_uid(sval, "transfer syntax"))
            if not abstract or not syntaxes:
                raise PDUError(f"presentation context {cid} lacks an abstract or transfer syntax")
            rq_contexts.append(PresentationContextRQ(cid, abstract, syntaxes))
        elif itype == 0x21 and not rq:
            if len(value) < 4:
                raise PDUError("truncated presentation context item")
            ts = ""
            for stype, sval in _items(value, 4, "presentation context"):
                if stype == 0x40:
                    ts = _uid(sval, "transfer syntax")
            ac_contexts.append(PresentationContextAC(value[0], value[2], ts))
        elif itype == 0x50:
            user = _parse_user_information(value)
        elif itype in (0x20, 0x21):
            raise PDUError(f"presentation context item 0x{itype:02X} not allowed here", ABORT_UNEXPECTED_PARAMETER)
    if not app_context:
        raise PDUError("A-ASSOCIATE PDU without application context item")
    if user is None:
        raise PDUError("A-ASSOCIATE PDU without user information item")
    if rq:
        if not rq_contexts:
            raise PDUError("A-ASSOCIATE-RQ without presentation context")
        return AssociateRQ(version, called, calling, app_context, rq_contexts, user)
    return AssociateAC(version, called, calling, app_context, ac_contexts, user)


# ---- encoding -----------------------------------------------------------------------------------------------


def _item(itype: int, value: bytes) -> bytes:
    return struct.pack(">BBH", itype, 0, len(value)) + value


def _ae_field(aet: str) -> bytes:
    return aet.encode("ascii", "replace")[:16].ljust(16, b" ")


def _user_items(user: UserInformation, *, reply: bool) -> bytes:
    sub = _item(0x51, struct.pack(">I", user.max_length))
    sub += _item(0x52, user.implementation_class_uid.encode("ascii"))
    if user.async_ops is not None:
        sub += _item(0x53, struct.pack(">HH", *user.async_ops))
    for role in user.roles.values():
        uid = role.sop_class_uid.encode("ascii")
        sub += _item(0x54, struct.pack(">H", len(uid)) + uid + bytes((int(role.scu_role), int(role.scp_role))))
    if user.implementation_version_name:
        sub += _item(0x55, user.implementation_version_name.encode("ascii")[:16])
    return _item(0x50, sub)


def _associate(pdu_type: int, called: str, calling: str, items: bytes) -> bytes:
    body = struct.pack(">HH", 1, 0) + _ae_field(called) + _ae_field(calling) + b"\0" * 32 + items
    return struct.pack(">BBI", pdu_type, 0, len(body)) + body


def encode_associate_ac(
    called: str, calling: str, contexts: list[PresentationContextAC], user: UserInformation
) -> bytes:
    items = _item(0x10, APPLICATION_CONTEXT.encode("ascii"))
    for pc in contexts:
        ts = _item(0x40, pc.transfer_syntax.encode("ascii"))
        items += _item(0x21, bytes((pc.context_id, 0, pc.result, 0)) + ts)
    return _associate(A_ASSOCIATE_AC, called, calling, items + _user_items(user, reply=True))


def encode_associate_rq(
    called: str, calling: str, contexts: list[PresentationContextRQ], user: UserInformation
) -> bytes:
    items = _item(0x10, APPLICATION_CONTEXT.encode("ascii"))
    for pc in contexts:
        sub = _item(0x30, pc.abstract_syntax.encode("ascii"))
        sub += b"".join(_item(0x40, ts.encode("ascii")) for ts in pc.transfer_syntaxes)
        items += _item(0x20, bytes((pc.context_id, 0, 0, 0)) + sub)
    return _associate(A_ASSOCIATE_RQ, called, calling, items + _user_items(user, reply=False))


def encode_associate_rj(result: int, source: int, reason: int) -> bytes:
    return struct.pack(">BBIBBBB", A_ASSOCIATE_RJ, 0, 4, 0, result, source, reason)


def encode_release_rq() -> bytes:
    return struct.pack(">BBII", A_RELEASE_RQ, 0, 4, 0)


def encode_release_rp() -> bytes:
    return struct.pack(">BBII", A_RELEASE_RP, 0, 4, 0)


def encode_abort(source: int = ABORT_SOURCE_PROVIDER, reason: int = ABORT_REASON_NOT_SPECIFIED) -> bytes:
    return struct.pack(">BBIBBBB", A_ABORT, 0, 4, 0, 0, source, reason)


_PDV_HEADER = struct.Struct(">BBIIBB")


def pdata_header(context_id: int, control: int, length: int) -> bytes:
    """Header of a P-DATA-TF PDU holding one PDV of ``length`` data bytes (control: bit0 command, bit1 last)."""
    return _PDV_HEADER.pack(P_DATA_TF, 0, length + 6, length + 2, context_id, control)
