"""HL7 v2 messages: character sets (MSH-18), parsing with python-hl7, escape sequences, and building ACKs.

python-hl7 parses the ER7 structure; what it leaves to us: the raw bytes must be decoded before parsing (MSH-18
names the character set, and MSH itself is ASCII), its ``unescape`` turns ``\\Xhh\\`` into one code point per byte
(wrong for a multi-byte UTF-8 character), and it builds ACKs with its own MSH layout. So decoding, unescaping and
ACKs are done here; python-hl7 does the splitting into segments, fields, repetitions and components.
"""

from __future__ import annotations

import itertools
import re
import secrets
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import hl7

SUPPORTED_VERSIONS = ("2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.7.1", "2.8", "2.8.1", "2.8.2")

# MSH-18 (HL7 table 0211) -> Python codec
CHARSETS = {
    "": "ascii",
    "ASCII": "ascii",
    "8859/1": "latin-1",
    "8859/2": "iso8859-2",
    "8859/3": "iso8859-3",
    "8859/4": "iso8859-4",
    "8859/5": "iso8859-5",
    "8859/6": "iso8859-6",
    "8859/7": "iso8859-7",
    "8859/8": "iso8859-8",
    "8859/9": "iso8859-9",
    "8859/15": "iso8859-15",
    "UNICODE UTF-8": "utf-8",
    "UNICODE": "utf-8",
    "UTF-8": "utf-8",
}

# HL7 table 0357, message error condition codes
REQUIRED_FIELD_MISSING = "101"
DATA_TYPE_ERROR = "102"
TABLE_VALUE_NOT_FOUND = "103"
UNSUPPORTED_MESSAGE_TYPE = "200"
UNSUPPORTED_EVENT = "201"
UNSUPPORTED_PROCESSING_ID = "202"
UNSUPPORTED_VERSION = "203"
UNKNOWN_KEY = "204"
DUPLICATE_KEY = "205"
INTERNAL_ERROR = "207"
SEGMENT_SEQUENCE_ERROR = "100"
_CODE_TEXT = {
    SEGMENT_SEQUENCE_ERROR: "Segment sequence error",
    REQUIRED_FIELD_MISSING: "Required field missing",
    DATA_TYPE_ERROR: "Data type error",
    TABLE_VALUE_NOT_FOUND: "Table value not found",
    UNSUPPORTED_MESSAGE_TYPE: "Unsupported message type",
    UNSUPPORTED_EVENT: "Unsupported event code",
    UNSUPPORTED_PROCESSING_ID: "Unsupported processing id",
    UNSUPPORTED_VERSION: "Unsupported version id",
    UNKNOWN_KEY: "Unknown key identifier",
    DUPLICATE_KEY: "Duplicate key identifier",
    INTERNAL_ERROR: "Application internal error",
}


class HL7Error(Exception):
    """A message we answer with AE (understood but wrong) or AR (not understood / not supported), naming the field
    (``location`` like ``PID^1^3``: segment, its sequence, field) and the table 0357 code."""

    def __init__(self, ack_code: str, code: str, text: str, location: str = "") -> None:
        super().__init__(text)
        self.ack_code = ack_code
        self.code = code
        self.text = text
        self.location = location


def rejected(code: str, text: str, location: str = "") -> HL7Error:
    return HL7Error("AR", code, text, location)


def error(code: str, text: str, location: str = "") -> HL7Error:
    return HL7Error("AE", code, text, location)


# ---------------------------------------------------------------------------------------------------------------------
# character sets


def header_fields(raw: bytes) -> list[bytes]:
    """MSH split on its field separator, in bytes (MSH is ASCII whatever the character set); index n is MSH-n."""
    if not raw.startswith(b"MSH") or len(raw) < 8:
        raise rejected(SEGMENT_SEQUENCE_ERROR, "the message does not start with an MSH segment", "MSH^1")
    sep = raw[3:4]
    end = min((i for i in (raw.find(b"\r"), raw.find(b"\n")) if i >= 0), default=len(raw))
    return [b"MSH", sep, *raw[4:end].split(sep)[0:]]


