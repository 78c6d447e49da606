"""Reports (ORU^R01) stored with their study as DICOM Basic Text SR through the one ingest path, so that C-FIND,
QIDO-RS, WADO and the viewer see them like any instance. hl7/reports.py only translates the message.

A report is first kept in ``pending_reports`` (in the HL7 message's transaction). It is attached once a study with
its accession number exists: right after the message commits if the study is there, else when an instance of such a
study is stored (ingest's ``on_stored`` hook, checked once per new study per process, off the store's path). A row is
claimed (``stored_sop_instance_uid`` set) before the SR is stored, so that two processes never store it twice.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from io import BytesIO
from typing import Any

from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid
from sqlalchemy import insert, select, update
from sqlalchemy.engine import Connection

from ..index.schema import patients, studies
from ..index.worklist_schema import pending_reports
from .types import Source, StoreOutcome

log = logging.getLogger("openpacs.reports")

BASIC_TEXT_SR = UID("1.2.840.10008.5.1.4.1.1.88.11")
_CLAIMING = "claiming"


@dataclass
class Report:
    accession_number: str
    text: str
    status: str = "F"  # OBR-25: P preliminary, F final, C corrected
    observer: str = ""  # PN of the principal result interpreter
    observed_at: str = ""  # DT
    title: str = "Diagnostic Imaging Report"
    patient_id: str = ""
    sender: str = ""
    control_id: str = ""


def basic_text_sr(report: Report, study: Any, patient: Any) -> bytes:
    """A Basic Text SR (PS3.3 A.35.1) in the study, with the study's patient module: one TEXT finding."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = BASIC_TEXT_SR
    uid = generate_uid()
    ds.SOPInstanceUID = uid
    now = datetime.now(UTC)
    ds.InstanceCreationDate, ds.InstanceCreationTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.PatientName = patient.patient_name or ""
    ds.PatientID = patient.patient_id or ""
    if patient.issuer_of_patient_id:
        ds.IssuerOfPatientID = patient.issuer_of_patient_id
    ds.PatientBirthDate = patient.patient_birth_date or ""
    ds.PatientSex = patient.patient_sex or ""
    ds.StudyInstanceUID = study.study_instance_uid
    ds.StudyDate = study.study_date or ""
    ds.StudyTime = study.study_time or ""
    ds.AccessionNumber = study.accession_number or report.accession_number
    ds.ReferringPhysicianName = study.referring_physician_name or ""
    ds.StudyID = study.study_id or ""
    ds.Modality = "SR"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 9000
    ds.SeriesDescription = "Report"
    ds.ReferencedPerformedProcedureStepSequence = Sequence([])
    ds.Manufacturer = "OpenPACS"
    ds.InstanceNumber = 1
    ds.ContentDate = (report.observed_at or now.strftime("%Y%m%d%H%M%S"))[:8]
    ds.ContentTime = (report.observed_at[8:14] if len(report.observed_at) >= 12 else now.strftime("%H%M%S"))
    final = report.status in ("F", "C")
    ds.CompletionFlag = "COMPLETE" if final else "PARTIAL"
    ds.VerificationFlag = "VERIFIED" if final and report.observer else "UNVERIFIED"
    if ds.VerificationFlag == "VERIFIED":
        v = Dataset()
        v.VerifyingObserverName = report.observer
        v.VerifyingObserverIdentificationCodeSequence = Sequence([])
        v.VerifyingOrganization = report.sender or "RIS"
        v.VerificationDateTime = report.observed_at or now.strftime("%Y%m%d%H%M%S")
        ds.VerifyingObserverSequence = Sequence([v])
    ds.PerformedProcedureCodeSequence = Sequence([])
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = Sequence([_code("18748-4", "LN", report.title)])
    ds.ContinuityOfContent = "SEPARATE"
    items = []
    if report.observer:
        obs = Dataset()
        obs.RelationshipType = "HAS OBS CONTEXT"
        obs.ValueType = "PNAME"
        obs.ConceptNameCodeSequence = Sequence([_code("121008", "DCM", "Person Observer Name")])
        obs.PersonName = report.observer
        items.append(obs)
    text = Dataset()
    text.RelationshipType = "CONTAINS"
    text.ValueType = "TEXT"
    text.ConceptNameCodeSequence = Sequence([_code("121070", "DCM", "Findings")])
    text.TextValue = report.text.replace("\r\n", "\n").replace("\r", "\n")
    items.append(text)
    ds.ContentSequence = Sequence(items)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = BASIC_TEXT_SR
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    c = Dataset()
    c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning = value, scheme, meaning
    return c


