"""Geometry test matrix on real anatomy: every patient orientation gives the same contours.

One OpenKBP validation patient (pt_236: all seven organs and PTV70 contoured) is cropped
to the 64 slices from the larynx to the top of the brainstem, upsampled in-plane to
1.953 mm pixels (a clinical pixel size; see ``INPLANE_UPSAMPLE``) and written as a DICOM
CT series in several variants of the *same physical anatomy*:

* ``HFS``: the reference (files and InstanceNumber 1 = the most inferior slice);
* ``HFP``, ``FFS``, ``FFP``: the other patient orientations (pixel rows/columns and, for
  feet-first, the slice order along the normal are reversed);
* ``nonsquare``: pixel columns resampled to 2.756 mm (rows stay 1.953 mm), so
  PixelSpacing = (row, column) differ and Rows != Columns;
* ``shuffled``: file names and InstanceNumbers in random order;
* ``superior_first``: file order and InstanceNumber 1 start at the most superior slice.

(``COMBINED``, all of these at once, is the geometry variant of test_conformance.py.)

Each variant goes through the pipeline in-process, without Holoscan, exactly as the app
runs it: scan/select/build_volume -> segment (both models, CPU) -> postprocess ->
build_rtstruct + build_seg -> written to disk -> read back (rasterise_rtstruct,
read_seg_masks) on the variant's own volume.  The read-back masks are then compared with
the HFS result *in patient coordinates*: every voxel centre of the variant is mapped
through LPS into the HFS volume's index space and the HFS mask is sampled there (nearest
neighbour; for the flips and orders the grids coincide and the map is an exact
permutation).

Models: ``models/`` of this repository, or the folder in ``AUTOCONTOUR_TEST_MODELS``;
the module is skipped when there is no ``*/model.yaml``.  Run with ``-s`` to see the
Dice table.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from scipy import ndimage

from app import SERIES_DESCRIPTION
from autocontour import APP_NAME, __version__
from autocontour.ct_volume import build_volume
from autocontour.dicom_elements import write_dataset
from autocontour.dicom_seg import build_seg
from autocontour.model_config import load_models
from autocontour.postprocess import StructureResult, postprocess
from autocontour.readback import rasterise_rtstruct, read_seg_masks
from autocontour.rtstruct import build_rtstruct
from autocontour.segmenter import Segmenter, open_segmenters
from autocontour.series_selection import SelectionRules, scan_folder, select_series
from autocontour.structures import STRUCTURES
from autocontour.volume import Volume, to_canonical
from tools.openkbp_to_dicom import write_ct_series
from training.data import load_openkbp

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
OPENKBP_PATIENT = SHARED_DATA / "openkbp" / "validation" / "pt_236.npz"
# Canonical slices 42..105 (3 mm): esophagus top, larynx, mandible, parotids, brainstem.
CROP_SLICES = slice(42, 106)
# OpenKBP's 3.906 mm pixels are upsampled 2x in-plane (linear), to 1.953 mm.  On the raw
# 3.9 mm grid, nearest-neighbour resampling of the reference alone costs the non-square
# comparison up to 0.08 Dice on structures of a few hundred voxels (measured with a
# model-free quantisation estimate), which would hide what the test is for.
INPLANE_UPSAMPLE = 2
ORIGIN_LPS = (-248.37, -231.19, -412.5)  # not on a round grid
NONSQUARE_EXTRA_MM = 0.8  # column spacing = row spacing + this
DICE_MIN = 0.95  # every variant vs HFS, in patient coordinates, RTSTRUCT and SEG
# Flips and slice orders give the model exactly the same canonical array: anything but
# (near-)identical masks is a geometry error.  One voxel of shift costs far more than 0.01.
SAME_GRID_DICE_MIN = 0.99
# (variant, structure) -> a lower, documented floor for a model-sensitivity shortfall that is
# not a placement error (the centroid check below still holds it to half a voxel).  With
# 1.0.0 the spinal cord on the non-square variant reached 0.933, with 1.1.0 0.954; hn_oar
# 1.2.0, which contours the whole cord (18.7 cc here, 2-4 voxels across on
# the model grid), gives 0.946, 1.3.0 0.943 (17.7 cc), 1.4.0 0.935 (15.9 cc; centroid
# within 0.32 mm) and 1.5.0 0.934 (15.7 cc; within 0.56 mm): its resampled, non-square input moves the cord's thin ends.
KNOWN_SHORTFALLS: dict[tuple[str, str], float] = {("nonsquare", "SpinalCord"): 0.93}
MIN_STRUCTURES_FOUND = 3  # fewer non-empty reference structures would make the matrix vacuous

pytestmark = pytest.mark.slow


# --------------------------------------------------------------------------- shared helpers
# (test_conformance.py imports these)


def models_dir_or_skip() -> Path:
    """ROOT/models, or $AUTOCONTOUR_TEST_MODELS; skips when no model is installed there."""
    folder = Path(os.environ.get("AUTOCONTOUR_TEST_MODELS") or ROOT / "models")
    if not list(folder.glob("*/model.yaml")):
        pytest.skip(
            f"no trained model in {folder} (no */model.yaml): train and export them (make train export), "
            "or point AUTOCONTOUR_TEST_MODELS at a models folder"
        )
    return folder


def load_pipeline(models_dir: Path) -> list[Segmenter]:
    """Every model opened once on the CPU backend, as the app does at start-up."""
    return open_segmenters(load_models(models_dir), "cpu")


def app_writer_args(loaded: list[Segmenter]) -> dict:
    """The writers' arguments exactly as app.py passes them to both writer operators."""
    version = f"{__version__} (" + ", ".join(f"{s.model.name} {s.model.version}" for s in loaded) + ")"
    return dict(algorithm_name=APP_NAME, algorithm_version=version, series_description=SERIES_DESCRIPTION)


