"""Scan an input folder for DICOM and choose the one CT series to contour.

The rules live in ``config/series_selection.yaml``: filters a series must pass, then
ranking keys applied in order.  The choice and its reason are logged and returned, so
the report can say why this series was contoured and not another.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import yaml
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.uid import CTImageStorage

from autocontour.errors import ConfigurationError, InputError, SeriesSelectionError
from autocontour.volume import AXIS_ALIGNMENT_TOLERANCE

logger = logging.getLogger(__name__)

__all__ = ["SelectionRules", "SeriesCandidate", "scan_folder", "select_series", "DEFAULT_RULES_PATH"]

DEFAULT_RULES_PATH = Path(__file__).resolve().parent.parent / "config" / "series_selection.yaml"


@dataclass(frozen=True)
class SelectionRules:
    modality: str = "CT"
    sop_class_uids: tuple[str, ...] = (str(CTImageStorage),)
    min_slices: int = 10
    exclude_image_type: tuple[str, ...] = ("LOCALIZER", "SCOUT", "SCREENSHOT", "PROJECTION")
    require_axial: bool = True
    axial_tolerance: float = AXIS_ALIGNMENT_TOLERANCE
    ranking: tuple[str, ...] = (
        "original_primary", "most_slices", "thinnest_slices", "newest_series", "series_instance_uid",
    )

    @classmethod
    def from_yaml(cls, path: Path = DEFAULT_RULES_PATH) -> "SelectionRules":
        """The rules in ``path`` (keys left out keep their defaults).

        Raises:
            ConfigurationError: the file is missing, not YAML, or a key or value is not one
                the rules know (named in the message).
        """
        path = Path(path)
        fix = f"fix it or restore {DEFAULT_RULES_PATH.parent.name}/{DEFAULT_RULES_PATH.name} from the release"
        try:
            cfg = yaml.safe_load(path.read_text())
        except OSError as exc:
            raise ConfigurationError(
                f"series selection rules {path} cannot be read ({exc.strerror or exc}) - pass --rules with the rules "
                f"file or restore {DEFAULT_RULES_PATH.parent.name}/{DEFAULT_RULES_PATH.name}"
            ) from None
        except yaml.YAMLError as exc:
            where = getattr(exc, "problem_mark", None)
            at = f" at line {where.line + 1}" if where is not None else ""
            raise ConfigurationError(f"series selection rules {path} are not valid YAML{at} - {fix}") from None
        try:
            if not isinstance(cfg, dict):
                raise TypeError(f"the file must be a mapping with 'filters' and 'ranking', not {type(cfg).__name__}")
            f = cfg.get("filters", {})
            if not isinstance(f, dict):
                raise TypeError(f"'filters' must be a mapping, not {type(f).__name__}")
            _known("top-level", cfg, {"filters", "ranking"})
            _known("filters", f, _FILTER_KEYS)
            rules = cls(
                modality=_text(f.get("modality", cls.modality), "filters.modality"),
                sop_class_uids=_texts(f.get("sop_class_uids", cls.sop_class_uids), "filters.sop_class_uids"),
                min_slices=int(f.get("min_slices", cls.min_slices)),
                exclude_image_type=tuple(
                    t.upper() for t in _texts(f.get("exclude_image_type", cls.exclude_image_type),
                                              "filters.exclude_image_type")
                ),
                require_axial=_flag(f.get("require_axial", True), "filters.require_axial"),
                axial_tolerance=float(f.get("axial_tolerance", cls.axial_tolerance)),
                ranking=_texts(cfg.get("ranking", cls.ranking), "ranking"),
            )
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(f"series selection rules {path}: {exc} - {fix}") from None
        unknown = set(rules.ranking) - set(_RANK_KEYS)
        if unknown:
            raise ConfigurationError(
                f"series selection rules {path}: unknown ranking keys {sorted(unknown)}; valid: {sorted(_RANK_KEYS)} - "
                f"{fix}"
            )
        return rules


_FILTER_KEYS = {"modality", "sop_class_uids", "min_slices", "exclude_image_type", "require_axial", "axial_tolerance"}


def _known(where: str, mapping: dict, keys: set[str]) -> None:
    unknown = set(map(str, mapping)) - keys
    if unknown:
        raise ValueError(f"unknown {where} keys {sorted(unknown)}; valid: {sorted(keys)}")


def _text(value: object, key: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{key} must be a string, not {value!r}")
    return value


def _texts(value: object, key: str) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"{key} must be a list of strings, not {value!r}")
    return tuple(value)


def _flag(value: object, key: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{key} must be true or false, not {value!r}")
    return value


@dataclass
class SeriesCandidate:
    series_instance_uid: str
    datasets: list = field(default_factory=list)  # pydicom Datasets, pixel data deferred
    paths: list = field(default_factory=list)
    rejected: str = ""  # why this series cannot be contoured ("" = eligible)

    @property
    def first(self):
        return self.datasets[0]

    def describe(self) -> str:
        ds = self.first
        return (
            f"{self.series_instance_uid} ({getattr(ds, 'Modality', '?')}, {len(self.datasets)} files, "
            f"'{getattr(ds, 'SeriesDescription', '')}', ImageType {'/'.join(_image_type(ds))})"
        )


def scan_folder(folder: Path) -> tuple[list[SeriesCandidate], list[tuple[str, str]]]:
    """Read every DICOM header under ``folder`` (pixel data deferred), grouped by series.

    Raises:
        InputError: the folder is missing or empty, or holds no readable DICOM file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"input folder {folder} does not exist or is not a folder - pass -i with a folder of DICOM files")
    files = sorted(Path(root) / f for root, _, names in os.walk(folder) for f in names)
    if not files:
        raise InputError(f"input folder {folder} is empty - put the planning CT's DICOM files in it")
    by_series: dict[str, SeriesCandidate] = {}
    skipped: list[tuple[str, str]] = []
    for path in files:
        try:
            ds = _read_header(path)
            if "SeriesInstanceUID" not in ds or "SOPInstanceUID" not in ds:
                skipped.append((str(path), "no SeriesInstanceUID or SOPInstanceUID (truncated file, or not an image)"))
                continue
            uid = str(ds.SeriesInstanceUID or "")
            if not uid or not str(ds.SOPInstanceUID or ""):
                skipped.append((str(path), "empty SeriesInstanceUID or SOPInstanceUID (damaged anonymisation)"))
                continue
        except InvalidDicomError as exc:
            skipped.append((str(path), f"not readable as DICOM ({type(exc).__name__})"))
            continue
        except Exception as exc:  # noqa: BLE001 - pydicom raises struct.error, TypeError, ... on damaged files
            skipped.append((str(path), f"damaged DICOM header ({type(exc).__name__}: {exc})".replace("\n", " ")))
            continue
        cand = by_series.setdefault(uid, SeriesCandidate(uid))
        cand.datasets.append(ds)
        cand.paths.append(str(path))
    if skipped:
        named = "; ".join(f"{path}: {why}" for path, why in skipped[:5])
        more = f"; and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        logger.warning("skipped %d file(s) that are not readable DICOM: %s%s", len(skipped), named, more)
    if not by_series:
        why = skipped[0][1] if skipped else "no files"
        raise InputError(
            f"no usable DICOM file in {folder} ({len(files)} files; e.g. {Path(skipped[0][0]).name}: {why}) - "
            "send the CT series as DICOM with its UIDs"
        )
    return sorted(by_series.values(), key=lambda c: c.series_instance_uid), skipped


