"""Outbound HL7 to the RIS: order status updates when a modality's procedure step starts and ends (IHE SWF).

When ``ris_hl7 = "mllp://host:port"`` is set, every MPPS N-CREATE (IN PROGRESS) and final N-SET (COMPLETED,
DISCONTINUED) queues one message per order it reports on: ORM^O01 (HL7 v2.3–2.4) or OMI^O23 (v2.5 and later)
with ORC-1 ``SC`` and ORC-5 ``IP`` / ``CM`` / ``DC``. The message is queued as an ``hl7_out`` job in the same
transaction as the MPPS change, so it exists exactly when the change does, survives restarts, and is retried with
the queue's backoff while the RIS is down or does not answer AA/CA. Messages to one RIS go out in the order they were
queued: a job waits while an older one to the same RIS has not ended.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import secrets
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

from pydicom import Dataset

from ..services.jobs import Deferred, JobContext, JobQueue
from .message import escape, hl7_timestamp
from .server import CR, FS, frame

log = logging.getLogger("openpacs.hl7.outbound")

KIND = "hl7_out"
ORDER_STATUS = {"IN PROGRESS": "IP", "COMPLETED": "CM", "DISCONTINUED": "DC"}  # HL7 table 0038
_counter = itertools.count(1)
_PREFIX = "OP" + secrets.token_hex(3).upper()


def parse_mllp_url(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme != "mllp" or not parts.hostname or not parts.port:
        raise ValueError(f"ris_hl7 must be mllp://host:port, not {url!r}")
    return parts.hostname, parts.port


def _modern(version: str) -> bool:
    m = re.match(r"(\d+)\.(\d+)", version)
    return m is None or (int(m.group(1)), int(m.group(2))) >= (2, 5)


def _dicom_datetime(date: str, time: str) -> str:
    return (date + time.split(".")[0])[:14] if date else ""


def _text(ds: Dataset, keyword: str) -> str:
    v = ds.get(keyword, "")
    return "" if v is None else str(v)


def xpn(dicom_name: str) -> str:
    """A DICOM PN (family^given^middle^prefix^suffix, alphabetic group) as an HL7 XPN (family^given^middle^suffix^
    prefix), each component escaped."""
    parts = (dicom_name.split("=")[0].split("^") + [""] * 5)[:5]
    family, given, middle, prefix, suffix = (escape(p) for p in parts)
    return "^".join([family, given, middle, suffix, prefix]).rstrip("^")


def status_message(settings: Any, mpps: Dataset, status: str, step: Any) -> tuple[str, str]:
    """The message reporting ``status`` of the MPPS for one scheduled step (a worklist row): (text, control ID).
    The patient is the order's; the times are the MPPS's."""
    modern = _modern(settings.ris_hl7_version)
    control = f"{_PREFIX}{next(_counter)}"

    def e(v: Any) -> str:
        return escape("" if v is None else str(v))

    code = ORDER_STATUS[status]
    started = _dicom_datetime(_text(mpps, "PerformedProcedureStepStartDate"),
                              _text(mpps, "PerformedProcedureStepStartTime"))
    ended = _dicom_datetime(_text(mpps, "PerformedProcedureStepEndDate"),
                            _text(mpps, "PerformedProcedureStepEndTime"))
    pid3 = e(step.patient_id) + (f"^^^{e(step.issuer_of_patient_id)}" if step.issuer_of_patient_id else "")
    name = xpn(step.patient_name or _text(mpps, "PatientName"))
    placer, filler = e(step.placer_order_number), e(step.filler_order_number)
    proc = "^".join([e(step.requested_procedure_id), e(step.requested_procedure_description)])
    msh = ["MSH", "^~\\&", e(settings.aet), "", e(settings.ris_hl7_application), e(settings.ris_hl7_facility),
           hl7_timestamp(), "", "OMI^O23^OMI_O23" if modern else "ORM^O01", control, "P", settings.ris_hl7_version]
    segments = [
        "|".join(msh),
        "|".join(["PID", "1", "", pid3, "", name, "", e(step.patient_birth_date), e(step.patient_sex)]),
        "|".join(["ORC", "SC", placer, filler, "", code, "", "", "", hl7_timestamp()]),
    ]
    obr = ["OBR", "1", placer, filler, proc, "", "", started, ended if code != "IP" else ""]
    if modern:
        segments.append("|".join(["TQ1", "1", "", "", "", "", "", started]))
        segments.append("|".join(obr))
        segments.append("|".join(["IPC", e(step.accession_number), e(step.requested_procedure_id),
                                  e(step.study_instance_uid or _text(mpps, "StudyInstanceUID")),
                                  e(step.scheduled_procedure_step_id), e(step.modality)]))
    else:  # OBR-18/19/20: accession, requested procedure ID, scheduled procedure step ID (IHE RAD-TF-2 4.4)
        obr += [""] * (17 - len(obr) + 1) + [e(step.accession_number), e(step.requested_procedure_id),
                                              e(step.scheduled_procedure_step_id), "", "", "", e(step.modality)]
        segments.append("|".join(obr))
    text = "\r".join(segments) + "\r"
    if not text.isascii():
        segments[0] += "|" * 6 + "UNICODE UTF-8"  # MSH-18
        text = "\r".join(segments) + "\r"
    return text, control


class RisOutbound:
    """Queues the status messages of an MPPS change inside the worklist's transaction."""

    def __init__(self, settings: Any, queue: JobQueue) -> None:
        self.settings = settings
        self.queue = queue
        parse_mllp_url(settings.ris_hl7)

    def report(self, conn: Any, mpps_uid: str, mpps: Dataset, status: str, steps: Iterable[Any]) -> int:
        """One job per order the MPPS names (several steps of one order give one message). Returns how many."""
        if status not in ORDER_STATUS:
            return 0
        seen: set[tuple[str, str, str]] = set()
        n = 0
        for step in steps:
            key = (step.placer_order_number or "", step.filler_order_number or "", step.accession_number or "")
            if key in seen:
                continue
            seen.add(key)
            text, control = status_message(self.settings, mpps, status, step)
            self.queue.submit_in(conn, KIND, {
                "message": text, "control_id": control, "mpps": mpps_uid, "status": ORDER_STATUS[status],
                "accession": step.accession_number or "", "placer": step.placer_order_number or "",
            }, destination=self.settings.ris_hl7, priority=5)
            n += 1
        if not n:
            log.info("MPPS %s (%s) names no order on the worklist: nothing to tell the RIS", mpps_uid, status)
        return n


