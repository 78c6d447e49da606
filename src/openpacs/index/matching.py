"""PS3.4 C.2.2.2 attribute matching compiled to SQL: single value, universal, wildcard, range, list of UIDs.

One place decides what a query string means; C-FIND and QIDO-RS both come through here (via services.query).
"""

from __future__ import annotations

import re

from sqlalchemy import Integer, and_, case, func, literal, or_
from sqlalchemy.sql.elements import ColumnElement

WILDCARD_VRS = {"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"}
RANGE_VRS = {"DA", "TM", "DT"}
# Stored as backslash-joined multi-values: a query value matches if any stored value matches.
MULTI_VALUED_COLUMNS = {"modalities_in_study", "sop_classes_in_study", "other_patient_names"}


EMPTY_VALUE = '""'


class MatchError(ValueError):
    """A query value that is not valid for its attribute (bad range, wildcard in a UID...)."""


def _like_escape(s: str) -> str:
    return s.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def wildcard_to_like(value: str) -> str:
    return _like_escape(value).replace("*", "%").replace("?", "_")


_DA = re.compile(r"\d{4}(0[1-9]|1[0-2])(0[1-9]|[12]\d|3[01])")
_TM = re.compile(r"([01]\d|2[0-3])([0-5]\d([0-5]\d|60)?)?(\.\d{1,6})?")
_DT = re.compile(r"\d{4}(\d{2}){0,5}(\.\d{1,6})?([+-]\d{4})?")
_INTEGER_VRS = {"IS", "US", "SS", "UL", "SL", "UV", "SV"}
_DECIMAL_VRS = {"DS", "FL", "FD"}


def check_value(keyword: str, vr: str, value: str) -> None:
    """Refuse a matching key value its VR cannot hold (PS3.4 C.2.2.2: no wildcards on dates, times or numbers),
    the same whether the attribute is matched in SQL or in a stored header. Universal ("", "*"), empty value
    matching (two quotation marks), backslash alternatives and ranges (DA, TM, DT) are understood."""
    value = value.strip()
    if value in ("", "*", EMPTY_VALUE):
        return
    for alt in value.split("\\"):
        alt = alt.strip()
        if not alt:  # an empty alternative ("1\\") is ignored, as the matcher ignores it
            continue
        if vr in RANGE_VRS:
            bounds = alt.split("-", 1) if vr != "DT" else _dt_bounds(alt)
            if len(bounds) == 2 and not any(b.strip() for b in bounds):
                raise MatchError(f"{keyword}: empty range {value!r}")
            for b in bounds:
                b = b.strip()
                if vr == "DA":
                    b = b.replace(".", "")  # ACR-NEMA YYYY.MM.DD
                elif vr == "TM":
                    b = b.replace(":", "")  # ACR-NEMA HH:MM:SS
                if b and not {"DA": _DA, "TM": _TM, "DT": _DT}[vr].fullmatch(b):
                    raise MatchError(f"{keyword}: {alt!r} is not a {vr} value or range")
        elif vr in _INTEGER_VRS:
            if not re.fullmatch(r"[+-]?\d+", alt):
                raise MatchError(f"{keyword}: {alt!r} is not an integer")
        elif vr in _DECIMAL_VRS:
            try:
                f = float(alt)
            except ValueError:
                raise MatchError(f"{keyword}: {alt!r} is not a number") from None
            if f != f or f in (float("inf"), float("-inf")):
                raise MatchError(f"{keyword}: {alt!r} is not a number")


def _dt_bounds(alt: str) -> list[str]:
    """A DT value or range split at the range hyphen (a UTC offset such as -0500 also holds one)."""
    m = re.fullmatch(r"([^-]*(?:[+-]\d{4})?)-(.*)", alt) if "-" in alt else None
    if alt.startswith("-"):
        return ["", alt[1:]]
    return [m.group(1), m.group(2)] if m else [alt]


def _normalize_date(v: str, keyword: str) -> str:
    v = v.strip().replace(".", "").replace("-", "")
    if v and (not v.isdigit() or len(v) != 8):
        raise MatchError(f"{keyword}: {v!r} is not a DA value (YYYYMMDD)")
    return v


def _normalize_time(v: str, keyword: str, upper: bool) -> str:
    v = v.strip().replace(":", "")
    head = v.split(".")[0]
    if v and (not head.isdigit() or len(head) not in (2, 4, 6)):
        raise MatchError(f"{keyword}: {v!r} is not a TM value (HHMMSS.FFFFFF)")
    if upper and v and "." not in v:
        # "12" as an upper bound means up to 12:59:59.999999
        v = head + "9" * (6 - len(head)) + ".999999"
    return v


def stored_time(v: str) -> str:
    """A stored TM value in the comparable form of ``_time_column`` (the same rule, for values read from headers)."""
    bare = v.replace(":", "")
    return (bare + "0000")[:6] if len(bare) < 6 else bare


def time_bounds(value: str, keyword: str) -> tuple[str, str]:
    """A TM range query as comparable (lower, upper) bounds; either may be empty (open)."""
    lo, _, hi = value.partition("-")
    lo, hi = _normalize_time(lo, keyword, False).strip(), _normalize_time(hi, keyword, True).strip()
    if lo and len(lo.split(".")[0]) < 6:  # a lower bound "0915" means from 09:15:00
        lo = lo + "0" * (6 - len(lo.split(".")[0]))
    if not lo and not hi:
        raise MatchError(f"{keyword}: empty range {value!r}")
    return lo, hi


