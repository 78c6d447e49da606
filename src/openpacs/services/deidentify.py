"""De-identification: PS3.15 Annex E, Basic Application Level Confidentiality Profile (E.1, table E.1-1), with the
Retain Longitudinal Temporal Information with Full Dates, Retain UIDs and Clean Descriptors options.

Actions of the table: D (a dummy value), Z (empty), X (removed), C (cleaned), U (a new UID). Beyond the listed
attributes, as the profile's intent asks, every private element, overlay/curve group (50xx, 60xx) and person
name (PN) is removed, and without the dates option every other date and time (DA, DT, TM) too. New UIDs come from
one map per operation (a salted hash: the same original UID gives the same new UID in every instance of the study
or export, so references between instances still hold). The result says what was done: PatientIdentityRemoved YES,
DeidentificationMethod and DeidentificationMethodCodeSequence (113100 and the option codes),
LongitudinalTemporalInformationModified.

Used into a new study (``deidentify_study``: stored through ingest like any instance) and on export
(services/export.py).
"""

from __future__ import annotations

import hashlib
import io
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

from pydicom import Dataset, dcmread
from pydicom.dataelem import DataElement
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import generate_uid

from .types import Source

# (keyword, action without options); "C" entries are descriptors: X without Clean Descriptors, cleaned with it.
_DATES = {
    "StudyDate": "Z", "StudyTime": "Z", "ContentDate": "Z", "ContentTime": "Z", "PatientBirthDate": "Z",
    "SeriesDate": "X", "SeriesTime": "X", "AcquisitionDate": "X", "AcquisitionTime": "X", "AcquisitionDateTime": "X",
    "PatientBirthTime": "X", "InstanceCreationDate": "X", "InstanceCreationTime": "X",
    "PerformedProcedureStepStartDate": "X", "PerformedProcedureStepStartTime": "X",
    "PerformedProcedureStepEndDate": "X", "PerformedProcedureStepEndTime": "X",
    "ScheduledProcedureStepStartDate": "X", "ScheduledProcedureStepStartTime": "X",
    "ScheduledProcedureStepEndDate": "X", "ScheduledProcedureStepEndTime": "X", "AdmittingDate": "X",
    "AdmittingTime": "X", "LastMenstrualDate": "X", "StudyVerifiedDate": "X", "StudyVerifiedTime": "X",
    "StudyReadDate": "X", "StudyReadTime": "X", "DateOfSecondaryCapture": "X", "TimeOfSecondaryCapture": "X",
    "RadiopharmaceuticalStartTime": "X", "RadiopharmaceuticalStopTime": "X", "FrameAcquisitionDateTime": "X",
    "FrameReferenceDateTime": "X",
}
_IDENTITY = {
    "PatientName": "D", "PatientID": "D", "AccessionNumber": "Z", "StudyID": "Z", "ReferringPhysicianName": "Z",
    "PatientSex": "Z", "IssuerOfPatientID": "X", "IssuerOfPatientIDQualifiersSequence": "X", "OtherPatientIDs": "X",
    "OtherPatientIDsSequence": "X", "OtherPatientNames": "X", "PatientBirthName": "X", "PatientMotherBirthName": "X",
    "PatientAddress": "X", "PatientTelephoneNumbers": "X", "MilitaryRank": "X", "BranchOfService": "X",
    "MedicalRecordLocator": "X", "PatientAge": "X", "PatientSize": "X", "PatientWeight": "X", "Occupation": "X",
    "AdditionalPatientHistory": "X", "PatientComments": "X", "EthnicGroup": "X", "PatientReligiousPreference": "X",
    "PatientSexNeutered": "X", "MedicalAlerts": "X", "Allergies": "X", "CountryOfResidence": "X",
    "RegionOfResidence": "X", "PatientInsurancePlanCodeSequence": "X", "PatientPrimaryLanguageCodeSequence": "X",
    "ResponsiblePerson": "X", "ResponsibleOrganization": "X", "PatientState": "X", "SmokingStatus": "X",
    "PregnancyStatus": "X", "PatientTransportArrangements": "X", "PatientInstitutionResidence": "X",
    "ReferringPhysicianAddress": "X", "ReferringPhysicianTelephoneNumbers": "X",
    "ReferringPhysicianIdentificationSequence": "X", "ConsultingPhysicianName": "X",
    "PerformingPhysicianName": "X", "PerformingPhysicianIdentificationSequence": "X",
    "NameOfPhysiciansReadingStudy": "X", "PhysiciansReadingStudyIdentificationSequence": "X",
    "PhysiciansOfRecord": "X", "PhysiciansOfRecordIdentificationSequence": "X", "OperatorsName": "X",
    "OperatorIdentificationSequence": "X", "RequestingPhysician": "X", "RequestingService": "X",
    "ScheduledPerformingPhysicianName": "X", "InstitutionName": "X", "InstitutionAddress": "X",
    "InstitutionCodeSequence": "X", "InstitutionalDepartmentName": "X", "StationName": "X",
    "DeviceSerialNumber": "X", "RequestAttributesSequence": "X", "ReferencedPatientSequence": "X",
    "ReferencedStudySequence": "X", "ReferencedPerformedProcedureStepSequence": "X", "PerformedProcedureStepID": "X",
    "RequestedProcedureID": "X", "ScheduledProcedureStepID": "X", "AdmissionID": "X", "IssuerOfAdmissionID": "X",
    "ServiceEpisodeID": "X", "PerformedLocation": "X",
    "ScheduledProcedureStepLocation": "X", "CurrentPatientLocation": "X",
    "PersonName": "X", "VerifyingObserverName": "X", "VerifyingOrganization": "X", "ContentCreatorName": "X",
    "DetectorID": "X", "GantryID": "X", "PlateID": "X", "CassetteID": "X", "StorageMediaFileSetID": "X",
    "SourceApplicationEntityTitle": "X",
}
_DESCRIPTORS = [
    "StudyDescription", "SeriesDescription", "ImageComments", "AdmittingDiagnosesDescription",
    "AdmittingDiagnosesCodeSequence", "DerivationDescription", "PerformedProcedureStepDescription",
    "RequestedProcedureDescription", "ScheduledProcedureStepDescription", "ProtocolName", "AcquisitionComments",
    "ReasonForStudy", "ReasonForTheRequestedProcedure", "ImagingServiceRequestComments", "RequestedProcedureComments",
    "StudyComments", "VisitComments", "CommentsOnThePerformedProcedureStep", "InterpretationText",
    "ContrastBolusAgent", "FrameComments", "IdentifyingComments", "ServiceEpisodeDescription",
    "RequestedContrastAgent", "TextComments", "LabelText",
]
_CODES = {"basic": ("113100", "Basic Application Confidentiality Profile"),
          "dates": ("113106", "Retain Longitudinal Temporal Information Full Dates Option"),
          "uids": ("113110", "Retain UIDs Option"),
          "descriptors": ("113105", "Clean Descriptors Option")}
