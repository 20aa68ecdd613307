"""Data elements stored as their encoded bytes, for the writers' per-frame / per-contour items.

pydicom validates every value it is given (~0.1 ms each for UI, DS, CS, IS strings), and
a SEG or RTSTRUCT of one CT holds tens of thousands of them, all produced by our own code
in a known-valid form.  A ``RawDataElement`` holds the explicit-VR little-endian bytes
instead; pydicom writes them as they are and decodes them like any element read from a
file when they are accessed.  Only for values the writers format themselves.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

__all__ = ["raw_element", "raw_text", "raw_uint", "format_ds_array"]

_TEXT_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UT"}
# DS: at most 16 bytes a value; "%.3f" stays within that below this magnitude
_DS_3F_LIMIT = 1e11


def raw_element(tag: int, vr: str, value: bytes) -> RawDataElement:
    """An element of ``vr`` whose value field is ``value``, padded to an even length
    (UI with NUL, other text VRs with a space, binary VRs with a zero byte)."""
    if len(value) % 2:
        value += b"\x00" if vr == "UI" or vr not in _TEXT_VRS else b" "
    return RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)


def raw_text(tag: int, vr: str, values: str | Sequence[str]) -> RawDataElement:
    """A text element (ASCII values; several joined by the DICOM backslash)."""
    text = values if isinstance(values, str) else "\\".join(values)
    return raw_element(tag, vr, text.encode("ascii"))


def raw_uint(tag: int, vr: str, values: Sequence[int]) -> RawDataElement:
    """A US or UL element."""
    dtype = {"US": "<u2", "UL": "<u4"}[vr]
    return raw_element(tag, vr, np.asarray(values, dtype).tobytes())


def format_ds_array(values: np.ndarray) -> list[str]:
    """Decimal Strings with 3 decimals (micrometres) for an array of finite floats.

    The same text as ``"%.3f"`` of each value, with no negative zero ("-0.000" is written
    "0.000").  Raises ValueError for a value that is not finite or too large for 16
    characters.
    """
    v = np.asarray(values, dtype=float).ravel()
    if not np.isfinite(v).all():
        raise ValueError("cannot write NaN or infinity as a DICOM DS")
    if v.size and np.abs(v).max() >= _DS_3F_LIMIT:
        raise ValueError(f"{np.abs(v).max()} is too large for a 16-character DICOM DS with 3 decimals")
    v = np.where((v > -0.0005) & (v <= 0.0), 0.0, v)  # values that would print as "-0.000"
    return list(map("{:.3f}".format, v.tolist()))
