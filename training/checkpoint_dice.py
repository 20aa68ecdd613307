"""Dice of training checkpoints on OpenKBP patients, on the model grid: A/B of recipes before export.

    python -m training.checkpoint_dice --task hn_target_ctx --checkpoint training/runs/exp-ctx/hn_target_ctx/best.pt \
        --task hn_target --checkpoint training/runs/exp-ctl/hn_target/best.pt --json training/results/x.json

Each checkpoint is scored exactly as the held-out curve is (``training.train.holdout_dice``:
sliding window over the whole patient on the model grid, partial-length organs on the
reference's slices), here on the OpenKBP ``validation`` patients by default.  A task with a
context model (``Task.context``) gets that model's label map from its TorchScript file, as in
training.  Figures for a release come from ``training.evaluate`` on the exported ONNX model,
on each patient's own grid; this one compares recipes that are not (yet) wired into the app.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch

from training.context import context_labels
from training.data import cached_cases
from training.tasks import TASKS
from training.train import (
    ROOT, build_network, checkpoint_channels, checkpoint_network, checkpoint_task, holdout_dice, init_from_torchscript,
)

logger = logging.getLogger("training.checkpoint_dice")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", action="append", required=True, choices=sorted(TASKS))
    ap.add_argument("--checkpoint", action="append", required=True, type=Path, help="one per --task, in order")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/openkbp/validation")
    ap.add_argument("--context-model", type=Path, help="context tasks: default models/<context>/model.ts")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if len(args.task) != len(args.checkpoint):
        ap.error("give one --checkpoint per --task")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    result = {}
    for name, ckpt in zip(args.task, args.checkpoint):
        task = TASKS[name]
        cases = cached_cases(args.data, task.spacing_zyx, ROOT / "training/cache")
        contexts = None
        if task.context:
            model = args.context_model or ROOT / "models" / task.context / "model.ts"
            contexts = context_labels(cases, task, model, ROOT / "training/cache")
        meta = torch.load(ckpt, weights_only=False, map_location="cpu")
        task = checkpoint_task(meta, task)
        net = build_network(task, checkpoint_network(meta), checkpoint_channels(meta, task))
        init_from_torchscript(net, ckpt)
        dice = holdout_dice(net, cases, task, contexts)
        result[f"{name} {ckpt}"] = {
            "task": name, "checkpoint": str(ckpt), "iteration": meta.get("iteration"),
            "patients": len(cases), "data": str(args.data.name),
            "dice_model_grid": {o[0]: round(d, 4) for o, d in zip(task.outputs, dice)},
            "mean": round(float(np.nanmean(dice)), 4),
        }
        logger.info("%s: %s", name, result[f"{name} {ckpt}"])
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))  # noqa: T201 - a command-line report


if __name__ == "__main__":
    main()
