"""All-or-nothing output (autocontour.output): staging inside OUTPUT, renamed into place at the end."""

from __future__ import annotations

from pathlib import Path

import pytest

from autocontour.errors import OutputError
from autocontour.output import STAGING_PREFIX, commit, discard, prepare_staging


def test_staging_is_a_private_folder_inside_output_created_with_its_parents(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    staging = prepare_staging(out)
    assert staging.parent == out and staging.is_dir() and staging.name.startswith(STAGING_PREFIX)
    assert prepare_staging(out) != staging  # one per run


def test_output_that_cannot_be_created_is_an_output_error(tmp_path):
    (tmp_path / "file.txt").write_text("not a folder")
    with pytest.raises(OutputError, match=r"output folder \S+file\.txt/out cannot be written \(.+\) - pass -o"):
        prepare_staging(tmp_path / "file.txt" / "out")


def _stage(staging: Path, names: list[str]) -> dict[str, Path]:
    staged = {}
    for n in names:
        (staging / f"tmp-{n}").write_text(n)
        staged[n] = staging / f"tmp-{n}"
    return staged


def test_commit_renames_into_output_in_order_and_removes_staging(tmp_path):
    out = tmp_path / "out"
    staging = prepare_staging(out)
    (out / "keep.txt").write_text("from before")
    (out / "report.json").write_text("old result")
    done = commit(_stage(staging, ["x_SEG.dcm", "x_RTSTRUCT.dcm", "report.json"]), out, staging)
    assert done == [out / "x_SEG.dcm", out / "x_RTSTRUCT.dcm", out / "report.json"]
    assert {p.name: p.read_text() for p in out.iterdir()} == {
        "keep.txt": "from before", "x_SEG.dcm": "x_SEG.dcm", "x_RTSTRUCT.dcm": "x_RTSTRUCT.dcm",
        "report.json": "report.json",  # a result of the same name is replaced
    }


def test_failed_commit_leaves_no_partial_output(tmp_path):
    out = tmp_path / "out"
    staging = prepare_staging(out)
    (out / "keep.txt").write_text("from before")
    staged = _stage(staging, ["x_SEG.dcm", "report.json"])
    staged["report.json"].unlink()  # the second rename fails
    with pytest.raises(OutputError, match=r"could not move results into \S+out: .+ - check"):
        commit(staged, out, staging)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]  # the SEG moved in first is gone again


def test_discard(tmp_path):
    staging = prepare_staging(tmp_path)
    (staging / "f").write_text("x")
    discard(staging)
    assert not staging.exists()
    discard(staging)  # already gone
    discard(None)  # no staging yet
