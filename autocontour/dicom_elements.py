"""DICOM helpers both writers (SEG and RTSTRUCT) share.

* ``write_dataset``: a dataset saved as a Part 10 file, or an ``OutputError``.
* ``format_ds`` / ``format_ds_array`` / ``format_contour_data``: Decimal Strings of at most
  16 characters.
* ``require_lo``: a Long String refused, not cut, when over 64 characters.
* ``copy_patient_and_study``: the patient and study attributes both copy from the CT
  (one list, ``PATIENT_STUDY_KEYWORDS``).
* ``put_text`` / ``put_uint``: data elements stored as their encoded bytes, for the
  writers' per-frame / per-contour items (below).
* ``encode_text`` / ``encode_item`` / ``encode_sequence`` / ``put_sequence``: a whole
  sequence of such items encoded at once (the RTSTRUCT's contours: hundreds of items,
  tens of thousands of values), so no pydicom dataset is made per item.

pydicom validates every value it is given (~0.1 ms each for UI, DS, CS, IS strings), and
a SEG or RTSTRUCT of one CT holds tens of thousands of them, all produced by our own code
in a known-valid form.  ``put_text`` / ``put_uint`` store a ``RawDataElement`` holding the
explicit-VR little-endian bytes instead (tag and VR from pydicom's data dictionary) and
marks the item as read in that encoding, so pydicom writes them as they are and decodes
them like any element read from a file only when they are accessed.  Only for values the
writers format themselves, in datasets written with explicit VR little endian.
"""

from __future__ import annotations

import copy
import logging
import struct
from collections.abc import Iterable, Sequence
from functools import cache
from pathlib import Path

import numpy as np
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import BaseTag, Tag
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import format_number_as_ds

from autocontour.errors import OutputError

logger = logging.getLogger(__name__)

__all__ = [
    "put_text", "put_uint", "put_sequence", "mark_explicit_little", "encode_text", "encode_uint", "encode_sequence",
    "encode_item", "format_ds", "format_ds_array", "format_contour_data", "require_lo", "write_dataset",
    "copy_patient_and_study", "PATIENT_STUDY_KEYWORDS",
]

_TEXT_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UT"}
_UINT_DTYPES = {"US": "<u2", "UL": "<u4"}
# DS: at most 16 bytes a value; "%.3f" stays within that below this magnitude
_DS_3F_LIMIT = 1e11


@cache
def _tag_and_vr(keyword: str) -> tuple[BaseTag, str]:
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(f"{keyword!r} is not a DICOM keyword")
    return Tag(tag), dictionary_VR(tag)


def _element_value(keyword: str, value: bytes, vrs, kind: str) -> tuple[BaseTag, str, bytes]:
    """Tag, VR and the value padded to even length (UI with NUL, the rest with a space),
    or ValueError when ``keyword``'s VR is not one of ``vrs`` (``kind`` names them)."""
    tag, vr = _tag_and_vr(keyword)
    if vr not in vrs:
        raise ValueError(f"{keyword} has VR {vr}, not {kind}")
    if len(value) % 2:
        value += b"\x00" if vr == "UI" else b" "
    return tag, vr, value


def _text(values: str | Sequence[str]) -> bytes:
    """ASCII values, several joined by the DICOM backslash."""
    return (values if isinstance(values, str) else "\\".join(values)).encode("ascii")


def _uints(keyword: str, values: Sequence[int]) -> bytes:
    """Little-endian unsigned integers of the width of ``keyword``'s VR (US 2 bytes, else 4)."""
    return np.asarray(values, _UINT_DTYPES.get(_tag_and_vr(keyword)[1], "<u4")).tobytes()


def _put(ds: Dataset, keyword: str, value: bytes, vrs, kind: str) -> None:
    tag, vr, value = _element_value(keyword, value, vrs, kind)
    ds[tag] = RawDataElement(tag, vr, len(value), value, 0, False, True)
    mark_explicit_little(ds)


