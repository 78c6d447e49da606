"""Orders: ORM^O01 (v2.3-2.4) and OMI^O23 (v2.5+) mapped onto services.worklist. Translation only.

An order group is an ORC with what follows it (OBR, TQ1, ZDS, IPC). ORC-1 (order control): NW new order and XO
change create or update its scheduled procedure steps; CA (and OC) cancel, DC (and OD) discontinue; SC sets the
status of ORC-5 (SC scheduled, IP in progress, CM completed, CA cancelled, DC discontinued).

Field mapping (IHE RAD-4/RAD-13, as RIS interface engines send it):
  ORC-2 / OBR-2 placer order number, ORC-3 / OBR-3 filler order number (the order's key: filler, else placer)
  OBR-18 accession number, OBR-19 requested procedure ID, OBR-20 scheduled procedure step ID,
  OBR-21 scheduled station AE title, OBR-24 modality, OBR-4 scheduled protocol (code^text^scheme) and step
  description, OBR-44 (else OBR-4) requested procedure code and description, OBR-31 reason, OBR-16 (else ORC-12)
  requesting physician, OBR-34 technician as scheduled performing physician, ORC-7.4 / OBR-27.4 / TQ1-7 start,
  ORC-7.6 / OBR-27.6 / TQ1-9 priority, ZDS-1 Study Instance UID, PV1-8 referring physician, PV1-19 admission ID,
  PV1-3 current location, AL1-3 allergies.
  OMI IPC (one per step): IPC-1 accession, IPC-2 requested procedure ID, IPC-3 Study Instance UID, IPC-4 step ID,
  IPC-5 modality, IPC-6 protocol code, IPC-7 station name, IPC-8 location, IPC-9 station AE title.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..services import worklist as wl
from . import message as m
from .adt import demographics
from .dispatch import Apply, Dispatcher, Outcome

_PRIORITY = {"S": "STAT", "A": "HIGH", "T": "HIGH", "R": "ROUTINE", "P": "MEDIUM", "C": "MEDIUM"}
_SC_STATUS = {"SC": wl.SCHEDULED, "IP": wl.IN_PROGRESS, "CM": wl.COMPLETED, "CA": wl.CANCELLED,
              "DC": wl.DISCONTINUED, "HD": wl.SCHEDULED}
_CONTROLS = ("NW", "XO", "CA", "OC", "DC", "OD", "SC")


def register(dispatcher: Dispatcher, ctx: Any) -> None:
    service = wl.for_context(ctx)
    dispatcher.register("ORM", ["O01"], lambda job: order(job, service))
    dispatcher.register("OMI", ["O23"], lambda job: order(job, service))


@dataclass
class _Group:
    orc: Any
    seq: int
    obr: Any = None
    tq1: Any = None
    zds: Any = None
    ipcs: list[Any] = field(default_factory=list)


def _groups(msg: m.Message) -> list[_Group]:
    groups: list[_Group] = []
    for seg in msg.parsed:
        name = str(seg[0])
        if name == "ORC":
            groups.append(_Group(seg, len(groups) + 1))
        elif name in ("OBR", "TQ1", "ZDS", "IPC"):
            if not groups:
                raise m.error(m.SEGMENT_SEQUENCE_ERROR, f"{name} before the first ORC", name)
            g = groups[-1]
            if name == "IPC":
                g.ipcs.append(seg)
            elif getattr(g, name.lower()) is None:
                setattr(g, name.lower(), seg)
    if not groups:
        raise m.error(m.SEGMENT_SEQUENCE_ERROR, f"{msg.type_trigger} has no ORC segment", "ORC")
    return groups


def _code(msg: m.Message, seg: Any, n: int) -> tuple[list[str], str]:
    """CE/CWE: ([value, scheme, meaning], text) of the first repetition."""
    value, text, scheme = msg.value(seg, n, 1).strip(), msg.value(seg, n, 2).strip(), msg.value(seg, n, 3).strip()
    return ([value, scheme, text] if value else []), text or value


def _xcn(msg: m.Message, seg: Any, n: int) -> str | None:
    """XCN (ID ^ family ^ given ^ middle ^ suffix ^ prefix ^ degree) as PN family^given^middle^prefix^suffix."""
    reps = msg.reps(seg, n) if seg is not None else []
    if not reps:
        return None
    c = [x[0].strip() if x else "" for x in reps[0]] + [""] * 7
    return "^".join([c[1], c[2], c[3], c[5], c[4]]).rstrip("^") or None


def _ndl(msg: m.Message, seg: Any, n: int) -> str | None:
    """NDL: the name (CNN, in the subcomponents of the first component: ID & family & given & middle & suffix &
    prefix) as PN."""
    reps = msg.reps(seg, n) if seg is not None else []
    if not reps or not reps[0]:
        return None
    s = [x.strip() for x in reps[0][0]] + [""] * 6
    return "^".join([s[1], s[2], s[3], s[5], s[4]]).rstrip("^") or None


def _ts(value: str, where: str) -> tuple[str | None, str | None]:
    value = value.strip()
    if not value:
        return None, None
    digits = value.split("+")[0].split("-")[0].split(".")[0]
    if not digits.isdigit() or len(digits) < 8:
        raise m.error(m.DATA_TYPE_ERROR, f"{where} {value!r} is not a date/time YYYYMMDD[HHMM[SS]]", where)
    time = digits[8:14]
    return digits[:8], (time.ljust(6, "0") if time else None)


def _first(*values: str) -> str:
    return next((v.strip() for v in values if v and v.strip()), "")


def _pv1(msg: m.Message) -> dict[str, Any]:
    pv1 = msg.segment("PV1")
    out: dict[str, Any] = {}
    if pv1 is None:
        return out
    out["referring_physician_name"] = _xcn(msg, pv1, 8)
    loc = [x for x in (msg.value(pv1, 3, 1), msg.value(pv1, 3, 2), msg.value(pv1, 3, 3)) if x.strip()]
    out["current_patient_location"] = "^".join(loc) or None
    out["admission_id"] = msg.value(pv1, 19).strip() or None
    return out


def _patient(msg: m.Message) -> dict[str, Any]:
    pid = msg.segment("PID")
    if pid is None:
        raise m.error(m.SEGMENT_SEQUENCE_ERROR, f"{msg.type_trigger} has no PID segment", "PID")
    demo = demographics(msg, pid)
    allergies = [x for al1 in msg.segments("AL1") for x in [_code(msg, al1, 3)[1]] if x]
    return {"patient_id": demo.identifier.id, "issuer_of_patient_id": demo.identifier.issuer or None,
            "patient_name": demo.name or None, "patient_birth_date": demo.birth_date or None,
            "patient_sex": demo.sex or None, "allergies": "; ".join(allergies)[:64] or None, **_pv1(msg)}


def _steps(msg: m.Message, g: _Group, common: dict[str, Any]) -> list[dict[str, Any]]:
    obr, orc = g.obr, g.orc
    if obr is None:
        raise m.error(m.SEGMENT_SEQUENCE_ERROR, f"order {g.seq} (ORC) has no OBR segment", f"ORC^{g.seq}")
    protocol, protocol_text = _code(msg, obr, 4)
    requested, requested_text = _code(msg, obr, 44)
    if not requested:
        requested, requested_text = protocol, protocol_text
    reason = _code(msg, obr, 31)[1]
    start = _first(msg.value(g.tq1, 7) if g.tq1 is not None else "", msg.value(orc, 7, 4), msg.value(obr, 27, 4))
    date, time = _ts(start, f"TQ1^{g.seq}^7" if g.tq1 is not None else f"ORC^{g.seq}^7")
    prio = _first(msg.value(g.tq1, 9) if g.tq1 is not None else "", msg.value(orc, 7, 6), msg.value(obr, 27, 6))
    base: dict[str, Any] = {
        **common,
        "accession_number": msg.value(obr, 18).strip() or None,
        "requested_procedure_id": msg.value(obr, 19).strip() or None,
        "requested_procedure_description": requested_text[:64] or None,
        "requested_procedure_code": requested,
        "requested_procedure_priority": _PRIORITY.get(prio.upper()[:1]) if prio else None,
        "reason_for_the_requested_procedure": reason[:64] or None,
        "study_instance_uid": (msg.value(g.zds, 1).strip() if g.zds is not None else "") or None,
        "scheduled_procedure_step_id": msg.value(obr, 20).strip() or None,
        "scheduled_procedure_step_description": protocol_text[:64] or None,
        "scheduled_protocol_code": protocol,
        "modality": msg.value(obr, 24).strip().upper() or None,
        "scheduled_station_ae_title": msg.value(obr, 21).strip() or None,
        "scheduled_procedure_step_start_date": date,
        "scheduled_procedure_step_start_time": time,
        "scheduled_performing_physician_name": _ndl(msg, obr, 34),
        "requesting_physician": _xcn(msg, obr, 16) or _xcn(msg, orc, 12),
    }
    if not g.ipcs:
        return [base]
    steps = []
    for ipc in g.ipcs:
        code, code_text = _code(msg, ipc, 6)
        step = dict(base)
        for key, value in (("accession_number", msg.value(ipc, 1)), ("requested_procedure_id", msg.value(ipc, 2)),
                           ("study_instance_uid", msg.value(ipc, 3)),
                           ("scheduled_procedure_step_id", msg.value(ipc, 4)), ("modality", msg.value(ipc, 5).upper()),
                           ("scheduled_station_name", msg.value(ipc, 7)),
                           ("scheduled_procedure_step_location", msg.value(ipc, 8)),
                           ("scheduled_station_ae_title", msg.value(ipc, 9))):
            if value.strip():
                step[key] = value.strip()
        if code:
            step["scheduled_protocol_code"] = code
            step["scheduled_procedure_step_description"] = code_text[:64]
        steps.append(step)
    return steps


def order(job: Apply, service: wl.WorklistService) -> Outcome:
    msg = job.msg
    common = _patient(msg)
    details: list[str] = []
    for g in _groups(msg):
        control = msg.value(g.orc, 1).strip().upper()
        if control not in _CONTROLS:
            raise m.error(m.TABLE_VALUE_NOT_FOUND, f"ORC-1 (order control) {control!r} is not supported "
                          f"({', '.join(_CONTROLS)})", f"ORC^{g.seq}^1")
        ref = wl.OrderRef(placer=_first(msg.value(g.orc, 2), msg.value(g.obr, 2) if g.obr is not None else ""),
                          filler=_first(msg.value(g.orc, 3), msg.value(g.obr, 3) if g.obr is not None else ""),
                          accession=msg.value(g.obr, 18).strip() if g.obr is not None else "")
        if not (ref.placer or ref.filler):
            raise m.error(m.REQUIRED_FIELD_MISSING, "ORC-2/ORC-3 (placer/filler order number) are empty",
                          f"ORC^{g.seq}^2")
        try:
            if control in ("NW", "XO"):
                steps = _steps(msg, g, common)
                if not any(s.get("accession_number") for s in steps):
                    raise m.error(m.REQUIRED_FIELD_MISSING, "OBR-18 (accession number) is empty",
                                  f"OBR^{g.seq}^18")
                ids = service.schedule(job.conn, ref, steps, control_id=msg.control_id)
                details.append(f"{control} {ref}: {len(ids)} step(s) scheduled")
            else:
                if control == "SC":
                    code = msg.value(g.orc, 5).strip().upper()
                    if code not in _SC_STATUS:
                        raise m.error(m.TABLE_VALUE_NOT_FOUND, f"ORC-5 (order status) {code!r} is not one of "
                                      f"{', '.join(_SC_STATUS)}", f"ORC^{g.seq}^5")
                    status = _SC_STATUS[code]
                else:
                    status = wl.CANCELLED if control in ("CA", "OC") else wl.DISCONTINUED
                n = service.set_order_status(job.conn, ref, status, msg.control_id)
                details.append(f"{control} {ref}: {n} step(s) {status.lower()}")
        except wl.WorklistError as e:
            code = m.UNKNOWN_KEY if e.kind == "unknown" else m.DATA_TYPE_ERROR
            raise m.error(code, str(e), f"ORC^{g.seq}^{3 if ref.filler else 2}") from e
    return Outcome(patient_id=common["patient_id"], detail="; ".join(details))
