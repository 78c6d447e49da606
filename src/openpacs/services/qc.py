"""Reconciliation of incoming studies with the RIS's orders: protocol-free rules.

When a study arrives (its first instance in this process), it is matched to an order's scheduled step by accession
number, else by patient ID and scheduled date = study date. A study with no matching order, or whose patient ID,
name (case-insensitive) or birth date disagrees with the order, goes onto the QC list with the differences. This
runs only once orders have come from a RIS (some step of source ``hl7``): without a RIS there is nothing to
reconcile against. The administrator links an item to an order (the study moves to the order's patient, created or
updated with the order's demographics, which retrieval then serves; the index takes the order's accession number) or
dismisses it. Both are audited by the caller.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import exc, insert, select, update

from ..index.schema import patients, studies
from ..index.worklist_schema import qc_items, scheduled_steps
from .patients import Demographics, PatientIdentifier, PatientService

log = logging.getLogger("openpacs.qc")
s = scheduled_steps.c
STATUSES = ("open", "linked", "dismissed")


class QCError(ValueError):
    def __init__(self, message: str, kind: str = "invalid") -> None:
        super().__init__(message)
        self.kind = kind


def _name(v: str | None) -> str:
    return (v or "").rstrip("^ ").upper()


def differences(patient: Any, step: Any) -> list[dict[str, str]]:
    out = []
    for attr, a, b, same in (
        ("PatientID", patient.patient_id or "", step.patient_id or "", None),
        ("PatientName", patient.patient_name or "", step.patient_name or "", _name),
        ("PatientBirthDate", patient.patient_birth_date or "", step.patient_birth_date or "", None),
    ):
        if not b:  # the order does not say: nothing to disagree with
            continue
        if (same(a) != same(b)) if same else (a != b):
            out.append({"attribute": attr, "study": a, "order": b})
    return out


class QCService:
    def __init__(self, index: Any) -> None:
        self.index = index
        self.patients = PatientService(index)

    def check_study(self, study_uid: str) -> dict[str, Any] | None:
        """Match a newly arrived study to its order; the QC item made, if any."""
        with self.index.engine.connect() as c:
            if c.execute(select(s.id).where(s.source == "hl7").limit(1)).first() is None:
                return None
            if c.execute(select(qc_items.c.id).where(qc_items.c.study_instance_uid == study_uid)).first():
                return None
            study = c.execute(select(studies).where(studies.c.study_instance_uid == study_uid)).first()
            if study is None:
                return None
            patient = c.execute(select(patients).where(patients.c.id == study.patient_fk)).first()
            step = None
            if study.accession_number:
                step = c.execute(select(scheduled_steps).where(s.accession_number == study.accession_number)
                                 .order_by(s.id).limit(1)).first()
            if step is None and study.study_date and patient is not None:
                step = c.execute(select(scheduled_steps).where(
                    s.patient_id == patient.patient_id,
                    s.scheduled_procedure_step_start_date == study.study_date).order_by(s.id).limit(1)).first()
        if step is None:
            kind, diffs, step_fk = "no-order", [], None
        else:
            diffs = differences(patient, step)
            if not diffs:
                return None
            kind, step_fk = "mismatch", step.id
        try:
            with self.index.write_engine.begin() as w:
                key = w.execute(insert(qc_items).values(
                    study_instance_uid=study_uid, kind=kind, step_fk=step_fk, differences=json.dumps(diffs),
                    status="open", created_at=datetime.now(UTC))).inserted_primary_key
        except exc.IntegrityError:  # another process got there first
            return None
        assert key is not None
        log.info("QC: study %s %s", study_uid, kind if not diffs else f"disagrees with its order: {diffs}")
        return self.get(int(key[0]))

    def search(self, status: str = "open", limit: int = 100, after: int | None = None) -> list[dict[str, Any]]:
        if status not in (*STATUSES, "all"):
            raise QCError(f"status: one of {', '.join(STATUSES)}, all")
        q = qc_items.c
        stmt = select(qc_items, studies.c.accession_number, studies.c.study_date, studies.c.study_description,
                      patients.c.patient_id, patients.c.patient_name, patients.c.patient_birth_date).join(
            studies, studies.c.study_instance_uid == q.study_instance_uid, isouter=True).join(
            patients, patients.c.id == studies.c.patient_fk, isouter=True)
        if status != "all":
            stmt = stmt.where(q.status == status)
        if after is not None:
            stmt = stmt.where(q.id < after)
        with self.index.engine.connect() as c:
            rows = c.execute(stmt.order_by(q.id.desc()).limit(limit)).all()
        return [_item(r) for r in rows]

    def get(self, item_id: int) -> dict[str, Any]:
        q = qc_items.c
        stmt = select(qc_items, studies.c.accession_number, studies.c.study_date, studies.c.study_description,
                      patients.c.patient_id, patients.c.patient_name, patients.c.patient_birth_date).join(
            studies, studies.c.study_instance_uid == q.study_instance_uid, isouter=True).join(
            patients, patients.c.id == studies.c.patient_fk, isouter=True).where(q.id == item_id)
        with self.index.engine.connect() as c:
            row = c.execute(stmt).first()
        if row is None:
            raise QCError(f"no QC item {item_id}", "unknown")
        return _item(row)

    def dismiss(self, item_id: int, user: str) -> dict[str, Any]:
        self._resolve(item_id, "dismissed", user)
        return self.get(item_id)

    def link(self, item_id: int, step_id: int, user: str) -> dict[str, Any]:
        """The study takes the order's patient (created or updated with the order's demographics) and accession."""
        with self.index.write_engine.begin() as w:
            item = w.execute(select(qc_items).where(qc_items.c.id == item_id)).first()
            if item is None:
                raise QCError(f"no QC item {item_id}", "unknown")
            if item.status != "open":
                raise QCError(f"QC item {item_id} is {item.status}", "conflict")
            step = w.execute(select(scheduled_steps).where(s.id == step_id)).first()
            if step is None:
                raise QCError(f"no worklist entry {step_id}", "unknown")
            if not step.patient_id:
                raise QCError(f"worklist entry {step_id} has no patient ID")
            study = w.execute(select(studies).where(studies.c.study_instance_uid == item.study_instance_uid)).first()
            if study is None:
                raise QCError(f"study {item.study_instance_uid} is no longer stored", "conflict")
            demo = Demographics(PatientIdentifier(step.patient_id, step.issuer_of_patient_id or ""),
                                name=step.patient_name, birth_date=step.patient_birth_date, sex=step.patient_sex)
            self.patients.upsert(w, demo, f"QC link by {user}")
            target = self.patients.find(w, demo.identifier)
            assert target is not None
            previous = study.patient_fk
            w.execute(update(studies).where(studies.c.id == study.id).values(
                patient_fk=target.id, accession_number=step.accession_number or study.accession_number))
            PatientService._recount(w, target.id)
            if previous != target.id:
                PatientService._recount(w, previous)
            w.execute(update(qc_items).where(qc_items.c.id == item_id).values(
                status="linked", step_fk=step_id, resolved_at=datetime.now(UTC), resolved_by=user))
        return self.get(item_id)

    def _resolve(self, item_id: int, status: str, user: str) -> None:
        with self.index.write_engine.begin() as w:
            item = w.execute(select(qc_items.c.status).where(qc_items.c.id == item_id)).first()
            if item is None:
                raise QCError(f"no QC item {item_id}", "unknown")
            if item.status != "open":
                raise QCError(f"QC item {item_id} is {item.status}", "conflict")
            w.execute(update(qc_items).where(qc_items.c.id == item_id).values(
                status=status, resolved_at=datetime.now(UTC), resolved_by=user))


def _item(r: Any) -> dict[str, Any]:
    return {"id": r.id, "study_instance_uid": r.study_instance_uid, "kind": r.kind, "step_id": r.step_fk,
            "differences": json.loads(r.differences), "status": r.status, "created_at": r.created_at,
            "resolved_at": r.resolved_at, "resolved_by": r.resolved_by, "accession_number": r.accession_number,
            "study_date": r.study_date, "study_description": r.study_description, "patient_id": r.patient_id,
            "patient_name": r.patient_name, "patient_birth_date": r.patient_birth_date}


def for_context(ctx: Any) -> QCService:
    svc = getattr(ctx, "qc", None)
    if svc is None:
        svc = QCService(ctx.index)
        ctx.qc = svc
    return svc