def charset_of(raw: bytes) -> tuple[str, str]:
    """(MSH-18 as sent, Python codec) for a raw message."""
    fields = header_fields(raw)
    value = fields[18].decode("ascii", "replace") if len(fields) > 18 else ""
    rep = fields[2][1:2].decode("ascii", "replace") if len(fields) > 2 and len(fields[2]) > 1 else "~"
    first = value.split(rep)[0].strip()
    codec = CHARSETS.get(first.upper())
    if codec is None:
        raise rejected(DATA_TYPE_ERROR, f"character set {first!r} (MSH-18) is not supported", "MSH^1^18")
    return first, codec


def decode(raw: bytes) -> tuple[str, str, str]:
    """(text, MSH-18, codec). ASCII (or no MSH-18) that is not ASCII is read as UTF-8, then Latin-1: senders that
    leave MSH-18 empty while sending accented names are common, and refusing them helps nobody."""
    charset, codec = charset_of(raw)
    try:
        return raw.decode(codec), charset, codec
    except UnicodeDecodeError as e:
        if codec != "ascii":
            raise rejected(DATA_TYPE_ERROR, f"the message is not valid {charset} (MSH-18): {e}", "MSH^1^18") from e
    try:
        return raw.decode("utf-8"), charset, "utf-8"
    except UnicodeDecodeError:
        return raw.decode("latin-1"), charset, "latin-1"


# ---------------------------------------------------------------------------------------------------------------------
# escapes


@dataclass(frozen=True)
class Delimiters:
    field: str = "|"
    component: str = "^"
    repetition: str = "~"
    escape: str = "\\"
    subcomponent: str = "&"


_FORMATTING = {".br": "\r", ".sp": "\r", ".fi": "", ".nf": "", ".ce": "\r", ".sk": " ", ".in": "", ".ti": ""}


def unescape(value: str, d: Delimiters = Delimiters(), codec: str = "utf-8") -> str:
    """Decode HL7 escape sequences (v2 chapter 2.7): \\F\\ \\S\\ \\T\\ \\R\\ \\E\\, \\Xhh..\\ (bytes in the message's
    character set, so a UTF-8 character may span several), highlighting \\H\\ \\N\\ (dropped) and formatting
    (\\.br\\ and friends: line breaks). Unknown or unterminated sequences are kept as they came."""
    e = d.escape
    if not e or e not in value:
        return value
    out: list[str] = []
    i = 0
    n = len(value)
    while i < n:
        c = value[i]
        if c != e:
            out.append(c)
            i += 1
            continue
        j = value.find(e, i + 1)
        if j < 0:
            out.append(value[i:])
            break
        seq = value[i + 1 : j]
        i = j + 1
        simple = {"F": d.field, "S": d.component, "T": d.subcomponent, "R": d.repetition, "E": e, "H": "", "N": ""}
        if seq in simple:
            out.append(simple[seq])
        elif seq[:1] == "X" and len(seq) > 1 and len(seq) % 2 == 1:
            try:
                out.append(_decode_hex(bytes.fromhex(seq[1:]), codec))
            except ValueError:
                out.append(e + seq + e)
        elif seq[:3] in _FORMATTING:
            times = seq[3:].strip()
            ch = _FORMATTING[seq[:3]]
            out.append(ch * (int(times) if times.lstrip("-").isdigit() and int(times) > 0 else 1))
        elif seq[:1] in ("C", "M", "Z"):  # character set switches / locally defined: not supported, dropped
            continue
        else:
            out.append(e + seq + e)
    return "".join(out)


