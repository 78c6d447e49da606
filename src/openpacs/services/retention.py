"""Retention rules: studies older than N years (per modality / department) deleted, the oldest recycled when the
archive is over a size; protected studies always kept. A preview (dry run) shows what a run would delete.

Rules come from TOML ``[[retention]]`` tables (read-only) and from the API (kept in the index's settings table, so
every node of a cluster has the same). A rule is either an age rule::

    [[retention]]
    name = "CT after 10 years"
    older_than_years = 10          # or older_than_days
    modalities = ["CT"]            # optional: any of these in the study
    departments = ["radiology"]    # optional

or a recycle rule (the oldest studies go first, by study date, until the archive is back under ``recycle_to``)::

    [[retention]]
    name = "recycle"
    recycle_above = "900GB"        # or a percentage of storage_quota ("95%")
    recycle_to = "800GB"           # default: recycle_above

A run is a ``retention`` job of the studies chosen when it was submitted; each one is checked again (still
unprotected) right before it goes through the one delete path (``IngestService.delete``) and is audited
(DICOM Study Deleted) with the rule that chose it.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import func, insert, or_, select, update

from ..index.db import now
from ..index.schema import patients, settings_table, studies
from .jobs import JobContext, JobQueue
from .storage_policy import parse_threshold
from .types import Source

log = logging.getLogger("openpacs.retention")

KIND = "retention"
SETTINGS_KEY = "retention_rules"
_FIELDS = {"name", "older_than_years", "older_than_days", "modalities", "departments", "recycle_above", "recycle_to",
           "enabled", "description"}


class RetentionError(ValueError):
    """A malformed rule (named in the message)."""


@dataclass
class RetentionRule:
    name: str
    older_than_days: float = 0.0
    modalities: list[str] = field(default_factory=list)
    departments: list[str] = field(default_factory=list)
    recycle_above: str = ""
    recycle_to: str = ""
    enabled: bool = True
    description: str = ""
    source: str = "index"

    @property
    def kind(self) -> str:
        return "recycle" if self.recycle_above else "age"

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "older_than_days": self.older_than_days,
                "modalities": self.modalities, "departments": self.departments, "recycle_above": self.recycle_above,
                "recycle_to": self.recycle_to, "enabled": self.enabled, "description": self.description,
                "source": self.source, "editable": self.source == "index"}


def _list(v: Any) -> list[str]:
    if v is None or v == "":
        return []
    if isinstance(v, str):
        return [p.strip() for p in v.replace("\\", ",").split(",") if p.strip()]
    return [str(p).strip() for p in v if str(p).strip()]


def parse_rule(raw: dict[str, Any], source: str = "index") -> RetentionRule:
    name = str(raw.get("name") or "").strip()
    if not name:
        raise RetentionError("a retention rule needs a name")
    bad = sorted(set(raw) - _FIELDS - {"kind", "source", "editable"})
    if bad:
        raise RetentionError(f"retention rule {name!r}: unknown field(s) {', '.join(bad)}")
    days = 0.0
    try:
        if raw.get("older_than_years"):
            days = float(raw["older_than_years"]) * 365.25
        elif raw.get("older_than_days"):
            days = float(raw["older_than_days"])
    except (TypeError, ValueError):
        raise RetentionError(f"retention rule {name!r}: older_than_years/older_than_days must be numbers") from None
    above, to = str(raw.get("recycle_above") or "").strip(), str(raw.get("recycle_to") or "").strip()
    if days < 0:
        raise RetentionError(f"retention rule {name!r}: the age must be positive")
    if bool(days) == bool(above):
        raise RetentionError(f"retention rule {name!r}: give either older_than_years/older_than_days (an age rule) "
                             "or recycle_above (a recycle rule)")
    for label, v in (("recycle_above", above), ("recycle_to", to)):
        if v:
            try:
                parse_threshold(v, label)
            except ValueError as e:
                raise RetentionError(f"retention rule {name!r}: {e}") from None
    return RetentionRule(name=name, older_than_days=days, modalities=[m.upper() for m in _list(raw.get("modalities"))],
                         departments=[d.lower() for d in _list(raw.get("departments"))], recycle_above=above,
                         recycle_to=to, enabled=bool(raw.get("enabled", True)),
                         description=str(raw.get("description") or ""), source=source)


class RetentionService:
    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx

    # -- rules ---------------------------------------------------------------------------------------------------------
    def config_rules(self) -> list[RetentionRule]:
        return [parse_rule(r, "toml") for r in getattr(self.ctx.settings, "retention", None) or []]

    def index_rules(self) -> list[RetentionRule]:
        with self.ctx.index.engine.connect() as c:
            raw = c.execute(select(settings_table.c.value).where(settings_table.c.key == SETTINGS_KEY)).scalar()
        try:
            return [parse_rule(r) for r in json.loads(raw)] if raw else []
        except (ValueError, RetentionError) as e:
            log.error("retention rules in the index unreadable: %s", e)
            return []

    def rules(self) -> list[RetentionRule]:
        return self.config_rules() + self.index_rules()

    def set_rules(self, raw: list[dict[str, Any]]) -> list[RetentionRule]:
        parsed = [parse_rule(r) for r in raw]
        names = [r.name for r in parsed] + [r.name for r in self.config_rules()]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise RetentionError(f"retention rule name(s) used twice: {', '.join(dup)}")
        doc = json.dumps([{k: v for k, v in r.as_dict().items() if k in _FIELDS} for r in parsed])
        t = now()
        with self.ctx.index.write_engine.begin() as c:
            n = c.execute(update(settings_table).where(settings_table.c.key == SETTINGS_KEY)
                          .values(value=doc, updated_at=t)).rowcount
            if not n:
                c.execute(insert(settings_table).values(key=SETTINGS_KEY, value=doc, updated_at=t))
        return parsed

    # -- protection ----------------------------------------------------------------------------------------------------
    def protect(self, study_uid: str, protected: bool) -> bool:
        with self.ctx.index.write_engine.begin() as c:
            n = c.execute(update(studies).where(studies.c.study_instance_uid == study_uid)
                          .values(protected=protected)).rowcount
        return bool(n)

    # -- the plan ------------------------------------------------------------------------------------------------------
    def _select(self) -> Any:
        return (select(studies.c.study_instance_uid, studies.c.study_date, studies.c.created_at, studies.c.size_bytes,
                       studies.c.department, studies.c.modalities_in_study, studies.c.protected,
                       studies.c.study_description, studies.c.num_instances, patients.c.patient_id,
                       patients.c.patient_name)
                .select_from(studies.join(patients, studies.c.patient_fk == patients.c.id)))

    @staticmethod
    def _entry(r: Any, rule: RetentionRule, reason: str) -> dict[str, Any]:
        return {"study_instance_uid": r.study_instance_uid, "study_date": r.study_date or "",
                "patient_id": r.patient_id, "patient_name": r.patient_name or "",
                "description": r.study_description or "", "modalities": r.modalities_in_study or "",
                "department": r.department or "", "instances": int(r.num_instances), "size_bytes": int(r.size_bytes),
                "protected": bool(r.protected), "rule": rule.name, "reason": reason}

    def preview(self, limit: int = 10000) -> dict[str, Any]:
        """What a run would delete now (and the protected studies the rules would have taken)."""
        chosen: dict[str, dict[str, Any]] = {}
        kept: dict[str, dict[str, Any]] = {}
        rules = [r for r in self.rules() if r.enabled]
        t = now()
        with self.ctx.index.engine.connect() as c:
            for rule in (r for r in rules if r.kind == "age"):
                cutoff = t - timedelta(days=rule.older_than_days)
                day = cutoff.strftime("%Y%m%d")
                stmt = self._select().where(or_(
                    (studies.c.study_date.isnot(None)) & (studies.c.study_date != "") & (studies.c.study_date < day),
                    ((studies.c.study_date.is_(None)) | (studies.c.study_date == "")) & (studies.c.created_at < cutoff)))
                if rule.departments:
                    stmt = stmt.where(func.lower(studies.c.department).in_(rule.departments))
                for r in c.execute(stmt.order_by(studies.c.study_date, studies.c.id)):
                    mods = {m for m in (r.modalities_in_study or "").split("\\") if m}
                    if rule.modalities and not mods & set(rule.modalities):
                        continue
                    reason = f"older than {rule.older_than_days / 365.25:g} years" if rule.older_than_days >= 365 \
                        else f"older than {rule.older_than_days:g} days"
                    target = kept if r.protected else chosen
                    target.setdefault(r.study_instance_uid, self._entry(r, rule, reason))
            for rule in (r for r in rules if r.kind == "recycle"):
                quota = parse_threshold(self.ctx.settings.storage_quota, "storage_quota", percent_allowed=False).nbytes
                above = parse_threshold(rule.recycle_above, "recycle_above").resolve(quota)
                to = parse_threshold(rule.recycle_to or rule.recycle_above, "recycle_to").resolve(quota)
                if not above or to is None:
                    continue
                used = int(c.execute(select(func.coalesce(func.sum(studies.c.size_bytes), 0))).scalar_one())
                used -= sum(e["size_bytes"] for e in chosen.values())
                if used <= above:
                    continue
                stmt = self._select().order_by(func.coalesce(studies.c.study_date, ""), studies.c.created_at,
                                               studies.c.id)
                for r in c.execute(stmt):
                    if used <= to:
                        break
                    if r.study_instance_uid in chosen:
                        continue
                    if r.protected:
                        kept.setdefault(r.study_instance_uid, self._entry(r, rule, "oldest while over the limit"))
                        continue
                    chosen[r.study_instance_uid] = self._entry(r, rule, f"oldest while over {rule.recycle_above}")
                    used -= int(r.size_bytes)
        studies_out = list(chosen.values())[:limit]
        return {"rules": [r.as_dict() for r in rules], "delete": studies_out, "studies": len(chosen),
                "bytes": sum(e["size_bytes"] for e in chosen.values()),
                "instances": sum(e["instances"] for e in chosen.values()),
                "protected_kept": list(kept.values())[:limit], "generated_at": t.isoformat()}

    def submit(self, user: str = "scheduler") -> Any:
        """A ``retention`` job of what the preview chooses now; None when nothing is due."""
        plan = self.preview()
        if not plan["delete"]:
            return None
        queue: JobQueue = self.ctx.jobs
        reasons = {e["study_instance_uid"]: f"{e['rule']}: {e['reason']}" for e in plan["delete"]}
        return queue.submit(KIND, {"user": user, "reasons": reasons, "bytes_planned": plan["bytes"]},
                            items=list(reasons), item_bytes=[e["size_bytes"] for e in plan["delete"]])


class RetentionRunner:
    """Runs ``retention`` jobs: each study checked again, deleted through the ingest delete path, audited."""

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx

    async def __call__(self, jc: JobContext) -> None:
        await asyncio.to_thread(self.run, jc)

    def run(self, jc: JobContext) -> None:
        p = jc.job.payload
        user = str(p.get("user") or "retention")
        reasons = p.get("reasons") or {}
        q = jc.queue
        deleted = kept = 0
        for item in q.pending_items(jc.job.id):
            jc.check()
            uid = item.sop_instance_uid  # a study UID: retention items are studies
            with self.ctx.index.engine.connect() as c:
                row = c.execute(select(studies.c.protected, studies.c.size_bytes, patients.c.patient_id,
                                       patients.c.patient_name)
                                .select_from(studies.join(patients, studies.c.patient_fk == patients.c.id))
                                .where(studies.c.study_instance_uid == uid)).first()
            if row is None or row.protected:
                q.ack(jc.job.id, item.seq, 1, 0)  # gone meanwhile, or protected since the plan: kept
                kept += 1
                continue
            n = self.ctx.ingest.delete("STUDY", uid, Source(protocol="JOB", user=user))
            deleted += 1
            if self.ctx.audit is not None:
                self.ctx.audit.record("StudyDeleted", user=user, protocol="JOB", study_uids=[uid],
                                      patient_id=row.patient_id or "", patient_name=row.patient_name or "",
                                      detail=f"retention job {jc.job.id}: {reasons.get(uid, 'retention rule')} "
                                      f"({n} instance(s), {int(row.size_bytes)} bytes)")
            q.ack(jc.job.id, item.seq, 0, int(row.size_bytes))
        q.update_payload(jc.job.id, {"deleted": deleted, "kept": kept})
        log.info("retention job %d: %d study(ies) deleted, %d kept", jc.job.id, deleted, kept)
