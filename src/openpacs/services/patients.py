"""Patient administration, protocol-free: create or update demographics, merge two patients, change an identifier;
and the retrieval rule that makes the index's patient module win over the stored files once ADT has touched it.

The rule (one for every retrieval path): **coerce on retrieval**. Stored files are never rewritten. A patient whose
demographics were set by ADT has a ``patient_demographics`` row; every instance of that patient read through
``RetrieveService.read_file`` (C-GET, C-MOVE, WADO-RS, WADO-URI, metadata) gets the patient module overlaid from the
index: PatientName, PatientID, IssuerOfPatientID, PatientBirthDate, PatientSex, OtherPatientIDsSequence. Patients
never touched by ADT have no row and keep the byte-identical fast path. C-FIND and QIDO read the index already.

Every function that writes takes the caller's open connection: the HL7 dispatcher runs one message in one
transaction (with its log row), so that a message applies completely or not at all.
"""

from __future__ import annotations

import io
import json
import re
import threading
from collections import OrderedDict, namedtuple
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydicom import Dataset, dcmread
from pydicom.dataelem import DataElement
from pydicom.sequence import Sequence as DicomSequence
from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.engine import Connection

from ..index.db import Index
from ..index.hl7_schema import patient_demographics
from ..index.schema import changes, patients, studies


@dataclass(frozen=True)
class PatientIdentifier:
    id: str
    issuer: str = ""
    type_code: str = ""  # HL7 table 0203 (MR, PI, ...): kept with other IDs

    def __str__(self) -> str:
        return f"{self.id}^^^{self.issuer}" if self.issuer else self.id


@dataclass
class Demographics:
    """What an ADT message says about a patient. ``None``: not sent (keep the stored value); ``""``: delete it
    (HL7's ``""``)."""

    identifier: PatientIdentifier
    other_ids: list[PatientIdentifier] | None = None
    name: str | None = None  # DICOM PN: family^given^middle^prefix^suffix
    birth_date: str | None = None
    birth_time: str | None = None
    sex: str | None = None


@dataclass
class PatientChange:
    """The outcome of one update, for the audit event and the message log."""

    action: str  # C (created) | U (updated) | D (merged away)
    patient_id: str
    issuer: str
    name: str
    study_uids: list[str] = field(default_factory=list)
    detail: str = ""