def _decode_hex(data: bytes, codec: str) -> str:
    try:
        return data.decode(codec)
    except UnicodeDecodeError:
        if codec != "ascii":
            return data.decode(codec, "replace")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def escape(value: str, d: Delimiters = Delimiters()) -> str:
    """The reverse of :func:`unescape` for our own text (ACK messages, ERR): delimiters become escapes."""
    out = value.replace(d.escape, f"{d.escape}E{d.escape}")
    for ch, code in ((d.field, "F"), (d.component, "S"), (d.subcomponent, "T"), (d.repetition, "R")):
        out = out.replace(ch, f"{d.escape}{code}{d.escape}")
    return out.replace("\r", f"{d.escape}.br{d.escape}").replace("\n", f"{d.escape}.br{d.escape}")


# ---------------------------------------------------------------------------------------------------------------------
# parsed message


Components = list[list[str]]  # components -> subcomponents, unescaped


@dataclass
class Message:
    """A parsed, decoded HL7 v2 message with its header already read."""

    raw: bytes
    text: str
    parsed: Any  # hl7.Message
    charset: str
    codec: str
    delimiters: Delimiters
    message_type: str  # MSH-9.1, e.g. ADT
    trigger: str  # MSH-9.2, e.g. A08
    structure: str  # MSH-9.3, e.g. ADT_A01
    control_id: str
    processing_id: str
    version: str
    sending_application: str
    sending_facility: str
    receiving_application: str
    receiving_facility: str
    accept_ack_type: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def type_trigger(self) -> str:
        return f"{self.message_type}^{self.trigger}" if self.trigger else self.message_type

    def segments(self, name: str) -> list[Any]:
        return [s for s in self.parsed if str(s[0]) == name]

    def segment(self, name: str) -> Any | None:
        found = self.segments(name)
        return found[0] if found else None

    def reps(self, seg: Any, n: int) -> list[Components]:
        return field_reps(seg, n, self.delimiters, self.codec)

    def value(self, seg: Any, n: int, component: int = 1, rep: int = 0, sub: int = 1) -> str:
        return field_value(seg, n, self.delimiters, self.codec, component, rep, sub)


def field_reps(seg: Any, n: int, d: Delimiters, codec: str) -> list[Components]:
    """Field ``n`` of a python-hl7 segment (``MSH-n`` too: python-hl7 counts MSH-1 as a field): its repetitions,
    each a list of components, each a list of subcomponents, unescaped. A missing field is an empty list."""
    if seg is None or n >= len(seg):
        return []
    f = seg[n]
    items: list[Any] = [f] if isinstance(f, str) else list(f)
    if not items:
        return []
    if all(isinstance(x, str) for x in items):
        # plain strings: one value (python-hl7 gives one element) or, several, the subcomponents of one component
        reps_raw: list[Any] = [[items]]
    else:
        reps_raw = items
    out: list[Components] = []
    for rep in reps_raw:
        comps: Components = []
        for comp in [rep] if isinstance(rep, str) else rep:
            subs = [comp] if isinstance(comp, str) else [str(s) for s in comp]
            comps.append([unescape(s, d, codec) for s in subs])
        out.append(comps)
    while out and not any(s for comp in out[-1] for s in comp):
        out.pop()
    return out


def field_value(seg: Any, n: int, d: Delimiters, codec: str, component: int = 1, rep: int = 0, sub: int = 1) -> str:
    """One leaf value (1-based component and subcomponent, 0-based repetition), '' when absent."""
    reps = field_reps(seg, n, d, codec)
    if rep >= len(reps):
        return ""
    comps = reps[rep]
    if component > len(comps):
        return ""
    subs = comps[component - 1]
    return subs[sub - 1] if sub <= len(subs) else ""