def mark_explicit_little(ds: Dataset) -> None:
    """Say that ``ds`` holds explicit VR little endian values in its own character set.

    pydicom writes a dataset's raw elements as they are only when the dataset says it was
    read with the encoding being written; otherwise it decodes every one of them first (a
    DS value at a time: seconds for an RTSTRUCT's contours) and walks every sequence to
    correct ambiguous VRs (parsing the pre-encoded ones).  For datasets the writers build
    themselves, which hold no ambiguous-VR element ("US or SS", "OB or OW").  The character
    set is the one the dataset has when this is called: call it after SpecificCharacterSet.
    """
    if ds.original_encoding != (False, True) or ds.original_character_set != ds._character_set:
        ds.set_original_encoding(False, True, ds._character_set)


def put_text(ds: Dataset, keyword: str, values: str | Sequence[str]) -> None:
    """Set a text element of ``ds`` (ASCII values; several joined by the DICOM backslash)."""
    _put(ds, keyword, _text(values), _TEXT_VRS, "a text element")


def put_uint(ds: Dataset, keyword: str, values: Sequence[int]) -> None:
    """Set a US or UL element of ``ds``."""
    _put(ds, keyword, _uints(keyword, values), _UINT_DTYPES, "US or UL")


# explicit VR: these VRs have a reserved 2 bytes and a 4-byte length, the others a 2-byte length
_LONG_LENGTH_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
_ITEM_TAG = b"\xfe\xff\x00\xe0"  # (FFFE,E000), little endian


def _encode(keyword: str, value: bytes, vrs, kind: str) -> bytes:
    """One data element in explicit VR little endian (tag and VR from the dictionary)."""
    tag, vr, value = _element_value(keyword, value, vrs, kind)
    head = struct.pack("<HH", tag.group, tag.elem) + vr.encode("ascii")
    if vr in _LONG_LENGTH_VRS:
        return head + struct.pack("<HI", 0, len(value)) + value
    if len(value) > 0xFFFE:
        raise ValueError(f"{keyword}: {len(value)} bytes do not fit one {vr} element (at most 65534)")
    return head + struct.pack("<H", len(value)) + value


def encode_text(keyword: str, values: str | Sequence[str]) -> bytes:
    """A text element (ASCII values; several joined by the DICOM backslash), encoded."""
    return _encode(keyword, _text(values), _TEXT_VRS, "a text element")


def encode_uint(keyword: str, values: Sequence[int]) -> bytes:
    """A US or UL element, encoded."""
    return _encode(keyword, _uints(keyword, values), _UINT_DTYPES, "US or UL")


def encode_item(elements: Iterable[bytes]) -> bytes:
    """A sequence item (defined length) of encoded elements (written in ascending tag order)."""
    body = b"".join(sorted(elements, key=lambda e: struct.unpack_from("<HH", e)))
    return _ITEM_TAG + struct.pack("<I", len(body)) + body


def encode_sequence(keyword: str, items: Iterable[bytes]) -> bytes:
    """A sequence element (defined length) of encoded items."""
    return _encode(keyword, b"".join(items), {"SQ"}, "a sequence")


def put_sequence(ds: Dataset, keyword: str, items: Sequence[bytes]) -> None:
    """Set a sequence of ``ds`` from encoded items (``encode_item``); pydicom decodes it
    like a sequence read from a file when it is accessed, and writes it as it is."""
    _put(ds, keyword, b"".join(items), {"SQ"}, "a sequence")


def format_ds(value: float) -> str:
    """A Decimal String of at most 16 characters: 3 decimals (um), shorter if needed."""
    value = float(value)
    if not np.isfinite(value):
        raise ValueError(f"cannot write {value} as a DICOM DS")
    text = f"{round(value, 3) + 0.0:.3f}"  # "+ 0.0" turns -0.0 into 0.0
    if len(text) > 16:
        text = format_number_as_ds(value)
    return text


def format_ds_array(values: np.ndarray) -> list[str]:
    """Decimal Strings with 3 decimals (micrometres) for an array of finite floats.

    The same text as ``"%.3f"`` of each value, with no negative zero ("-0.000" is written
    "0.000").  Raises ValueError for a value that is not finite or too large for 16
    characters.
    """
    return list(map("{:.3f}".format, _ds_3f_values(values).tolist()))


