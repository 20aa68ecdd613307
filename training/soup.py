"""Average the weights of checkpoints of one network (a "model soup"): an ensemble's gain
without its inference cost, when the checkpoints come from one lineage (each stage
warm-started from the one before).

    python -m training.soup --task hn_oar --checkpoint models/hn_oar/model.ts \\
        --checkpoint training/checkpoints/hn_oar/best.pt --out training/runs/soup/hn_oar/best.pt

Each ``--checkpoint`` is a released TorchScript file or a training checkpoint (``best.pt``);
deep-supervision heads are left out, so the soup is the plain ``unet`` the app runs.  The
result is a ``best.pt`` that ``training.checkpoint_dice`` scores and ``training.export``
exports; it records its ingredients and their weights.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import torch

from training.tasks import TASKS, Task
from training.data import cached_cases
from training.train import (
    ROOT, _cast, build_network, holdout_dice, init_from_torchscript, save_atomic, split_cases,
)

logger = logging.getLogger("training.soup")


def soup(task: Task, checkpoints: list[Path], weights: list[float] | None = None) -> dict[str, torch.Tensor]:
    """The weighted mean of ``checkpoints``' float32 weights (equal weights by default)."""
    if len(checkpoints) < 2:
        raise ValueError("a soup needs at least two checkpoints")
    weights = weights or [1.0] * len(checkpoints)
    if len(weights) != len(checkpoints) or min(weights) < 0 or sum(weights) <= 0:
        raise ValueError(f"give one non-negative weight per checkpoint (got {weights} for {len(checkpoints)})")
    total = sum(weights)
    mean: dict[str, torch.Tensor] = {}
    for path, w in zip(checkpoints, weights):
        net = build_network(task, "unet")
        init_from_torchscript(net, path)  # raises for a different network
        for k, v in net.state_dict().items():
            if not v.is_floating_point():
                mean.setdefault(k, v)
                continue
            mean[k] = mean.get(k, torch.zeros_like(v)) + v * (w / total)
    return mean


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=sorted(TASKS), required=True)
    ap.add_argument("--checkpoint", action="append", required=True, type=Path, help="two or more")
    ap.add_argument("--weight", action="append", type=float, help="one per --checkpoint (default: equal)")
    ap.add_argument("--out", type=Path, required=True, help="the soup's best.pt")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/openkbp/train")
    ap.add_argument("--holdout", type=int, default=10, help="score on the last N patients, as training.train does")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    task = TASKS[args.task]
    if task.context:
        ap.error(f"{task.name}: held-out scoring of a context model's soup is not supported")
    stored = _cast(soup(task, args.checkpoint, args.weight), torch.float16)  # as best.pt stores weights
    net = build_network(task, "unet")
    net.load_state_dict(_cast(stored, torch.float32))  # scored as it is stored
    _, held = split_cases(cached_cases(args.data, task.spacing_zyx, ROOT / "training/cache"), args.holdout)
    dice = holdout_dice(net, held, task)
    mean = float(np.nanmean(dice))
    logger.info("held-out Dice %s mean %.3f", np.round(dice, 3).tolist(), mean)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    stage = {"network": "unet", "soup": [str(p) for p in args.checkpoint],
             "soup_weights": args.weight or [1.0] * len(args.checkpoint)}
    save_atomic({"model": stored, "iteration": None, "holdout_mean": mean, "stage": stage,
                 "holdout_dice": {o[0]: round(d, 4) for o, d in zip(task.outputs, dice)}}, args.out)
    logger.info("wrote %s: %s", args.out, stage)


if __name__ == "__main__":
    main()
