"""OpenKBP npz -> canonical (z, y, x) LPS arrays at the model's spacing, cached on disk.

OpenKBP stores ``ct_hu[row, col, slice]`` with rows running anterior -> posterior (+y),
columns patient right -> left (+x) and slices superior -> inferior (-z).  The canonical
array order used everywhere in this project is ``(z, y, x)`` with every index increasing
along +z (superior), +y (posterior) and +x (patient left) of DICOM LPS.
"""

from __future__ import annotations

import hashlib
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

logger = logging.getLogger(__name__)

OPENKBP_ROIS = (
    "Brainstem", "SpinalCord", "RightParotid", "LeftParotid", "Esophagus",
    "Larynx", "Mandible", "PTV56", "PTV63", "PTV70",
)


@dataclass(frozen=True)
class Case:
    """One patient in canonical (z, y, x) order.

    ``masks`` holds the ten OpenKBP ROIs (in ``OPENKBP_ROIS`` order) and ``present``
    tells which were contoured (an absent ROI is unknown, not background).
    """

    name: str
    ct: np.ndarray  # int16 HU (z, y, x)
    masks: np.ndarray  # bool (10, z, y, x)
    present: np.ndarray  # bool (10,)
    spacing_zyx: tuple[float, float, float]


def load_openkbp(path: Path) -> Case:
    """Read one OpenKBP npz and reorient it to canonical (z, y, x) LPS order."""
    z = np.load(path)
    names = tuple(str(n) for n in z["roi_names"])
    if names != OPENKBP_ROIS:
        raise ValueError(f"{path}: unexpected roi_names {names}")
    masks = np.unpackbits(z["masks"], axis=-1).astype(bool)
    dx, dy, dz = (float(v) for v in z["voxel_mm"])
    # (row, col, slice) -> (slice, row, col); slices run superior->inferior: flip to +z.
    ct = np.ascontiguousarray(z["ct_hu"].transpose(2, 0, 1)[::-1])
    masks = np.ascontiguousarray(masks.transpose(0, 3, 1, 2)[:, ::-1])
    return Case(path.stem, ct, masks, z["roi_present"].astype(bool), (dz, dy, dx))


def resample_case(case: Case, spacing_zyx: tuple[float, float, float]) -> Case:
    """Resample to ``spacing_zyx`` (linear for CT, linear-then-0.5 for masks).

    Voxel centres of the first voxel are kept; the extent is preserved to within
    one output voxel.
    """
    zoom = np.array(case.spacing_zyx) / np.array(spacing_zyx)
    ct = ndimage.zoom(case.ct.astype(np.float32), zoom, order=1, grid_mode=False)
    masks = np.stack(
        [ndimage.zoom(m.astype(np.float32), zoom, order=1, grid_mode=False) > 0.5 for m in case.masks]
    )
    return Case(case.name, ct.astype(np.int16), masks, case.present, tuple(spacing_zyx))


def _cache_one(path: Path, cpath: Path, spacing_zyx: tuple[float, float, float]) -> None:
    case = resample_case(load_openkbp(path), spacing_zyx)
    tmp = cpath.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(tmp, ct=case.ct, masks=case.masks, present=case.present)
    os.replace(tmp, cpath)


def cached_cases(
    folder: Path, spacing_zyx: tuple[float, float, float], cache_dir: Path, reverse: bool = False,
    workers: int | None = None,
) -> list[Case]:
    """All patients of an OpenKBP folder at ``spacing_zyx``, cached as npz under ``cache_dir``.

    Missing cache files are made by ``workers`` processes (default: one per CPU), so a fresh
    machine (a lent GPU machine with 16 cores) fills the cache in seconds, not minutes.
    """
    key = hashlib.sha256(f"{folder.resolve()}|{spacing_zyx}".encode()).hexdigest()[:12]
    cdir = cache_dir / key
    cdir.mkdir(parents=True, exist_ok=True)
    paths = sorted(folder.glob("*.npz"), key=lambda p: int(p.stem.split("_")[-1]))
    if reverse:
        paths.reverse()
    missing = [p for p in paths if not (cdir / p.name).exists()]
    if missing:
        n = min(len(missing), workers or os.cpu_count() or 1)
        logger.info("caching %d cases at %s mm with %d processes", len(missing), spacing_zyx, n)
        if n > 1:
            with ProcessPoolExecutor(n) as pool:
                list(pool.map(_cache_one, missing, [cdir / p.name for p in missing], [spacing_zyx] * len(missing)))
        else:
            for p in missing:
                _cache_one(p, cdir / p.name, spacing_zyx)
    cases = []
    for path in paths:
        z = np.load(cdir / path.name)
        cases.append(Case(path.stem, z["ct"], z["masks"], z["present"], tuple(spacing_zyx)))
    if reverse:
        cases.reverse()
    logger.info("loaded %d cases from %s at %s mm", len(cases), folder, spacing_zyx)
    return cases