def load_volume(ct_dir: Path) -> Volume:
    cands, _ = scan_folder(ct_dir)
    return build_volume(select_series(cands, SelectionRules()))


@dataclass
class PipelineResult:
    ct_dir: Path
    volume: Volume
    results: dict[str, StructureResult]
    masks: dict[str, np.ndarray]  # what the writers were given
    rtstruct_path: Path
    seg_path: Path
    rtstruct_masks: dict[str, np.ndarray]  # read back from the written files
    seg_masks: dict[str, np.ndarray]


def run_pipeline(ct_dir: Path, loaded: list[Segmenter], out_dir: Path) -> PipelineResult:
    """The app's graph, in-process: select, convert, segment, postprocess, write, read back."""
    volume = load_volume(ct_dir)
    raw: dict[str, np.ndarray] = {}
    for segmenter in loaded:
        raw.update(segmenter.predict(volume))
    order = [s.name for s in STRUCTURES if s.name in raw]  # as PostprocessOperator merges
    results = postprocess(volume, {n: raw[n] for n in order})
    masks = {n: r.mask for n, r in results.items()}
    writer = app_writer_args(loaded)
    out_dir.mkdir(parents=True, exist_ok=True)
    rts_path = write_dataset(build_rtstruct(volume, masks, **writer), out_dir / "RTSTRUCT.dcm")
    seg_path = write_dataset(build_seg(volume, masks, **writer), out_dir / "SEG.dcm")
    return PipelineResult(
        ct_dir, volume, results, masks, rts_path, seg_path,
        rasterise_rtstruct(pydicom.dcmread(rts_path), volume, strict=True),
        read_seg_masks(pydicom.dcmread(seg_path), volume),
    )


def source_ct() -> tuple[np.ndarray, tuple[float, float, float]]:
    """The reference anatomy: canonical (z, y, x) HU array and its spacing."""
    if not OPENKBP_PATIENT.exists():
        pytest.skip(f"{OPENKBP_PATIENT} not present")
    case = load_openkbp(OPENKBP_PATIENT)
    ct = case.ct[CROP_SLICES].astype(np.float32)
    dz, dy, dx = (float(f"{v:g}") for v in case.spacing_zyx)  # as write_ct_series writes them
    n_y, n_x = ((n - 1) * INPLANE_UPSAMPLE + 1 for n in ct.shape[1:])  # keeps the end voxels' centres
    ct = ndimage.zoom(ct, (1, n_y / ct.shape[1], n_x / ct.shape[2]), order=1, grid_mode=False, mode="nearest")
    return ct, (dz, dy / INPLANE_UPSAMPLE, dx / INPLANE_UPSAMPLE)


