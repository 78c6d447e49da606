"""Departments and the rules that assign each new study to one (by modality, sending AE, institution, department).

The department is decided once, when the study's first instance is indexed, from that instance's attributes (ingest
calls :meth:`DepartmentService.classify`); admins can edit rules and re-apply them to existing studies. A study no
rule matches gets ``default`` (None unless configured): it is then visible only to users with every-department scope.
Rules are cached in memory (the hot path evaluates a handful of fnmatch patterns, no query).
"""

from __future__ import annotations

import fnmatch
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import delete, insert, select, update

from ..index.db import Index
from ..index.schema import instances, series, studies
from ..index.security_schema import department_rules, departments

STANDARD_DEPARTMENTS = {
    "radiology": "Radiology",
    "cardiology": "Cardiology",
    "pathology": "Pathology",
    "nuclear-medicine": "Nuclear Medicine",
    "radiation-therapy": "Radiation Therapy",
}


@dataclass(frozen=True)
class Rule:
    id: int
    priority: int
    department: str
    modality: str | None = None
    calling_aet: str | None = None
    institution_name: str | None = None
    institutional_department_name: str | None = None
    enabled: bool = True

    def matches(self, modality: str, calling_aet: str, institution: str, department_name: str) -> bool:
        for pattern, value in (
            (self.modality, modality),
            (self.calling_aet, calling_aet),
            (self.institution_name, institution),
            (self.institutional_department_name, department_name),
        ):
            if pattern and not any(
                fnmatch.fnmatchcase((value or "").upper(), p.strip().upper()) for p in pattern.split(",") if p.strip()
            ):
                return False
        return True


class DepartmentService:
    def __init__(self, index: Index, default: str | None = None, reload_every: float = 30.0) -> None:
        self.index = index
        self.default = default or None
        self.reload_every = reload_every
        self._rules: list[Rule] = []
        self._loaded = float("-inf")  # never loaded (0.0 is not "long ago": monotonic time starts at boot)
        self._changes = 0  # stale marks received (the change feed's thread)
        self._lock = threading.Lock()
        index.changes.subscribe("departments", self._mark_stale)  # rules edited on another node or process

    # -- the hot path ----------------------------------------------------------------------------------------
    def rules(self) -> list[Rule]:
        if time.monotonic() - self._loaded > self.reload_every:
            self.reload()
        return self._rules

    def _mark_stale(self) -> None:
        self._changes += 1
        self._loaded = float("-inf")  # the next classification reads the rules again

    def reload(self) -> None:
        changes = self._changes  # a change marked while the rules are read is not lost: they are read again
        with self.index.engine.connect() as c:
            rows = c.execute(
                select(department_rules)
                .where(department_rules.c.enabled.is_(True))
                .order_by(department_rules.c.priority, department_rules.c.id)
            ).all()
        with self._lock:
            self._rules = [
                Rule(
                    r.id,
                    r.priority,
                    r.department,
                    r.modality,
                    r.calling_aet,
                    r.institution_name,
                    r.institutional_department_name,
                    bool(r.enabled),
                )
                for r in rows
            ]
            self._loaded = time.monotonic() if changes == self._changes else float("-inf")

    def classify(self, values: dict[str, dict[str, Any]], calling_aet: str = "") -> str | None:
        """The department of a new study, from the index values of its first instance (level -> column -> value)."""
        sv = values.get("SERIES", {})
        modality = sv.get("modality") or ""
        institution = sv.get("institution_name") or values.get("STUDY", {}).get("institution_name") or ""
        dept_name = sv.get("institutional_department_name") or ""
        for rule in self.rules():
            if rule.matches(modality, calling_aet, institution, dept_name):
                return rule.department
        return self.default

    # -- administration --------------------------------------------------------------------------------------
    def ensure_standard(self) -> None:
        """Create the standard departments once (rules stay the admin's choice)."""
        with self.index.write_engine.begin() as c:
            have = set(c.execute(select(departments.c.code)).scalars())
            for code, name in STANDARD_DEPARTMENTS.items():
                if code not in have:
                    c.execute(insert(departments).values(code=code, name=name, created_at=datetime.now(UTC)))

    def list_departments(self) -> list[tuple[str, str]]:
        with self.index.engine.connect() as c:
            return [(r.code, r.name) for r in c.execute(select(departments).order_by(departments.c.code))]

    def add_department(self, code: str, name: str = "") -> None:
        code = code.strip().lower()
        if not code or "," in code or len(code) > 64:
            raise ValueError("invalid department code")
        with self.index.write_engine.begin() as c:
            c.execute(insert(departments).values(code=code, name=name or code, created_at=datetime.now(UTC)))

    def add_rule(
        self,
        department: str,
        *,
        priority: int = 100,
        modality: str | None = None,
        calling_aet: str | None = None,
        institution_name: str | None = None,
        institutional_department_name: str | None = None,
    ) -> int:
        department = department.strip().lower()
        if not any((modality, calling_aet, institution_name, institutional_department_name)):
            raise ValueError("a rule needs at least one criterion")
        with self.index.write_engine.begin() as c:
            if c.execute(select(departments.c.id).where(departments.c.code == department)).first() is None:
                raise ValueError(f"unknown department {department!r}")
            rid = c.execute(
                insert(department_rules).values(
                    priority=priority,
                    department=department,
                    modality=modality or None,
                    calling_aet=calling_aet or None,
                    institution_name=institution_name or None,
                    institutional_department_name=institutional_department_name or None,
                    enabled=True,
                    created_at=datetime.now(UTC),
                )
            ).inserted_primary_key[0]  # type: ignore[index]
        self.index.changes.bump("departments")
        self.reload()
        return int(rid)

    def delete_rule(self, rule_id: int) -> None:
        with self.index.write_engine.begin() as c:
            c.execute(delete(department_rules).where(department_rules.c.id == rule_id))
        self.index.changes.bump("departments")
        self.reload()

    def reapply(self, only_unassigned: bool = False) -> int:
        """Recompute every study's department from its first series (admin action after editing rules)."""
        self.reload()
        changed = 0
        with self.index.engine.connect() as c:
            stmt = select(studies.c.id, studies.c.department)
            if only_unassigned:
                stmt = stmt.where(studies.c.department.is_(None))
            rows = c.execute(stmt).all()
            updates = []
            for sid, current in rows:
                s = c.execute(
                    select(
                        series.c.id,
                        series.c.modality,
                        series.c.institution_name,
                        series.c.institutional_department_name,
                    )
                    .where(series.c.study_fk == sid)
                    .order_by(series.c.id)
                    .limit(1)
                ).first()
                aet = (
                    c.execute(
                        select(instances.c.calling_aet)
                        .where(instances.c.series_fk == s.id)
                        .order_by(instances.c.id)
                        .limit(1)
                    ).scalar_one_or_none()
                    if s
                    else None
                )
                values = {
                    "SERIES": {
                        "modality": s.modality,
                        "institution_name": s.institution_name,
                        "institutional_department_name": s.institutional_department_name,
                    }
                    if s
                    else {}
                }
                dept = self.classify(values, aet or "")
                if dept != current:
                    updates.append((sid, dept))
        if updates:
            with self.index.write_engine.begin() as c:
                for sid, dept in updates:
                    c.execute(update(studies).where(studies.c.id == sid).values(department=dept))
                    changed += 1
        return changed