def msa_code(ack: bytes) -> tuple[str, str]:
    """MSA-1 and the error text (MSA-3 or ERR-8) of an ACK."""
    text = ack.decode("utf-8", "replace")
    code, err = "", ""
    for seg in re.split(r"[\r\n]+", text):
        if len(seg) < 4:
            continue
        f = seg.split(seg[3])
        if f[0] == "MSA":
            code = f[1] if len(f) > 1 else ""
            err = f[3] if len(f) > 3 else err
        elif f[0] == "ERR" and len(f) > 8 and f[8]:
            err = f[8]
    return code, err


class RisSender:
    """The ``hl7_out`` job runner: one MLLP exchange, done when the RIS answers AA (or CA)."""

    def __init__(self, timeout: float = 30.0) -> None:
        self.timeout = timeout

    async def __call__(self, jc: JobContext) -> None:
        job = jc.job
        older = await asyncio.to_thread(jc.queue.older_unfinished, job)
        if older is not None:
            raise Deferred(1.0, f"waiting for job {older}, an earlier message to the same RIS")
        host, port = parse_mllp_url(job.destination or "")
        message = str(job.payload["message"]).encode("utf-8")
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), self.timeout)
        except (OSError, TimeoutError) as exc:
            raise ConnectionError(f"RIS {host}:{port} unreachable: {exc}") from exc
        try:
            writer.write(frame(message))
            await writer.drain()
            raw = await asyncio.wait_for(reader.readuntil(FS + CR), self.timeout)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            raise ConnectionError(f"RIS {host}:{port} sent no ACK: {exc!r}") from exc
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass
        code, err = msa_code(raw.strip(b"\x0b\x1c\r\n"))
        if code not in ("AA", "CA"):
            raise RuntimeError(f"RIS answered {code or 'no MSA'} to {job.payload.get('control_id')}: {err}".strip())
        log.info("RIS acknowledged %s (%s %s)", job.payload.get("control_id"), job.payload.get("status"),
                 job.payload.get("accession"))
