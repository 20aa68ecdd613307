"""The whole app, as a process, on the real 512x512 planning CT and on the bundled sample."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from scipy import ndimage

from autocontour.readback import rasterise_rtstruct, read_seg_masks
from autocontour.series_selection import SelectionRules, scan_folder, select_series
from autocontour.ct_volume import build_volume

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def run_app(input_dir: Path, output_dir: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python app.py -i INPUT -o OUTPUT`` as a user runs it (the stack limit Holoscan asks for)."""
    cmd = f"ulimit -s 32768 2>/dev/null; exec {sys.executable} {ROOT / 'app.py'} -i {input_dir} -o {output_dir} " + " ".join(extra)
    return subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})}, cwd=ROOT)


def needs_models():
    if not list((ROOT / "models").glob("*/model.yaml")):
        pytest.skip("no trained model in models/ yet")


@pytest.fixture(scope="module")
def chus_run(tmp_path_factory):
    needs_models()
    ct = ROOT.parent / "shared" / "data" / "hn-chus-052" / "CT"
    if not ct.is_dir():
        pytest.skip(f"{ct} not present")
    out = tmp_path_factory.mktemp("chus-out")
    proc = run_app(ct, out)
    cands, _ = scan_folder(ct)
    volume = build_volume(select_series(cands, SelectionRules()))
    return proc, out, volume


def outputs(out: Path) -> tuple[Path, Path, dict]:
    seg = list(out.glob("*_SEG.dcm"))
    rts = list(out.glob("*_RTSTRUCT.dcm"))
    assert len(seg) == 1 and len(rts) == 1, sorted(p.name for p in out.iterdir())
    return seg[0], rts[0], json.loads((out / "report.json").read_text())


def test_real_ct_writes_seg_rtstruct_and_report(chus_run):
    proc, out, volume = chus_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    # app.main leaves without the interpreter's teardown: the log is flushed first, to its last line
    assert "hn-autocontour: done in" in proc.stderr.strip().splitlines()[-1]
    seg, rts, report = outputs(out)
    qa = report["outputs"]["qa"]
    listed = [seg.name, rts.name, "report.json", *qa["secondary_capture"]["files"], "qa"]
    assert sorted(p.name for p in out.iterdir()) == sorted(listed)  # no staging left
    assert sorted(f"qa/{p.name}" for p in (out / "qa").iterdir()) == sorted(qa["png"]) == ["qa/qa_sheet.png"]
    assert report["input"]["chosen"] == volume.series_instance_uid
    assert {m["name"] for m in report["models"]} == {"hn_oar", "hn_target"}
    assert all(m["backend"] == "cpu" for m in report["models"])
    assert set(report["seconds"]) >= {"load", "select", "convert", "external", "inference_hn_oar", "inference_hn_target",
                                      "postprocess_hn_oar", "postprocess_hn_target", "postprocess", "write_seg",
                                      "write_rtstruct", "write_qa"}


def test_outputs_reference_the_input_series_and_frame_of_reference(chus_run):
    _, out, volume = chus_run
    seg_path, rts_path, _ = outputs(out)
    seg, rts = pydicom.dcmread(seg_path), pydicom.dcmread(rts_path)
    for ds in (seg, rts):
        assert ds.StudyInstanceUID == volume.study_instance_uid
        assert ds.PatientID == volume.datasets[0].PatientID
    assert seg.FrameOfReferenceUID == volume.frame_of_reference_uid
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == volume.series_instance_uid
    ref = rts.ReferencedFrameOfReferenceSequence[0]
    assert ref.FrameOfReferenceUID == volume.frame_of_reference_uid
    series = ref.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == volume.series_instance_uid
    assert len(series.ContourImageSequence) == len(volume.sop_instance_uids)
    assert rts.ApprovalStatus == "UNAPPROVED"


