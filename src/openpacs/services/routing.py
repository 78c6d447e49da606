"""Auto-routing: rules that forward what arrives to other nodes, evaluated from the change feed.

A rule has conditions (on the calling or called AE title, the modality, SOP class, department, institution, or any
other attribute: equals, wildcard, regex, range, one of), one or more destinations (DIMSE nodes or DICOMweb peers),
a trigger (``instance``: each instance as it arrives; ``stable``: the whole study once no instance has arrived for
``stable_seconds``), an optional schedule (time windows, e.g. ``22:00-06:00``, and week days) and a transfer syntax
to send in (empty: as stored).

Rules live in the index (``routing_rules``: the API and the console edit them) and in the TOML file (``[[routes]]``,
read-only). The :class:`Router` follows the change feed (``changes.seq``) in batches, never the ingest hot path:
a rule never slows down or fails a C-STORE. For each batch it submits one send job per (rule, destination) of the
matching instances, in the same transaction that advances its cursor, so a batch is routed exactly once even across
a crash (and, on PostgreSQL, across nodes: the cursor row is locked). Jobs (services/jobs.py) do the sending, with
retries; a rule outside its schedule submits its jobs to start when the next window opens.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from datetime import time as dtime
from typing import Any

from sqlalchemy import and_, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from ..index.db import Index
from ..index.routing_schema import routing_cursor, routing_pending, routing_rules
from ..index.schema import changes, instances, jobs, patients, series, studies
from ..index.worklist_schema import scheduled_steps

log = logging.getLogger("openpacs.routing")

TRIGGERS = ("instance", "stable")
KINDS = ("route", "prefetch")  # prefetch rules: services/prefetch.py
PREFETCH_ON = ("study", "order")
OPS = ("equals", "wildcard", "regex", "range", "in")
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
CURSOR = "router"
ORDERS_CURSOR = "prefetch-orders"  # the last scheduled_steps.id the prefetch rules have seen
BATCH = 500
MAX_VALUE = 4096  # characters of an attribute value a condition looks at (hostile content stays bounded)
MAX_PATTERN = 512
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_WINDOW = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-4]):([0-5]\d)$")
_TAG = re.compile(r"^\(?([0-9A-Fa-f]{4}),?([0-9A-Fa-f]{4})\)?$")

# Attributes the index holds for every instance: a condition on them needs no file read.
INDEXED: dict[str, Any] = {
    "CallingAETitle": instances.c.calling_aet,
    "CalledAETitle": instances.c.called_aet,
    "Source": instances.c.source,
    "SOPClassUID": instances.c.sop_class_uid,
    "TransferSyntaxUID": instances.c.transfer_syntax_uid,
    "Modality": series.c.modality,
    "BodyPartExamined": series.c.body_part_examined,
    "SeriesDescription": series.c.series_description,
    "StationName": series.c.station_name,
    "Manufacturer": series.c.manufacturer,
    "InstitutionalDepartmentName": series.c.institutional_department_name,
    "ProtocolName": series.c.protocol_name,
    "Department": studies.c.department,
    "StudyDescription": studies.c.study_description,
    "AccessionNumber": studies.c.accession_number,
    "StudyDate": studies.c.study_date,
    "ReferringPhysicianName": studies.c.referring_physician_name,
    "PatientID": patients.c.patient_id,
    "IssuerOfPatientID": patients.c.issuer_of_patient_id,
}
ALIASES = {"calling_aet": "CallingAETitle", "called_aet": "CalledAETitle", "modality": "Modality",
           "sop_class": "SOPClassUID", "department": "Department", "institution": "InstitutionName"}


class RouteError(ValueError):
    """A rule that is not valid (HTTP 400), naming the field."""


class RouteConflict(Exception):
    """A name taken, or a TOML rule that cannot be changed through the API (HTTP 409)."""


@dataclass(frozen=True)
class Condition:
    attribute: str
    op: str
    value: Any
    negate: bool = False
    ignore_case: bool = False
    _regex: Any = field(default=None, compare=False, repr=False)  # an RE2 pattern: linear time, no backtracking

    def spec(self) -> dict[str, Any]:
        out: dict[str, Any] = {"attribute": self.attribute, "op": self.op, "value": self.value}
        if self.negate:
            out["negate"] = True
        if self.ignore_case:
            out["ignore_case"] = True
        return out

    def matches(self, raw: Any) -> bool:
        return self._test(raw) != self.negate

    def _test(self, raw: Any) -> bool:
        values = _values_of(raw)
        if self.ignore_case:
            values = [v.casefold() for v in values]
        if self.op == "equals":
            want = self.value.casefold() if self.ignore_case else self.value
            return any(v == want for v in values)
        if self.op == "in":
            wants = {w.casefold() if self.ignore_case else w for w in self.value}
            return any(v in wants for v in values)
        if self.op == "wildcard":
            pat = self.value.casefold() if self.ignore_case else self.value
            return any(fnmatch.fnmatchcase(v, pat) for v in values)
        if self.op == "regex":
            assert self._regex is not None
            return any(self._regex.search(v) for v in values)
        low, high = self.value
        return any(_in_range(v, low, high) for v in values)


@dataclass(frozen=True)
class Rule:
    name: str
    destinations: tuple[str, ...]
    conditions: tuple[Condition, ...] = ()
    match: str = "all"  # all | any
    trigger: str = "instance"
    stable_seconds: float = 60.0
    schedule: tuple[str, ...] = ()  # "HH:MM-HH:MM" windows (local time of the node); empty: always
    days: tuple[str, ...] = ()  # mon..sun; empty: every day
    transfer_syntax: str = ""  # empty: as stored (transcoded only when the peer does not accept it)
    commit: bool = False  # ask a DICOM destination for storage commitment: the job is done once it has committed
    priority: int = 0
    enabled: bool = True
    description: str = ""
    source: str = "index"  # index (editable) | config (TOML [[routes]], read-only)
    id: int | None = None
    updated_at: datetime | None = None
    updated_by: str | None = None
    # prefetch rules (kind "prefetch"): where from, when, and which priors
    kind: str = "route"
    sources: tuple[str, ...] = ()
    on: tuple[str, ...] = ("study",)
    prior_modalities: tuple[str, ...] | str = "same"  # "same", a list, or () for any
    same_body_part: bool = False
    max_priors: int = 3
    max_age_days: float = 0.0  # 0: any age
    method: str = ""  # move | get | wado; empty: the archive's first

    @property
    def editable(self) -> bool:
        return self.source == "index"

    def spec(self) -> dict[str, Any]:
        if self.kind == "prefetch":
            return {"kind": "prefetch", "sources": list(self.sources), "on": list(self.on),
                    "conditions": [c.spec() for c in self.conditions], "match": self.match,
                    "prior_modalities": (self.prior_modalities if isinstance(self.prior_modalities, str)
                                         else list(self.prior_modalities)),
                    "same_body_part": self.same_body_part, "max_priors": self.max_priors,
                    "max_age_days": self.max_age_days, "method": self.method, "priority": self.priority,
                    "description": self.description}
        return {"destinations": list(self.destinations), "conditions": [c.spec() for c in self.conditions],
                "match": self.match, "trigger": self.trigger, "stable_seconds": self.stable_seconds,
                "schedule": list(self.schedule), "days": list(self.days), "transfer_syntax": self.transfer_syntax,
                "commit": self.commit, "priority": self.priority, "description": self.description}

    def matches(self, attrs: Mapping[str, Any]) -> bool:
        if not self.conditions:
            return True
        results = (c.matches(attrs.get(c.attribute)) for c in self.conditions)
        return all(results) if self.match == "all" else any(results)

    def file_attributes(self) -> set[str]:
        return {c.attribute for c in self.conditions if c.attribute not in INDEXED and c.attribute != "InstitutionName"}

    # -- schedule -------------------------------------------------------------------------------------------
    def open_at(self, t: datetime) -> bool:
        """Whether ``t`` (aware) is inside the rule's schedule."""
        local = t.astimezone()
        if self.days and DAYS[local.weekday()] not in self.days:
            # a window that began yesterday (22:00-06:00) still counts on the next morning
            if not self._in_overnight_tail(local):
                return False
        if not self.schedule:
            return True
        return any(_in_window(local, w, self.days) for w in self.schedule)

    def _in_overnight_tail(self, local: datetime) -> bool:
        yesterday = DAYS[(local.weekday() - 1) % 7]
        if yesterday not in self.days:
            return False
        for w in self.schedule:
            start, end = _window(w)
            if end <= start and local.time() < end:
                return True
        return False

    def next_open(self, t: datetime) -> datetime:
        """The first minute at or after ``t`` inside the schedule (t itself when open); searched a week ahead."""
        if self.open_at(t):
            return t
        probe = t.replace(second=0, microsecond=0) + timedelta(minutes=1)
        for _ in range(7 * 24 * 60):
            if self.open_at(probe):
                return probe
            probe += timedelta(minutes=1)
        return t  # no window at all (cannot happen for a validated rule): send now