_STANDARD_UID = "1.2.840.10008."  # SOP classes, transfer syntaxes, coding schemes: never patient data


class DeidentifyError(ValueError):
    pass


@dataclass
class DeidOptions:
    retain_dates: bool = False  # Retain Longitudinal Temporal Information with Full Dates Option
    retain_uids: bool = False  # Retain UIDs Option
    clean_descriptors: bool = False  # Clean Descriptors Option
    patient_name: str = "ANONYMOUS"
    patient_id: str = ""  # default: a pseudonym derived from the original ID (same patient, same pseudonym)

    @classmethod
    def from_json(cls, j: dict[str, Any] | None) -> DeidOptions:
        j = dict(j or {})
        unknown = set(j) - {"retain_dates", "retain_uids", "clean_descriptors", "patient_name", "patient_id"}
        if unknown:
            raise DeidentifyError(f"unknown de-identification option(s): {', '.join(sorted(unknown))}")
        return cls(retain_dates=bool(j.get("retain_dates", False)), retain_uids=bool(j.get("retain_uids", False)),
                   clean_descriptors=bool(j.get("clean_descriptors", False)),
                   patient_name=str(j.get("patient_name") or "ANONYMOUS"), patient_id=str(j.get("patient_id") or ""))


@dataclass
class Deidentifier:
    """One de-identification operation: its options and its UID map (consistent across the instances it sees)."""

    options: DeidOptions = field(default_factory=DeidOptions)
    salt: str = field(default_factory=lambda: secrets.token_hex(16))
    uids: dict[str, str] = field(default_factory=dict)

    def new_uid(self, uid: str) -> str:
        uid = uid.strip()
        if not uid or uid.startswith(_STANDARD_UID):
            return uid
        out = self.uids.get(uid)
        if out is None:
            out = self.uids[uid] = generate_uid(entropy_srcs=[self.salt, uid])
        return out

    def pseudonym(self, patient_id: str) -> str:
        if self.options.patient_id:
            return self.options.patient_id
        return "ANON" + hashlib.sha256((self.salt + "|" + patient_id).encode()).hexdigest()[:12].upper()

    def apply(self, ds: Dataset) -> Dataset:
        """De-identify ``ds`` in place (and its File Meta Information); returns it."""
        o = self.options
        identifying = self._identifying_tokens(ds)
        self._walk(ds, identifying)
        ds.PatientIdentityRemoved = "YES"
        ds.LongitudinalTemporalInformationModified = "UNMODIFIED" if o.retain_dates else "REMOVED"
        used = ["basic"] + (["dates"] if o.retain_dates else []) + (["uids"] if o.retain_uids else []) + \
            (["descriptors"] if o.clean_descriptors else [])
        ds.DeidentificationMethod = "PS3.15 E.1 Basic Profile" + "".join(
            {"dates": ", Retain Full Dates", "uids": ", Retain UIDs", "descriptors": ", Clean Descriptors"}.get(u, "")
            for u in used)
        items = []
        for u in used:
            c = Dataset()
            c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning = _CODES[u][0], "DCM", _CODES[u][1]
            items.append(c)
        ds.DeidentificationMethodCodeSequence = DicomSequence(items)
        meta = getattr(ds, "file_meta", None)
        if meta is not None:
            if "MediaStorageSOPInstanceUID" in meta and not o.retain_uids:
                meta.MediaStorageSOPInstanceUID = self.new_uid(str(meta.MediaStorageSOPInstanceUID))
            for kw in ("SourceApplicationEntityTitle", "SendingApplicationEntityTitle",
                       "ReceivingApplicationEntityTitle", "PrivateInformationCreatorUID", "PrivateInformation"):
                if kw in meta:
                    delattr(meta, kw)
        return ds

    def _identifying_tokens(self, ds: Dataset) -> list[str]:
        toks: set[str] = set()
        for kw in ("PatientName", "PatientID", "OtherPatientNames", "OtherPatientIDs", "AccessionNumber",
                   "PatientBirthName", "ReferringPhysicianName"):
            v = str(ds.get(kw, "") or "")
            toks |= {t for t in re.split(r"[\^\\=\s,]+", v) if len(t) >= 3}
        return sorted(toks, key=len, reverse=True)

    def _clean(self, text: str, identifying: list[str]) -> str:
        """Clean Descriptors: the description stays, the identifying words and any date in it go."""
        for t in identifying:
            text = re.sub(re.escape(t), "", text, flags=re.I)
        text = re.sub(r"\b(19|20)\d{2}[-./]?\d{2}[-./]?\d{2}\b", "", text)
        return re.sub(r"\s{2,}", " ", text).strip(" -,;")

    def _walk(self, ds: Dataset, identifying: list[str]) -> None:
        o = self.options
        for elem in list(ds):
            tag = elem.tag
            kw = elem.keyword
            if tag.is_private or (tag.group & 0xFF00) in (0x5000, 0x6000):
                del ds[tag]
                continue
            if kw in _DATES:
                if o.retain_dates:
                    continue
                self._act(ds, elem, _DATES[kw])
                continue
            if kw in _IDENTITY:
                action = _IDENTITY[kw]
                if action == "D" and kw == "PatientName":
                    ds[tag].value = o.patient_name
                elif action == "D" and kw == "PatientID":
                    ds[tag].value = self.pseudonym(str(elem.value or ""))
                else:
                    self._act(ds, elem, action)
                continue
            if kw in _DESCRIPTORS:
                if o.clean_descriptors and elem.VR in ("LO", "LT", "SH", "ST", "UT", "UC"):
                    ds[tag].value = self._clean(str(elem.value or ""), identifying)
                elif o.clean_descriptors and elem.VR == "SQ":
                    for item in elem.value:
                        self._walk(item, identifying)
                else:
                    del ds[tag]
                continue
            if elem.VR == "UI":
                if not o.retain_uids and elem.value:
                    vals = list(elem.value) if elem.VM > 1 else [elem.value]
                    new = [self.new_uid(str(v)) for v in vals]
                    ds[tag].value = new if len(new) > 1 else new[0]
                continue
            if elem.VR == "PN":
                del ds[tag]
                continue
            if elem.VR in ("DA", "DT", "TM") and not o.retain_dates:
                del ds[tag]
                continue
            if elem.VR == "SQ":
                for item in elem.value:
                    self._walk(item, identifying)

    @staticmethod
    def _act(ds: Dataset, elem: DataElement, action: str) -> None:
        if action == "X":
            del ds[elem.tag]
        elif elem.VR == "SQ":
            ds[elem.tag].value = DicomSequence()
        else:
            ds[elem.tag].value = None  # Z, and D for dates: empty (a dummy date would look real)


