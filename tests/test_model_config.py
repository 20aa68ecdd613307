"""model.yaml loading and the start-up checksum check."""

from __future__ import annotations


import pytest
import yaml

from autocontour.errors import ModelError
from autocontour.model_config import load_model_config, load_models, sha256_file

CFG = {
    "name": "tiny",
    "version": "0.0.1",
    "files": {"onnx": {"path": "model.onnx", "sha256": None}},
    "input": {"spacing_zyx_mm": [3, 4, 4], "window_hu": [-500, 1000], "patch_zyx": [16, 16, 16]},
    "output": {"kind": "sigmoid", "labels": ["PTV_High"]},
}


@pytest.fixture
def model_dir(tmp_path):
    d = tmp_path / "tiny"
    d.mkdir()
    (d / "model.onnx").write_bytes(b"not really onnx, but checksummed")
    cfg = {**CFG, "files": {"onnx": {"path": "model.onnx", "sha256": sha256_file(d / "model.onnx")}}}
    (d / "model.yaml").write_text(yaml.safe_dump(cfg))
    return d


def test_valid_model_loads(model_dir):
    mc = load_model_config(model_dir)
    assert mc.labels == ("PTV_High",) and mc.spacing_zyx == (3.0, 4.0, 4.0) and mc.patch_zyx == (16, 16, 16)


def test_test_time_mirroring_is_off_unless_model_yaml_says_so(model_dir):
    assert load_model_config(model_dir).test_time_mirroring is False
    cfg = yaml.safe_load((model_dir / "model.yaml").read_text())
    cfg["inference"] = {"test_time_mirroring": True}
    (model_dir / "model.yaml").write_text(yaml.safe_dump(cfg))
    assert load_model_config(model_dir).test_time_mirroring is True


def test_corrupt_model_names_file_and_expected_checksum(model_dir):
    expected = load_model_config(model_dir).onnx_sha256
    with open(model_dir / "model.onnx", "ab") as f:
        f.write(b"!")
    with pytest.raises(ModelError, match=f"model.onnx is corrupt: sha256 .*, expected {expected}"):
        load_model_config(model_dir)


def test_missing_model_file_names_it(model_dir):
    (model_dir / "model.onnx").unlink()
    with pytest.raises(ModelError, match=r"model file .*model.onnx is missing \(expected sha256"):
        load_model_config(model_dir)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.pop("input"), "malformed"),
        (lambda c: c["output"].update(kind="argmax"), "must be 'softmax' or 'sigmoid'"),
        (lambda c: c["output"].update(labels=["Heart"]), "Unknown structure 'Heart'"),
        (lambda c: c.update(inference={"test_time_mirroring": "yes"}), "test_time_mirroring must be true or false"),
    ],
)
def test_bad_model_yaml_is_refused(model_dir, edit, message):
    cfg = yaml.safe_load((model_dir / "model.yaml").read_text())
    edit(cfg)
    (model_dir / "model.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ModelError, match=message):
        load_model_config(model_dir)


def test_models_folder_without_models(tmp_path):
    with pytest.raises(ModelError, match="no \\*/model.yaml"):
        load_models(tmp_path)
    with pytest.raises(ModelError, match="does not exist"):
        load_models(tmp_path / "nope")


def test_shipped_models_verify(repo_root):
    if not list((repo_root / "models").glob("*/model.yaml")):
        pytest.skip("no trained model in models/ yet")
    names = [m.name for m in load_models(repo_root / "models")]
    assert names == ["hn_oar", "hn_target"]
    for d in (repo_root / "models").iterdir():
        if d.is_dir():
            for f in ("model.onnx", "model.ts"):  # the project's limit per model file (issue #13): 60 MB
                assert (d / f).stat().st_size <= 60 * 10**6, f"{d.name}/{f}"
