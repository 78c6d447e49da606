"""ADT (patient administration) messages mapped onto services.patients: A01/A04/A05/A08 create or update,
A40 merge, A47 change identifier. Translation only: the rules live in the service."""

from __future__ import annotations

import re
from typing import Any

from ..services import worklist as wl
from ..services.patients import Demographics, PatientError, PatientIdentifier, PatientService
from . import message as m
from .dispatch import Apply, Dispatcher, Outcome

UPDATE_TRIGGERS = ("A01", "A04", "A05", "A08")
_SEX = {"M": "M", "F": "F", "O": "O", "A": "O", "N": "O", "X": "O", "U": ""}
_DELETE = '""'


def register(dispatcher: Dispatcher, ctx: Any) -> None:
    patients = getattr(ctx, "patients", None) or PatientService(ctx.index)
    worklist = wl.for_context(ctx)  # the worklist entries of a patient follow ADT too
    dispatcher.register("ADT", UPDATE_TRIGGERS, lambda job: update(job, patients, worklist))
    dispatcher.register("ADT", ["A40"], lambda job: merge(job, patients, worklist))
    dispatcher.register("ADT", ["A47"], lambda job: change_identifier(job, patients, worklist))


def _cx(comps: m.Components) -> PatientIdentifier:
    """CX: ID ^ check digit ^ scheme ^ assigning authority (HD: namespace & universal ID & type) ^ type code."""
    def c(i: int, s: int = 1) -> str:
        return comps[i - 1][s - 1].strip() if i <= len(comps) and s <= len(comps[i - 1]) else ""

    return PatientIdentifier(c(1), c(4, 1) or c(4, 2), c(5))


def identifiers(msg: m.Message, seg: Any, n: int, segment: str, seq: int) -> list[PatientIdentifier]:
    ids = [_cx(rep) for rep in msg.reps(seg, n)]
    ids = [i for i in ids if i.id and i.id != _DELETE]
    if not ids:
        raise m.error(m.REQUIRED_FIELD_MISSING, f"{segment}-{n} (patient identifier) is empty",
                      f"{segment}^{seq}^{n}")
    return ids


def person_name(msg: m.Message, seg: Any, n: int = 5) -> str | None:
    """XPN (family & own surname ^ given ^ middle ^ suffix ^ prefix ^ degree ^ type) as DICOM PN
    family^given^middle^prefix^suffix; the legal name (type L) when several repeat."""
    reps = msg.reps(seg, n)
    if not reps:
        return None
    chosen = reps[0]
    for rep in reps:
        if len(rep) >= 7 and rep[6] and rep[6][0] == "L":
            chosen = rep
            break

    def c(i: int) -> str:
        return chosen[i - 1][0].strip() if i <= len(chosen) and chosen[i - 1] else ""

    if c(1) == _DELETE and len(chosen) == 1:
        return ""
    parts = [c(1), c(2), c(3), c(5), c(4)]
    if c(6):  # degree (MD, PhD) goes with the suffix in DICOM
        parts[4] = f"{parts[4]} {c(6)}".strip()
    return "^".join(parts).rstrip("^")


def _birth(msg: m.Message, seg: Any, seq: int) -> tuple[str | None, str | None]:
    raw = msg.value(seg, 7).strip()
    if not raw:
        return None, None
    if raw == _DELETE:
        return "", ""
    digits = re.match(r"^(\d{4}(\d{2}(\d{2})?)?)(\d{2,6})?", raw)
    if not digits or len(digits.group(1)) != 8:
        raise m.error(m.DATA_TYPE_ERROR, f"PID-7 (date of birth) {raw!r} is not a date YYYYMMDD", f"PID^{seq}^7")
    time_part = digits.group(4) or None
    return digits.group(1), time_part


def _sex(msg: m.Message, seg: Any, seq: int) -> str | None:
    raw = msg.value(seg, 8).strip().upper()
    if not raw:
        return None
    if raw == _DELETE:
        return ""
    if raw not in _SEX:
        raise m.error(m.TABLE_VALUE_NOT_FOUND, f"PID-8 (administrative sex) {raw!r} is not in table 0001",
                      f"PID^{seq}^8")
    return _SEX[raw]


