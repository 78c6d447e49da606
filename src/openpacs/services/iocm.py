"""IOCM (PS3.4 / IHE Imaging Object Change Management): rejection notes, restore, purge.

A rejection note is a Key Object Selection whose title (ConceptNameCodeSequence, scheme DCM) is one of the rejection
codes; the instances in its CurrentRequestedProcedureEvidenceSequence are rejected. Notes arrive over the one ingest
path (C-STORE, STOW-RS, import: ``stored`` runs after the note's own commit and never fails its store), or are made
here (``reject``: the note is built and stored through ingest, so routing forwards it like any instance).

A rejected instance keeps its blob and row until the purge, but no query (C-FIND, QIDO-RS, console, API) and no
retrieval (C-MOVE, C-GET, WADO) sees it. The counters of its series, study and patient (NumberOfStudyRelated*...,
ModalitiesInStudy, SOPClassesInStudy) count only the instances not rejected, as a receiver of the note would see the
study; a series or study left with only rejected instances disappears from every level. The rejection note itself
stays an ordinary, visible instance (its KO series), so other systems can retrieve it. Restoring a rejection brings
its instances back (unless another rejection still covers them) and deletes its note. The ``purge_rejected`` job
deletes instances rejected more than ``rejected_purge_days`` ago through the ingest delete path.
"""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from pydicom import Dataset, dcmread
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy import and_, exists, func, insert, select, update

from ..index.iocm_schema import rejection_items, rejections
from ..index.schema import instances, jobs, patients, series, studies
from .types import Source, StoreOutcome

log = logging.getLogger("openpacs.iocm")

KOS_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"
REJECTION_TITLES = {
    "113001": "Rejected for Quality Reasons",
    "113037": "Rejected for Patient Safety Reasons",
    "113038": "Incorrect Modality Worklist Entry",
    "113039": "Data Retention Policy Expired",
}
KIND = "purge_rejected"
REJECTED, RESTORED, PURGED = "rejected", "restored", "purged"


class IOCMError(Exception):
    def __init__(self, message: str, kind: str = "invalid") -> None:  # invalid, unknown, conflict
        super().__init__(message)
        self.kind = kind


def rejection_title(ds: Dataset) -> str | None:
    """The rejection code of a Key Object Selection, or None if it is not a rejection note."""
    if str(ds.get("SOPClassUID", "")) != KOS_SOP_CLASS:
        return None
    for item in ds.get("ConceptNameCodeSequence") or []:
        code = str(item.get("CodeValue", "")).strip()
        if code in REJECTION_TITLES and str(item.get("CodingSchemeDesignator", "")).strip() == "DCM":
            return code
    return None


def evidence(ds: Dataset) -> list[tuple[str, str, str, str]]:
    """(study, series, SOP class, SOP instance) of every instance the note's evidence sequence names."""
    out = []
    for st in ds.get("CurrentRequestedProcedureEvidenceSequence") or []:
        for se in st.get("ReferencedSeriesSequence") or []:
            for sop in se.get("ReferencedSOPSequence") or []:
                out.append((str(st.get("StudyInstanceUID", "")), str(se.get("SeriesInstanceUID", "")),
                            str(sop.get("ReferencedSOPClassUID", "")), str(sop.get("ReferencedSOPInstanceUID", ""))))
    return [r for r in out if r[3]]