def parse(raw: bytes) -> Message:
    """Decode and parse one message (the bytes inside the MLLP frame). Raises HL7Error (AR) when it cannot."""
    raw = raw.strip(b"\r\n\t ")
    if b"\x00" in raw:
        raise rejected(DATA_TYPE_ERROR, "the message contains NUL bytes")
    text, charset, codec = decode(raw)
    text = re.sub(r"\r\n|\n", "\r", text).strip("\r")
    if len(text) < 8 or not text.startswith("MSH"):
        raise rejected(SEGMENT_SEQUENCE_ERROR, "the message does not start with an MSH segment", "MSH^1")
    enc = text[4:8]
    fs = text[3]
    if fs.isalnum() or fs in " \r" or len(set(enc[:4])) < 4 or fs in enc[:4]:
        raise rejected(DATA_TYPE_ERROR, "MSH-1/MSH-2 do not hold valid delimiters", "MSH^1^2")
    for bad in ("\x0b", "\x1c"):
        if bad in text:
            raise rejected(DATA_TYPE_ERROR, "the message contains MLLP framing bytes")
    d = Delimiters(field=fs, component=enc[0], repetition=enc[1], escape=enc[2], subcomponent=enc[3])
    for seg_text in text.split("\r"):
        name = seg_text[:3]
        if not re.fullmatch(r"[A-Z][A-Z0-9]{2}", name) or (len(seg_text) > 3 and seg_text[3] != fs):
            raise rejected(SEGMENT_SEQUENCE_ERROR, f"not a segment: {seg_text[:20]!r}")
    try:
        parsed = hl7.parse(text)
    except Exception as e:  # python-hl7 raises several types on malformed input
        raise rejected(DATA_TYPE_ERROR, f"cannot parse the message: {e}") from e
    msh = parsed.segment("MSH")

    def h(n: int, comp: int = 1) -> str:
        return field_value(msh, n, d, codec, comp)

    msg = Message(
        raw=raw, text=text, parsed=parsed, charset=charset, codec=codec, delimiters=d,
        message_type=h(9, 1).strip().upper(), trigger=h(9, 2).strip().upper(), structure=h(9, 3).strip().upper(),
        control_id=h(10).strip(), processing_id=h(11).strip(), version=h(12).strip(),
        sending_application=h(3).strip(), sending_facility=h(4).strip(),
        receiving_application=h(5).strip(), receiving_facility=h(6).strip(), accept_ack_type=h(15).strip().upper(),
    )
    return msg


def check_header(msg: Message) -> None:
    """The header fields every message needs; AR when missing or not supported."""
    if not msg.message_type:
        raise rejected(REQUIRED_FIELD_MISSING, "MSH-9 (message type) is empty", "MSH^1^9")
    if not msg.control_id:
        raise rejected(REQUIRED_FIELD_MISSING, "MSH-10 (message control ID) is empty", "MSH^1^10")
    if not msg.version:
        raise rejected(REQUIRED_FIELD_MISSING, "MSH-12 (version ID) is empty", "MSH^1^12")
    if msg.version not in SUPPORTED_VERSIONS:
        raise rejected(UNSUPPORTED_VERSION, f"HL7 version {msg.version!r} is not supported (2.3 to 2.8)", "MSH^1^12")
    if msg.processing_id and msg.processing_id[:1] not in ("P", "T", "D"):
        raise rejected(UNSUPPORTED_PROCESSING_ID, f"processing ID {msg.processing_id!r} is not P, T or D", "MSH^1^11")


# ---------------------------------------------------------------------------------------------------------------------
# ACK

_ack_counter = itertools.count(1)
_ACK_PREFIX = secrets.token_hex(3).upper()


def hl7_timestamp(at: datetime | None = None) -> str:
    return (at or datetime.now().astimezone()).strftime("%Y%m%d%H%M%S%z")


def _modern(version: str) -> bool:
    """v2.5 and later: ERR-2 (location), ERR-3 (code), ERR-4 (severity); before: ERR-1 (code and location)."""
    try:
        major, minor = (int(p) for p in version.split(".")[:2])
    except ValueError:
        return True
    return (major, minor) >= (2, 5)