def _time_column(col: ColumnElement) -> ColumnElement:
    """A stored TM value as HHMMSS[.FFFFFF] for range comparison, whatever precision or ACR-NEMA colons it was sent
    with: "0915" -> "091500", "11" -> "110000", "13:05:30" -> "130530". (A fraction only follows full seconds.)
    Stored values stay as received; this is applied at query time, on the few rows a time range is asked of."""
    bare = func.replace(col, ":", "")
    return case((func.length(bare) < 6, func.substr(bare + literal("0000"), 1, 6)), else_=bare)


def _range(col: ColumnElement, vr: str, keyword: str, value: str) -> ColumnElement:
    target = col
    if vr == "TM":
        lo, hi = time_bounds(value, keyword)
        target = _time_column(col)
    else:
        lo, _, hi = value.partition("-")
        if vr == "DA":
            lo, hi = _normalize_date(lo, keyword), _normalize_date(hi, keyword)
        lo, hi = lo.strip(), hi.strip()
        if not lo and not hi:
            raise MatchError(f"{keyword}: empty range {value!r}")
    conds: list[ColumnElement] = [col.is_not(None), col != ""]
    if lo:
        conds.append(target >= lo)
    if hi:
        conds.append(target <= hi)
    return and_(*conds)


def compile_match(
    col: ColumnElement,
    vr: str,
    keyword: str,
    value: str,
    *,
    column_name: str = "",
    norm_col: ColumnElement | None = None,
    fuzzy: bool = False,
    case_insensitive_pn: bool = True,
    empty_value: bool = False,
) -> ColumnElement | None:
    """SQL condition for one matching key, or None for universal matching. ``empty_value``: a value of "" (two
    quotation marks) matches an empty or absent attribute (PS3.4 C.2.2.2.1, Empty Value Matching)."""
    value = value.strip() if vr != "PN" else value.strip(" ")
    if value == "" or value == "*":
        return None
    if empty_value and value == EMPTY_VALUE:
        return col.is_(None) if isinstance(getattr(col, "type", None), Integer) else or_(col.is_(None), col == "")
    multi = column_name in MULTI_VALUED_COLUMNS

    if vr == "PN" and case_insensitive_pn:
        # the *_norm column (upper-cased at ingest, indexed) when the level keeps one, UPPER() otherwise
        col, value = (norm_col if norm_col is not None else func.upper(col)), value.upper()

    if isinstance(getattr(col, "type", None), Integer):
        # counts and US attributes live in INTEGER columns: compare numbers (PostgreSQL has no integer = varchar)
        try:
            numbers = [int(v) for v in value.split("\\") if v.strip()]
        except ValueError:
            raise MatchError(f"{keyword}: {value!r} is not a number") from None
        if not numbers:
            return None
        return col == numbers[0] if len(numbers) == 1 else col.in_(numbers)

    if vr == "UI":
        uids = [u.strip() for u in value.split("\\") if u.strip()]
        if any(("*" in u or "?" in u) for u in uids):
            raise MatchError(f"{keyword}: wildcards are not allowed in UIDs")
        if multi:
            return or_(*[_multi_contains(col, u) for u in uids])
        return col == uids[0] if len(uids) == 1 else col.in_(uids)

    if vr in RANGE_VRS and "-" in value:
        return _range(col, vr, keyword, value)
    if vr == "DA":
        return col == _normalize_date(value, keyword)
    if vr == "TM":
        return col == _normalize_time(value, keyword, False)

    values = value.split("\\") if "\\" in value else [value]  # a backslash never occurs in a value (PN neither)
    conds = [_one(col, vr, v, multi, fuzzy and vr == "PN") for v in values if v != ""]
    return conds[0] if len(conds) == 1 else or_(*conds)


def _multi_contains(col: ColumnElement, v: str, like: bool = False) -> ColumnElement:
    wrapped = literal("\\") + col + literal("\\")
    pattern = "%\\\\" + (v if like else _like_escape(v)) + "\\\\%"
    return wrapped.like(pattern, escape="\\")


def _one(col: ColumnElement, vr: str, v: str, multi: bool, fuzzy: bool) -> ColumnElement:
    has_wild = vr in WILDCARD_VRS and ("*" in v or "?" in v)
    if fuzzy:
        # PS3.18 fuzzymatching for PN: the value matches the start of any name component
        p = wildcard_to_like(v.rstrip("*")) + "%"
        return or_(col.like(p, escape="\\"), col.like("%^" + p, escape="\\"), col.like("% " + p, escape="\\"))
    if multi:
        return _multi_contains(col, wildcard_to_like(v), like=True) if has_wild else _multi_contains(col, v)
    if vr == "PN" and "=" not in v:
        # A name without component groups also matches the alphabetic group of one stored with ideographic and
        # phonetic groups ("Yamada^Tarou" finds "Yamada^Tarou=山田^太郎=やまだ^たろう"; PS3.4 leaves groups to us)
        pattern = wildcard_to_like(v) if has_wild else _like_escape(v)
        whole = col.like(pattern, escape="\\") if has_wild else col == v
        if pattern.endswith("%"):
            return whole  # already matches whatever follows, groups included
        return or_(whole, col.like(pattern + "=%", escape="\\"))
    if has_wild:
        return col.like(wildcard_to_like(v), escape="\\")
    return col == v
