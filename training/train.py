"""Train one default model on OpenKBP ``train`` (CPU, resumable).

    python -m training.train --task hn_oar --iterations 6000 --seed 20261122

Checkpoints go to ``training/runs/<task>/`` every ``--ckpt-every`` iterations (``last.pt``)
and the best internal-holdout checkpoint is kept as ``best.pt``.  Re-running the same
command resumes from ``last.pt``.  The last ``--holdout`` train patients (by patient
number) are held out for checkpoint selection; the OpenKBP ``validation`` set is never
seen here (``training/evaluate.py`` measures it on the exported ONNX model).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from monai.networks.nets import UNet

from training.data import Case, cached_cases
from training.tasks import TASKS, Task

logger = logging.getLogger("training.train")

ROOT = Path(__file__).resolve().parent.parent


def build_network(task: Task) -> torch.nn.Module:
    return UNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=task.out_channels,
        channels=task.channels,
        strides=(2,) * (len(task.channels) - 1),
        num_res_units=1,
        norm="instance",
    )


def normalise(ct: np.ndarray, task: Task) -> np.ndarray:
    lo, hi = task.window_hu
    return ((np.clip(ct.astype(np.float32), lo, hi) - lo) / (hi - lo)).astype(np.float32)


class Sampler:
    """Random patches, two thirds centred on a voxel of a known structure.

    The structure is drawn with weight 1 / (fraction of patients that have it), so a
    structure contoured for a third of the patients is centred as often as one contoured
    for all of them.
    """

    def __init__(self, cases: list[Case], task: Task, rng: np.random.Generator):
        self.task, self.rng = task, rng
        self.items = []
        for c in cases:
            tgt, known = task.targets(c)
            self.items.append((normalise(c.ct, task), tgt, known))
        self.class_weight = 1.0 / np.maximum(np.mean([k for _, _, k in self.items], axis=0), 1e-3)

    def _crop(self, arr: np.ndarray, start: np.ndarray, pad_value: float) -> np.ndarray:
        p = np.array(self.task.patch_zyx)
        sp = arr.shape[-3:]
        lo = np.maximum(start, 0)
        hi = np.minimum(start + p, sp)
        out = np.full(arr.shape[:-3] + tuple(p), pad_value, dtype=arr.dtype)
        dst = tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, start))
        src = tuple(slice(a, b) for a, b in zip(lo, hi))
        out[(..., *dst)] = arr[(..., *src)]
        return out

    def sample(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        img, tgt, known = self.items[self.rng.integers(len(self.items))]
        p = np.array(self.task.patch_zyx)
        centre = None
        if self.rng.random() < 0.67:
            chans = np.flatnonzero(known)
            w = self.class_weight[chans]
            ch = self.rng.choice(chans, p=w / w.sum())
            fg = np.argwhere(tgt == ch + 1) if self.task.kind == "softmax" else np.argwhere(tgt[ch] > 0)
            if len(fg):
                centre = fg[self.rng.integers(len(fg))]
        if centre is None:
            centre = np.array([self.rng.integers(s) for s in img.shape])
        start = centre - p // 2 + self.rng.integers(-p // 4, p // 4 + 1)
        x = self._crop(img, start, 0.0)
        y = self._crop(tgt, start, 0)
        # intensity augmentation: small scale and shift on the normalised image
        x = x * self.rng.uniform(0.9, 1.1) + self.rng.uniform(-0.05, 0.05)
        return x[None].astype(np.float32), y, known


# Weight of the per-structure recall term of softmax_marginal_loss (see there).
RECALL_WEIGHT = 0.5


def softmax_marginal_loss(
    logits: torch.Tensor, labels: torch.Tensor, known: torch.Tensor, recall_weight: float = RECALL_WEIGHT
) -> torch.Tensor:
    """Cross-entropy + soft Dice + per-structure recall, unknown structures merged into background.

    A structure not contoured for a patient may be present in the image, so its
    probability counts as "background" (marginal loss, Shi et al. 2021) and it is left
    out of the Dice term.

    The recall term is the mean over the structures in the patch of the mean -log p
    inside each structure.  Without it a small structure whose probability has fallen
    near zero gets almost no push back: soft Dice's gradient vanishes through the
    saturated softmax and the voxel-averaged cross-entropy gives each of its ~200 voxels
    1/409600 of the patch's weight.  Measured at iteration 1000 of hn_oar 1.1.0 without
    it: Esophagus and Larynx had mean probability 0.000 inside their own contours on the
    held-out patients while the other five organs were at Dice 0.67-0.77.

    The term has no counterweight of its own, so a large weight over-segments: with 0.5,
    at iteration 2500 of hn_oar 1.1.0 every organ was predicted 2-4x its contoured volume
    on the held-out patients (Dice 0.3-0.75).  The released run used 0.5 until iteration
    3000 (to bring Esophagus and Larynx up) and 0.1 from there on (``--recall-weight``).
    """
    # log-space throughout: clamping probabilities before the log zeroes the gradient of any
    # class whose probability fell below the clamp, and it never comes back (this silenced
    # Esophagus and Larynx in hn_oar 1.0.0 before iteration 3000)
    logp_all = torch.log_softmax(logits.float(), dim=1)
    losses = []
    for b in range(logits.shape[0]):
        logp = logp_all[b]
        unknown = (~known[b]).nonzero().flatten() + 1
        if len(unknown):
            bg = torch.logsumexp(torch.cat([logp[0:1], logp[unknown]], 0), 0, keepdim=True)
            keep = torch.ones(logp.shape[0], dtype=torch.bool)
            keep[unknown] = False
            keep[0] = False
            logp = torch.cat([bg, logp[keep]], 0)
            kept_ids = torch.cat([torch.tensor([0]), keep.nonzero().flatten()])
            remap = torch.zeros(logp_all.shape[1], dtype=torch.long)
            remap[kept_ids] = torch.arange(len(kept_ids))
            lab = remap[labels[b]]
        else:
            lab = labels[b]
        ce = F.nll_loss(logp[None], lab[None])
        p = logp.exp()
        onehot = F.one_hot(lab, p.shape[0]).permute(3, 0, 1, 2).float()
        # Dice only for structures inside this patch: a Dice term for a structure absent from
        # the patch pushes its probability to zero everywhere (it silenced the rarely-seen
        # Esophagus and Larynx in the first 2500 iterations of hn_oar 1.0.0).
        in_patch = onehot[1:].sum((1, 2, 3)) > 0
        inter = (p[1:] * onehot[1:]).sum((1, 2, 3))
        denom = p[1:].sum((1, 2, 3)) + onehot[1:].sum((1, 2, 3))
        dice = 1 - (2 * inter + 1e-3) / (denom + 1e-3)
        total = ce
        if in_patch.any():
            total = total + dice[in_patch].mean()
            nll_in = -(logp[1:] * onehot[1:]).sum((1, 2, 3)) / onehot[1:].sum((1, 2, 3)).clamp_min(1)
            total = total + recall_weight * nll_in[in_patch].mean()
        losses.append(total)
    return torch.stack(losses).mean()


def sigmoid_loss(logits: torch.Tensor, target: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    logits = logits.float()
    w = known.float()[:, :, None, None, None].expand_as(logits)
    bce = F.binary_cross_entropy_with_logits(logits, target, weight=w)
    p = torch.sigmoid(logits) * w
    inter = (p * target).sum((2, 3, 4))
    denom = p.sum((2, 3, 4)) + (target * w).sum((2, 3, 4))
    dice = 1 - (2 * inter + 1e-3) / (denom + 1e-3)
    # Dice only where the target is in the patch (see softmax_marginal_loss)
    use = known & (target.sum((2, 3, 4)) > 0)
    return bce + (dice * use).sum() / use.sum().clamp_min(1)


def holdout_dice(net: torch.nn.Module, cases: list[Case], task: Task) -> list[float]:
    """Mean Dice per output over the holdout cases (known structures only)."""
    net.eval()
    scores: list[list[float]] = [[] for _ in task.outputs]
    with torch.inference_mode():
        for c in cases:
            tgt, known = task.targets(c)
            x = torch.from_numpy(normalise(c.ct, task))[None, None]
            out = sliding_window_inference(x, task.patch_zyx, 1, net, overlap=0.25, mode="gaussian")[0]
            if task.kind == "softmax":
                pred = out.argmax(0).numpy()
                masks = [(pred == i + 1, tgt == i + 1) for i in range(len(task.outputs))]
            else:
                pred = (out > 0).numpy()
                masks = [(pred[i], tgt[i] > 0) for i in range(len(task.outputs))]
            for i, (p, t) in enumerate(masks):
                if known[i] and t.any():
                    scores[i].append(2 * (p & t).sum() / (p.sum() + t.sum()))
    net.train()
    return [float(np.mean(s)) if s else float("nan") for s in scores]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=sorted(TASKS), required=True)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/openkbp/train")
    ap.add_argument("--iterations", type=int, default=6000)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=20261122)
    ap.add_argument("--holdout", type=int, default=10)
    ap.add_argument("--ckpt-every", type=int, default=500)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--stop-at", type=int, help="stop after this iteration (the schedule still spans --iterations)")
    ap.add_argument("--recall-weight", type=float, default=RECALL_WEIGHT, help="softmax tasks: weight of the recall term")
    ap.add_argument("--runs", type=Path, default=ROOT / "training/runs")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    task = TASKS[args.task]
    run = args.runs / task.name
    run.mkdir(parents=True, exist_ok=True)

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    cases = cached_cases(args.data, task.spacing_zyx, ROOT / "training/cache")
    train_cases, hold_cases = cases[: -args.holdout], cases[-args.holdout :]
    net = build_network(task)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    it, best, history = 0, -1.0, []
    last = run / "last.pt"
    if last.exists():
        ck = torch.load(last, weights_only=False)
        net.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        it, best, history = ck["iteration"], ck["best"], ck["history"]
        logger.info("resumed %s at iteration %d (best holdout %.3f)", last, it, best)
    # The sampler's stream is re-seeded from (seed, iteration) so a resumed run is repeatable.
    sampler = Sampler(train_cases, task, np.random.default_rng([args.seed, it]))
    if task.kind == "softmax":
        def loss_fn(lg, y, k):
            return softmax_marginal_loss(lg, y, k, args.recall_weight)
    else:
        loss_fn = sigmoid_loss
    net.train()
    t0, run_loss = time.time(), []
    stop = min(args.iterations, args.stop_at or args.iterations)
    while it < stop:
        lr = args.lr * (1 - it / args.iterations) ** 0.9
        for g in opt.param_groups:
            g["lr"] = lr
        batch = [sampler.sample() for _ in range(args.batch)]
        x = torch.from_numpy(np.stack([b[0] for b in batch]))
        y = torch.from_numpy(np.stack([b[1] for b in batch]))
        k = torch.from_numpy(np.stack([b[2] for b in batch]))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = net(x)
        loss = loss_fn(logits, y, k)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        it += 1
        run_loss.append(float(loss.detach()))
        if it % 50 == 0:
            logger.info("it %d loss %.4f lr %.2e %.2f s/it", it, np.mean(run_loss), lr, (time.time() - t0) / 50)
            t0, run_loss = time.time(), []
        if it % args.ckpt_every == 0 or it == stop:
            dice = holdout_dice(net, hold_cases, task)
            mean = float(np.nanmean(dice))
            history.append({"iteration": it, "holdout_dice": dict(zip([o[0] for o in task.outputs], dice))})
            logger.info("it %d holdout dice %s mean %.3f", it, np.round(dice, 3).tolist(), mean)
            if mean > best:
                best = mean
                torch.save({"model": net.state_dict(), "iteration": it, "holdout_mean": mean}, run / "best.pt")
            torch.save(
                {"model": net.state_dict(), "opt": opt.state_dict(), "iteration": it, "best": best, "history": history},
                last,
            )
            (run / "history.json").write_text(json.dumps(history, indent=1))
            t0 = time.time()
    logger.info("done: %d iterations, best holdout mean Dice %.3f", it, best)


if __name__ == "__main__":
    main()