def nonsquare_ct(ct: np.ndarray, spacing: tuple[float, float, float]) -> tuple[np.ndarray, tuple[float, float, float]]:
    """The same anatomy with columns resampled (linear, first/last centres kept) to another spacing."""
    dz, dy, dx = spacing
    n_x = ct.shape[2]
    n_new = int(round((n_x - 1) * dx / (dy + NONSQUARE_EXTRA_MM))) + 1
    dx_new = float(f"{(n_x - 1) * dx / (n_new - 1):g}")  # as written in PixelSpacing
    # mode="nearest": with the default constant mode, rounding can put the last column just
    # outside the input and zero it (0 HU: a bright line at the image border)
    return ndimage.zoom(ct, (1, 1, n_new / n_x), order=1, grid_mode=False, mode="nearest"), (dz, dy, dx_new)


@dataclass(frozen=True)
class Variant:
    name: str
    position: str = "HFS"
    nonsquare: bool = False
    slices_descending: bool = False  # True: file 0 / InstanceNumber 1 is the most superior slice
    shuffled: bool = False  # file names and InstanceNumbers scrambled
    seed: int = 0


VARIANTS = {
    v.name: v
    for v in (
        Variant("HFS"),
        Variant("HFP", position="HFP"),
        Variant("FFS", position="FFS"),
        Variant("FFP", position="FFP"),
        Variant("nonsquare", nonsquare=True),
        Variant("shuffled", shuffled=True, seed=1),
        Variant("superior_first", slices_descending=True),
    )
}
# all at once (used by test_conformance.py)
COMBINED = Variant("FFP_superior_first_shuffled", position="FFP", slices_descending=True, shuffled=True, seed=2)


def write_variant(variant: Variant, ct: np.ndarray, spacing: tuple[float, float, float], out_dir: Path) -> Path:
    if variant.nonsquare:
        ct, spacing = nonsquare_ct(ct, spacing)
    write_ct_series(
        ct, spacing, out_dir, origin_lps=ORIGIN_LPS, position=variant.position,
        patient_id="OPENKBP-pt_236", series_description=f"OpenKBP pt_236 {variant.name}",
        slices_descending=variant.slices_descending, shuffle_files=variant.shuffled,
        scramble_instance_numbers=variant.shuffled, seed=variant.seed,
    )
    return out_dir


def map_to_reference(reference: Volume, volume: Volume) -> tuple[np.ndarray, np.ndarray, float]:
    """Index of the reference voxel nearest to each voxel centre of ``volume``, via LPS.

    ``reference.lps_to_index(volume.index_to_lps(kji))`` for every voxel, composed into
    one index -> index matrix (checked against the two calls on a sample) and applied by
    broadcasting.  Returns (k, j, i) indices of shape (3, *volume shape), whether each
    lies inside the reference grid, and the largest distance (in reference voxels) of a
    mapped centre from the nearest reference centre (0 when the grids coincide).
    """
    shape = volume.array.shape
    m = np.linalg.inv(reference.affine) @ volume.affine
    rng = np.random.default_rng(0)
    sample = np.stack([rng.integers(0, n, 100) for n in shape], axis=1)
    assert np.allclose(sample @ m[:3, :3].T + m[:3, 3], reference.lps_to_index(volume.index_to_lps(sample)))
    k, j, i = (np.arange(n, dtype=float) for n in shape)
    mapped = np.empty((3, *shape), np.int32)
    worst = 0.0
    for c in range(3):  # no BLAS: broadcasting over the grid, one output axis at a time
        frac = m[c, 0] * k[:, None, None] + m[c, 1] * j[None, :, None] + m[c, 2] * i[None, None, :] + m[c, 3]
        mapped[c] = np.rint(frac)
        worst = max(worst, float(np.abs(frac - mapped[c]).max()))
    inside = np.ones(shape, bool)
    for c, n in enumerate(reference.array.shape):
        inside &= (mapped[c] >= 0) & (mapped[c] < n)
    return mapped, inside, worst


