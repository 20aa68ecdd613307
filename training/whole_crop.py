"""Would one network call over the whole model-grid crop beat the sliding window?  (An
experiment; the app keeps the sliding window: see docs/benchmark.md.)

    python -m training.whole_crop --task hn_oar --json training/results/validation-whole-crop-hn_oar-nomirror-postprocessed-qa.json
    python -m training.compare training/results/validation-stage6-w1e3-hn_oar-nomirror-postprocessed-qa.json \\
        training/results/validation-whole-crop-hn_oar-nomirror-postprocessed-qa.json

The released weights (``training/checkpoints/<task>/best.pt``, the same as the released
model) are exported to ONNX with free spatial axes into a copy of ``models/``; then

* speed: ONNX Runtime (one thread, as each model runs in the app) on hn-chus-052's
  hn_oar crop, 6 windows of 64 x 80 x 80 against one call of 144 x 80 x 144 (the crop
  132 x 76 x 130 rounded up to the network's multiple of 16): a third fewer voxels;
* accuracy: ``training.evaluate --no-mirror --postprocess --reference-qa`` over the
  validation set, with every crop run as one window (the crop rounded up to a multiple of
  16, at least the training patch).

The network was trained on 64 x 80 x 80 patches with instance normalisation, whose
statistics over a whole crop differ from those over a patch.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import yaml

from autocontour.model_config import sha256_file
from training.export import load_deployable
from training.tasks import TASKS
from training.train import ROOT

CROP = (132, 76, 130)  # hn-chus-052's hn_oar crop on the model grid (make bench prints it)


def multiple_of(shape, patch, m: int) -> tuple[int, ...]:
    """One window over ``shape``: each axis rounded up to ``m``, never below the training patch."""
    return tuple(max(p, int(np.ceil(s / m)) * m) for p, s in zip(patch, shape))


def export_dynamic(task_name: str, out: Path) -> int:
    """The committed best.pt as ONNX with free batch and spatial axes; returns the network's multiple."""
    task = TASKS[task_name]
    _, net, _, channels = load_deployable(task, ROOT / "training/checkpoints" / task_name / "best.pt")
    axes = {0: "batch", 2: "z", 3: "y", 4: "x"}
    torch.onnx.export(net, torch.zeros(1, task.in_channels, *task.patch_zyx), str(out), input_names=["image"],
                      output_names=["logits"], dynamic_axes={"image": axes, "logits": axes}, opset_version=17,
                      dynamo=False)
    return 2 ** (len(channels) - 1)


def timing(onnx: Path, patch, multiple: int, repeats: int) -> dict:
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    session = ort.InferenceSession(str(onnx), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    window = rng.random((1, 1, *patch), np.float32)
    whole = rng.random((1, 1, *multiple_of(CROP, patch, multiple)), np.float32)
    windows_s, whole_s = [], []
    for _ in range(repeats):  # interleaved, so a drifting machine hits both alike
        t = time.perf_counter()
        for _ in range(6):
            session.run(None, {"image": window})
        windows_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        session.run(None, {"image": whole})
        whole_s.append(time.perf_counter() - t)
    return {"crop": list(CROP), "whole_window": list(whole.shape[2:]), "six_windows_s": windows_s,
            "whole_s": whole_s, "median_six_windows_s": statistics.median(windows_s),
            "median_whole_s": statistics.median(whole_s)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="hn_oar", choices=["hn_oar", "hn_target"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp) / "models"
        shutil.copytree(ROOT / "models", models)
        onnx = models / args.task / "model.onnx"
        multiple = export_dynamic(args.task, onnx)
        meta_path = models / args.task / "model.yaml"
        meta = yaml.safe_load(meta_path.read_text())
        meta["files"]["onnx"]["sha256"] = sha256_file(onnx)
        meta_path.write_text(yaml.safe_dump(meta, sort_keys=False, width=120))
        t = timing(onnx, tuple(meta["input"]["patch_zyx"]), multiple, args.repeats)
        print(f"ONNX Runtime, 1 thread: 6 windows {t['median_six_windows_s']:.2f} s, one window "
              f"{t['whole_window']} {t['median_whole_s']:.2f} s (median of {args.repeats})")

        import autocontour.inference as inference
        import training.evaluate as evaluate

        sliding = inference.sliding_window

        def one_window(image, patch, predict, n_out, *a, **k):
            return sliding(image, multiple_of(image.shape, patch, multiple), predict, n_out, *a, **k)

        inference.sliding_window = one_window  # the Segmenter calls it through the module
        sys.argv = ["training.evaluate", "--models", args.task, "--no-mirror", "--postprocess", "--reference-qa",
                    "--models-dir", str(models), "--json", str(args.json)]
        evaluate.main()
    result = json.loads(args.json.read_text())
    result["whole_crop_timing"] = t
    args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