def demographics(msg: m.Message, seg: Any, seq: int = 1) -> Demographics:
    ids = identifiers(msg, seg, 3, "PID", seq)
    birth_date, birth_time = _birth(msg, seg, seq)
    return Demographics(identifier=ids[0], other_ids=ids[1:],
                        name=person_name(msg, seg), birth_date=birth_date, birth_time=birth_time,
                        sex=_sex(msg, seg, seq))


def _pid(msg: m.Message) -> Any:
    seg = msg.segment("PID")
    if seg is None:
        raise m.error(m.SEGMENT_SEQUENCE_ERROR, f"{msg.type_trigger} has no PID segment", "PID")
    return seg


def _audit(job: Apply, changes: list[Any]) -> None:
    audit = getattr(job.ctx, "audit", None)
    if audit is None:
        return
    msg = job.msg
    user = "/".join(x for x in (msg.sending_application, msg.sending_facility) if x) or "HL7"
    for ch in changes:
        def record(ch: Any = ch) -> None:
            audit.record("PatientRecord", action=ch.action, user=user, protocol="HL7",
                         source_address=job.peer, patient_id=ch.patient_id, patient_name=ch.name,
                         study_uids=ch.study_uids, detail=f"{msg.type_trigger} {msg.control_id}: {ch.detail}")
        job.after_commit(record)


def update(job: Apply, patients: PatientService, worklist: wl.WorklistService | None = None) -> Outcome:
    demo = demographics(job.msg, _pid(job.msg))
    ch = patients.upsert(job.conn, demo, f"{job.msg.type_trigger} {job.msg.control_id}")
    if worklist is not None:
        worklist.follow_patient(job.conn, demo)
    _audit(job, [ch])
    return Outcome(patient_id=demo.identifier.id, detail=ch.detail)


def _pairs(msg: m.Message) -> list[tuple[Any, Any, int]]:
    """(PID, MRG, sequence) pairs: A40/A47 may carry several patient groups."""
    out: list[tuple[Any, Any, int]] = []
    pid = None
    seq = 0
    mrg_seq = 0
    for seg in msg.parsed:
        name = str(seg[0])
        if name == "PID":
            pid = seg
            seq += 1
        elif name == "MRG":
            mrg_seq += 1
            if pid is None:
                raise m.error(m.SEGMENT_SEQUENCE_ERROR, "MRG without a PID before it", f"MRG^{mrg_seq}")
            out.append((pid, seg, mrg_seq))
            pid = None
    if not out:
        raise m.error(m.SEGMENT_SEQUENCE_ERROR, f"{msg.type_trigger} needs a PID and an MRG segment", "MRG")
    return out


def merge(job: Apply, patients: PatientService, worklist: wl.WorklistService | None = None) -> Outcome:
    changes = []
    first = ""
    for pid, mrg, seq in _pairs(job.msg):
        surviving = demographics(job.msg, pid, seq)
        prior = identifiers(job.msg, mrg, 1, "MRG", seq)[0]
        try:
            changes += patients.merge(job.conn, surviving, prior, f"{job.msg.type_trigger} {job.msg.control_id}")
        except PatientError as e:
            raise m.error(m.UNKNOWN_KEY if e.kind == "unknown" else m.DUPLICATE_KEY, str(e), f"MRG^{seq}^1") from e
        if worklist is not None:
            worklist.follow_patient(job.conn, surviving, prior)
            worklist.follow_patient(job.conn, surviving)
        first = first or surviving.identifier.id
    _audit(job, changes)
    return Outcome(patient_id=first, detail="; ".join(c.detail for c in changes))


def change_identifier(job: Apply, patients: PatientService, worklist: wl.WorklistService | None = None) -> Outcome:
    changes = []
    first = ""
    for pid, mrg, seq in _pairs(job.msg):
        new = demographics(job.msg, pid, seq)
        prior = identifiers(job.msg, mrg, 1, "MRG", seq)[0]
        try:
            changes.append(patients.change_identifier(job.conn, new, prior,
                                                      f"{job.msg.type_trigger} {job.msg.control_id}"))
        except PatientError as e:
            loc = f"MRG^{seq}^1" if e.kind == "unknown" else f"PID^{seq}^3"
            raise m.error(m.UNKNOWN_KEY if e.kind == "unknown" else m.DUPLICATE_KEY, str(e), loc) from e
        if worklist is not None:
            worklist.follow_patient(job.conn, new, prior)
        first = first or new.identifier.id
    _audit(job, changes)
    return Outcome(patient_id=first, detail="; ".join(c.detail for c in changes))
