"""The one query engine: C-FIND, QIDO-RS, the console and the REST API all come here.

Indexed attributes are matched in SQL (index.query); keys the index does not hold are matched and returned from the
stored header of the entity's first instance, so every attribute of the data set is queryable, just slower.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from functools import lru_cache
from typing import Any, TypeVar

from pydicom import Dataset
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.sequence import Sequence as DicomSequence
from sqlalchemy import select

from ..config import Settings
from ..dicom.header import as_text, read_header
from ..dicom.json import _ds_value, _pn_value, dataset_to_json, tag_key
from ..index.db import Index
from ..index.matching import EMPTY_VALUE, MatchError, check_value, stored_time, time_bounds
from ..index.query import attributes_for, compile_query, lower_level_conditions, rows
from ..index.schema import ATTRIBUTES, REQUEST_ATTRIBUTES, instances, series, studies
from ..storage import BlobStore
from .types import Query, Status

log = logging.getLogger("openpacs.query")

LEVEL_OF_MODEL = {"PATIENT": ("PATIENT", "STUDY", "SERIES", "IMAGE"), "STUDY": ("STUDY", "SERIES", "IMAGE")}
IGNORED_KEYS = {"QueryRetrieveLevel", "SpecificCharacterSet", "TimezoneOffsetFromUTC"}
REQUEST_ATTRIBUTES_SEQUENCE = "RequestAttributesSequence"

_T = TypeVar("_T")
# (index row values, stored header or None) -> one result
_Builder = Callable[[dict[str, Any], Dataset | None], _T]


class QueryError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def keyword_of(key: str) -> str:
    """A keyword from a keyword or an 8-hex-digit tag ('00100010' -> 'PatientName'); private tags stay hex."""
    if re.fullmatch(r"[0-9A-Fa-f]{8}", key):
        kw = keyword_for_tag(int(key, 16))
        return kw or key.upper()
    if tag_for_keyword(key) is None:
        raise QueryError(Status.CANNOT_UNDERSTAND, f"unknown attribute {key!r}")
    return key


@lru_cache(maxsize=4096)
def _tag_vr(key: str) -> tuple[int, str]:
    tag = int(key, 16) if re.fullmatch(r"[0-9A-F]{8}", key) else tag_for_keyword(key)
    if tag is None:
        raise QueryError(Status.CANNOT_UNDERSTAND, f"unknown attribute {key!r}")
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        vr = "UN"
    return tag, vr.split(" or ")[0]


def _wild_regex(value: str) -> re.Pattern[str]:
    return re.compile("".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in value) + r"\Z", re.S)


def match_in_memory(vr: str, query: str, stored: str | None, pn_ci: bool = True, empty_value: bool = False) -> bool:
    """PS3.4 matching of one key against a value read from a stored header (keys the index does not hold)."""
    query = query.strip()
    if query in ("", "*"):
        return True
    if empty_value and query == EMPTY_VALUE:
        return not stored
    if stored is None:
        return False
    values = stored.split("\\") if stored else [""]
    if vr == "PN" and pn_ci:
        query, values = query.upper(), [v.upper() for v in values]
    alternatives = query.split("\\")
    if vr == "PN":  # a name without groups also matches the alphabetic group (as in index.matching)
        values += [v.split("=", 1)[0] for v in values if "=" in v]
    for alt in alternatives:
        if vr == "TM" and "-" in alt:
            try:
                lo, hi = time_bounds(alt, "TM")
            except MatchError:
                return False
            if any(v and (not lo or stored_time(v) >= lo) and (not hi or stored_time(v) <= hi) for v in values):
                return True
        elif vr in ("DA", "DT") and "-" in alt:
            lo, _, hi = alt.partition("-")
            if any(v and (not lo or v >= lo) and (not hi or v <= hi + ("\uffff" if vr != "DA" else "")) for v in values):
                return True
        elif "*" in alt or "?" in alt:
            rx = _wild_regex(alt)
            if any(rx.match(v) for v in values):
                return True
        elif alt in values:
            return True
    return False


class QueryService:
    def __init__(self, settings: Settings, store: BlobStore, index: Index) -> None:
        self.settings = settings
        self.store = store
        self.index = index

    # -- building queries ------------------------------------------------------------------------------------
    def from_identifier(self, identifier: Dataset, model: str) -> Query:
        """A C-FIND identifier (PS3.4 C.4.1) as a Query; raises QueryError with the status to answer."""
        level = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
        if level not in LEVEL_OF_MODEL.get(model, ()):
            raise QueryError(Status.IDENTIFIER_MISMATCH,
                             f"Query/Retrieve Level {level!r} is not valid for the {model.title()} Root model")
        q = Query(level=level, patient_root=model == "PATIENT")  # type: ignore[arg-type]
        q.return_keys.append("QueryRetrieveLevel")
        for elem in identifier:
            kw = elem.keyword or f"{elem.tag:08X}"
            if kw in IGNORED_KEYS or elem.tag.group == 0x0002:
                continue
            if elem.VR == "SQ":
                if elem.value:
                    item = elem.value[0]
                    keys = {(sub.keyword or f"{sub.tag:08X}"): as_text(item, sub.tag) or "" for sub in item
                            if sub.VR != "SQ"}
                    keys = {k: v for k, v in keys.items() if v.strip() not in ("", "*")}
                    if kw == REQUEST_ATTRIBUTES_SEQUENCE:
                        q.sequence_filters.update({k: v for k, v in keys.items() if k in REQUEST_ATTRIBUTES})
                    elif keys:
                        q.item_filters[kw] = keys
                q.return_keys.append(kw)
                continue
            try:
                value = as_text(identifier, elem.tag) or ""
            except Exception as e:
                raise QueryError(Status.CANNOT_UNDERSTAND, f"unreadable value for {kw}: {e}") from e
            q.filters[kw] = value
        return q

    # -- running queries -------------------------------------------------------------------------------------
    def find(self, query: Query, cancelled: Callable[[], bool] | None = None) -> Iterator[Dataset]:
        """Matching entities as Datasets holding the requested keys (plus the level's defaults for include_all)."""

        def builder(requested: list[str], indexed: dict[str, Any]) -> _Builder[Dataset]:
            return lambda values, header: self._dataset(query, requested, indexed, values, header)

        return self._search(query, cancelled, builder)

    def find_json(self, query: Query, cancelled: Callable[[], bool] | None = None) -> Iterator[dict[str, Any]]:
        """As ``find``, each match already encoded as a DICOM JSON object (PS3.18 F.2, ``dicom.json``'s encoding).

        Built straight from the index row when every returned key is an indexed one (no header read): pydicom
        elements would cost several times more than the encoding itself. The same JSON as
        ``dataset_to_json(find(...))`` in every case (tests/unit/dicomweb/test_qido_fastpath.py compares them)."""

        def builder(requested: list[str], indexed: dict[str, Any]) -> _Builder[dict[str, Any]]:
            return self._json_builder(query, requested, indexed)

        return self._search(query, cancelled, builder)

    def _search(self, query: Query, cancelled: Callable[[], bool] | None,
                make_builder: Callable[[list[str], dict[str, Any]], _Builder[_T]]) -> Iterator[_T]:
        level = query.level
        visible = attributes_for(level)
        requested: list[str] = []
        for k in [*query.filters.keys(), *query.return_keys]:
            if k not in requested:
                requested.append(k)
        if query.include_all:
            for a in visible:
                if a.keyword not in requested:
                    requested.append(a.keyword)
        # which requested keys live in the index at this level, which must come from a stored header
        indexed = {a.keyword: a for a in visible}
        header_keys = [k for k in requested if k not in indexed and k not in ("QueryRetrieveLevel", REQUEST_ATTRIBUTES_SEQUENCE)]
        header_filters = {k: v for k, v in query.filters.items() if k in header_keys and v.strip() not in ("", "*")}
        for k in query.filters:
            if k in ATTRIBUTES and k not in indexed:
                # a key of a lower level (computed counts too): matched in SQL through EXISTS, returned from a
                # representative header
                header_filters.pop(k, None)
        for k, v in query.filters.items():  # one validation, whether a key is matched in SQL or in a header
            try:
                check_value(k, _tag_vr(k)[1], v)
            except MatchError as e:
                raise QueryError(Status.IDENTIFIER_MISMATCH, str(e)) from e
        select_attrs = [indexed[k] for k in requested if k in indexed]
        select_attrs_all = list(select_attrs)
        if REQUEST_ATTRIBUTES_SEQUENCE in requested and level in ("SERIES", "IMAGE"):
            select_attrs_all += list(REQUEST_ATTRIBUTES.values())
        item_filters = {k: v for k, v in query.item_filters.items() if k in header_keys}
        sql_query = query
        if (header_filters or item_filters) and (query.limit is not None or query.offset):
            # paging must count only entities that also pass the in-memory filters
            sql_query = Query(**{**query.__dict__, "limit": None, "offset": 0})
        try:
            cq = compile_query(sql_query, select_attrs_all, self.settings.pn_case_insensitive)
        except MatchError as e:
            raise QueryError(Status.IDENTIFIER_MISMATCH, str(e)) from e
        build = make_builder(requested, indexed)
        skipped = 0
        produced = 0
        with self.index.engine.connect() as conn:
            result_rows = list(rows(conn, cq)) if header_keys else None
            iterator = iter(result_rows) if result_rows is not None else rows(conn, cq)
            blob_of = (
                self._representative_blobs(
                    conn, level, [r[0] for r in result_rows],
                    lower_level_conditions(sql_query, self.settings.pn_case_insensitive),
                )
                if result_rows
                else {}
            )
            for entity_id, values in iterator:
                if cancelled is not None and cancelled():
                    return
                header = None
                if header_keys:
                    key = blob_of.get(entity_id)
                    header = self._header(key, header_keys) if key else Dataset()
                    if header_filters and not all(
                        match_in_memory(_tag_vr(k)[1], v, as_text(header, _tag_vr(k)[0]), self.settings.pn_case_insensitive,
                                        query.empty_value_matching)
                        for k, v in header_filters.items()
                    ):
                        continue
                    if item_filters and not all(self._items_match(header, k, v) for k, v in item_filters.items()):
                        continue
                    if sql_query is not query:
                        if skipped < query.offset:
                            skipped += 1
                            continue
                        if query.limit is not None and produced >= query.limit:
                            return
                produced += 1
                yield build(values, header)

    def _items_match(self, header: Dataset, keyword: str, keys: dict[str, str]) -> bool:
        """Sequence matching (PS3.4 C.2.2.2.6): some stored item matches every key of the query's item."""
        elem = header.get(_tag_vr(keyword)[0])
        if elem is None or elem.VR != "SQ":
            return False
        pn_ci = self.settings.pn_case_insensitive
        return any(
            all(match_in_memory(_tag_vr(k)[1], v, as_text(item, _tag_vr(k)[0]), pn_ci) for k, v in keys.items())
            for item in elem.value
        )

    def _representative_blobs(
        self, conn: Any, level: str, ids: list[int], conds: list[Any] | None = None
    ) -> dict[int, str]:
        """The blob of one instance of each entity, whose header gives the values not in the index: one meeting
        ``conds`` (the query's lower-level keys) where there is one, so that returned values agree with them."""
        if not conds:
            return self._pick_blobs(conn, level, ids, [])
        matched = self._pick_blobs(conn, level, ids, conds)
        # keys of two lower levels may have matched in different children: then any instance
        rest = [i for i in ids if i not in matched]
        return {**self._pick_blobs(conn, level, rest, []), **matched}

    def _pick_blobs(self, conn: Any, level: str, ids: list[int], conds: list[Any]) -> dict[int, str]:
        out: dict[int, str] = {}
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            if level == "IMAGE":
                stmt = select(instances.c.id, instances.c.blob_key).where(instances.c.id.in_(chunk))
            elif level == "SERIES":
                stmt = select(instances.c.series_fk, instances.c.blob_key).where(instances.c.series_fk.in_(chunk))
            elif level == "STUDY":
                stmt = (select(series.c.study_fk, instances.c.blob_key)
                        .select_from(instances.join(series, instances.c.series_fk == series.c.id))
                        .where(series.c.study_fk.in_(chunk)))
            else:
                stmt = (select(studies.c.patient_fk, instances.c.blob_key)
                        .select_from(instances.join(series, instances.c.series_fk == series.c.id)
                                     .join(studies, series.c.study_fk == studies.c.id))
                        .where(studies.c.patient_fk.in_(chunk)))
            stmt = stmt.where(instances.c.rejected.is_(None))  # IOCM: a rejected instance never represents
            if conds:  # on the tables below the level, all in this statement's FROM (instances up to the level)
                stmt = stmt.where(*conds)
            for eid, key in conn.execute(stmt):
                out.setdefault(eid, key)
        return out

    def _header(self, blob_key: str, keys: list[str]) -> Dataset:
        try:
            data = self.store.read(blob_key, 0, 1 << 20)
            return read_header(data, [_tag_vr(k)[0] for k in keys] + [0x00080005])
        except Exception as e:  # a damaged blob must not fail a whole query
            log.warning("cannot read header of blob %s: %s", blob_key, e)
            return Dataset()

    def _dataset(self, query: Query, requested: list[str], indexed: dict[str, Any], values: dict[str, Any],
                 header: Dataset | None) -> Dataset:
        ds = Dataset()
        non_ascii = False
        for k in requested:
            if k == "QueryRetrieveLevel":
                ds.QueryRetrieveLevel = query.level
                continue
            if k == REQUEST_ATTRIBUTES_SEQUENCE:
                ds.RequestAttributesSequence = self._request_attributes(values, query)
                continue
            tag, vr = _tag_vr(k)
            if k in indexed:
                v = values.get(k)
                if v is None:
                    v = None
                elif vr in ("IS", "US", "UL", "SS", "SL"):
                    v = int(v) if str(v).lstrip("-").isdigit() else (None if v == "" else v)
                else:
                    v = str(v)
                    if not v.isascii():
                        non_ascii = True
                if isinstance(v, str) and "\\" in v and vr in ("CS", "UI", "LO", "SH", "PN", "DS", "IS"):
                    ds.add(DataElement(tag, vr, v.split("\\")))
                else:
                    ds.add(DataElement(tag, vr, v))
            elif header is not None and tag in header:
                elem = header[tag]
                ds.add(elem)
                if isinstance(elem.value, str) and not elem.value.isascii():
                    non_ascii = True
            else:
                ds.add(DataElement(tag, vr, None if vr != "SQ" else DicomSequence()))
        if non_ascii:
            ds.SpecificCharacterSet = "ISO_IR 192"
        return ds

    def _request_attributes(self, values: dict[str, Any], query: Query) -> DicomSequence:
        if query.level not in ("SERIES", "IMAGE"):
            return DicomSequence()
        item = Dataset()
        for kw in REQUEST_ATTRIBUTES:
            item.add(DataElement(REQUEST_ATTRIBUTES[kw].tag, "SH", values.get(kw) or None))
        return DicomSequence([item])

    # -- DICOM JSON straight from index rows (QIDO-RS) --------------------------------------------------------
    def _json_builder(self, query: Query, requested: list[str],
                      indexed: dict[str, Any]) -> _Builder[dict[str, Any]]:
        """The per-row encoder of ``find_json``: the JSON ``dataset_to_json(self._dataset(...))`` gives, built
        without pydicom for the values it knows the encoding of; any other value (a multi-valued PN, IS or DS, a
        number the index holds as odd text, ...) goes through a one-element Dataset, so the two never differ."""
        level = query.level
        multi_fast = _MULTI_FAST_VRS
        plans: list[list[tuple[str, int, str, str, int]]] = []  # made at the first row, as _dataset looks keys up

        def make_plan() -> list[tuple[str, int, str, str, int]]:
            by_tag: dict[int, tuple[str, int, str, str, int]] = {}  # tag -> (JSON key, tag, VR, keyword, kind)
            for k in requested:
                if k == "QueryRetrieveLevel":
                    tag, vr, kind = 0x00080052, "CS", _QRL
                elif k == REQUEST_ATTRIBUTES_SEQUENCE:
                    tag, vr, kind = REQUEST_ATTRIBUTES_SEQUENCE_TAG, "SQ", _RAS
                else:
                    tag, vr = _tag_vr(k)
                    kind = (_ABSENT if k not in indexed else _INT if vr in _INT_VRS_OF_INDEX
                            else _STR if vr in _STRING_VRS_OF_JSON else _PN if vr == "PN"
                            else _DS if vr == "DS" else _OTHER)
                by_tag[tag] = (tag_key(tag), tag, vr, k, kind)  # a later key of a tag replaces, as Dataset.add does
            return [by_tag[t] for t in sorted(by_tag)]  # dataset_to_json's order

        def build(values: dict[str, Any], header: Dataset | None) -> dict[str, Any]:
            if header is not None:  # values from a stored header: the pydicom path
                return dataset_to_json(self._dataset(query, requested, indexed, values, header))
            if not plans:
                plans.append(make_plan())
            plan = plans[0]
            out: dict[str, Any] = {}
            non_ascii = False
            for key, tag, vr, k, kind in plan:
                if kind >= _INT:  # indexed: the value as _dataset normalizes it, then as dataset_to_json writes it
                    v = values.get(k)
                    if v is None:
                        out[key] = {"vr": vr}
                    elif kind == _INT:
                        if type(v) is not int:
                            v = int(v) if str(v).lstrip("-").isdigit() else (None if v == "" else v)
                        if v is None:
                            out[key] = {"vr": vr}
                        elif type(v) is int:
                            out[key] = {"vr": vr, "Value": [v]}
                        else:
                            out[key] = _element_json(tag, vr, v)
                    else:
                        if type(v) is not str:
                            v = str(v)
                        if not v:
                            out[key] = {"vr": vr}
                            continue
                        if not v.isascii():
                            non_ascii = True
                        if "\\" in v:
                            if vr in multi_fast:
                                parts = [p or None for p in v.split("\\")]
                                out[key] = {"vr": vr, "Value": parts} if any(parts) else {"vr": vr}
                            else:
                                out[key] = _element_json(tag, vr, v)
                        elif kind == _STR:
                            out[key] = {"vr": vr, "Value": [v]}
                        elif kind == _PN:
                            pn = _pn_value(v)
                            out[key] = {"vr": vr, "Value": [pn]} if pn else {"vr": vr}
                        elif kind == _DS and _SIMPLE_DS.fullmatch(v):
                            out[key] = {"vr": vr, "Value": [_ds_value(v)]}
                        else:
                            out[key] = _element_json(tag, vr, v)
                elif kind == _ABSENT:
                    out[key] = {"vr": vr}
                elif kind == _QRL:
                    out[key] = {"vr": "CS", "Value": [level]}
                else:
                    out[key] = self._request_attributes_json(values, query)
            if non_ascii:
                out["00080005"] = {"vr": "CS", "Value": ["ISO_IR 192"]}
                out = dict(sorted(out.items()))
            return out

        return build

    def _request_attributes_json(self, values: dict[str, Any], query: Query) -> dict[str, Any]:
        if query.level not in ("SERIES", "IMAGE"):
            return {"vr": "SQ"}
        item: dict[str, Any] = {}
        for kw in REQUEST_ATTRIBUTES:
            tag = REQUEST_ATTRIBUTES[kw].tag
            v = values.get(kw) or None
            if v is None:
                item[tag_key(tag)] = {"vr": "SH"}
            elif type(v) is str and "\\" not in v:
                item[tag_key(tag)] = {"vr": "SH", "Value": [v]}
            else:
                item[tag_key(tag)] = _element_json(tag, "SH", v)
        return {"vr": "SQ", "Value": [dict(sorted(item.items()))]}


REQUEST_ATTRIBUTES_SEQUENCE_TAG = 0x00400275
# how find_json builds each key: not from the row (QueryRetrieveLevel, RequestAttributesSequence, a key not indexed),
# or from the row's value by VR (_INT and above)
_QRL, _RAS, _ABSENT, _INT, _STR, _PN, _DS, _OTHER = range(8)
_INT_VRS_OF_INDEX = frozenset({"IS", "US", "UL", "SS", "SL"})  # the VRs _dataset turns into int
_MULTI_FAST_VRS = frozenset({"CS", "UI", "LO", "SH"})  # split by _dataset, each value a plain string in JSON
# the string VRs dataset_to_json writes as the text itself (PN, DS, IS and binary VRs are not among them)
_STRING_VRS_OF_JSON = frozenset({"AE", "AS", "CS", "DA", "DT", "LO", "LT", "SH", "ST", "TM", "UC", "UI", "UR", "UT"})
_SIMPLE_DS = re.compile(r"-?[0-9]{1,12}(\.[0-9]{1,12})?")


def _element_json(tag: int, vr: str, v: Any) -> Any:
    """One element as the pydicom path encodes it (``_dataset``'s splitting, then ``dataset_to_json``)."""
    ds = Dataset()
    if isinstance(v, str) and "\\" in v and vr in ("CS", "UI", "LO", "SH", "PN", "DS", "IS"):
        ds.add(DataElement(tag, vr, v.split("\\")))
    else:
        ds.add(DataElement(tag, vr, v))
    return dataset_to_json(ds)[tag_key(tag)]