def sample_reference(mask: np.ndarray, mapped: np.ndarray, inside: np.ndarray) -> np.ndarray:
    out = np.zeros(inside.shape, bool)
    out[inside] = mask[tuple(m[inside] for m in mapped)]
    return out


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def centroid_lps(mask: np.ndarray, volume: Volume) -> np.ndarray:
    return volume.index_to_lps(np.argwhere(mask).mean(axis=0)[None])[0]


# --------------------------------------------------------------------------- fixtures

DICE_TABLE: dict[str, dict[str, tuple[float, float]]] = {}
CENTROID_SHIFT_MM: dict[str, float] = {}  # largest centroid shift vs HFS, per variant


@pytest.fixture(scope="module")
def loaded():
    logging.getLogger("highdicom").setLevel(logging.ERROR)
    return load_pipeline(models_dir_or_skip())


@pytest.fixture(scope="module")
def anatomy():
    return source_ct()


@pytest.fixture(scope="module")
def run_variant(loaded, anatomy, tmp_path_factory):
    """name -> PipelineResult, each variant computed once, on first use."""
    cache: dict[str, PipelineResult] = {}
    root = tmp_path_factory.mktemp("geometry")

    def get(name: str) -> PipelineResult:
        if name not in cache:
            ct_dir = write_variant(VARIANTS[name], *anatomy, root / name / "ct")
            cache[name] = run_pipeline(ct_dir, loaded, root / name / "out")
        return cache[name]

    yield get
    if DICE_TABLE:  # shown with pytest -s
        names = [n for n in cache["HFS"].masks if cache["HFS"].rtstruct_masks[n].any()]
        print("\n\nDice vs HFS in patient coordinates (RTSTRUCT / SEG); models:", models_dir_or_skip())
        print(f"{'variant':30s}" + "".join(f"{n:>16s}" for n in names) + "  max centroid shift")
        for variant, row in DICE_TABLE.items():
            cells = "".join(f"{row[n][0]:.3f}/{row[n][1]:.3f}".rjust(16) for n in names if n in row)
            print(f"{variant:30s}{cells}  {CENTROID_SHIFT_MM.get(variant, 0.0):.2f} mm")
        ref = cache["HFS"]
        print("HFS volumes (cc): " + ", ".join(f"{n} {r.volume_cc:.1f}" for n, r in ref.results.items()))


# --------------------------------------------------------------------------- tests


def test_reference_finds_structures_and_reads_back_exactly(run_variant):
    ref = run_variant("HFS")
    found = [n for n, m in ref.masks.items() if m.any()]
    assert len(found) >= MIN_STRUCTURES_FOUND, (
        f"the models found only {found} on the reference CT: the geometry matrix would test nothing"
    )
    for name, mask in ref.masks.items():
        assert np.array_equal(ref.rtstruct_masks[name], mask), name
        assert np.array_equal(ref.seg_masks[name], mask), name