def build_rejection_note(reason: str, study_header: Dataset, refs: Sequence[tuple[str, str, str]],
                         manufacturer: str = "OpenPACS") -> Dataset:
    """A Key Object Selection Document (PS3.3 A.35.4, TID 2010) rejecting ``refs`` (series, SOP class, SOP
    instance) of the study whose patient and study modules ``study_header`` gives."""
    if reason not in REJECTION_TITLES:
        raise IOCMError(f"reason: one of {', '.join(REJECTION_TITLES)}")
    ds = Dataset()
    now = datetime.now(UTC)
    for kw in ("SpecificCharacterSet", "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate",
               "PatientSex", "StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber",
               "ReferringPhysicianName", "StudyID"):
        if kw in study_header:
            setattr(ds, kw, study_header.get(kw))
        elif kw not in ("SpecificCharacterSet", "IssuerOfPatientID"):
            setattr(ds, kw, "")
    ds.SOPClassUID = KOS_SOP_CLASS
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "KO"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 999
    ds.SeriesDescription = "Rejection note"
    ds.ReferencedPerformedProcedureStepSequence = DicomSequence()
    ds.Manufacturer = manufacturer
    ds.InstanceNumber = 1
    ds.ContentDate = now.strftime("%Y%m%d")
    ds.ContentTime = now.strftime("%H%M%S")
    ds.ValueType = "CONTAINER"
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = reason, "DCM", REJECTION_TITLES[reason]
    ds.ConceptNameCodeSequence = DicomSequence([code])
    tpl = Dataset()
    tpl.MappingResource, tpl.TemplateIdentifier = "DCMR", "2010"
    ds.ContentTemplateSequence = DicomSequence([tpl])
    ds.ContinuityOfContent = "SEPARATE"
    by_series: dict[str, list[tuple[str, str]]] = {}
    content = []
    for series_uid, cls, sop in refs:
        by_series.setdefault(series_uid, []).append((cls, sop))
        item = Dataset()
        item.RelationshipType = "CONTAINS"
        item.ValueType = "IMAGE" if cls.startswith("1.2.840.10008.5.1.4.1.1.") and ".88." not in cls else "COMPOSITE"
        r = Dataset()
        r.ReferencedSOPClassUID, r.ReferencedSOPInstanceUID = cls, sop
        item.ReferencedSOPSequence = DicomSequence([r])
        content.append(item)
    ds.ContentSequence = DicomSequence(content)
    st = Dataset()
    st.StudyInstanceUID = study_header.StudyInstanceUID
    series_items = []
    for series_uid, sops in by_series.items():
        se = Dataset()
        se.SeriesInstanceUID = series_uid
        items = []
        for cls, sop in sops:
            r = Dataset()
            r.ReferencedSOPClassUID, r.ReferencedSOPInstanceUID = cls, sop
            items.append(r)
        se.ReferencedSOPSequence = DicomSequence(items)
        series_items.append(se)
    st.ReferencedSeriesSequence = DicomSequence(series_items)
    ds.CurrentRequestedProcedureEvidenceSequence = DicomSequence([st])
    return ds


def to_part10(ds: Dataset) -> bytes:
    from pydicom.dataset import FileMetaDataset

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