def salvage_header(raw: bytes) -> dict[str, str]:
    """MSH fields of a message that did not parse (or was refused unread): {} when there is no MSH."""
    try:
        hf = [f.decode("latin-1") for f in header_fields(raw.strip(b"\r\n\t "))]
    except HL7Error:
        return {}
    comp = hf[2][:1] if len(hf) > 2 and hf[2] else "^"

    def at(n: int, c: int = 0) -> str:
        parts = hf[n].split(comp) if len(hf) > n else [""]
        return parts[c].strip() if c < len(parts) else ""

    kind = at(9).upper()
    trigger = at(9, 1).upper()
    return dict(sending_application=at(3), sending_facility=at(4), receiving_application=at(5),
                receiving_facility=at(6), message_type=f"{kind}^{trigger}" if trigger else kind, control_id=at(10),
                version=at(12))


def build_ack(
    code: str,
    msg: Message | None,
    *,
    raw: bytes = b"",
    err: HL7Error | None = None,
    application: str = "OPENPACS",
    facility: str = "",
) -> bytes:
    """The ACK for ``msg`` (or for raw bytes that did not parse: the header is salvaged when it can be), encoded in
    the message's character set and with its version and delimiters."""
    d = msg.delimiters if msg is not None else Delimiters()
    codec = msg.codec if msg is not None else "ascii"
    charset = msg.charset if msg is not None else ""
    version = msg.version if msg is not None and msg.version else "2.5"
    control_id = msg.control_id if msg is not None else ""
    trigger = msg.trigger if msg is not None else ""
    send_app = msg.sending_application if msg is not None else ""
    send_fac = msg.sending_facility if msg is not None else ""
    recv_app = msg.receiving_application if msg is not None and msg.receiving_application else application
    recv_fac = msg.receiving_facility if msg is not None and msg.receiving_facility else facility
    if msg is None and raw:  # whatever of the header we can read, so that the sender can match the AR
        h = salvage_header(raw)
        if h:
            send_app, send_fac, control_id = h["sending_application"], h["sending_facility"], h["control_id"]
            recv_app, recv_fac = h["receiving_application"] or application, h["receiving_facility"] or facility
            version = h["version"] if h["version"] in SUPPORTED_VERSIONS else version
    version = version if version in SUPPORTED_VERSIONS else "2.5"
    f, c = d.field, d.component
    enc = d.component + d.repetition + d.escape + d.subcomponent
    ack_type = f"ACK{c}{trigger}{c}ACK" if trigger else "ACK"
    msh = [
        "MSH", enc, escape(recv_app, d), escape(recv_fac, d), escape(send_app, d), escape(send_fac, d),
        hl7_timestamp(), "", ack_type, f"{_ACK_PREFIX}{next(_ack_counter)}", "P", version,
    ]
    if charset:
        msh += [""] * 5 + [charset]
    segments = [f.join(msh)]
    text = escape(err.text, d)[:200] if err is not None else ""
    modern = _modern(version)
    msa = ["MSA", code, escape(control_id, d)]
    if text and not modern:
        msa.append(text)
    segments.append(f.join(msa))
    if err is not None:
        loc = err.location.split("^") if err.location else []
        loc_field = c.join(loc)
        code_text = _CODE_TEXT.get(err.code, "")
        if modern:
            cwe = c.join([err.code, code_text, "HL70357"])
            segments.append(f.join(["ERR", "", loc_field, cwe, "E", "", "", "", text]))
        else:
            s = d.subcomponent
            segments.append(f.join(["ERR", c.join([*(loc + [""] * 3)[:3], s.join([err.code, code_text, "HL70357"])])]))
    return ("\r".join(segments) + "\r").encode(codec if codec != "ascii" else "ascii", "replace")


def ack_code_of(ack: bytes) -> str:
    """MSA-1 of an ACK we built (for the log)."""
    m = re.search(rb"\rMSA.(A[AER]|C[AER])", ack)
    return m.group(1).decode() if m else ""