class PatientError(Exception):
    """Understood but not applicable (an unknown prior patient, a target identifier that exists)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind  # unknown | exists


def _now() -> datetime:
    return datetime.now(UTC)


class PatientService:
    def __init__(self, index: Index) -> None:
        self.index = index
        self._modules: OrderedDict[tuple[int, int], dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()

    # -- lookups ---------------------------------------------------------------------------------------------
    def find(self, conn: Connection, ident: PatientIdentifier, lock: bool = False) -> Any:
        """The patient row for an identifier: an exact (ID, issuer) match, else, when the message names an issuer,
        the one row with that ID and no issuer (modalities often leave IssuerOfPatientID empty)."""
        rows = sql(conn, "SELECT id, patient_id, issuer_of_patient_id, patient_name, patient_birth_date,"
                         " patient_birth_time, patient_sex FROM patients WHERE patient_id = :pid"
                   + (" FOR UPDATE" if lock and not self.index.is_sqlite else ""), {"pid": ident.id}).all()
        exact = [r for r in rows if r.issuer_of_patient_id == ident.issuer]
        if exact:
            return exact[0]
        if ident.issuer:
            bare = [r for r in rows if not r.issuer_of_patient_id]
            if len(bare) == 1:
                return bare[0]
        return None

    # -- writes ----------------------------------------------------------------------------------------------
    def upsert(self, conn: Connection, demo: Demographics, source: str = "") -> PatientChange:
        """A01/A04/A05/A08: create the patient or update what the message sent."""
        row = self.find(conn, demo.identifier, lock=True)
        ts = _now()
        if row is None:
            values = _values(demo, None)
            result = conn.execute(insert(patients).values(
                patient_id=demo.identifier.id, issuer_of_patient_id=demo.identifier.issuer, num_studies=0,
                num_series=0, num_instances=0, created_at=ts, updated_at=ts, **values,
            ))
            assert result.inserted_primary_key is not None
            pk = int(result.inserted_primary_key[0])
            self._bump(conn, pk, demo.other_ids, source, ts)
            conn.execute(insert(changes).values(change_type="NewPatient", level="PATIENT", uid=demo.identifier.id,
                                                study_instance_uid=None, at=ts))
            return PatientChange("C", demo.identifier.id, demo.identifier.issuer, values.get("patient_name") or "",
                                 detail=f"patient created by {source}")
        values = _values(demo, row)
        if demo.identifier.issuer and row.issuer_of_patient_id != demo.identifier.issuer:
            values["issuer_of_patient_id"] = demo.identifier.issuer
        stamp = _stamp(conn, ts)
        sets = ", ".join(f"{k} = :{k}" for k in values)
        sql(conn, f"UPDATE patients SET {sets}{', ' if sets else ''}updated_at = :at WHERE id = :id",
            {**values, "at": stamp, "id": row.id})
        self._bump(conn, row.id, demo.other_ids, source, ts)
        sql(conn, "INSERT INTO changes (change_type, level, uid, study_instance_uid, at)"
                  " VALUES ('UpdatedPatient', 'PATIENT', :uid, NULL, :at)", {"uid": demo.identifier.id, "at": stamp})
        changed = ", ".join(sorted(k for k in values if not k.endswith("_norm"))) or "nothing"
        return PatientChange("U", demo.identifier.id, demo.identifier.issuer,
                             values.get("patient_name", row.patient_name) or "", self._study_uids(conn, row.id),
                             detail=f"demographics updated by {source}: {changed}")

    def merge(self, conn: Connection, surviving: Demographics, prior: PatientIdentifier,
              source: str = "") -> list[PatientChange]:
        """A40: every study of the prior patient moves to the surviving one (created from the message when it is not
        known yet); the prior patient row goes."""
        old = self.find(conn, prior, lock=True)
        if old is None:
            raise PatientError("unknown", f"prior patient {prior} (MRG-1) is not known")
        target = self.find(conn, surviving.identifier, lock=True)
        if target is not None and target.id == old.id:
            raise PatientError("exists", f"prior patient {prior} and surviving patient {surviving.identifier} are "
                                         "the same record")
        up = self.upsert(conn, surviving, source)
        target = self.find(conn, surviving.identifier)
        assert target is not None
        moved = self._study_uids(conn, old.id)
        ts = _now()
        conn.execute(update(studies).where(studies.c.patient_fk == old.id).values(patient_fk=target.id,
                                                                                   updated_at=ts))
        self._recount(conn, target.id)
        conn.execute(delete(patient_demographics).where(patient_demographics.c.patient_fk == old.id))
        conn.execute(delete(patients).where(patients.c.id == old.id))
        self._bump(conn, target.id, None, source, ts)
        conn.execute(insert(changes), [
            dict(change_type="MergedPatient", level="PATIENT", uid=prior.id, study_instance_uid=None, at=ts),
            *[dict(change_type="UpdatedStudy", level="STUDY", uid=u, study_instance_uid=u, at=ts) for u in moved],
        ])
        gone = PatientChange("D", prior.id, prior.issuer, old.patient_name or "", moved,
                             detail=f"merged into {surviving.identifier} by {source}: {len(moved)} stud(ies) moved")
        up.study_uids = self._study_uids(conn, target.id)
        up.detail += f"; {len(moved)} stud(ies) merged from {prior}"
        return [gone, up]

    def change_identifier(self, conn: Connection, new: Demographics, prior: PatientIdentifier,
                          source: str = "") -> PatientChange:
        """A47: the prior identifier (MRG-1) becomes the new one (PID-3); the other demographics sent are applied."""
        old = self.find(conn, prior, lock=True)
        if old is None:
            raise PatientError("unknown", f"prior patient identifier {prior} (MRG-1) is not known")
        clash = self.find(conn, new.identifier)
        if clash is not None and clash.id != old.id:
            raise PatientError("exists", f"patient identifier {new.identifier} already exists: a merge (A40) "
                                         "joins two patients")
        ts = _now()
        conn.execute(update(patients).where(patients.c.id == old.id).values(
            patient_id=new.identifier.id, issuer_of_patient_id=new.identifier.issuer or old.issuer_of_patient_id,
            updated_at=ts, **_values(new, old)))
        self._bump(conn, old.id, new.other_ids, source, ts)
        conn.execute(insert(changes).values(change_type="UpdatedPatient", level="PATIENT", uid=new.identifier.id,
                                            study_instance_uid=None, at=ts))
        return PatientChange("U", new.identifier.id, new.identifier.issuer, old.patient_name or "",
                             self._study_uids(conn, old.id),
                             detail=f"patient identifier {prior} changed to {new.identifier} by {source}")

    def _bump(self, conn: Connection, pk: int, other_ids: list[PatientIdentifier] | None, source: str,
              ts: datetime) -> None:
        """Mark the patient's demographics as the index's (a new version: the retrieval overlay reads it)."""
        others = None if other_ids is None else json.dumps(
            [{"id": o.id, "issuer": o.issuer, "type": o.type_code} for o in other_ids])
        stamp = _stamp(conn, ts)
        keep = "other_patient_ids" if other_ids is None else ":others"
        done = sql(conn, f"UPDATE patient_demographics SET version = version + 1, updated_at = :at,"
                         f" control_id = :src, other_patient_ids = {keep} WHERE patient_fk = :pk",
                   {"at": stamp, "src": source, "pk": pk, **({} if other_ids is None else {"others": others})})
        if done.rowcount == 0:
            sql(conn, "INSERT INTO patient_demographics (patient_fk, version, other_patient_ids, updated_at,"
                      " control_id) VALUES (:pk, 1, :others, :at, :src)",
                {"pk": pk, "others": others, "at": stamp, "src": source})

    @staticmethod
    def _study_uids(conn: Connection, pk: int) -> list[str]:
        return [r[0] for r in sql(conn, "SELECT study_instance_uid FROM studies WHERE patient_fk = :pk", {"pk": pk})]

    @staticmethod
    def _recount(conn: Connection, pk: int) -> None:
        n, ns, ni = conn.execute(select(func.count(), func.coalesce(func.sum(studies.c.num_series), 0),
                                        func.coalesce(func.sum(studies.c.num_instances), 0))
                                 .where(studies.c.patient_fk == pk)).one()
        conn.execute(update(patients).where(patients.c.id == pk).values(num_studies=n, num_series=ns,
                                                                        num_instances=ni))

    # -- the retrieval overlay ------------------------------------------------------------------------------
    def patient_module(self, patient_fk: int, version: int) -> dict[str, Any]:
        """The current patient module of a patient (cached by demographics version: a new version is a new key)."""
        key = (patient_fk, version)
        with self._lock:
            hit = self._modules.get(key)
            if hit is not None:
                return hit
        with self.index.engine.connect() as conn:
            row = conn.execute(
                select(patients.c.patient_id, patients.c.issuer_of_patient_id, patients.c.patient_name,
                       patients.c.patient_birth_date, patients.c.patient_sex,
                       patient_demographics.c.other_patient_ids)
                .select_from(patients.outerjoin(patient_demographics,
                                                patient_demographics.c.patient_fk == patients.c.id))
                .where(patients.c.id == patient_fk)).first()
        module: dict[str, Any] = {}
        if row is not None:
            module = dict(PatientName=row.patient_name or "", PatientID=row.patient_id or "",
                          IssuerOfPatientID=row.issuer_of_patient_id or "",
                          PatientBirthDate=row.patient_birth_date or "", PatientSex=row.patient_sex or "",
                          OtherPatientIDs=json.loads(row.other_patient_ids) if row.other_patient_ids else None)
        with self._lock:
            self._modules[key] = module
            while len(self._modules) > 4096:
                self._modules.popitem(last=False)
        return module

    def coerce(self, data: bytes, patient_fk: int, version: int) -> bytes:
        module = self.patient_module(patient_fk, version)
        return coerce_patient_module(data, module) if module else data


_PYFORMAT: dict[str, str] = {}


def sql(conn: Connection, statement: str, params: dict[str, Any] | None = None) -> _Result:
    """Plain SQL with :name parameters, on the DBAPI cursor of the caller's connection (inside its transaction):
    the per-message path of ADT runs a handful of fixed statements, where SQLAlchemy's statement building, cache
    keys and result wrapping cost more than the database (as in index/writer.py)."""
    if conn.dialect.name != "sqlite":
        converted = _PYFORMAT.get(statement)
        if converted is None:
            converted = _PYFORMAT[statement] = re.sub(r"(?<![:\w]):(\w+)", r"%(\1)s", statement)
        statement = converted
    cur = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        cur.execute(statement, params or {})
        return _Result(cur)
    finally:
        cur.close()


class _Result:
    """Rows with attribute access (like SQLAlchemy's), the row count of a DML statement."""

    def __init__(self, cur: Any) -> None:
        self.rowcount: int = cur.rowcount
        desc = cur.description
        if desc is None:
            self.rows: list[Any] = []
            return
        names = tuple(d[0] for d in desc)
        cls = _ROW_TYPES.get(names)
        if cls is None:
            cls = _ROW_TYPES[names] = namedtuple("Row", names)  # type: ignore[misc]  # noqa: PYI024
        self.rows = [cls(*r) for r in cur.fetchall()]

    def all(self) -> list[Any]:
        return self.rows

    def first(self) -> Any:
        return self.rows[0] if self.rows else None

    def __iter__(self) -> Any:
        return iter(self.rows)


_ROW_TYPES: dict[tuple[str, ...], Any] = {}


def _stamp(conn: Connection, ts: datetime) -> Any:
    """A timestamp parameter: SQLite keeps the text form SQLAlchemy's DateTime reads back."""
    return ts.strftime("%Y-%m-%d %H:%M:%S.%f") if conn.dialect.name == "sqlite" else ts


def _values(demo: Demographics, row: Any) -> dict[str, Any]:
    """The patients columns an ADT message sets (only those it sent; ``""`` clears)."""
    out: dict[str, Any] = {}
    for col, v in (("patient_name", demo.name), ("patient_birth_date", demo.birth_date),
                   ("patient_birth_time", demo.birth_time), ("patient_sex", demo.sex)):
        if v is None:
            continue
        if row is not None and getattr(row, col) == (v or None):
            continue
        out[col] = v or None
    if "patient_name" in out:
        out["patient_name_norm"] = out["patient_name"].upper() if out["patient_name"] else None
    return out


_PN_TAG, _PID_TAG, _ISSUER_TAG, _BD_TAG, _SEX_TAG, _OTHER_TAG = (0x00100010, 0x00100020, 0x00100021, 0x00100030,
                                                                 0x00100040, 0x00101002)
_UTF8 = "ISO_IR 192"


def coerce_patient_module(data: bytes, module: dict[str, Any]) -> bytes:
    """The Part 10 file with its patient module replaced; the file meta, the transfer syntax and every other element
    stay. Non-ASCII values in a file whose character set cannot hold them switch it to UTF-8 (all its text decoded
    first, so the other values are re-encoded rather than misread)."""
    ds = dcmread(io.BytesIO(data), force=True)
    values = {k: module.get(k) or "" for k in ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate",
                                                "PatientSex")}
    others = module.get("OtherPatientIDs")
    texts = [str(v) for v in values.values()] + [o.get("id", "") + o.get("issuer", "") for o in others or []]
    if not _fits(texts, _charsets(ds)):
        ds.decode()
        ds.SpecificCharacterSet = _UTF8
    for tag, vr, kw in ((_PN_TAG, "PN", "PatientName"), (_PID_TAG, "LO", "PatientID"),
                        (_BD_TAG, "DA", "PatientBirthDate"), (_SEX_TAG, "CS", "PatientSex")):
        ds[tag] = DataElement(tag, vr, values[kw])
    if values["IssuerOfPatientID"]:
        ds[_ISSUER_TAG] = DataElement(_ISSUER_TAG, "LO", values["IssuerOfPatientID"])
    elif _ISSUER_TAG in ds:
        del ds[_ISSUER_TAG]
    if others is not None:
        items = []
        for o in others:
            item = Dataset()
            item.PatientID = o.get("id", "")
            if o.get("issuer"):
                item.IssuerOfPatientID = o["issuer"]
            item.TypeOfPatientID = "TEXT"
            items.append(item)
        if items:
            ds[_OTHER_TAG] = DataElement(_OTHER_TAG, "SQ", DicomSequence(items))
        elif _OTHER_TAG in ds:
            del ds[_OTHER_TAG]
    out = io.BytesIO()
    has_meta = data[128:132] == b"DICM"
    ds.save_as(out, enforce_file_format=has_meta)
    return out.getvalue()


def _fits(texts: list[str], charsets: list[str]) -> bool:
    """Whether the file's character set holds these values (one single-byte set or UTF-8; ISO 2022 code
    extensions are not tried: those files switch to UTF-8 for a non-ASCII value)."""
    from pydicom.charset import python_encoding

    if all(t.isascii() for t in texts):
        return True
    if len(charsets) > 1:
        return False
    codec = python_encoding.get(charsets[0] if charsets else "ISO_IR 6")
    if codec is None or (charsets and charsets[0].startswith("ISO 2022")):
        return False
    try:
        for t in texts:
            t.encode(codec)
    except UnicodeEncodeError:
        return False
    return True


def _charsets(ds: Dataset) -> list[str]:
    v = ds.get("SpecificCharacterSet")
    if v is None or v == "":
        return []
    from pydicom.multival import MultiValue

    return [str(x) or "ISO_IR 6" for x in (v if isinstance(v, MultiValue | list | tuple) else [v])]