def format_contour_data(xy: np.ndarray, z_text: str) -> str:
    """The ContourData text ``x\\y\\z\\x\\y\\z...`` of points on one slice: x and y as
    ``format_ds_array`` writes them, z the slice's own DS text on every point.

    One ``%`` format over the whole contour, about twice as fast as formatting value by
    value: the RTSTRUCT writer formats ~100 000 values and is on the app's critical path.
    """
    v = _ds_3f_values(xy)
    point = "%.3f\\%.3f\\" + z_text.replace("%", "%%")
    return "\\".join([point] * (v.size // 2)) % tuple(v.tolist())


def _ds_3f_values(values: np.ndarray) -> np.ndarray:
    """``values`` flattened, checked to fit a 16-character DS with 3 decimals, with the values
    that would print as "-0.000" made 0."""
    v = np.asarray(values, dtype=float).ravel()
    if not np.isfinite(v).all():
        raise ValueError("cannot write NaN or infinity as a DICOM DS")
    if v.size and np.abs(v).max() >= _DS_3F_LIMIT:
        raise ValueError(f"{np.abs(v).max()} is too large for a 16-character DICOM DS with 3 decimals")
    return np.where((v > -0.0005) & (v <= 0.0), 0.0, v)


LO_MAX_CHARS = 64  # Long String (LO): at most 64 characters


def require_lo(text: str, what: str) -> str:
    """``text`` unchanged if it fits a Long String (LO) element, else ValueError naming ``what``.

    Both writers refuse an over-long value instead of cutting it: what the caller asked
    to write is written whole or not at all.
    """
    if len(text) > LO_MAX_CHARS:
        raise ValueError(f"{what} {text!r} is longer than {LO_MAX_CHARS} characters (LO)")
    return text


def write_dataset(ds: Dataset, path: str | Path) -> Path:
    """Save ``ds`` as a DICOM Part 10 file (preamble, file meta) and return the path.

    The transfer syntax is the one in ``ds.file_meta`` (explicit VR little endian for
    the writers' datasets; implicit VR little endian is also accepted).

    Raises:
        OutputError: the file cannot be written.
    """
    path = Path(path)
    file_meta = getattr(ds, "file_meta", None)
    if file_meta is None:
        ds.file_meta = file_meta = FileMetaDataset()
    if "TransferSyntaxUID" not in file_meta:
        file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    try:
        ds.save_as(path, enforce_file_format=True)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc} - check that the output folder exists and is writable") from exc
    logger.info("wrote %s", path)
    return path


# Root attributes of the Patient, Clinical Trial Subject, General Study, Patient Study and
# Clinical Trial Study modules of the CT Image IOD (PS3.3 A.3), copied from the CT when
# present into the SEG and the RTSTRUCT (the RT Structure Set IOD, A.19, has the same
# modules).  The list highdicom's copy_patient_and_study_information derives from its
# tables of the standard (tests/test_dicom_seg.py checks that they agree).
PATIENT_STUDY_KEYWORDS = (
    # Patient
    "ReferencedPatientSequence", "PatientName", "PatientID", "IssuerOfPatientID", "TypeOfPatientID",
    "IssuerOfPatientIDQualifiersSequence", "SourcePatientGroupIdentificationSequence",
    "GroupOfPatientsIdentificationSequence", "PatientBirthDate", "PatientBirthTime",
    "PatientBirthDateInAlternativeCalendar", "PatientDeathDateInAlternativeCalendar", "PatientAlternativeCalendar",
    "PatientSex", "QualityControlSubject", "StrainDescription", "StrainNomenclature", "StrainStockSequence",
    "StrainAdditionalInformation", "StrainCodeSequence", "GeneticModificationsSequence", "OtherPatientNames",
    "OtherPatientIDsSequence", "ReferencedPatientPhotoSequence", "EthnicGroupCodeSequence",
    "PatientSpeciesDescription", "PatientSpeciesCodeSequence", "PatientBreedDescription",
    "PatientBreedCodeSequence", "BreedRegistrationSequence", "ResponsiblePerson", "ResponsiblePersonRole",
    "ResponsibleOrganization", "PatientComments", "PatientIdentityRemoved", "DeidentificationMethod",
    "DeidentificationMethodCodeSequence",
    # Clinical Trial Subject
    "ClinicalTrialSponsorName", "ClinicalTrialProtocolID", "ClinicalTrialProtocolName",
    "IssuerOfClinicalTrialProtocolID", "OtherClinicalTrialProtocolIDsSequence", "ClinicalTrialSiteID",
    "ClinicalTrialSiteName", "IssuerOfClinicalTrialSiteID", "ClinicalTrialSubjectID",
    "IssuerOfClinicalTrialSubjectID", "ClinicalTrialSubjectReadingID", "IssuerOfClinicalTrialSubjectReadingID",
    "ClinicalTrialProtocolEthicsCommitteeName", "ClinicalTrialProtocolEthicsCommitteeApprovalNumber",
    # General Study
    "StudyDate", "StudyTime", "AccessionNumber", "IssuerOfAccessionNumberSequence", "ReferringPhysicianName",
    "ReferringPhysicianIdentificationSequence", "ConsultingPhysicianName",
    "ConsultingPhysicianIdentificationSequence", "StudyDescription", "ProcedureCodeSequence",
    "PhysiciansOfRecord", "PhysiciansOfRecordIdentificationSequence", "NameOfPhysiciansReadingStudy",
    "PhysiciansReadingStudyIdentificationSequence", "ReferencedStudySequence", "StudyInstanceUID", "StudyID",
    "RequestingService", "RequestingServiceCodeSequence", "ReasonForPerformedProcedureCodeSequence",
    # Patient Study
    "AdmittingDiagnosesDescription", "AdmittingDiagnosesCodeSequence", "PatientAge", "PatientSize",
    "PatientSizeCodeSequence", "PatientBodyMassIndex", "MeasuredAPDimension", "MeasuredLateralDimension",
    "PatientWeight", "MedicalAlerts", "Allergies", "Occupation", "SmokingStatus", "AdditionalPatientHistory",
    "PregnancyStatus", "LastMenstrualDate", "PatientSexNeutered", "ReasonForVisit", "ReasonForVisitCodeSequence",
    "AdmissionID", "IssuerOfAdmissionIDSequence", "ServiceEpisodeID", "ServiceEpisodeDescription",
    "IssuerOfServiceEpisodeIDSequence", "PatientState",
    # Clinical Trial Study
    "ClinicalTrialTimePointID", "ClinicalTrialTimePointDescription", "LongitudinalTemporalOffsetFromEvent",
    "LongitudinalTemporalEventType", "ClinicalTrialTimePointTypeCodeSequence", "IssuerOfClinicalTrialTimePointID",
    "ConsentForClinicalTrialUseSequence",
)

# Type 2 attributes of the Patient and General Study modules: written empty when the CT
# lacks them (a non-conformant CT must not make a non-conformant SEG)
TYPE2_PATIENT_STUDY = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
    "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber",
)


def copy_patient_and_study(target: Dataset, ct: Dataset) -> None:
    """Patient, Clinical Trial Subject, General Study, Patient Study and Clinical Trial Study
    modules of ``target``, copied from the CT header ``ct`` (``PATIENT_STUDY_KEYWORDS``);
    the type 2 ones the CT lacks are written empty."""
    for keyword in PATIENT_STUDY_KEYWORDS:
        if keyword in ct:
            target[keyword] = copy.deepcopy(ct[keyword])
    for keyword in TYPE2_PATIENT_STUDY:  # required, possibly empty, even when the CT lacks them
        if keyword not in target:
            setattr(target, keyword, None)
    if "ReferencedStudySequence" in target:
        # anonymisation often blanks Referenced SOP Class UID (type 1 in the item): drop
        # the items that are not complete
        kept = [
            item for item in target.ReferencedStudySequence
            if item.get("ReferencedSOPClassUID") and item.get("ReferencedSOPInstanceUID")
        ]
        if kept:
            target.ReferencedStudySequence = kept
        else:
            del target.ReferencedStudySequence