def _values_of(raw: Any) -> list[str]:
    if raw is None:
        return [""]
    if isinstance(raw, (list, tuple)):
        items = [str(v) for v in raw] or [""]
    else:
        items = str(raw).split("\\")
    return [v.strip(" \x00")[:MAX_VALUE] for v in items]


def _number(v: str) -> float | None:
    try:
        return float(v)
    except ValueError:
        return None


def _in_range(v: str, low: str, high: str) -> bool:
    if not v:
        return False
    nv, nl, nh = _number(v), _number(low) if low else None, _number(high) if high else None
    if nv is not None and (not low or nl is not None) and (not high or nh is not None):
        return (nl is None or nv >= nl) and (nh is None or nv <= nh)
    return (not low or v >= low) and (not high or v <= high)  # dates (YYYYMMDD), times, text


def _window(w: str) -> tuple[dtime, dtime]:
    m = _WINDOW.match(w)
    assert m is not None
    h1, m1, h2, m2 = (int(x) for x in m.groups())
    end = dtime(23, 59, 59, 999999) if h2 == 24 else dtime(h2, m2)
    return dtime(h1, m1), end


def _in_window(local: datetime, w: str, days: tuple[str, ...]) -> bool:
    start, end = _window(w)
    now = local.time()
    if start <= end:
        return start <= now < end and (not days or DAYS[local.weekday()] in days)
    # overnight: from start today, or before end on the morning after a scheduled day
    if now >= start:
        return not days or DAYS[local.weekday()] in days
    if now < end:
        return not days or DAYS[(local.weekday() - 1) % 7] in days
    return False