class IOCMService:
    def __init__(self, index: Any, ingest: Any, store: Any, settings: Any, audit: Any = None) -> None:
        self.index, self.ingest, self.store, self.settings, self.audit = index, ingest, store, settings, audit
        self._made: dict[str, tuple[str, str]] = {}  # note SOP UID -> (source, actor) of notes made by reject()

    # -- notes arriving through ingest -----------------------------------------------------------------------
    def chain(self, after: Callable[[StoreOutcome], None] | None) -> Callable[[StoreOutcome], None]:
        """An ingest ``on_stored`` listener: this service's, then ``after`` (the one already attached)."""
        def listener(outcome: StoreOutcome) -> None:
            try:
                self.stored(outcome)
            except Exception:  # noqa: BLE001 - a rejection note never fails its own store
                log.exception("rejection note %s not applied", outcome.sop_instance_uid)
            if after is not None:
                after(outcome)
        return listener

    def stored(self, outcome: StoreOutcome) -> None:
        """After a new instance's commit: apply it if it is a rejection note. Only Key Object Selections are read
        (rare, small): done before the store is answered, so a sender sees the instances hidden once it has its
        C-STORE response."""
        if outcome.sop_class_uid != KOS_SOP_CLASS:
            return
        row = self.index.find_instance(outcome.sop_instance_uid)
        if row is None:
            return
        ds = dcmread(io.BytesIO(self.store.read(row.blob_key)), force=True)
        made = self._made.pop(outcome.sop_instance_uid, None)
        source, actor = made or ("network", str(ds.file_meta.get("SourceApplicationEntityTitle", "") or "").strip()
                                 if getattr(ds, "file_meta", None) is not None else "")
        self.apply_note(ds, source, actor)

    def apply_note(self, ds: Dataset, source: str, actor: str) -> int | None:
        """Reject the instances a rejection note names; the rejection's id (None if ``ds`` is no rejection note)."""
        reason = rejection_title(ds)
        if reason is None:
            return None
        kos_uid = str(ds.SOPInstanceUID)
        refs = evidence(ds)
        at = datetime.now(UTC)
        with self.index.write_engine.begin() as c:
            old = c.execute(select(rejections.c.id).where(rejections.c.kos_sop_instance_uid == kos_uid)).first()
            if old is not None:
                return int(old[0])
            rid = int(c.execute(insert(rejections).values(
                kos_sop_instance_uid=kos_uid, study_instance_uid=str(ds.get("StudyInstanceUID", "")), reason=reason,
                source=source, actor=actor or None, state=REJECTED, num_instances=0, created_at=at, updated_at=at,
            ).returning(rejections.c.id)).scalar_one())
            items = {r[3]: r for r in refs if r[3] != kos_uid}
            if items:
                c.execute(insert(rejection_items), [{"rejection_id": rid, "sop_instance_uid": sop,
                                                     "series_instance_uid": r[1]} for sop, r in items.items()])
            hit = self._set_rejected(c, list(items), reason, at)
            c.execute(update(rejections).where(rejections.c.id == rid).values(num_instances=len(hit)))
        log.info("rejection note %s (%s) from %s %s: %d instance(s) rejected", kos_uid, reason, source, actor,
                 len(hit))
        self._audit("U", actor, [str(ds.get("StudyInstanceUID", ""))], str(ds.get("PatientID", "")),
                    str(ds.get("PatientName", "")),
                    f"IOCM rejection {rid} ({reason} {REJECTION_TITLES[reason]}) by {source} note {kos_uid}: "
                    f"{len(hit)} instance(s) rejected")
        return rid

    def _set_rejected(self, c: Any, sops: list[str], reason: str, at: datetime) -> list[int]:
        hit: list[int] = []
        series_ids: set[int] = set()
        for i in range(0, len(sops), 500):
            chunk = sops[i:i + 500]
            rows = c.execute(select(instances.c.id, instances.c.series_fk)
                             .where(instances.c.sop_instance_uid.in_(chunk), instances.c.rejected.is_(None))).all()
            if rows:
                c.execute(update(instances).where(instances.c.id.in_([r.id for r in rows]))
                          .values(rejected=reason, rejected_at=at))
            hit += [r.id for r in rows]
            series_ids |= {r.series_fk for r in rows}
        self.index.recount(c, series_ids)
        return hit

    # -- made here -------------------------------------------------------------------------------------------
    def reject(self, study_uid: str, reason: str, *, series_uids: Sequence[str] = (),
               sop_uids: Sequence[str] = (), actor: str = "", source: str = "console",
               departments: tuple[str, ...] | None = None) -> dict[str, Any]:
        """Reject a study, some of its series or instances: a rejection note is built, stored through ingest (and
        so applied, and forwarded by routing like any instance). Returns the rejection."""
        reason = str(reason).strip()
        if reason not in REJECTION_TITLES:
            raise IOCMError(f"reason: one of {', '.join(REJECTION_TITLES)}")
        stmt = (select(series.c.series_instance_uid, instances.c.sop_class_uid, instances.c.sop_instance_uid,
                       instances.c.blob_key, studies.c.department)
                .select_from(instances.join(series, instances.c.series_fk == series.c.id)
                             .join(studies, series.c.study_fk == studies.c.id))
                .where(studies.c.study_instance_uid == study_uid, instances.c.rejected.is_(None),
                       instances.c.sop_class_uid != KOS_SOP_CLASS)
                .order_by(series.c.id, instances.c.id))
        if series_uids:
            stmt = stmt.where(series.c.series_instance_uid.in_(list(series_uids)))
        if sop_uids:
            stmt = stmt.where(instances.c.sop_instance_uid.in_(list(sop_uids)))
        with self.index.engine.connect() as c:
            rows = c.execute(stmt).all()
        if departments is not None:
            rows = [r for r in rows if r.department in departments]
        if not rows:
            raise IOCMError(f"nothing to reject in study {study_uid}", "unknown")
        header = dcmread(io.BytesIO(self.store.read(rows[0].blob_key, 0, 1 << 20)), stop_before_pixels=True,
                         force=True, specific_tags=None)
        note = build_rejection_note(reason, header, [(r.series_instance_uid, r.sop_class_uid, r.sop_instance_uid)
                                                     for r in rows])
        self._made[str(note.SOPInstanceUID)] = (source, actor)
        outcome = self.ingest.store_file(to_part10(note), Source("API", calling_aet=self.settings.aet, user=actor))
        self._made.pop(str(note.SOPInstanceUID), None)
        if not outcome.ok:
            raise IOCMError(f"the rejection note was not stored: {outcome.message}", "conflict")
        with self.index.engine.connect() as c:
            rid = c.execute(select(rejections.c.id)
                            .where(rejections.c.kos_sop_instance_uid == str(note.SOPInstanceUID))).scalar()
        if rid is None:
            raise IOCMError("the rejection note was stored but not applied (see the log)", "conflict")
        return self.get(int(rid))

    def restore(self, rejection_id: int, actor: str = "") -> dict[str, Any]:
        """Un-reject the instances of a rejection (those no other standing rejection covers) and delete its note."""
        at = datetime.now(UTC)
        with self.index.write_engine.begin() as c:
            r = c.execute(select(rejections).where(rejections.c.id == rejection_id)).mappings().first()
            if r is None:
                raise IOCMError(f"no rejection {rejection_id}", "unknown")
            if r["state"] != REJECTED:
                raise IOCMError(f"rejection {rejection_id} is {r['state']}, not rejected", "conflict")
            other = (select(rejection_items.c.sop_instance_uid)
                     .select_from(rejection_items.join(rejections, rejections.c.id == rejection_items.c.rejection_id))
                     .where(rejections.c.state == REJECTED, rejections.c.id != rejection_id,
                            rejection_items.c.sop_instance_uid == instances.c.sop_instance_uid))
            mine = select(rejection_items.c.sop_instance_uid).where(rejection_items.c.rejection_id == rejection_id)
            rows = c.execute(select(instances.c.id, instances.c.series_fk).where(
                instances.c.sop_instance_uid.in_(mine), instances.c.rejected.is_not(None), ~exists(other))).all()
            if rows:
                c.execute(update(instances).where(instances.c.id.in_([x.id for x in rows]))
                          .values(rejected=None, rejected_at=None))
            self.index.recount(c, {x.series_fk for x in rows})
            c.execute(update(rejections).where(rejections.c.id == rejection_id)
                      .values(state=RESTORED, updated_at=at, detail=f"restored by {actor or '?'}"))
        if r["kos_sop_instance_uid"]:
            self.ingest.delete("IMAGE", r["kos_sop_instance_uid"], Source("API", user=actor))
        self._audit("U", actor, [r["study_instance_uid"]], "", "",
                    f"IOCM rejection {rejection_id} restored: {len(rows)} instance(s) visible again; note "
                    f"{r['kos_sop_instance_uid']} deleted")
        return self.get(rejection_id)

    # -- reading ---------------------------------------------------------------------------------------------
    def get(self, rejection_id: int) -> dict[str, Any]:
        with self.index.engine.connect() as c:
            r = c.execute(self._select().where(rejections.c.id == rejection_id)).mappings().first()
            if r is None:
                raise IOCMError(f"no rejection {rejection_id}", "unknown")
            items = c.execute(select(rejection_items.c.series_instance_uid, rejection_items.c.sop_instance_uid)
                              .where(rejection_items.c.rejection_id == rejection_id)
                              .order_by(rejection_items.c.series_instance_uid, rejection_items.c.sop_instance_uid)
                              ).all()
        out = self._json(r)
        out["instances"] = [{"series": s, "sop_instance_uid": u} for s, u in items]
        return out

    def _select(self) -> Any:
        return (select(rejections, patients.c.patient_id, patients.c.patient_name)
                .select_from(rejections.outerjoin(studies, studies.c.study_instance_uid == rejections.c.study_instance_uid)
                             .outerjoin(patients, patients.c.id == studies.c.patient_fk)))

    def _json(self, r: Any) -> dict[str, Any]:
        return {"id": r["id"], "kos_sop_instance_uid": r["kos_sop_instance_uid"],
                "study_instance_uid": r["study_instance_uid"], "reason": r["reason"],
                "reason_meaning": REJECTION_TITLES.get(r["reason"], ""), "source": r["source"], "actor": r["actor"],
                "state": r["state"], "num_instances": r["num_instances"], "patient_id": r["patient_id"],
                "patient_name": r["patient_name"], "detail": r["detail"],
                "created_at": _iso(r["created_at"]), "updated_at": _iso(r["updated_at"])}

    def search(self, state: str = "", limit: int = 100, before: int | None = None,
               study_uid: str = "") -> list[dict[str, Any]]:
        stmt = self._select()
        if state and state != "all":
            if state not in (REJECTED, RESTORED, PURGED):
                raise IOCMError("state: rejected, restored, purged or all")
            stmt = stmt.where(rejections.c.state == state)
        if study_uid:
            stmt = stmt.where(rejections.c.study_instance_uid == study_uid)
        if before is not None:
            stmt = stmt.where(rejections.c.id < before)
        with self.index.engine.connect() as c:
            return [self._json(r) for r in c.execute(stmt.order_by(rejections.c.id.desc()).limit(limit)).mappings()]

    # -- purge -----------------------------------------------------------------------------------------------
    def purge(self, older_than_days: float | None = None, actor: str = "purge_rejected") -> dict[str, Any]:
        """Delete the instances rejected more than ``older_than_days`` (default ``rejected_purge_days``) ago."""
        days = self.settings.rejected_purge_days if older_than_days is None else older_than_days
        cutoff = datetime.now(UTC) - timedelta(days=float(days))
        with self.index.engine.connect() as c:
            rows = c.execute(select(instances.c.sop_instance_uid, studies.c.study_instance_uid)
                             .select_from(instances.join(series, instances.c.series_fk == series.c.id)
                                          .join(studies, series.c.study_fk == studies.c.id))
                             .where(instances.c.rejected.is_not(None), instances.c.rejected_at <= cutoff)).all()
        by_study: dict[str, int] = {}
        source = Source("JOB", user=actor)
        for sop, study in rows:
            by_study[study] = by_study.get(study, 0) + self.ingest.delete("IMAGE", sop, source)
        at = datetime.now(UTC)
        with self.index.write_engine.begin() as c:
            left = (select(rejection_items.c.sop_instance_uid)
                    .select_from(rejection_items.join(instances,
                                                      instances.c.sop_instance_uid == rejection_items.c.sop_instance_uid))
                    .where(rejection_items.c.rejection_id == rejections.c.id, instances.c.rejected.is_not(None)))
            purged = [sop for sop, _ in rows]
            ids: set[int] = set()
            for i in range(0, len(purged), 500):
                ids |= set(c.execute(select(rejection_items.c.rejection_id).where(
                    rejection_items.c.sop_instance_uid.in_(purged[i:i + 500]))).scalars())
            if ids:
                c.execute(update(rejections).where(and_(rejections.c.state == REJECTED, ~exists(left)),
                                                   rejections.c.id.in_(sorted(ids)))
                          .values(state=PURGED, updated_at=at))
        for study, n in by_study.items():
            self._audit("D", actor, [study], "", "", f"IOCM purge: {n} rejected instance(s) deleted "
                        f"(rejected more than {days:g} days ago)", event="StudyDeleted")
        log.info("purge of rejected instances: %d deleted in %d studies", sum(by_study.values()), len(by_study))
        return {"deleted": sum(by_study.values()), "studies": len(by_study), "older_than_days": days}

    def _audit(self, action: str, actor: str, study_uids: list[str], patient_id: str, patient_name: str,
               detail: str, event: str = "PatientRecord") -> None:
        if self.audit is not None:
            self.audit.record(event, action=action, user=actor or "", protocol="IOCM", study_uids=study_uids,
                              patient_id=patient_id, patient_name=patient_name, detail=detail)


