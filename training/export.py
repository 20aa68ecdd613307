"""Export a trained checkpoint to ONNX (what the app runs) and TorchScript, with model.yaml.

    python -m training.export --task hn_oar --version 2.0.0 [--checkpoint training/checkpoints/hn_oar/best.pt]

Writes ``models/<task>/model.onnx``, ``model.ts`` and ``model.yaml`` (labels, spacing,
window, patch, version, provenance, sha256 of each file).  ``training/evaluate.py``
adds the validation Dice to model.yaml afterwards.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
from pathlib import Path

import numpy as np
import torch
import yaml

from autocontour.model_config import sha256_file
from training.tasks import TASKS, Task
from training.networks import deployable, describe
from training.train import ROOT, build_network, checkpoint_channels, checkpoint_network, checkpoint_task

logger = logging.getLogger("training.export")


def data_description(stage: dict) -> str:
    """``training.data`` in model.yaml: which patients the weights were trained on."""
    text = ("OpenKBP train (170 head-and-neck planning CTs with clinical contours; Babier et al., Med Phys 2021; "
            "images from TCIA, CC BY): 160 trained on, the last 10 by number held out for checkpoint selection")
    extra = stage.get("extra_data") or []
    if not extra:
        return text + "; OpenKBP validation never used in training"
    return (text + "; also trained on every patient of " + ", ".join(extra) + " (--extra-data, once validation had "
            "fixed the recipe): the validation figures below are the recipe's, measured on a control trained without them")


def load_deployable(task: Task, checkpoint: Path) -> tuple[dict, torch.nn.Module, str, tuple[int, ...]]:
    """A checkpoint's network as the app runs it (float32, eval, training-only parts such as the
    deep-supervision heads dropped): (the checkpoint, the network, its kind, its widths)."""
    ck = torch.load(checkpoint, weights_only=False, map_location="cpu")
    network = checkpoint_network(ck)
    channels = checkpoint_channels(ck, task)
    net = build_network(task, network, channels)
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in ck["model"].items()})
    return ck, deployable(net).eval(), network, channels


def export(task: Task, checkpoint: Path, out_dir: Path, version: str, mirror: bool) -> Path:
    ck, net, network, channels = load_deployable(task, checkpoint)
    task = checkpoint_task(ck, task)  # the stage's patch is the app's window
    out_dir.mkdir(parents=True, exist_ok=True)
    x = torch.zeros(1, task.in_channels, *task.patch_zyx)
    onnx_path, ts_path = out_dir / "model.onnx", out_dir / "model.ts"
    torch.onnx.export(
        net, x, str(onnx_path), input_names=["image"], output_names=["logits"],
        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False,
    )
    with torch.inference_mode():
        ts = torch.jit.trace(net, x)
    ts.save(str(ts_path))
    # check the ONNX graph reproduces the network
    import onnxruntime as ort

    xr = torch.rand(2, task.in_channels, *task.patch_zyx)
    with torch.inference_mode():
        ref = net(xr).numpy()
    got = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, {"image": xr.numpy()})[0]
    err = float(np.abs(ref - got).max())
    if err > 1e-3:
        raise RuntimeError(f"ONNX export differs from the network by {err}")
    run_dir = checkpoint.parent
    history = json.loads((run_dir / "history.json").read_text()) if (run_dir / "history.json").exists() else []
    if isinstance(history, dict):  # stage 2 on: {"stage": ..., "history": [...]}
        history = history["history"]
    old = yaml.safe_load((out_dir / "model.yaml").read_text()) if (out_dir / "model.yaml").exists() else {}
    meta = {
        "name": task.name,
        "version": version,
        "description": task.description,
        "files": {
            "onnx": {"path": onnx_path.name, "sha256": sha256_file(onnx_path), "opset": 17},
            "torchscript": {"path": ts_path.name, "sha256": sha256_file(ts_path)},
        },
        "network": {
            "architecture": describe(network),
            "channels": list(channels),
            "parameters": int(sum(p.numel() for p in net.parameters())),
        },
        "input": {
            "orientation": "canonical (z, y, x): indices increase to superior, posterior, patient left (LPS)",
            "spacing_zyx_mm": list(task.spacing_zyx),
            "window_hu": list(task.window_hu),
            "normalisation": "clip to window_hu, then (HU - low) / (high - low)",
            "patch_zyx": list(task.patch_zyx),
        },
        "output": {
            "kind": task.kind,
            "labels": [name for name, _ in task.outputs],
            "source_rois": {name: list(rois) for name, rois in task.outputs},
        },
        # how the app runs it: test-time mirroring pays only for a model trained with mirrored
        # patches (measured for hn_oar 1.1.0, trained without: Esophagus -0.06 Dice with it)
        "inference": {"test_time_mirroring": mirror},
        "training": {
            "data": data_description(ck.get("stage") or {}),
            "checkpoint": str(checkpoint.resolve().relative_to(ROOT)) if checkpoint.resolve().is_relative_to(ROOT)
            else str(checkpoint),
            "iteration": ck.get("iteration"),  # None for a soup (training.soup): its stage lists the ingredients
            "stage": ck.get("stage"),
            "holdout_mean_dice": round(float(ck.get("holdout_mean", float("nan"))), 4),
            "holdout_history": history,
            "exported": dt.date.today().isoformat(),
            "onnx_vs_torch_max_abs_diff": err,
        },
        # validation Dice belongs to the weights it was measured on: kept only if they are unchanged
        "validation": old.get("validation", {}) if old.get("files", {}).get("onnx", {}).get("sha256")
        == sha256_file(onnx_path) else {},
    }
    (out_dir / "model.yaml").write_text(yaml.safe_dump(meta, sort_keys=False, width=120))
    logger.info("exported %s (iteration %s) to %s", task.name, ck.get("iteration"), out_dir)
    return out_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=sorted(TASKS), required=True)
    ap.add_argument("--checkpoint", type=Path)
    ap.add_argument("--version", default="1.0.0")
    ap.add_argument("--out", type=Path, default=ROOT / "models")
    ap.add_argument("--no-mirror", action="store_true", help="model.yaml: run without test-time mirroring")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    task = TASKS[args.task]
    ckpt = args.checkpoint or ROOT / "training/checkpoints" / task.name / "best.pt"
    export(task, ckpt, args.out / task.name, args.version, mirror=not args.no_mirror)


if __name__ == "__main__":
    main()