# Header elements the loader reads: converted while scanning, so that a damaged value makes
# that one file "not readable" (skipped with a warning) instead of failing later.
_HEADER_KEYWORDS = (
    "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "Modality", "ImageType", "ImageOrientationPatient",
    "ImagePositionPatient", "PixelSpacing", "Rows", "Columns", "RescaleSlope", "RescaleIntercept",
    "SliceThickness", "SeriesDate", "SeriesTime", "SeriesDescription", "StudyInstanceUID", "FrameOfReferenceUID",
)
_NUMERIC_KEYWORDS = (
    "ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing", "RescaleSlope", "RescaleIntercept",
)


def _read_header(path: Path):
    ds = pydicom.dcmread(path, defer_size="1 KB")
    for kw in _HEADER_KEYWORDS:
        if kw in ds:
            value = ds[kw].value  # converts the raw value; raises if it cannot
            if kw in _NUMERIC_KEYWORDS and value is not None:  # pydicom keeps e.g. 'abc' in a DS as text
                for v in value if isinstance(value, (list, tuple, MultiValue)) else [value]:
                    try:
                        float(v)
                    except (TypeError, ValueError):
                        raise ValueError(f"{kw} value {v!r} is not a number") from None
    return ds


def _image_type(ds) -> list[str]:
    value = getattr(ds, "ImageType", None) or []
    return [str(v).upper() for v in ([value] if isinstance(value, str) else value)]


