"""``models/<name>/model.yaml``: what a model needs to be run correctly, loaded once.

Every fact about a model (labels, spacing, intensity window, patch size, version,
checksum, validation Dice) lives beside its weights; the app reads it at start-up and
verifies the weights' sha256 before anything else runs.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import yaml

from autocontour.errors import ModelError
from autocontour.structures import structure

logger = logging.getLogger(__name__)

__all__ = ["ModelConfig", "ModelKind", "load_model_config", "load_models", "sha256_file"]


class ModelKind(str, Enum):
    """How a model's output channels are read (``output.kind`` in model.yaml)."""

    SOFTMAX = "softmax"  # mutually exclusive labels: channel 0 is background, the argmax decides
    SIGMOID = "sigmoid"  # independent labels: one channel each, probability > 0.5 decides

    @property
    def background_channels(self) -> int:
        """Output channels before the first label's (the background channel of a softmax)."""
        return 1 if self is ModelKind.SOFTMAX else 0

    def output_count(self, n_labels: int) -> int:
        """Output channels of a network of this kind with ``n_labels`` labels."""
        return n_labels + self.background_channels


@dataclass(frozen=True)
class ModelConfig:
    name: str
    version: str
    folder: Path
    onnx_file: str
    onnx_sha256: str
    kind: ModelKind  # a plain "softmax" / "sigmoid" string is converted (ValueError if neither)
    labels: tuple[str, ...]  # TG-263 name of each foreground output channel, in order
    spacing_zyx: tuple[float, float, float]
    window_hu: tuple[float, float]
    patch_zyx: tuple[int, int, int]
    description: str = ""
    # model.yaml inference.test_time_mirroring: run with the patient also mirrored left-right
    # (lateral structures swapped back); set at export for models trained with mirrored patches
    test_time_mirroring: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", ModelKind(self.kind))

    @property
    def onnx_path(self) -> Path:
        return self.folder / self.onnx_file

    @property
    def output_count(self) -> int:
        """Channels the network outputs: one per label, plus the background of a softmax."""
        return self.kind.output_count(len(self.labels))


def _flag(value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"inference.test_time_mirroring must be true or false, not {value!r}")
    return value


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_model_config(folder: Path, verify: bool = True) -> ModelConfig:
    """Read ``folder/model.yaml`` and (by default) check the ONNX file's sha256.

    Raises:
        ModelError: model.yaml or the ONNX file is missing or unreadable, a field is
            missing, a label is not in the structure table, or the checksum differs.
    """
    folder = Path(folder)
    meta = folder / "model.yaml"
    try:
        cfg = yaml.safe_load(meta.read_text())
        inp, files = cfg["input"], cfg["files"]
        kind = str(cfg["output"]["kind"])
        if kind not in {k.value for k in ModelKind}:
            raise ModelError(
                f"{meta}: output.kind {kind!r} must be " + " or ".join(repr(k.value) for k in ModelKind)
            )
        mc = ModelConfig(
            name=str(cfg["name"]),
            version=str(cfg["version"]),
            folder=folder,
            onnx_file=str(files["onnx"]["path"]),
            onnx_sha256=str(files["onnx"]["sha256"]),
            kind=ModelKind(kind),
            labels=tuple(str(v) for v in cfg["output"]["labels"]),
            spacing_zyx=tuple(float(v) for v in inp["spacing_zyx_mm"]),
            window_hu=tuple(float(v) for v in inp["window_hu"]),
            patch_zyx=tuple(int(v) for v in inp["patch_zyx"]),
            description=str(cfg.get("description", "")),
            test_time_mirroring=_flag((cfg.get("inference") or {}).get("test_time_mirroring", False)),
        )
    except FileNotFoundError:
        raise ModelError(f"model description {meta} not found - reinstall the app's models/ folder or pass -m") from None
    except (yaml.YAMLError, KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{meta} is malformed ({type(exc).__name__}: {exc}) - restore it from the release") from None
    for label in mc.labels:
        try:
            structure(label)
        except KeyError as exc:
            raise ModelError(f"{meta}: {exc.args[0]}") from None
    if verify:
        if not mc.onnx_path.is_file():
            raise ModelError(
                f"model file {mc.onnx_path} is missing (expected sha256 {mc.onnx_sha256}) - restore models/{mc.name}"
            )
        actual = sha256_file(mc.onnx_path)
        if actual != mc.onnx_sha256:
            raise ModelError(
                f"model file {mc.onnx_path} is corrupt: sha256 {actual}, expected {mc.onnx_sha256} - "
                f"restore models/{mc.name} from the release"
            )
    return mc


def load_models(models_dir: Path, verify: bool = True) -> list[ModelConfig]:
    """All models under ``models_dir`` (one sub-folder with a model.yaml each), sorted by name."""
    models_dir = Path(models_dir)
    if not models_dir.is_dir():
        raise ModelError(f"model folder {models_dir} does not exist - pass -m with the app's models/ folder")
    folders = sorted(p.parent for p in models_dir.glob("*/model.yaml"))
    if not folders:
        raise ModelError(f"no */model.yaml under {models_dir} - pass -m with the app's models/ folder")
    return [load_model_config(f, verify) for f in folders]