def test_rtstruct_agrees_with_seg_and_lies_inside_the_ct(chus_run):
    _, out, volume = chus_run
    seg_path, rts_path, report = outputs(out)
    seg_masks = read_seg_masks(pydicom.dcmread(seg_path), volume)
    rts_masks = rasterise_rtstruct(pydicom.dcmread(rts_path), volume)
    assert set(seg_masks) == set(rts_masks)
    voxel_cc = volume.voxel_volume_cc
    found = 0
    for name, seg_mask in seg_masks.items():
        if seg_mask.sum() * voxel_cc < 1.0:
            continue
        found += 1
        rt = rts_masks[name]
        dice = 2 * (seg_mask & rt).sum() / (seg_mask.sum() + rt.sum())
        assert dice >= 0.97, f"{name}: RTSTRUCT vs SEG Dice {dice:.3f}"
        # inside the CT's physical extent: every voxel index is within the grid by construction,
        # so check the contour points themselves
    lo = volume.index_to_lps(np.array([[0, 0, 0]]))[0]
    hi = volume.index_to_lps(np.array(volume.array.shape)[None] - 1)[0]
    lo, hi = np.minimum(lo, hi) - 1e-3, np.maximum(lo, hi) + 1e-3
    rts = pydicom.dcmread(rts_path)
    for roi in rts.ROIContourSequence:
        for c in getattr(roi, "ContourSequence", []):
            pts = np.array(c.ContourData, float).reshape(-1, 3)
            assert (pts >= lo - volume.spacing.max()).all() and (pts <= hi + volume.spacing.max()).all()
    assert found >= 5, f"only {found} structures of >= 1 cc on a head-and-neck CT"
    by_name = {s["name"]: s for s in report["structures"]}
    for name in ("Parotid_L", "Parotid_R"):
        assert not any("laterality" in f for f in by_name[name]["flags"]), by_name[name]


def test_real_ct_external_in_both_objects_targets_inside_no_stray_piece(chus_run):
    _, out, volume = chus_run
    seg_path, rts_path, report = outputs(out)
    rts = pydicom.dcmread(rts_path)
    kinds = {str(o.ReferencedROINumber): str(o.RTROIInterpretedType) for o in rts.RTROIObservationsSequence}
    names = {str(r.ROINumber): str(r.ROIName) for r in rts.StructureSetROISequence}
    assert [n for k, n in names.items() if kinds[k] == "EXTERNAL"] == ["External"]
    seg_masks = read_seg_masks(pydicom.dcmread(seg_path), volume)
    rts_masks = rasterise_rtstruct(rts, volume)
    ext = seg_masks["External"]
    assert np.array_equal(ext, rts_masks["External"])  # marching squares + even-odd: exact
    # every slice that holds the patient (External from the first to the last occupied slice, no gap)
    occupied = np.flatnonzero(ext.any(axis=(1, 2)))
    assert occupied.size >= 120 and np.array_equal(occupied, np.arange(occupied[0], occupied[-1] + 1))
    by_name = {s["name"]: s for s in report["structures"]}
    assert by_name["External"]["rt_roi_interpreted_type"] == "EXTERNAL" and not by_name["External"]["flags"]
    # no target voxel outside the External
    targets = ("PTV_High", "PTV_Mid", "PTV_Low")
    for name in targets:
        assert not (seg_masks[name] & ~ext).any(), name
    # nothing inside the brain, far above the neck: hn_target 1.0.0 put a PTV_High piece
    # centred near (-3, 17, -147) mm LPS, 2.0.0 a 21.5 cc PTV_Low piece near (-14, 32, -143);
    # the stray-component rule removes such pieces, counts them and says why
    k, j, i = np.rint(volume.lps_to_index(np.array([[-8.0, 25.0, -145.0]]))[0]).astype(int)
    for name in targets:
        assert not seg_masks[name][k - 8 : k + 9, j - 35 : j + 36, i - 35 : i + 36].any(), name
        assert ndimage.label(seg_masks[name], structure=np.ones((3, 3, 3), bool))[1] == 1, name
        removed = by_name[name]["removed_components"]
        assert len(removed) == by_name[name]["components_removed"]
    assert sum("stray component" in line for t in targets for line in by_name[t]["removed_components"]) >= 1
    # the three dose levels are nested, as the clinical volumes are by definition (the model
    # nests them to within 0.02 cc here; post-processing adds what is missing)
    assert not (seg_masks["PTV_High"] & ~seg_masks["PTV_Mid"]).any()
    assert not (seg_masks["PTV_Mid"] & ~seg_masks["PTV_Low"]).any()
    assert by_name["PTV_Mid"]["added_from_contained_cc"] < 0.5
    for name in ("Brainstem", "SpinalCord", "Parotid_L", "Parotid_R", "Larynx", "Bone_Mandible"):
        assert ndimage.label(seg_masks[name], structure=np.ones((3, 3, 3), bool))[1] == 1, name


