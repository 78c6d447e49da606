"""Value types shared by the services and the protocol layers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Level = Literal["PATIENT", "STUDY", "SERIES", "IMAGE"]


class Status:
    """DICOM status codes the services answer with (PS3.4 Annex B/C, PS3.7 Annex C)."""

    SUCCESS = 0x0000
    # Duplicate SOP Instance UID with different content, first kept: no standard code exists; 0xB006 "Elements
    # Discarded" is the closest in meaning (the received data set was discarded). Documented in the README.
    WARNING_DUPLICATE = 0xB006
    WARNING_COERCED = 0xB000
    OUT_OF_RESOURCES = 0xA700
    DATASET_MISMATCH = 0xA900  # Error: Data Set does not match SOP Class
    CANNOT_UNDERSTAND = 0xC000
    DUPLICATE_REJECTED = 0x0111  # Duplicate SOP Instance (PS3.7 C.4.2) when policy is "reject"
    NOT_AUTHORIZED = 0x0124
    IDENTIFIER_MISMATCH = 0xA900
    UNABLE_TO_PROCESS = 0xC001
    PROCESSING_FAILURE = 0x0110  # PS3.7 C.4.2; STOW-RS: instance outside the study of the request URL
    MOVE_DESTINATION_UNKNOWN = 0xA801
    SUBOPS_FAILURES = 0xB000
    CANCEL = 0xFE00
    PENDING = 0xFF00


@dataclass(frozen=True)
class Source:
    """Where data or a request came from: for the index (calling AE), logs and the audit trail."""

    protocol: str  # "DIMSE", "DICOMWEB", "IMPORT", ...
    calling_aet: str = ""
    called_aet: str = ""
    address: str = ""
    user: str = ""
    # Store scope of the sender (security): it may add instances only to studies of these departments or to new
    # studies; None = anywhere.
    departments: tuple[str, ...] | None = None


@dataclass
class StoreOutcome:
    status: int
    message: str = ""
    sop_instance_uid: str = ""
    sop_class_uid: str = ""
    study_instance_uid: str = ""
    series_instance_uid: str = ""
    duplicate: bool = False  # identical instance was already stored; nothing written

    @property
    def ok(self) -> bool:
        return self.status == Status.SUCCESS or 0xB000 <= self.status <= 0xBFFF


@dataclass(frozen=True)
class InstanceRef:
    """What retrieve needs to send one stored instance."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    blob_key: str
    size: int
    sha256: str = ""
    # set when ADT made the index's patient module authoritative: the stored bytes get it overlaid on retrieval
    patient_fk: int = 0
    demographics_version: int = 0
    # set when QC changed the study or series (services/qc_edit.py): (study pk, version, series pk, version); the
    # index's study and series modules are overlaid on retrieval
    qc_key: tuple[int, int, int, int] | None = None


@dataclass
class Query:
    """A protocol-free query: C-FIND identifiers and QIDO-RS parameters both become one of these.

    ``filters`` maps a keyword to its raw DICOM query string (wildcards, ranges, UID lists as in PS3.4 C.2.2.2);
    an empty string is universal matching (a return key). ``sequence_filters`` holds matching keys inside
    RequestAttributesSequence. ``return_keys`` are extra keywords (or 8-hex-digit tags) to return.
    """

    level: Level
    filters: dict[str, str] = field(default_factory=dict)
    return_keys: list[str] = field(default_factory=list)
    sequence_filters: dict[str, str] = field(default_factory=dict)
    # matching keys inside other sequences (PS3.4 C.2.2.2.6), matched against the stored header:
    # {"ProcedureCodeSequence": {"CodeValue": "P-MR1"}}
    item_filters: dict[str, dict[str, str]] = field(default_factory=dict)
    include_all: bool = False
    limit: int | None = None
    offset: int = 0
    fuzzy: bool = False
    # PS3.4 C.2.2.2.1 Empty Value Matching (QIDO-RS emptyvaluematching=true): a key of "" (two quotation marks)
    # matches an entity whose attribute is empty or absent
    empty_value_matching: bool = False
    patient_root: bool = False  # Patient Root model: PATIENT level allowed, patient attrs not returned below it
    departments: tuple[str, ...] | None = None  # access scope: None = everything
