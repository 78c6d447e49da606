"""Reports: ORU^R01 mapped onto services.reports (kept, then stored as Basic Text SR with its study). Translation only.

Each OBR starts a report: the accession number from OBR-18 (else the filler order number OBR-3, else the placer
order number OBR-2), status OBR-25, principal result interpreter OBR-32 (NDL), observation time OBR-7. Its text is
the OBX segments after it with a text value type (TX, FT, ST, CE/CWE give their text), each repetition a line, HL7
escapes and formatting (``\\.br\\``) decoded; Z-segments and NTE are ignored.
"""

from __future__ import annotations

from typing import Any

from ..services import reports as rp
from . import message as m
from .dispatch import Apply, Dispatcher, Outcome
from .orders import _ndl

_TEXT_TYPES = ("TX", "FT", "ST", "TEXT", "CE", "CWE", "")


def register(dispatcher: Dispatcher, ctx: Any) -> None:
    service = rp.for_context(ctx)
    dispatcher.register("ORU", ["R01"], lambda job: report(job, service))


def _obx_text(msg: m.Message, obx: Any) -> list[str]:
    vtype = msg.value(obx, 2).strip().upper()
    if vtype not in _TEXT_TYPES:
        return []
    lines = []
    for rep in msg.reps(obx, 5):
        if vtype in ("CE", "CWE"):
            value = rep[1][0] if len(rep) > 1 and rep[1] and rep[1][0] else (rep[0][0] if rep and rep[0] else "")
        else:  # a text value holds no components: a component separator in it was text
            value = msg.delimiters.component.join(msg.delimiters.subcomponent.join(c) for c in rep)
        lines.append(value)
    return lines


def report(job: Apply, service: rp.ReportService) -> Outcome:
    msg = job.msg
    pid = msg.segment("PID")
    patient_id = msg.value(pid, 3).strip() if pid is not None else ""
    found: list[tuple[Any, int, list[str]]] = []
    seq = 0
    for seg in msg.parsed:
        name = str(seg[0])
        if name == "OBR":
            seq += 1
            found.append((seg, seq, []))
        elif name == "OBX" and found:
            found[-1][2].extend(_obx_text(msg, seg))
    if not found:
        raise m.error(m.SEGMENT_SEQUENCE_ERROR, "ORU^R01 has no OBR segment", "OBR")
    sender = "/".join(x for x in (msg.sending_application, msg.sending_facility) if x)
    kept = []
    for obr, n, lines in found:
        accession = next((v for v in (msg.value(obr, 18).strip(), msg.value(obr, 3).strip(),
                                      msg.value(obr, 2).strip()) if v), "")
        if not accession:
            raise m.error(m.REQUIRED_FIELD_MISSING, "OBR-18 (accession number) and OBR-2/3 are empty",
                          f"OBR^{n}^18")
        text = "\n".join(lines).replace("\r", "\n").strip()
        if not text:
            raise m.error(m.REQUIRED_FIELD_MISSING, "the report has no text OBX segment", f"OBX^{n}^5")
        status = msg.value(obr, 25).strip().upper() or "F"
        observer = _ndl(msg, obr, 32) or ""
        rep = rp.Report(accession_number=accession, text=text, status=status, observer=observer,
                        observed_at=msg.value(obr, 7).strip()[:14], patient_id=patient_id, sender=sender,
                        control_id=msg.control_id)
        service.keep(job.conn, rep)
        kept.append(accession)
    for accession in dict.fromkeys(kept):
        job.after_commit(lambda a=accession: _attach(service, a))  # type: ignore[misc]
    return Outcome(patient_id=patient_id, detail=f"{len(kept)} report(s) for {', '.join(dict.fromkeys(kept))}")


def _attach(service: rp.ReportService, accession: str) -> None:
    service.attach_pending(accession)