def test_real_ct_qa_secondary_capture_is_in_the_study_and_references_the_ct(chus_run):
    _, out, volume = chus_run
    _, _, report = outputs(out)
    sc_files = report["outputs"]["qa"]["secondary_capture"]["files"]
    assert len(sc_files) == 1
    sc = pydicom.dcmread(out / sc_files[0])
    assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    assert sc.StudyInstanceUID == volume.study_instance_uid and sc.PatientID == volume.datasets[0].PatientID
    assert sc.SeriesInstanceUID == report["outputs"]["qa"]["secondary_capture"]["series_instance_uid"]
    assert list(sc.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert sc.ReferencedSeriesSequence[0].SeriesInstanceUID == volume.series_instance_uid
    refs = {r.ReferencedSOPInstanceUID for r in sc.SourceImageSequence}
    assert refs and refs <= set(volume.sop_instance_uids)
    png = np.asarray(Image.open(out / "qa" / "qa_sheet.png").convert("RGB"))
    assert np.array_equal(sc.pixel_array, png)  # the same picture


def test_no_qa_skips_the_pictures(tmp_path):
    needs_models()
    proc = run_app(ROOT / "sample" / "ct", tmp_path, "--no-qa")
    assert proc.returncode == 0, proc.stderr[-3000:]
    seg, rts, report = outputs(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([seg.name, rts.name, "report.json"])
    assert "qa" not in report["outputs"] and "write_qa" not in report["seconds"]


def test_bundled_sample_runs_like_make_run(tmp_path):
    needs_models()
    proc = run_app(ROOT / "sample" / "ct", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seg, rts, report = outputs(tmp_path)
    assert report["structures"] and seg.stat().st_size > 0 and rts.stat().st_size > 0


def test_environment_variables_replace_the_flags(tmp_path):
    needs_models()
    cmd = f"ulimit -s 32768 2>/dev/null; exec {sys.executable} {ROOT / 'app.py'}"
    env = {**os.environ, "HOLOSCAN_INPUT_PATH": str(ROOT / "sample" / "ct"), "HOLOSCAN_OUTPUT_PATH": str(tmp_path),
           "HOLOSCAN_MODEL_PATH": str(ROOT / "models"), "HOLOSCAN_WORKDIR": str(tmp_path / "work")}
    proc = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=600, env=env, cwd="/")
    assert proc.returncode == 0, proc.stderr[-3000:]
    outputs(tmp_path)


def test_one_or_two_graph_workers_give_the_same_contours(tmp_path):
    """The multi-threaded scheduler (default 2 workers) runs the branches side by side; the
    result must be the one a strictly sequential run gives."""
    needs_models()
    sample = ROOT / "sample" / "ct"
    runs = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        proc = run_app(sample, out, "--workers", str(workers))
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[workers] = outputs(out)
        assert runs[workers][2]["host"]["graph_workers"] == workers
    cands, _ = scan_folder(sample)
    volume = build_volume(select_series(cands, SelectionRules()))
    one = read_seg_masks(pydicom.dcmread(runs[1][0]), volume)
    two = read_seg_masks(pydicom.dcmread(runs[2][0]), volume)
    assert set(one) == set(two) and any(m.any() for m in one.values())
    for name in one:
        assert np.array_equal(one[name], two[name]), name
    vols = [{s["name"]: s["volume_cc"] for s in r[2]["structures"]} for r in (runs[1], runs[2])]
    assert vols[0] == vols[1]


def test_command_line_exit_code_and_last_line_of_a_refused_input(tmp_path):
    """``python app.py`` ends through app.main (os._exit after flushing): the documented exit
    code and the one-line error as the last line of stderr, nothing written."""
    from autocontour.errors import InputError

    proc = run_app(tmp_path / "no-such-folder", tmp_path / "out")
    assert proc.returncode == InputError.exit_code != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "InputError: input folder" in last and "no-such-folder does not exist" in last
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