# ---- parsing and validation ---------------------------------------------------------------------------------


def _attribute(name: Any) -> str:
    if not isinstance(name, str) or not name.strip():
        raise RouteError("conditions[].attribute: a DICOM keyword or tag is required")
    name = ALIASES.get(name.strip(), name.strip())
    if name in INDEXED or name == "InstitutionName":
        return name
    m = _TAG.match(name)
    if m:
        return f"{m.group(1)}{m.group(2)}".upper()
    from pydicom.datadict import tag_for_keyword

    if tag_for_keyword(name) is None:
        raise RouteError(f"conditions[].attribute: {name!r} is neither a DICOM keyword nor a tag (GGGGEEEE)")
    return name


def parse_condition(spec: Any) -> Condition:
    if not isinstance(spec, Mapping):
        raise RouteError("conditions[]: each condition is an object {attribute, op, value}")
    unknown = set(spec) - {"attribute", "op", "value", "negate", "ignore_case"}
    if unknown:
        raise RouteError(f"conditions[]: unknown field(s) {', '.join(sorted(unknown))}")
    attribute = _attribute(spec.get("attribute"))
    op = str(spec.get("op") or "equals").strip().lower()
    if op not in OPS:
        raise RouteError(f"conditions[].op: one of {', '.join(OPS)}, not {op!r}")
    value = spec.get("value")
    regex = None
    if op == "in":
        if isinstance(value, str):
            value = [v for v in value.split("\\")]
        if not isinstance(value, list) or not value or not all(isinstance(v, (str, int, float)) for v in value):
            raise RouteError(f"conditions[{attribute}].value: a list of values for op 'in'")
        value = [str(v) for v in value]
    elif op == "range":
        if isinstance(value, str) and "-" in value:
            value = value.split("-", 1)
        if (not isinstance(value, list) or len(value) != 2 or not all(isinstance(v, (str, int, float)) for v in value)
                or not any(str(v) for v in value)):
            raise RouteError(f"conditions[{attribute}].value: [low, high] (or \"low-high\"; one side may be empty)")
        value = [str(v).strip() for v in value]
    else:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise RouteError(f"conditions[{attribute}].value: a string")
        value = str(value)
        if len(value) > MAX_PATTERN:
            raise RouteError(f"conditions[{attribute}].value: at most {MAX_PATTERN} characters")
        if op == "regex":
            regex = _compile_regex(attribute, value, bool(spec.get("ignore_case")))
    return Condition(attribute, op, value, bool(spec.get("negate", False)), bool(spec.get("ignore_case", False)),
                     regex)


def _compile_regex(attribute: str, pattern: str, ignore_case: bool) -> Any:
    """RE2 (google-re2), not Python's re: matching takes time linear in the value whatever the pattern, so a rule
    like ``(a+)+$`` meeting a hostile value cannot hang the router (Python's re would backtrack for hours, holding
    the GIL). RE2 has no backreferences or lookaround; such patterns are refused here."""
    import re2

    try:
        return re2.compile(("(?i)" if ignore_case else "") + pattern)
    except Exception as e:  # noqa: BLE001 - re2.error
        msg = e.args[0].decode(errors="replace") if e.args and isinstance(e.args[0], bytes) else str(e)
        raise RouteError(f"conditions[{attribute}].value: not a valid regular expression (RE2 syntax: no "
                         f"backreferences or lookaround): {msg}") from None


def _shorthand(match: Mapping[str, Any]) -> list[dict[str, Any]]:
    """TOML ``[routes.match]`` Keyword = "value": equals, or wildcard when the value has * or ?; a list: one of."""
    out = []
    for k, v in match.items():
        if isinstance(v, list):
            out.append({"attribute": k, "op": "in", "value": v})
        elif isinstance(v, str) and ("*" in v or "?" in v):
            out.append({"attribute": k, "op": "wildcard", "value": v})
        else:
            out.append({"attribute": k, "op": "equals", "value": v})
    return out