class ReportService:
    SEEN = 4096  # study UIDs remembered per process (one pending-report lookup per new study)

    def __init__(self, index: Any, ingest: Any = None) -> None:
        self.index = index
        self.ingest = ingest
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._q: queue.Queue[str | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        # called with each new study's UID in the same background thread (services.qc reconciles it with its order)
        self.listeners: list[Callable[[str], Any]] = []

    # -- from HL7 (inside the message's transaction) -------------------------------------------------------------
    def keep(self, conn: Connection, report: Report) -> int:
        key = conn.execute(insert(pending_reports).values(
            accession_number=report.accession_number, received_at=datetime.now(UTC), control_id=report.control_id,
            report=json.dumps(asdict(report)))).inserted_primary_key
        assert key is not None
        return int(key[0])

    # -- attaching -------------------------------------------------------------------------------------------
    def attach_pending(self, accession: str) -> list[str]:
        """Store every pending report of this accession whose study exists; the SOP Instance UIDs stored."""
        if self.ingest is None or not accession:
            return []
        with self.index.engine.connect() as c:
            study = c.execute(select(studies).where(studies.c.accession_number == accession)
                              .order_by(studies.c.id).limit(1)).first()
            if study is None:
                return []
            patient = c.execute(select(patients).where(patients.c.id == study.patient_fk)).first()
            rows = c.execute(select(pending_reports.c.id, pending_reports.c.report).where(
                pending_reports.c.accession_number == accession,
                pending_reports.c.stored_sop_instance_uid.is_(None)).order_by(pending_reports.c.id)).all()
        stored = []
        for row in rows:
            with self.index.write_engine.begin() as w:  # claim it: no other process stores it too
                claimed = w.execute(update(pending_reports).where(
                    pending_reports.c.id == row.id, pending_reports.c.stored_sop_instance_uid.is_(None))
                    .values(stored_sop_instance_uid=_CLAIMING)).rowcount
            if not claimed:
                continue
            report = Report(**json.loads(row.report))
            uid: str | None = None
            try:
                data = basic_text_sr(report, study, patient)
                outcome: StoreOutcome = self.ingest.store_file(
                    data, Source(protocol="HL7", calling_aet=report.sender[:16], user=report.sender))
                if outcome.ok:
                    uid = outcome.sop_instance_uid
                else:
                    log.error("report for %s not stored: 0x%04X %s", accession, outcome.status, outcome.message)
            except Exception:
                log.exception("report for %s not stored", accession)
            with self.index.write_engine.begin() as w:
                w.execute(update(pending_reports).where(pending_reports.c.id == row.id)
                          .values(stored_sop_instance_uid=uid))
            if uid:
                log.info("report %s (%s) stored for study %s", uid, accession, study.study_instance_uid)
                stored.append(uid)
        return stored

    # -- from ingest (every stored instance: keep it cheap) ----------------------------------------------------
    def study_stored(self, outcome: StoreOutcome) -> None:
        uid = outcome.study_instance_uid
        if not uid or outcome.sop_class_uid == BASIC_TEXT_SR:
            return
        with self._lock:
            if uid in self._seen:
                return
            self._seen[uid] = None
            if len(self._seen) > self.SEEN:
                self._seen.popitem(last=False)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="reports", daemon=True)
                self._thread.start()
        self._q.put(uid)

    def _loop(self) -> None:
        while True:
            uid = self._q.get()
            if uid is None:
                return
            try:
                with self.index.engine.connect() as c:
                    found = c.execute(select(pending_reports.c.accession_number).join(
                        studies, studies.c.accession_number == pending_reports.c.accession_number).where(
                        studies.c.study_instance_uid == uid,
                        pending_reports.c.stored_sop_instance_uid.is_(None)).limit(1)).first()
                if found is not None:
                    self.attach_pending(found.accession_number)
            except Exception:
                log.exception("pending reports for study %s", uid)
            for listener in self.listeners:
                try:
                    listener(uid)
                except Exception:
                    log.exception("new-study listener failed for %s", uid)

    def close(self) -> None:
        if self._thread is not None:
            self._q.put(None)
            self._thread.join(timeout=30)
            self._thread = None

    # -- reading ---------------------------------------------------------------------------------------------
    def search(self, accession: str | None = None, study_uid: str | None = None) -> list[dict[str, Any]]:
        stmt = select(pending_reports, studies.c.study_instance_uid, studies.c.department).join(
            studies, studies.c.accession_number == pending_reports.c.accession_number, isouter=True)
        if accession:
            stmt = stmt.where(pending_reports.c.accession_number == accession)
        if study_uid:
            stmt = stmt.where(studies.c.study_instance_uid == study_uid)
        with self.index.engine.connect() as c:
            rows = c.execute(stmt.order_by(pending_reports.c.id.desc()).limit(500)).all()
        out = []
        for r in rows:
            rep = json.loads(r.report)
            sop = r.stored_sop_instance_uid if r.stored_sop_instance_uid != _CLAIMING else None
            out.append({"id": r.id, "accession_number": r.accession_number, "received_at": r.received_at,
                        "control_id": r.control_id, "status": rep.get("status"), "observer": rep.get("observer"),
                        "text": rep.get("text"), "study_instance_uid": r.study_instance_uid,
                        "department": r.department, "sop_instance_uid": sop, "stored": sop is not None})
        return out


def for_context(ctx: Any) -> ReportService:
    svc = getattr(ctx, "reports", None)
    if svc is None:
        svc = ReportService(ctx.index, getattr(ctx, "ingest", None))
        ctx.reports = svc
    return svc