EXPECTED_AXES = {  # position -> direction of increasing column index i, row index j (LPS)
    "HFS": ((1, 0, 0), (0, 1, 0)),
    "HFP": ((-1, 0, 0), (0, -1, 0)),
    "FFS": ((-1, 0, 0), (0, 1, 0)),
    "FFP": ((1, 0, 0), (0, -1, 0)),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_is_the_same_anatomy(name, run_variant, anatomy, tmp_path):
    """The variant's DICOM is what its name says, and its voxels are the reference's."""
    variant, res, ref = VARIANTS[name], run_variant(name), run_variant("HFS")
    vol = res.volume
    unit = vol.affine[:3, :3] / vol.spacing
    row_dir, col_dir = EXPECTED_AXES[variant.position]
    assert np.allclose(unit[:, 2], row_dir) and np.allclose(unit[:, 1], col_dir)
    # slices are sorted along the normal; head-first k runs to superior, feet-first to inferior
    assert np.sign(vol.affine[2, 0]) == (1 if variant.position.startswith("HF") else -1)
    # where the first file and InstanceNumber 1 are
    z_all = [float(ds.ImagePositionPatient[2]) for ds in vol.datasets]
    first_file = pydicom.dcmread(sorted(res.ct_dir.iterdir())[0], stop_before_pixels=True)
    number_one = next(ds for ds in vol.datasets if int(ds.InstanceNumber) == 1)
    if not variant.shuffled:
        assert first_file.SOPInstanceUID == number_one.SOPInstanceUID
        end = max(z_all) if variant.slices_descending else min(z_all)
        assert float(first_file.ImagePositionPatient[2]) == end
    else:
        numbers = [int(ds.InstanceNumber) for ds in vol.datasets]  # k order = sorted along the normal
        assert numbers != sorted(numbers) and numbers != sorted(numbers, reverse=True)
    view, ref_view = to_canonical(vol), to_canonical(ref.volume)
    assert np.allclose(view.origin_lps, ORIGIN_LPS, atol=1e-3)
    mapped, inside, worst = map_to_reference(ref.volume, vol)
    if not variant.nonsquare:
        # the same grid: the model sees exactly the same canonical array
        assert worst < 1e-3 and inside.all()
        assert np.array_equal(view.forward(vol.array), ref_view.forward(ref.volume.array))
    else:
        ct, spacing = nonsquare_ct(*anatomy)
        rows, cols = (float(v) for v in vol.datasets[0].PixelSpacing)
        assert (rows, cols) == (spacing[1], spacing[2]) and rows != cols
        assert vol.array.shape[1:] == ct.shape[1:] and vol.array.shape[1] != vol.array.shape[2]
        # HU at each voxel centre = the reference CT linearly interpolated at that physical point
        rng = np.random.default_rng(0)
        kji = np.stack([rng.integers(0, n, 20_000) for n in vol.array.shape], axis=1)  # a sample of the voxels
        frac = ref.volume.lps_to_index(vol.index_to_lps(kji))
        expected = ndimage.map_coordinates(ref.volume.array, frac.T, order=1, mode="nearest")
        assert np.abs(vol.array[tuple(kji.T)] - expected).max() <= 1.0  # int16 rounding of both


@pytest.mark.parametrize("name", [n for n in VARIANTS if n != "HFS"])
def test_variant_matches_reference_in_patient_coordinates(name, run_variant):
    variant, res, ref = VARIANTS[name], run_variant(name), run_variant("HFS")
    mapped, inside, _ = map_to_reference(ref.volume, res.volume)
    threshold = DICE_MIN if variant.nonsquare else max(DICE_MIN, SAME_GRID_DICE_MIN)
    half_voxel = 0.5 * max(ref.volume.spacing.max(), res.volume.spacing.max())
    row, failures = {}, []
    for structure_name, ref_mask in ref.masks.items():
        if not ref_mask.any():
            continue
        scores = []
        for kind, ours, theirs in (("RTSTRUCT", res.rtstruct_masks, ref.rtstruct_masks),
                                   ("SEG", res.seg_masks, ref.seg_masks)):
            expected = sample_reference(theirs[structure_name], mapped, inside)
            d = dice(ours[structure_name], expected)
            scores.append(d)
            floor = KNOWN_SHORTFALLS.get((name, structure_name), threshold)
            if d < floor:
                failures.append(f"{structure_name} {kind}: Dice {d:.3f} < {floor}")
            if ours[structure_name].any():
                shift = np.linalg.norm(centroid_lps(ours[structure_name], res.volume)
                                       - centroid_lps(theirs[structure_name], ref.volume))
                CENTROID_SHIFT_MM[name] = max(CENTROID_SHIFT_MM.get(name, 0.0), float(shift))
                if shift > half_voxel:
                    failures.append(f"{structure_name} {kind}: centroid moved {shift:.2f} mm > {half_voxel:.2f} mm")
        row[structure_name] = (scores[0], scores[1])
    DICE_TABLE[name] = row
    assert not failures, f"{name}: " + "; ".join(failures)