def parse_rule(name: Any, spec: Mapping[str, Any], *, source: str = "index", enabled: bool = True,
               known_destinations: Iterable[str] | None = None) -> Rule:
    """A rule from its JSON/TOML form, or RouteError naming what is wrong."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise RouteError("name: 1-64 letters, digits, '_', '.', '-' (starting with a letter or digit)")
    kind = str(spec.get("kind") or "route").lower()
    if kind not in KINDS:
        raise RouteError(f"kind: one of {', '.join(KINDS)}")
    if kind == "prefetch":
        return _parse_prefetch(name, spec, source, enabled, known_destinations)
    allowed = {"destinations", "conditions", "match", "trigger", "stable_seconds", "schedule", "days",
               "transfer_syntax", "commit", "priority", "description", "enabled", "name", "kind"}
    unknown = set(spec) - allowed
    if unknown:
        raise RouteError(f"unknown field(s) {', '.join(sorted(unknown))}")
    dests = spec.get("destinations")
    if isinstance(dests, str):
        dests = [d for d in dests.replace(",", " ").split() if d]
    if not isinstance(dests, list) or not dests or not all(isinstance(d, str) and d.strip() for d in dests):
        raise RouteError("destinations: one or more node names")
    dests = list(dict.fromkeys(d.strip() for d in dests))
    if known_destinations is not None:
        known = set(known_destinations)
        missing = [d for d in dests if d not in known]
        if missing:
            raise RouteError(f"destinations: unknown node(s) {', '.join(missing)} (add them under Nodes first)")
    conditions, match = _conditions(spec)
    trigger = str(spec.get("trigger") or "instance").lower()
    if trigger not in TRIGGERS:
        raise RouteError(f"trigger: one of {', '.join(TRIGGERS)}")
    try:
        stable = float(spec.get("stable_seconds", 60))
    except (TypeError, ValueError):
        raise RouteError("stable_seconds: a number of seconds") from None
    if not 0 <= stable <= 7 * 86400:
        raise RouteError("stable_seconds: 0 to 604800")
    schedule = spec.get("schedule") or []
    if isinstance(schedule, str):
        schedule = [w for w in schedule.replace(",", " ").split() if w]
    if not isinstance(schedule, list) or not all(isinstance(w, str) and _WINDOW.match(w.strip()) for w in schedule):
        raise RouteError("schedule: time windows \"HH:MM-HH:MM\" (e.g. \"22:00-06:00\")")
    days = spec.get("days") or []
    if isinstance(days, str):
        days = [d for d in days.replace(",", " ").split() if d]
    days = [str(d).strip().lower()[:3] for d in days]
    if any(d not in DAYS for d in days):
        raise RouteError(f"days: some of {', '.join(DAYS)}")
    ts = str(spec.get("transfer_syntax") or "").strip()
    if ts and not re.fullmatch(r"[0-9]+(\.[0-9]+)+", ts):
        raise RouteError("transfer_syntax: a transfer syntax UID, or empty for as stored")
    try:
        priority = int(spec.get("priority", 0))
    except (TypeError, ValueError):
        raise RouteError("priority: an integer") from None
    return Rule(name=name, destinations=tuple(dests), conditions=conditions, match=match, trigger=trigger,
                stable_seconds=stable, schedule=tuple(w.strip() for w in schedule), days=tuple(days),
                transfer_syntax=ts, commit=bool(spec.get("commit", False)), priority=priority,
                enabled=bool(spec.get("enabled", enabled)),
                description=str(spec.get("description") or "")[:1000], source=source)


def _conditions(spec: Mapping[str, Any]) -> tuple[tuple[Condition, ...], str]:
    raw_match = spec.get("match", "all")
    conds_spec: Any = spec.get("conditions") or []
    if not isinstance(conds_spec, list):
        raise RouteError("conditions: a list")
    conds_spec = list(conds_spec)
    if isinstance(raw_match, Mapping):  # TOML shorthand
        conds_spec += _shorthand(raw_match)
        raw_match = "all"
    match = str(raw_match).lower()
    if match not in ("all", "any"):
        raise RouteError("match: 'all' or 'any'")
    return tuple(parse_condition(c) for c in conds_spec), match


def _names(spec: Mapping[str, Any], key: str) -> list[str]:
    raw = spec.get(key)
    if isinstance(raw, str):
        raw = [d for d in raw.replace(",", " ").split() if d]
    if raw is None:
        return []
    if not isinstance(raw, list) or not all(isinstance(d, str) and d.strip() for d in raw):
        raise RouteError(f"{key}: a list of names")
    return list(dict.fromkeys(d.strip() for d in raw))


def _parse_prefetch(name: str, spec: Mapping[str, Any], source: str, enabled: bool,
                    known: Iterable[str] | None) -> Rule:
    allowed = {"kind", "name", "enabled", "sources", "on", "conditions", "match", "prior_modalities",
               "same_body_part", "max_priors", "max_age_days", "method", "priority", "description"}
    unknown = set(spec) - allowed
    if unknown:
        raise RouteError(f"unknown field(s) {', '.join(sorted(unknown))} (a prefetch rule)")
    sources = _names(spec, "sources")
    if not sources:
        raise RouteError("sources: one or more archives to fetch the priors from")
    if known is not None:
        missing = [d for d in sources if d not in set(known)]
        if missing:
            raise RouteError(f"sources: unknown archive(s) {', '.join(missing)} (add them under Nodes first)")
    on = [o.lower() for o in _names(spec, "on")] or ["study"]
    if any(o not in PREFETCH_ON for o in on):
        raise RouteError(f"on: some of {', '.join(PREFETCH_ON)}")
    conditions, match = _conditions(spec)
    mods_raw = spec.get("prior_modalities", "same")
    mods: tuple[str, ...] | str
    if mods_raw in ("same", "SAME"):
        mods = "same"
    else:
        names = _names({"m": mods_raw}, "m") if mods_raw not in ("", None, []) else []
        if any(not re.fullmatch(r"[A-Z0-9]{1,16}", m) for m in names):
            raise RouteError("prior_modalities: \"same\", a list of modalities (CT, MR...), or empty for any")
        mods = tuple(names)
    try:
        max_priors = int(spec.get("max_priors", 3))
        max_age = float(spec.get("max_age_days", 0) or 0)
        priority = int(spec.get("priority", -10))
    except (TypeError, ValueError):
        raise RouteError("max_priors, max_age_days and priority: numbers") from None
    if not 1 <= max_priors <= 50:
        raise RouteError("max_priors: 1 to 50")
    if max_age < 0:
        raise RouteError("max_age_days: 0 (any age) or more")
    method = str(spec.get("method") or "").lower()
    if method and method not in ("move", "get", "wado"):
        raise RouteError("method: move, get or wado (empty: the archive's first)")
    return Rule(name=name, destinations=(), conditions=conditions, match=match, kind="prefetch",
                sources=tuple(sources), on=tuple(on), prior_modalities=mods,
                same_body_part=bool(spec.get("same_body_part", False)), max_priors=max_priors,
                max_age_days=max_age, method=method, priority=priority,
                enabled=bool(spec.get("enabled", enabled)), description=str(spec.get("description") or "")[:1000],
                source=source)


def send_kind(settings: Any, destination: str) -> str:
    """The job kind that sends to ``destination``: STOW-RS to a DICOMweb peer, else C-STORE (a destination removed
    since the rule was written fails in its job, with the reason, rather than here)."""
    from .jobs import destination_kind

    return destination_kind(settings, destination) or "send"


# ---- the rules -------------------------------------------------------------------------------------------------


class RoutingService:
    """The rules of the index and of the TOML file, edited through the API and the console."""

    def __init__(self, index: Index, settings: Any, nodes: Any = None) -> None:
        self.index = index
        self.settings = settings
        self.nodes = nodes
        self._config_rules: list[Rule] | None = None

    def destinations(self) -> list[str]:
        names = set((getattr(self.settings, "remote_dicomweb", None) or {}).keys())
        if self.nodes is not None:
            names |= {n.name for n in self.nodes.list()}
        else:
            names |= set(self.settings.remote_aes)
        return sorted(names)

    def config_rules(self) -> list[Rule]:
        if self._config_rules is None:
            out = []
            for i, spec in enumerate(getattr(self.settings, "routes", None) or []):
                name = spec.get("name") or f"route-{i + 1}"
                try:
                    out.append(parse_rule(name, spec, source="config"))
                except RouteError as e:
                    raise RouteError(f"[[routes]] {name}: {e}") from None
            self._config_rules = out
        return self._config_rules

    def rules(self) -> list[Rule]:
        with self.index.engine.connect() as c:
            rows = c.execute(select(routing_rules).order_by(routing_rules.c.name)).all()
        out = list(self.config_rules())
        taken = {r.name for r in out}
        for row in rows:
            if row.name in taken:
                continue
            try:
                rule = parse_rule(row.name, json.loads(row.spec), enabled=bool(row.enabled))
            except (RouteError, ValueError) as e:  # a rule stored by an older version: shown, never applied
                log.error("routing rule %s cannot be read: %s", row.name, e)
                continue
            out.append(Rule(**{**rule.__dict__, "id": row.id, "updated_at": row.updated_at,
                               "updated_by": row.updated_by}))
        return out

    def get(self, name: str) -> Rule | None:
        return next((r for r in self.rules() if r.name == name), None)

    def create(self, spec: Mapping[str, Any], user: str = "") -> Rule:
        name = spec.get("name")
        rule = parse_rule(name, spec, known_destinations=self.destinations())
        if any(r.name == rule.name for r in self.config_rules()):
            raise RouteConflict(f"rule {rule.name!r} is defined in the configuration file")
        t = datetime.now(UTC)
        try:
            with self.index.write_engine.begin() as c:
                c.execute(insert(routing_rules).values(name=rule.name, enabled=rule.enabled,
                                                       spec=json.dumps(rule.spec()), created_at=t, updated_at=t,
                                                       updated_by=user or None))
        except IntegrityError:
            raise RouteConflict(f"a rule named {rule.name!r} exists") from None
        got = self.get(rule.name)
        assert got is not None
        return got

    def update(self, name: str, spec: Mapping[str, Any], user: str = "") -> Rule:
        old = self.get(name)
        if old is None:
            raise KeyError(name)
        if not old.editable:
            raise RouteConflict(f"rule {name!r} is defined in the configuration file; change it there")
        merged = {**old.spec(), "enabled": old.enabled, **{k: v for k, v in spec.items() if k != "name"}}
        rule = parse_rule(name, merged, known_destinations=self.destinations())
        with self.index.write_engine.begin() as c:
            c.execute(update(routing_rules).where(routing_rules.c.name == name).values(
                enabled=rule.enabled, spec=json.dumps(rule.spec()), updated_at=datetime.now(UTC),
                updated_by=user or None))
        got = self.get(name)
        assert got is not None
        return got

    def delete(self, name: str) -> None:
        old = self.get(name)
        if old is None:
            raise KeyError(name)
        if not old.editable:
            raise RouteConflict(f"rule {name!r} is defined in the configuration file; remove it there")
        with self.index.write_engine.begin() as c:
            c.execute(delete(routing_rules).where(routing_rules.c.name == name))
            c.execute(delete(routing_pending).where(routing_pending.c.rule == name))

    def pending(self) -> list[dict[str, Any]]:
        with self.index.engine.connect() as c:
            rows = c.execute(select(routing_pending).order_by(routing_pending.c.last_at)).mappings().all()
        return [dict(r) for r in rows]

    def cursor(self) -> dict[str, Any]:
        with self.index.engine.connect() as c:
            row = c.execute(select(routing_cursor).where(routing_cursor.c.name == CURSOR)).first()
            head = c.execute(select(func.max(changes.c.seq))).scalar() or 0
        return {"seq": row.seq if row else None, "head": int(head), "behind": int(head) - (row.seq if row else head),
                "updated_at": row.updated_at if row else None}

    # -- dry run ----------------------------------------------------------------------------------------------
    def dry_run(self, study_instance_uid: str, rules: Sequence[Rule] | None = None,
                reader: Any = None) -> list[dict[str, Any]]:
        """Which rules the stored instances of a study would trigger, and to where: nothing is sent."""
        with self.index.engine.connect() as c:
            rows = c.execute(_attrs_query().where(studies.c.study_instance_uid == study_instance_uid)).mappings().all()
        if not rows:
            raise KeyError(study_instance_uid)
        rules = [r for r in (rules if rules is not None else self.rules())]
        attrs = [dict(r) for r in rows]
        _add_file_attributes(attrs, rules, reader)
        now = datetime.now(UTC)
        out = []
        for rule in rules:
            matched = [a["SOPInstanceUID"] for a in attrs if rule.matches(a)]
            out.append({"rule": rule.name, "kind": rule.kind, "sources": list(rule.sources),
                        "enabled": rule.enabled, "trigger": rule.trigger,
                        "destinations": list(rule.destinations), "instances": len(matched),
                        "of": len(attrs), "would_send": bool(matched) and rule.enabled,
                        "open_now": rule.open_at(now),
                        "next_window": None if rule.open_at(now) else rule.next_open(now).isoformat()})
        return out


def _attrs_query() -> Any:
    cols = [instances.c.sop_instance_uid.label("SOPInstanceUID"), instances.c.size_bytes.label("_size"),
            instances.c.blob_key.label("_blob"), studies.c.study_instance_uid.label("StudyInstanceUID"),
            func.coalesce(series.c.institution_name, studies.c.institution_name).label("InstitutionName")]
    cols += [col.label(name) for name, col in INDEXED.items()]
    return (select(*cols).select_from(instances.join(series, instances.c.series_fk == series.c.id)
                                      .join(studies, series.c.study_fk == studies.c.id)
                                      .join(patients, studies.c.patient_fk == patients.c.id)))


def read_header(store: Any, key: str, full: bool = False) -> bytes:
    """The first MB of a stored file (the header of any but a huge private one), or all of it."""
    return bytes(store.read(key) if full else store.read(key, 0, 1 << 20))


def _add_file_attributes(attrs: list[dict[str, Any]], rules: Sequence[Rule], reader: Any) -> None:
    """Attributes the index does not hold, read from the stored headers of the instances (only when a rule asks)."""
    wanted = set().union(*(r.file_attributes() for r in rules if r.enabled)) if rules else set()
    if not wanted or reader is None:
        return
    from io import BytesIO

    from pydicom import dcmread

    for a in attrs:
        try:
            head = reader(a["_blob"])
            try:
                ds = dcmread(BytesIO(head), stop_before_pixels=True, force=True)
            except Exception:  # noqa: BLE001 - a header longer than the first MB: read it all
                ds = dcmread(BytesIO(reader(a["_blob"], full=True)), stop_before_pixels=True, force=True)
        except Exception as e:  # noqa: BLE001 - an unreadable header matches no file condition
            log.warning("routing: header of %s unreadable: %s", a["SOPInstanceUID"], e)
            continue
        for name in wanted:
            try:
                elem = ds[int(name, 16)] if re.fullmatch(r"[0-9A-F]{8}", name) else ds.data_element(name)
                if elem is None:
                    continue
                value = elem.value
                if isinstance(value, bytes):
                    value = value.decode("latin-1")
                elif isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
                    value = [str(v) for v in value]
                else:
                    value = str(value)
                a[name] = value
            except Exception:  # noqa: BLE001 - missing or malformed element: no value
                continue


# ---- the router ------------------------------------------------------------------------------------------------


class Router:
    """Follows the change feed and submits the send jobs the rules ask for; checks studies waiting to be stable."""

    def __init__(self, ctx: Any, service: RoutingService, *, poll: float = 1.0) -> None:
        self.ctx = ctx
        self.index: Index = ctx.index
        self.service = service
        self.poll = poll
        self.routed = 0  # instances put into jobs by this process (tests, metrics)
        self._queued = False  # a job was submitted in this step: notify the workers once it is committed

    def _read_header(self, key: str, full: bool = False) -> bytes:
        return read_header(self.ctx.store, key, full)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                busy = await asyncio.to_thread(self.step)
            except Exception as e:  # noqa: BLE001 - the index may be briefly unreachable; never stop routing
                log.error("routing step failed: %r", e)
                busy = False
            if not busy:
                try:
                    await asyncio.wait_for(stop.wait(), timeout=self.poll)
                except TimeoutError:
                    pass

    def start_following(self, now: datetime | None = None) -> None:
        """At the first start: the router's cursors at the heads of the change feed and of the orders, before the
        listeners open (what arrives from then on is routed, whenever the router itself starts)."""
        try:
            with self.index.write_engine.begin() as c:
                self._take_cursors(c, now or datetime.now(UTC))
        except IntegrityError:
            pass  # another node starting at the same time took them

    def _take_cursors(self, c: Any, now: datetime) -> None:
        have = set(c.execute(select(routing_cursor.c.name)
                             .where(routing_cursor.c.name.in_((CURSOR, ORDERS_CURSOR)))).scalars())
        if CURSOR not in have:
            head = int(c.execute(select(func.max(changes.c.seq))).scalar() or 0)
            c.execute(insert(routing_cursor).values(name=CURSOR, seq=head, updated_at=now))
            log.info("routing: following the change feed from seq %d", head)
        if ORDERS_CURSOR not in have:
            head = int(c.execute(select(func.max(scheduled_steps.c.id))).scalar() or 0)
            c.execute(insert(routing_cursor).values(name=ORDERS_CURSOR, seq=head, updated_at=now))

    def step(self, now: datetime | None = None) -> bool:
        """One batch of the change feed, then the stable studies due; True when there may be more to do now."""
        now = now or datetime.now(UTC)
        rules = [r for r in self.service.rules() if r.enabled]
        more = self._feed(rules, now)
        self._stable([r for r in rules if r.kind == "route"], now)
        self._orders([r for r in rules if r.kind == "prefetch" and "order" in r.on], now)
        if self._queued:  # committed by now: the job workers start them at once
            self._queued = False
            self.ctx.jobs.notify()
        return more

    def _feed(self, rules: list[Rule], now: datetime) -> bool:
        with self.index.write_engine.begin() as c:
            stmt = select(routing_cursor.c.seq).where(routing_cursor.c.name == CURSOR)
            if not self.index.is_sqlite:
                stmt = stmt.with_for_update()
            seq = c.execute(stmt).scalar()
            if seq is None:
                self._take_cursors(c, now)
                return False
            rows = c.execute(select(changes.c.seq, changes.c.change_type, changes.c.uid)
                             .where(changes.c.seq > seq).order_by(changes.c.seq).limit(BATCH)).all()
            if not rows:
                return False
            last = int(rows[-1].seq)
            uids = [r.uid for r in rows if r.change_type == "NewInstance"]
            routes = [r for r in rules if r.kind == "route"]
            if routes and uids:
                self._route(c, routes, uids, now)
            new_studies = [r.uid for r in rows if r.change_type == "NewStudy"]
            prefetch = [r for r in rules if r.kind == "prefetch" and "study" in r.on]
            if prefetch and new_studies:
                self._prefetch_studies(c, prefetch, new_studies)
            c.execute(update(routing_cursor).where(routing_cursor.c.name == CURSOR).values(seq=last, updated_at=now))
        return len(rows) == BATCH

    def _route(self, c: Any, rules: list[Rule], uids: list[str], now: datetime) -> None:
        attrs = [dict(r) for r in c.execute(_attrs_query().where(instances.c.sop_instance_uid.in_(uids))).mappings()]
        _add_file_attributes(attrs, rules, self._read_header)
        for rule in rules:
            try:
                matched = [a for a in attrs if rule.matches(a)]
            except Exception as e:  # noqa: BLE001 - one bad rule never stops the others
                log.error("routing rule %s failed: %r", rule.name, e)
                continue
            if not matched:
                continue
            if rule.trigger == "stable":
                self._touch_pending(c, rule, matched, now)
                continue
            start = rule.next_open(now)
            for dest in rule.destinations:
                self._submit(c, rule, dest, [a["SOPInstanceUID"] for a in matched], [a["_size"] for a in matched],
                             None if start <= now else start, level="IMAGE")
            self.routed += len(matched)

    def _prefetch_studies(self, c: Any, rules: list[Rule], study_uids: list[str]) -> None:
        """A new study: each prefetch rule it matches (on its first instance) queues a prefetch job."""
        for uid in dict.fromkeys(study_uids):
            rows = [dict(r) for r in c.execute(_attrs_query().where(studies.c.study_instance_uid == uid)
                                                .limit(1)).mappings()]
            if not rows:
                continue  # deleted since
            _add_file_attributes(rows, rules, self._read_header)
            a = rows[0]
            for rule in rules:
                if (a.get("CallingAETitle") or "") in self._source_aets(rule):
                    continue  # a prior this rule (or another from the same archive) fetched: no chain reaction
                if rule.matches(a):
                    self._submit_prefetch(c, rule, a.get("PatientID") or "", a.get("IssuerOfPatientID") or "",
                                          a.get("Modality") or "", a.get("BodyPartExamined") or "", exclude=[uid],
                                          why=f"study {uid}")

    def _source_aets(self, rule: Rule) -> set[str]:
        from .nodes import remote_aes_for

        aes = remote_aes_for(self.ctx.settings)
        return {n[:16] for n in rule.sources} | {aes[n].aet for n in rule.sources if n in aes}

    def _orders(self, rules: list[Rule], now: datetime) -> None:
        """New scheduled procedure steps (ORM/OMI from the RIS, or the API): prefetch rules with on = order."""
        with self.index.write_engine.begin() as c:
            stmt = select(routing_cursor.c.seq).where(routing_cursor.c.name == ORDERS_CURSOR)
            if not self.index.is_sqlite:
                stmt = stmt.with_for_update()
            seq = c.execute(stmt).scalar()
            if seq is None:
                self._take_cursors(c, now)
                return
            steps = c.execute(select(scheduled_steps).where(scheduled_steps.c.id > seq)
                              .order_by(scheduled_steps.c.id).limit(BATCH)).mappings().all()
            if not steps:
                return
            for st in steps:
                a = {"PatientID": st["patient_id"], "IssuerOfPatientID": st["issuer_of_patient_id"] or "",
                     "Modality": st["modality"], "AccessionNumber": st["accession_number"],
                     "ScheduledStationAETitle": st["scheduled_station_ae_title"],
                     "RequestedProcedureDescription": st["requested_procedure_description"],
                     "StudyInstanceUID": st["study_instance_uid"]}
                for rule in rules:
                    if rule.matches(a):
                        self._submit_prefetch(c, rule, a["PatientID"] or "", a["IssuerOfPatientID"],
                                              a["Modality"] or "", "",
                                              exclude=[st["study_instance_uid"]] if st["study_instance_uid"] else [],
                                              why=f"order {st['accession_number'] or st['id']}")
            c.execute(update(routing_cursor).where(routing_cursor.c.name == ORDERS_CURSOR)
                      .values(seq=int(steps[-1]["id"]), updated_at=now))

    def _submit_prefetch(self, c: Any, rule: Rule, patient_id: str, issuer: str, modality: str, body_part: str,
                         *, exclude: list[str], why: str) -> None:
        if not patient_id:
            return
        key = f"{rule.name}:{patient_id}"
        waiting = c.execute(select(jobs.c.id).where(jobs.c.kind == "prefetch", jobs.c.destination == key,
                                                    jobs.c.state == "pending").limit(1)).scalar()
        if waiting is not None:
            return  # one not started yet will find every prior of this patient: no second one
        mods = ([modality] if modality else []) if rule.prior_modalities == "same" else list(rule.prior_modalities)
        payload = {"rule": rule.name, "PatientID": patient_id, "IssuerOfPatientID": issuer, "sources":
                   list(rule.sources), "prior_modalities": mods, "same_body_part": rule.same_body_part,
                   "BodyPartExamined": body_part, "max_priors": rule.max_priors, "max_age_days": rule.max_age_days,
                   "method": rule.method, "exclude": exclude, "why": why}
        job_id = self.ctx.jobs.submit_in(c, "prefetch", payload, priority=rule.priority, max_attempts=3,
                                         destination=key)
        self._queued = True
        log.info("prefetch rule %s: job %d for patient %s (%s)", rule.name, job_id, patient_id, why)

    def _touch_pending(self, c: Any, rule: Rule, matched: list[dict[str, Any]], now: datetime) -> None:
        per_study: dict[str, int] = {}
        for a in matched:
            per_study[a["StudyInstanceUID"]] = per_study.get(a["StudyInstanceUID"], 0) + 1
        for study_uid, n in per_study.items():
            done = c.execute(update(routing_pending).where(and_(routing_pending.c.rule == rule.name,
                                                                routing_pending.c.study_instance_uid == study_uid))
                             .values(last_at=now, instances=routing_pending.c.instances + n)).rowcount
            if not done:
                c.execute(insert(routing_pending).values(rule=rule.name, study_instance_uid=study_uid, first_at=now,
                                                         last_at=now, instances=n))

    def _stable(self, rules: list[Rule], now: datetime) -> None:
        by_name = {r.name: r for r in rules if r.trigger == "stable"}
        with self.index.engine.connect() as c:
            waiting = c.execute(select(routing_pending)).all()
        for p in waiting:
            rule = by_name.get(p.rule)
            if rule is None:
                continue  # disabled or removed: kept until it comes back or is deleted
            last = p.last_at if p.last_at.tzinfo else p.last_at.replace(tzinfo=UTC)
            if (now - last).total_seconds() < rule.stable_seconds or not rule.open_at(now):
                continue
            with self.index.write_engine.begin() as c:
                gone = c.execute(delete(routing_pending).where(and_(
                    routing_pending.c.rule == p.rule, routing_pending.c.study_instance_uid == p.study_instance_uid,
                    routing_pending.c.last_at == p.last_at))).rowcount
                if not gone:
                    continue  # another instance arrived meanwhile (or another node took it)
                rows = c.execute(_attrs_query().where(studies.c.study_instance_uid == p.study_instance_uid)
                                 ).mappings().all()
                attrs = [dict(r) for r in rows]
                _add_file_attributes(attrs, [rule], self._read_header)
                matched = [a for a in attrs if rule.matches(a)]
                if not matched:
                    continue
                for dest in rule.destinations:
                    self._submit(c, rule, dest, [a["SOPInstanceUID"] for a in matched],
                                 [a["_size"] for a in matched], None, level="STUDY",
                                 study=p.study_instance_uid)
                self.routed += len(matched)

    def _submit(self, c: Any, rule: Rule, dest: str, uids: list[str], sizes: list[int], not_before: datetime | None,
                *, level: str, study: str | None = None) -> None:
        payload: dict[str, Any] = {"destination": dest, "level": level, "rule": rule.name,
                                   "uids": [study] if study else uids[:100]}
        kind = send_kind(self.ctx.settings, dest)
        if rule.transfer_syntax:
            payload["transfer_syntax"] = rule.transfer_syntax
        if rule.commit and kind == "send":
            payload["commit"] = True
        job_id = self.ctx.jobs.submit_in(c, kind, payload, items=uids, priority=rule.priority, destination=dest,
                                         item_bytes=sizes)
        self._queued = True
        if not_before is not None:
            c.execute(update(jobs).where(jobs.c.id == job_id).values(not_before=not_before))
        log.info("routing rule %s: job %d, %d instance(s) to %s%s", rule.name, job_id, len(uids), dest,
                 f" from {not_before.isoformat()}" if not_before else "")
