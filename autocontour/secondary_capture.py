"""The QA pictures as a DICOM Secondary Capture series in the CT's study.

One Secondary Capture Image (1.2.840.10008.5.1.4.1.1.7) per QA page, all in one new
series of the CT's study, so PACS and planning-system viewers list them next to the CT
and its RTSTRUCT / SEG.  Each instance is marked derived (ImageType DERIVED\\SECONDARY,
a Derivation Description and a derivation code) and references the CT series it was
made from: the Source Image Sequence lists the CT slices the picture was drawn from,
and the Referenced Series Sequence (Common Instance Reference module) names the CT
series with those instances.  Burned-in annotation: YES (the picture carries text,
including the patient ID).  RGB, 8 bits, uncompressed, explicit VR little endian.

Written with pydicom: highdicom's ``SCImage`` would do, but importing highdicom costs
more than a second, far more than this whole step is allowed (the app imports it only
to read SEGs).  ``tests/test_qa.py`` checks the files with dciodvfy.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset, validate_file_meta
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from autocontour.dicom_elements import copy_patient_and_study, put_text, require_lo
from autocontour.errors import GeometryError
from autocontour.volume import Volume

logger = logging.getLogger(__name__)

__all__ = ["SECONDARY_CAPTURE_IMAGE_STORAGE", "build_secondary_capture"]

SECONDARY_CAPTURE_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
# DCM 113076 "Segmentation" is what the picture shows: contours drawn on the CT (CID 7203)
_DERIVATION = ("113076", "DCM", "Segmentation")

def _ascii(text: str, what: str) -> str:
    try:
        text.encode("ascii")
    except UnicodeEncodeError:
        raise ValueError(f"{what} must be ASCII, got {text!r}") from None
    return text


def build_secondary_capture(
    volume: Volume,
    image: np.ndarray,
    *,
    series_instance_uid: str,
    instance_number: int,
    series_description: str,
    algorithm_name: str,
    algorithm_version: str,
    source_slices: Sequence[int] | None = None,
    series_number: int = 903,
    derivation_description: str = "Automatic contours drawn on the CT for review (QA sheet)",
) -> Dataset:
    """One Secondary Capture instance of the RGB picture ``image`` in the CT's study.

    Args:
        volume: the CT (``volume.datasets`` hold its headers, no pixel data needed).
        image: (rows, columns, 3) uint8 RGB.
        series_instance_uid: the QA series' UID (the same for every page of one run).
        instance_number: page number, from 1.
        series_description: SeriesDescription of the QA series (ASCII, <= 64 characters).
        algorithm_name, algorithm_version: written as the capture device's manufacturer,
            model name and software version.
        source_slices: the CT slices (k) the picture was drawn from; default: all.
        series_number: SeriesNumber of the QA series.

    Raises:
        ValueError: ``image`` is not (rows, columns, 3) uint8, or text is not ASCII or is
            longer than 64 characters (LO).
        GeometryError: the CT has no StudyInstanceUID.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"a Secondary Capture needs a (rows, columns, 3) uint8 picture, got {image.shape} {image.dtype}")
    ct = volume.datasets[0]
    study_uid = volume.study_instance_uid or str(getattr(ct, "StudyInstanceUID", ""))
    if not study_uid:
        raise GeometryError(f"series {volume.series_instance_uid}: the CT has no StudyInstanceUID")
    series_description = require_lo(_ascii(series_description, "series description"), "series description")
    now = datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")

    ds = Dataset()
    # SOP Common
    if "SpecificCharacterSet" in ct:  # patient and study text copied verbatim; ours is ASCII
        ds.SpecificCharacterSet = ct.SpecificCharacterSet
    ds.InstanceCreationDate = date
    ds.InstanceCreationTime = time
    ds.SOPClassUID = SECONDARY_CAPTURE_IMAGE_STORAGE
    ds.SOPInstanceUID = generate_uid()
    # Patient, Clinical Trial Subject, General Study, Patient Study, Clinical Trial Study: the CT's
    copy_patient_and_study(ds, ct)
    ds.StudyInstanceUID = study_uid
    # General Series
    ds.Modality = "OT"
    ds.SeriesInstanceUID = series_instance_uid
    ds.SeriesNumber = series_number
    ds.SeriesDate = date
    ds.SeriesTime = time
    ds.SeriesDescription = series_description
    # Laterality (type 2C, for a paired body part) is left out: the body part examined is
    # given (the CT's, else head and neck: what this app contours) and is unpaired
    ds.BodyPartExamined = str(ct.get("BodyPartExamined", "") or "HEADNECK")
    # General Equipment, SC Equipment
    ds.Manufacturer = _ascii(algorithm_name, "algorithm name")
    ds.ConversionType = "WSD"  # workstation
    ds.SecondaryCaptureDeviceManufacturer = algorithm_name
    ds.SecondaryCaptureDeviceManufacturerModelName = algorithm_name
    ds.SecondaryCaptureDeviceSoftwareVersions = require_lo(_ascii(algorithm_version, "algorithm version"),
                                                           "algorithm version")
    # General Image, General Reference
    ds.InstanceNumber = instance_number
    ds.PatientOrientation = ""  # the page holds axial, coronal and sagittal cuts
    ds.ContentDate = date
    ds.ContentTime = time
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.DerivationDescription = _ascii(derivation_description, "derivation description")[:1024]
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = _DERIVATION
    ds.DerivationCodeSequence = DicomSequence([code])
    ks = range(len(volume.datasets)) if source_slices is None else sorted(set(int(k) for k in source_slices))
    sources = [(str(getattr(volume.datasets[k], "SOPClassUID", "") or CT_IMAGE_STORAGE), volume.sop_instance_uids[k])
               for k in ks]
    ds.SourceImageSequence = DicomSequence([_instance_ref(*source) for source in sources])
    ds.BurnedInAnnotation = "YES"
    ds.LossyImageCompression = "00"
    # SC Image
    ds.DateOfSecondaryCapture = date
    ds.TimeOfSecondaryCapture = time
    # Common Instance Reference: the CT series (same study)
    series = Dataset()
    series.SeriesInstanceUID = volume.series_instance_uid or str(ct.SeriesInstanceUID)
    series.ReferencedInstanceSequence = DicomSequence([_instance_ref(*source) for source in sources])
    ds.ReferencedSeriesSequence = DicomSequence([series])
    # Image Pixel
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = int(image.shape[0]), int(image.shape[1])
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    pixels = np.ascontiguousarray(image).tobytes()
    if len(pixels) % 2:
        pixels += b"\x00"
    ds.PixelData = pixels
    ds["PixelData"].VR = "OB"

    ds.preamble = b"\x00" * 128
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    validate_file_meta(ds.file_meta, enforce_standard=True)
    return ds


def _instance_ref(sop_class_uid: str, sop_instance_uid: str) -> Dataset:
    """One item of an instance reference sequence, built from the values (reading them back
    from another item through pydicom was the largest Python cost of the SC in a profile)."""
    item = Dataset()
    put_text(item, "ReferencedSOPClassUID", sop_class_uid)
    put_text(item, "ReferencedSOPInstanceUID", sop_instance_uid)
    return item