def _iso(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, datetime) and v.tzinfo is None:
        v = v.replace(tzinfo=UTC)
    return v.isoformat() if isinstance(v, datetime) else str(v)


def ensure_scheduled(queue: Any, delay_seconds: float = 60.0) -> None:
    """One recurring ``purge_rejected`` job: queued (to start after ``delay_seconds``) unless one is waiting."""
    with queue.index.engine.connect() as c:
        waiting = c.execute(select(func.count()).select_from(jobs).where(
            jobs.c.kind == KIND, jobs.c.state.in_(("pending", "running", "paused")))).scalar_one()
    if not waiting:
        submit_later(queue, delay_seconds)


def submit_later(queue: Any, seconds: float, payload: dict[str, Any] | None = None) -> int:
    """A ``purge_rejected`` job that may not start before ``seconds`` from now (recurring unless a payload says)."""
    t = datetime.now(UTC)
    with queue.index.write_engine.begin() as c:
        job_id = int(queue.submit_in(c, KIND, payload or {"recurring": True}))
        c.execute(update(jobs).where(jobs.c.id == job_id).values(not_before=t + timedelta(seconds=seconds)))
    return job_id


class PurgeRejectedRunner:
    """Runs ``purge_rejected`` jobs; a recurring one queues the next (``rejected_purge_check_hours`` later)."""

    def __init__(self, ctx: Any, queue: Any) -> None:
        self.ctx, self.queue = ctx, queue

    async def __call__(self, jc: Any) -> None:
        await asyncio.to_thread(self.run, jc)

    def run(self, jc: Any) -> None:
        p = jc.job.payload
        service: IOCMService = self.ctx.iocm
        days = p.get("older_than_days")
        result = service.purge(None if days is None else float(days), actor=str(p.get("user") or "purge_rejected"))
        self.queue.update_payload(jc.job.id, {"result": result})
        if p.get("recurring"):
            submit_later(self.queue, self.ctx.settings.rejected_purge_check_hours * 3600)