def _rejection(cand: SeriesCandidate, rules: SelectionRules) -> str:
    ds = cand.first
    if str(getattr(ds, "Modality", "")) != rules.modality:
        return f"modality {getattr(ds, 'Modality', 'missing')}, not {rules.modality}"
    sop_classes = {str(getattr(d, "SOPClassUID", "")) for d in cand.datasets}
    if not sop_classes <= set(rules.sop_class_uids):
        return f"SOP class {sorted(sop_classes)} is not single-frame CT Image Storage"
    # Localisers: drop the scout images; the series stays a candidate with what is left.
    kept = [i for i, d in enumerate(cand.datasets) if not set(_image_type(d)) & set(rules.exclude_image_type)]
    if not kept:
        return f"image type {'/'.join(_image_type(ds))} (localiser/scout)"
    if len(kept) < len(cand.datasets):
        logger.warning(
            "series %s: ignoring %d localiser/scout image(s) mixed into the series",
            cand.series_instance_uid, len(cand.datasets) - len(kept),
        )
        cand.datasets = [cand.datasets[i] for i in kept]
        cand.paths = [cand.paths[i] for i in kept]
        ds = cand.first  # the orientation test below is about the images kept, not a scout
    with_pixels = [d for d in cand.datasets if "PixelData" in d]
    if not with_pixels:
        return "no pixel data in any file"
    if len(cand.datasets) < rules.min_slices:
        return f"{len(cand.datasets)} slices, fewer than the {rules.min_slices} needed for a volume"
    if rules.require_axial:
        try:
            iop = np.array([float(v) for v in ds.ImageOrientationPatient])
        except (AttributeError, TypeError, ValueError):
            iop = np.array([])
        if iop.shape != (6,) or not np.isfinite(iop).all():
            return "no valid ImageOrientationPatient"
        normal = np.cross(iop[:3], iop[3:])
        if not abs(abs(normal[2]) - 1.0) <= rules.axial_tolerance:
            return f"not axial (slice normal {np.round(normal, 3).tolist()})"
    return ""


def _slice_thickness(cand: SeriesCandidate) -> float:
    try:
        return float(cand.first.SliceThickness)
    except (AttributeError, TypeError, ValueError):
        return float("inf")


_RANK_KEYS = {
    # smaller sorts first
    "original_primary": lambda c: 0 if _image_type(c.first)[:2] == ["ORIGINAL", "PRIMARY"] else 1,
    "most_slices": lambda c: -len(c.datasets),
    "thinnest_slices": _slice_thickness,
    "newest_series": lambda c: tuple(
        -ord(ch) for ch in f"{getattr(c.first, 'SeriesDate', '')}{getattr(c.first, 'SeriesTime', '')}"
    ),
    "series_instance_uid": lambda c: c.series_instance_uid,
}


def select_series(candidates: list[SeriesCandidate], rules: SelectionRules, folder: Path | str = "") -> SeriesCandidate:
    """The series to contour, by the rules; logs the choice and why.

    Raises:
        SeriesSelectionError: no series passes the filters (lists each series and why).
    """
    for cand in candidates:
        cand.rejected = _rejection(cand, rules)
    eligible = [c for c in candidates if not c.rejected]
    if not eligible:
        why = "; ".join(f"{c.describe()}: {c.rejected}" for c in candidates)
        raise SeriesSelectionError(
            f"no CT series in {folder} can be contoured ({why}) - send an axial CT series of at least "
            f"{rules.min_slices} slices"
        )
    ranked = sorted(eligible, key=lambda c: tuple(_RANK_KEYS[k](c) for k in rules.ranking))
    chosen = ranked[0]
    if len(eligible) > 1:
        logger.warning(
            "%d CT series are eligible; contouring %s, chosen by %s; not contoured: %s",
            len(eligible), chosen.describe(), " > ".join(rules.ranking),
            ", ".join(c.series_instance_uid for c in ranked[1:]),
        )
    else:
        logger.info("contouring series %s", chosen.describe())
    return chosen
