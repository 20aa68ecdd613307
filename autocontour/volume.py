"""A CT volume with its patient geometry, and exact reorientation to the model's frame.

Array order is ``(k, j, i)`` = (slice, row, column).  ``affine`` maps an index
``(k, j, i, 1)`` to a DICOM patient (LPS) position in mm, so the geometry travels with
the pixels and is never recomputed from assumptions:

* column 2 (``i``) = ImageOrientationPatient[0:3] * column spacing (PixelSpacing[1]);
* column 1 (``j``) = ImageOrientationPatient[3:6] * row spacing (PixelSpacing[0]);
* column 0 (``k``) = the measured step between sorted slice positions;
* column 3 = ImagePositionPatient of the first sorted slice.

The *canonical* frame is the one the models were trained in: axes ``(z, y, x)`` with
index increasing towards superior (+z), posterior (+y) and patient left (+x).  Any
axis-aligned orientation (HFS, HFP, FFS, FFP, decubitus) reaches it by transposes and
flips only, which are exact and invertible.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from autocontour.errors import GeometryError

__all__ = ["Volume", "CanonicalView", "to_canonical", "AXIS_ALIGNMENT_TOLERANCE", "BODY_HU"]

# A direction cosine farther than this from an axis makes the series oblique (rejected);
# also the series selection's default axial tolerance and the RTSTRUCT writer's axial check.
AXIS_ALIGNMENT_TOLERANCE = 1e-3
# HU above which a voxel is patient (or couch), not air: the inference crop and the midline.
BODY_HU = -400.0


@dataclass
class Volume:
    """Pixels in HU plus where each voxel is in the patient.

    ``sop_instance_uids[k]`` is the CT slice that holds ``array[k]``; ``datasets`` keeps
    the header of each slice (no pixel data) for the writers.
    """

    array: np.ndarray  # (k, j, i), HU
    affine: np.ndarray  # 4x4, index (k, j, i) -> LPS mm
    series_instance_uid: str = ""
    study_instance_uid: str = ""
    frame_of_reference_uid: str = ""
    sop_instance_uids: tuple[str, ...] = ()
    datasets: list = field(default_factory=list, repr=False)

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size along (k, j, i) in mm."""
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    @property
    def voxel_volume_cc(self) -> float:
        return float(abs(np.linalg.det(self.affine[:3, :3])) / 1000.0)

    def index_to_lps(self, kji: np.ndarray) -> np.ndarray:
        """(N, 3) indices (k, j, i) -> (N, 3) LPS positions in mm."""
        kji = np.asarray(kji, dtype=float)
        return kji @ self.affine[:3, :3].T + self.affine[:3, 3]

    def lps_to_index(self, xyz: np.ndarray) -> np.ndarray:
        """(N, 3) LPS positions -> fractional (k, j, i) indices."""
        inv = np.linalg.inv(self.affine)
        xyz = np.asarray(xyz, dtype=float)
        return xyz @ inv[:3, :3].T + inv[:3, 3]


@dataclass(frozen=True)
class CanonicalView:
    """How a volume's array maps onto the canonical (z, y, x) frame.

    ``perm[c]`` is the source array axis that becomes canonical axis ``c``;
    ``flip[c]`` tells whether that axis is reversed.
    """

    perm: tuple[int, int, int]
    flip: tuple[bool, bool, bool]
    spacing_zyx: tuple[float, float, float]
    origin_lps: tuple[float, float, float]  # LPS of canonical voxel (0, 0, 0)

    def forward(self, arr: np.ndarray) -> np.ndarray:
        """Source (k, j, i) array -> canonical (z, y, x) view (no copy)."""
        out = arr.transpose(self.perm)
        sl = tuple(slice(None, None, -1) if f else slice(None) for f in self.flip)
        return out[sl]

    def inverse(self, arr: np.ndarray) -> np.ndarray:
        """Canonical (z, y, x) array -> source (k, j, i) order (no copy)."""
        sl = tuple(slice(None, None, -1) if f else slice(None) for f in self.flip)
        arr = arr[sl]
        return arr.transpose(np.argsort(self.perm))


def to_canonical(volume: Volume) -> CanonicalView:
    """The exact transpose/flip that brings ``volume`` to the canonical frame.

    Raises:
        GeometryError: the slice or pixel axes are not aligned with the patient axes
            (gantry tilt, oblique acquisition).
    """
    lin = volume.affine[:3, :3]
    spacing = np.linalg.norm(lin, axis=0)
    unit = lin / spacing
    # LPS axis of each array axis
    axis_of = np.argmax(np.abs(unit), axis=0)
    off_axis = np.abs(unit).copy()
    off_axis[axis_of, range(3)] = 0
    if off_axis.max() > AXIS_ALIGNMENT_TOLERANCE or len(set(axis_of.tolist())) != 3:
        raise GeometryError(
            f"series {volume.series_instance_uid}: image axes are oblique or tilted "
            f"(direction {np.round(unit, 4).tolist()}); only axial, axis-aligned CTs can be contoured - "
            "send the planning CT reconstructed without gantry tilt"
        )
    perm, flip, spacing_zyx = [0, 0, 0], [False] * 3, [0.0] * 3
    shape = volume.array.shape
    origin = volume.affine[:3, 3].copy()
    for array_axis in range(3):
        lps_axis = int(axis_of[array_axis])
        canon_axis = 2 - lps_axis  # LPS x -> canonical 2, y -> 1, z -> 0
        perm[canon_axis] = array_axis
        negative = unit[lps_axis, array_axis] < 0
        flip[canon_axis] = bool(negative)
        spacing_zyx[canon_axis] = float(spacing[array_axis])
        if negative:
            origin += lin[:, array_axis] * (shape[array_axis] - 1)
    return CanonicalView(tuple(perm), tuple(flip), tuple(spacing_zyx), tuple(float(v) for v in origin))