def deidentify_bytes(deid: Deidentifier, data: bytes) -> bytes:
    ds = dcmread(io.BytesIO(data), force=True)
    deid.apply(ds)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def deidentify_study(ctx: Any, study_uid: str, options: DeidOptions, *, actor: str = "",
                     departments: tuple[str, ...] | None = None) -> dict[str, Any]:
    """A de-identified copy of a study, stored through ingest as a new study. Returns its UID and counts."""
    if options.retain_uids:
        raise DeidentifyError("retain_uids cannot make a new study (the copy would have the original's UIDs): "
                              "use it on export")
    refs = ctx.retrieve.list_instances(study_uid, departments=departments)
    if not refs:
        raise DeidentifyError(f"no stored instance in study {study_uid}")
    deid = Deidentifier(options)
    source = Source("DEIDENTIFY", calling_aet=ctx.settings.aet, user=actor)
    stored = failed = 0
    for ref in refs:
        out = ctx.ingest.store_file(deidentify_bytes(deid, ctx.retrieve.read_file(ref)), source)
        if out.ok:
            stored += 1
        else:
            failed += 1
    new_uid = deid.new_uid(study_uid)
    if ctx.audit is not None:
        ctx.audit.record("InstancesAccessed", action="C", user=actor, protocol="DEIDENTIFY",
                         study_uids=[study_uid, new_uid],
                         detail=f"de-identified copy of study {study_uid} as {new_uid} ({stored} instances; "
                                f"{'retain dates, ' if options.retain_dates else ''}"
                                f"{'clean descriptors' if options.clean_descriptors else 'basic profile'})")
    return {"study_instance_uid": new_uid, "source_study": study_uid, "stored": stored, "failed": failed}
