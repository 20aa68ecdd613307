"""The training recipe's numpy parts: augmentation, partial-length labels, metrics.

These run in the app's venv (no torch): training/augment.py, training/tasks.py and
training/metrics.py import only numpy and SciPy.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from training.context import one_hot_context
from training.augment import NO_AUGMENTATION, AugmentConfig, Patch, augment_intensity, cut_patch, known_slices, mirror_lr
from training.data import OPENKBP_ROIS, Case
from training.metrics import dice, hd95, restrict_to_slices, surface_dice
from training.pseudo import with_teacher_labels
from training.tasks import TASKS, reference_mask


def _ball(shape, centre, radius_mm, spacing):
    zz, yy, xx = np.indices(shape)
    d = ((zz - centre[0]) * spacing[0]) ** 2 + ((yy - centre[1]) * spacing[1]) ** 2 + ((xx - centre[2]) * spacing[2]) ** 2
    return d <= radius_mm**2


def _case(shape=(40, 48, 48)) -> Case:
    """A synthetic patient: cord on slices 5-34 at x=20, esophagus on slices 10-19, left
    parotid at x>30 (patient left = +x), right parotid at x<16, PTV70 and PTV56 (no PTV63)."""
    masks = np.zeros((len(OPENKBP_ROIS), *shape), bool)
    idx = {n: i for i, n in enumerate(OPENKBP_ROIS)}
    masks[idx["SpinalCord"], 5:35, 30:33, 20:23] = True
    masks[idx["Esophagus"], 10:20, 25:28, 22:25] = True
    masks[idx["LeftParotid"], 20:28, 20:28, 34:40] = True
    masks[idx["RightParotid"], 20:28, 20:28, 8:14] = True
    masks[idx["PTV70"], 15:25, 10:20, 15:25] = True
    masks[idx["PTV56"], 12:28, 8:22, 12:28] = True
    masks[idx["PTV56"]] &= ~masks[idx["PTV70"]]  # OpenKBP stores disjoint shells
    present = np.array([n in ("SpinalCord", "Esophagus", "LeftParotid", "RightParotid", "PTV70", "PTV56")
                        for n in OPENKBP_ROIS])
    ct = np.full(shape, -1000, np.int16)
    ct[:, 4:44, 4:44] = 40
    return Case("synthetic", ct, masks, present, (3.0, 4.0, 4.0))


def test_partial_length_organs_are_known_only_on_their_reference_slices():
    case = _case()
    task = TASKS["hn_oar"]
    kz = task.known_slices(case)
    names = [n for n, _ in task.outputs]
    cord = kz[names.index("SpinalCord")]
    assert cord[5:35].all() and not cord[:5].any() and not cord[35:].any()
    eso = kz[names.index("Esophagus")]
    assert eso[10:20].all() and eso.sum() == 10
    # a whole organ (not partial-length) is known everywhere; a missing one nowhere
    assert kz[names.index("Parotid_L")].all()
    assert not kz[names.index("Brainstem")].any() and not kz[names.index("Larynx")].any()


def test_nested_targets_are_unions_and_need_their_defining_level():
    case = _case()
    task = TASKS["hn_target"]
    tgt, known = task.targets(case)
    idx = {n: i for i, n in enumerate(OPENKBP_ROIS)}
    names = [n for n, _ in task.outputs]
    assert known.tolist() == [True, False, True]  # PTV63 not contoured: PTV_Mid unknown
    high, low = tgt[names.index("PTV_High")] > 0, tgt[names.index("PTV_Low")] > 0
    assert np.array_equal(high, case.masks[idx["PTV70"]])
    assert np.array_equal(low, case.masks[idx["PTV70"]] | case.masks[idx["PTV56"]])
    assert (high <= low).all()
    assert reference_mask(("PTV63", "PTV70"), case) is None


def test_known_slices_empty_partial_reference_is_unknown():
    m = np.zeros((6, 4, 4), bool)
    kz = known_slices(np.array([True]), [m], (True,))
    assert not kz.any()


def test_mirror_swaps_parotids_and_flips_patient_left_right():
    case = _case()
    task = TASKS["hn_oar"]
    lab, _ = task.targets(case)
    names = [n for n, _ in task.outputs]
    pl, pr = names.index("Parotid_L") + 1, names.index("Parotid_R") + 1
    patch = Patch(np.arange(lab.size, dtype=np.float32).reshape(lab.shape), lab, task.known_slices(case))
    m = mirror_lr(patch, task.mirror_pairs, softmax=True)
    # the left parotid (x 34-39) is now at x 8-13 (48 - 1 - x) and labelled right
    assert set(np.unique(m.target[20:28, 20:28, 8:14])) == {pr}
    assert set(np.unique(m.target[20:28, 20:28, 34:40])) == {pl}
    assert np.array_equal(m.image, patch.image[..., ::-1])
    # midline structures keep their label, mirrored in x only
    cord = names.index("SpinalCord") + 1
    assert np.array_equal(m.target == cord, (lab == cord)[..., ::-1])
    assert np.array_equal(m.known_z, patch.known_z)  # both parotids known: flags swap to themselves


def test_mirror_swaps_known_flags_too():
    kz = np.array([[True, True], [False, False]])
    p = Patch(np.zeros((2, 2, 2), np.float32), np.zeros((2, 2, 2, 2), np.float32), kz)
    assert mirror_lr(p, ((0, 1),), softmax=False).known_z.tolist() == [[False, False], [True, True]]


def test_patch_without_spatial_augmentation_is_an_exact_crop_with_its_slice_flags():
    case = _case()
    task = TASKS["hn_oar"]
    lab, _ = task.targets(case)
    kz = task.known_slices(case)
    img = case.ct.astype(np.float32)
    p = cut_patch(img, lab, kz, np.array([2, 24, 24]), (8, 16, 16), np.random.default_rng(0), NO_AUGMENTATION)
    # centre 2, patch 8: slices -2..5, the first two padded
    assert np.array_equal(p.image[2:], img[0:6, 16:32, 16:32])
    assert (p.image[:2] == 0).all()
    assert np.array_equal(p.target[2:], lab[0:6, 16:32, 16:32])
    assert np.array_equal(p.known_z[:, 2:], kz[:, 0:6]) and not p.known_z[:, :2].any()


def test_rotated_scaled_patch_keeps_geometry():
    """A ball centred on the patch centre stays centred, its volume scales by 1/s^3 and
    its label stays on the slices its known flags say."""
    shape, spacing = (60, 60, 60), (1.0, 1.0, 1.0)
    ball = _ball(shape, (30, 30, 30), 10, spacing)
    lab = ball.astype(np.int64)
    kz = np.zeros((1, 60), bool)
    kz[0, 20:41] = True
    img = ball.astype(np.float32)
    cfg = AugmentConfig(p_rotation=1.0, p_scale=1.0, scale=(1.25, 1.25))
    p = cut_patch(img, lab, kz, np.array([30, 30, 30]), (41, 41, 41), np.random.default_rng(1), cfg)
    vol = (p.target == 1).sum()
    assert vol == pytest.approx(ball.sum() / 1.25**3, rel=0.05)
    com = np.argwhere(p.target == 1).mean(0)
    assert np.allclose(com, 20, atol=0.5)
    # source slices 20..40 map to output slices 20 +- 10 / 1.25 = 12..28
    known = np.flatnonzero(p.known_z[0])
    assert known[0] == 12 and known[-1] == 28


def test_elastic_deformation_moves_voxels_within_their_slice():
    """``p_elastic``: a smooth in-plane displacement.  Each output slice still samples one source
    slice (the image below holds its slice number), so the known flags stay those of the exact
    crop; the labels move, smoothly (the ball stays one piece); off, no random draw
    is taken, so stages without it keep their patch streams."""
    shape = (40, 64, 64)
    img = np.broadcast_to(np.arange(1, 41, dtype=np.float32)[:, None, None], shape).copy()
    lab = _ball(shape, (20, 32, 32), 12, (1.0, 1.0, 1.0)).astype(np.int64)
    kz = np.zeros((1, 40), bool)
    kz[0, 10:30] = True
    centre, size = np.array([20, 32, 32]), (25, 49, 49)  # odd: the affine path samples the exact crop's voxels
    exact = cut_patch(img, lab, kz, centre, size, np.random.default_rng(0), NO_AUGMENTATION)
    cfg = AugmentConfig(p_rotation=0, p_scale=0, p_elastic=1.0, elastic_alpha=(900.0, 900.0), elastic_sigma=(9.0, 9.0))
    moved = cut_patch(img, lab, kz, centre, size, np.random.default_rng(0), cfg)
    for z in range(size[0]):
        inside = moved.image[z][moved.image[z] > 0]
        assert np.allclose(inside, exact.image[z, 0, 0])  # one source slice per output slice
    assert np.array_equal(moved.known_z, exact.known_z)
    changed = (moved.target != exact.target).sum()
    assert changed > 100 and 0.5 < moved.target.sum() / exact.target.sum() < 1.5  # alpha 900: a strong warp
    assert ndimage.label(moved.target)[1] == 1  # smooth: the ball stays one piece
    rng = np.random.default_rng(5)
    cut_patch(img, lab, kz, centre, size, rng, AugmentConfig(p_rotation=0, p_scale=0))
    assert rng.random() == pytest.approx(np.random.default_rng(5).random(size=3)[2])  # two draws, not three


def test_context_label_map_is_cut_and_mirrored_with_the_patch():
    """The organ model's label map given to the target model moves with the image: the
    same crop, the same rotation (nearest neighbour), and under mirroring its left parotid
    becomes the right one, exactly as the organ model would label the mirrored patient."""
    case = _case()
    oar, target = TASKS["hn_oar"], TASKS["hn_target_ctx"]
    assert target.context == "hn_oar" and target.in_channels == 1 + len(oar.outputs)
    ctx, _ = oar.targets(case)  # stands in for the organ model's output
    tgt, _ = target.targets(case)
    kz = target.known_slices(case)
    img = case.ct.astype(np.float32)
    p = cut_patch(img, tgt, kz, np.array([20, 24, 24]), (16, 32, 32), np.random.default_rng(0), NO_AUGMENTATION, ctx)
    assert np.array_equal(p.context, ctx[12:28, 8:40, 8:40])
    names = [n for n, _ in oar.outputs]
    pl, pr = names.index("Parotid_L") + 1, names.index("Parotid_R") + 1
    m = mirror_lr(p, target.mirror_pairs, softmax=False, context_swap=oar.mirror_pairs)
    expect = p.context[..., ::-1].copy()
    left, right = expect == pl, expect == pr
    expect[left], expect[right] = pr, pl
    assert np.array_equal(m.context, expect)
    assert (m.context == pl).any() and (m.context == pr).any()
    # rotated and scaled: the context follows the target's geometry voxel for voxel where both are labels
    cfg = AugmentConfig(p_rotation=1.0, p_scale=1.0)
    both = np.where(case.masks[OPENKBP_ROIS.index("PTV70")], 9, 0).astype(np.uint8)
    r = cut_patch(img, both, kz, np.array([20, 24, 24]), (16, 32, 32), np.random.default_rng(3), cfg, both)
    assert np.array_equal(r.context, r.target) and (r.context == 9).any()


def test_context_one_hot_leaves_background_out():
    lab = np.array([[[0, 1, 7, 3]]], np.uint8)
    oh = one_hot_context(lab, 7)
    assert oh.shape == (7, 1, 1, 4) and oh.dtype == np.float32
    assert oh[:, 0, 0, 0].sum() == 0 and oh[0, 0, 0, 1] == 1 and oh[6, 0, 0, 2] == 1 and oh[2, 0, 0, 3] == 1


def test_intensity_augmentation_is_bounded_and_seeded():
    x = np.linspace(0, 1, 8 * 8 * 8, dtype=np.float32).reshape(8, 8, 8)
    a = augment_intensity(x, np.random.default_rng(3), AugmentConfig())
    b = augment_intensity(x, np.random.default_rng(3), AugmentConfig())
    assert a.shape == x.shape and a.dtype == np.float32 and np.array_equal(a, b)
    assert np.array_equal(augment_intensity(x, np.random.default_rng(3), NO_AUGMENTATION), x)
    always = AugmentConfig(p_noise=0, p_blur=0, p_brightness=0, p_contrast=0, p_lowres=0, p_gamma=1.0, p_gamma_inverted=0)
    g = augment_intensity(x, np.random.default_rng(5), always)
    assert g.min() == pytest.approx(0, abs=1e-6) and g.max() == pytest.approx(1, abs=1e-6)  # gamma keeps the range
    assert not np.allclose(g, x)


def test_metrics_on_shifted_balls():
    spacing = (2.0, 1.0, 1.0)
    a = _ball((40, 60, 60), (20, 30, 30), 12, spacing)
    b = _ball((40, 60, 60), (20, 30, 33), 12, spacing)  # shifted 3 mm in x
    assert dice(a, a) == 1.0 and dice(a, np.zeros_like(a)) == 0.0
    assert 0.75 < dice(a, b) < 0.9
    h = hd95(a, b, spacing)
    assert 2.0 <= h <= 3.2
    assert surface_dice(a, b, spacing, 3.0) > 0.95
    assert surface_dice(a, b, spacing, 0.5) < 0.6
    assert surface_dice(a, np.zeros_like(a), spacing, 3.0) == 0.0
    assert np.isnan(hd95(a, np.zeros_like(a), spacing))


def test_hd95_uses_the_spacing():
    a = np.zeros((10, 10, 30), bool)
    b = np.zeros_like(a)
    a[4:6, 4:6, 5:10] = True
    b[4:6, 4:6, 15:20] = True  # 10 voxels apart along x
    assert hd95(a, b, (1.0, 1.0, 2.5)) == pytest.approx(25.0)
    assert hd95(a, b, (1.0, 1.0, 1.0)) == pytest.approx(10.0)


def test_restrict_to_reference_slices():
    ref = np.zeros((10, 4, 4), bool)
    ref[3:6, 1:3, 1:3] = True
    pred = np.zeros_like(ref)
    pred[1:8, 1:3, 1:3] = True
    p2, r2 = restrict_to_slices(pred, ref)
    assert np.flatnonzero(p2.any((1, 2))).tolist() == [3, 4, 5]
    assert np.array_equal(r2, ref)
    assert dice(p2, r2) == 1.0 and dice(pred, ref) < 0.7


def test_cache_made_in_parallel_equals_the_serial_resampling(shared_data, tmp_path):
    import shutil

    from training.data import cached_cases, load_openkbp, resample_case

    src = sorted((shared_data / "openkbp" / "validation").glob("*.npz"))[:2]
    folder = tmp_path / "in"
    folder.mkdir()
    for f in src:
        shutil.copy(f, folder)
    made = cached_cases(folder, (3.0, 4.0, 4.0), tmp_path / "cache", workers=2)
    again = cached_cases(folder, (3.0, 4.0, 4.0), tmp_path / "cache", workers=2)  # read back
    assert [c.name for c in made] == [p.stem for p in src] == [c.name for c in again]
    ref = resample_case(load_openkbp(src[1]), (3.0, 4.0, 4.0))
    for c in (made[1], again[1]):
        assert np.array_equal(c.ct, ref.ct) and np.array_equal(c.masks, ref.masks)


def test_teacher_labels_fill_only_the_organs_a_patient_lacks():
    """training.pseudo: a missing organ takes the teacher's voxels that no clinician's reference
    claims; present references are untouched; an organ the teacher does not find stays unknown."""
    case = _case()  # lacks Brainstem, Larynx and Mandible
    task = TASKS["hn_oar"]
    names = [n for n, _ in task.outputs]
    label = {n: names.index(n) + 1 for n in names}
    refs = task.references(case)
    teacher = np.zeros(case.ct.shape, np.uint8)
    teacher[30:36, 10:14, 20:24] = label["Brainstem"]
    teacher[12:16, 30:33, 20:23] = label["Larynx"]  # inside the clinician's cord: the cord wins
    teacher[13:15, 5:8, 5:8] = label["Larynx"]
    teacher[10:20, 25:28, 22:25] = label["SpinalCord"]  # disagrees with the clinician's esophagus: ignored
    out = with_teacher_labels(refs, teacher, task)

    for i, ref in enumerate(refs):
        if ref is not None:
            assert out[i] is ref
    assert np.array_equal(out[names.index("Brainstem")], teacher == label["Brainstem"])
    larynx = out[names.index("Larynx")]
    assert larynx.sum() == 2 * 3 * 3 and not (larynx & refs[names.index("SpinalCord")]).any()
    assert out[names.index("Bone_Mandible")] is None
    lab, known = task.targets(case, out)
    assert (lab[10:20, 25:28, 22:25] == label["Esophagus"]).all()
    assert known[names.index("Larynx")] and not known[names.index("Bone_Mandible")]
    kz = task.known_slices(case, out)
    assert np.flatnonzero(kz[names.index("Brainstem")]).tolist() == list(range(30, 36))  # partial-length
    assert kz[names.index("Larynx")].all()  # a whole organ: the teacher's background is learnt too

    with pytest.raises(ValueError, match="softmax"):
        with_teacher_labels(TASKS["hn_target"].references(case), teacher, TASKS["hn_target"])
    with pytest.raises(ValueError, match="grid"):
        with_teacher_labels(refs, teacher[:-1], task)
