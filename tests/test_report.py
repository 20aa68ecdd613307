"""report.json from the typed run record: every field the operators set, under its documented key."""

from __future__ import annotations

import json

import numpy as np
import pytest

from autocontour import report
from autocontour.postprocess import StructureResult
from autocontour.report import REPORT_SCHEMA_VERSION, build_report
from autocontour.run_record import CandidateSeries, ModelUsed, OutputFile, RunRecord, SeriesChoice, VolumeGeometry


@pytest.fixture
def record(tmp_path, monkeypatch) -> RunRecord:
    monkeypatch.setattr(report, "gpu_snapshot", lambda: None)  # no dependence on this machine's GPU
    rec = RunRecord(tmp_path / "in", tmp_path / "out", tmp_path / "stage")
    rec.graph_workers = 2
    rec.series = SeriesChoice(
        chosen="1.2.3", files=120,
        candidates=[CandidateSeries("1.2.3", 120, ""), CandidateSeries("1.2.4", 1, "a single slice")],
        skipped_files=3, ranking=["most_slices"],
    )
    rec.volume = VolumeGeometry(
        shape_kji=[120, 512, 512], spacing_kji_mm=[2.5, 0.9766, 0.9766],
        affine=[[0.0, 0.0, 0.9766, -250.0], [0.0, 0.9766, 0.0, -250.0], [2.5, 0.0, 0.0, -100.0], [0.0, 0.0, 0.0, 1.0]],
        frame_of_reference_uid="1.2.9", study_instance_uid="1.2.1",
    )
    rec.models = [ModelUsed("hn_oar", "1.0", "ab" * 32, "cpu", ["Brainstem"])]
    return rec


def test_report_carries_each_record_field_under_its_key(record):
    record.seg = OutputFile("1.2.3_SEG.dcm", "1.2.5")
    record.rtstruct = OutputFile("1.2.3_RTSTRUCT.dcm", "1.2.6")
    record.seconds["convert"] = 1.25
    rep = build_report(record, {})
    assert rep["schema_version"] == REPORT_SCHEMA_VERSION
    assert list(rep["input"]) == [
        "path", "chosen", "files", "candidates", "skipped_files", "ranking",
        "shape_kji", "spacing_kji_mm", "affine", "frame_of_reference_uid", "study_instance_uid",
    ]
    assert rep["input"]["path"] == str(record.input_path)
    assert rep["input"]["candidates"][1] == {"series_instance_uid": "1.2.4", "files": 1, "rejected": "a single slice"}
    assert rep["input"]["affine"][2] == [2.5, 0.0, 0.0, -100.0]
    assert rep["models"] == [{"name": "hn_oar", "version": "1.0", "onnx_sha256": "ab" * 32, "backend": "cpu",
                              "labels": ["Brainstem"]}]
    assert rep["outputs"] == {"seg": {"file": "1.2.3_SEG.dcm", "series_instance_uid": "1.2.5"},
                              "rtstruct": {"file": "1.2.3_RTSTRUCT.dcm", "series_instance_uid": "1.2.6"}}
    assert rep["seconds"] == {"convert": 1.25}
    assert rep["host"]["graph_workers"] == 2 and rep["host"]["gpu"] is None
    json.dumps(rep)  # all of it serialisable


def test_outputs_not_written_are_absent(record):
    record.rtstruct = OutputFile("x_RTSTRUCT.dcm", "1.2.6")
    assert list(build_report(record, {})["outputs"]) == ["rtstruct"]


def test_structures_and_their_flags(record):
    mask = np.zeros((2, 2, 2), bool)
    results = {
        "Parotid_L": StructureResult("Parotid_L", mask, 20.1234, components_removed=1, removed_cc=0.5,
                                     centroid_lps=(30.0, 10.0, -20.0), flags=["on the patient's right"]),
    }
    rep = build_report(record, results)
    (s,) = rep["structures"]
    assert s["name"] == "Parotid_L" and s["rt_roi_interpreted_type"] == "ORGAN"
    assert s["volume_cc"] == 20.123 and s["components_removed"] == 1
    assert rep["flags"] == ["Parotid_L: on the patient's right"]
