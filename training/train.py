"""Train one default model on OpenKBP ``train``: resumable across machines and sessions.

    python -m training.train --task hn_oar --init models/hn_oar/model.ts   # what `make train` runs

A *stage* is one poly learning-rate schedule of ``--iterations`` iterations with one
recipe (learning rate, warm-up, seed, recall weight, warm start, augmentation on/off).
Its state lives in ``training/checkpoints/<task>/`` and is committed to the repository:

* ``state.pt``: float16 weights, the iteration, the stage's settings and the held-out
  learning curve; running the command again (on any machine, CPU or CUDA GPU) resumes it
  with the stage's own settings, whatever options are given.  The AdamW moments are not
  kept (a resumed stage restarts them): measured, a restart without them followed the one
  with them within 0.001 of held-out Dice, and they were two thirds of the file
  (training/README.md); an older state.pt's moments are still read;
* ``best.pt``: float16 weights of the best held-out checkpoint (what ``training.export``
  exports);
* ``history.json``: the learning curve (per-structure held-out Dice by iteration).

``--new-stage`` starts a new one (``--init`` warm-starts it from a released model.ts).
Batch i of a stage is drawn from (seed, i) (``training.loader``; stages before 2026-12-05
re-seed one sequential stream at each start), so a resumed stage draws the same patches as an
uninterrupted one would, with any number of ``--workers`` processes drawing them.  The last
``--holdout`` train patients (by patient number) are held out for checkpoint selection,
scored on the slices where each structure is known (partial-length organs on their
reference's slices only); the OpenKBP ``validation`` set is not seen here
(``training/evaluate.py`` measures it on the exported ONNX model) unless a stage asks for it
with ``--extra-data``, once validation has fixed the recipe (training/README.md, "Training on
train + validation").  Measured and not kept, but available as stage settings: ``--teacher``
(missing organs filled from a model's labels, ``training.pseudo``), ``--elastic``,
``--optimizer sgd`` and ``--batch-dice`` (training/README.md).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import random
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference

from training import networks
from training.augment import NO_AUGMENTATION, AugmentConfig, augment_intensity, cut_patch, mirror_lr
from training.context import context_labels, model_label_maps, one_hot_context
from training.data import Case, cached_cases
from training.loader import STREAMS, batches, default_workers
from training.pseudo import with_teacher_labels
from training.tasks import TASKS, Task

logger = logging.getLogger("training.train")

ROOT = Path(__file__).resolve().parent.parent


def build_network(task: Task, network: str = "unet", channels: tuple[int, ...] | None = None) -> torch.nn.Module:
    """``task``'s network (``training.networks``: ``unet`` or ``unet-ds``), with ``channels``
    (one width per level; default the task's own)."""
    return networks.build_network(network, task.in_channels, task.out_channels, tuple(channels or task.channels))


def checkpoint_channels(checkpoint: dict, task: Task) -> tuple[int, ...]:
    """The widths of a saved stage's network (stages before ``--channels`` used the task's)."""
    return tuple((checkpoint.get("stage") or {}).get("channels") or task.channels)


def checkpoint_task(checkpoint: dict, task: Task) -> Task:
    """``task`` with the saved stage's patch (stages before ``--patch`` used the task's)."""
    patch = (checkpoint.get("stage") or {}).get("patch")
    return replace(task, patch_zyx=tuple(patch)) if patch else task


def checkpoint_network(checkpoint: dict) -> str:
    """The network a saved stage was trained with (stages before ``--network`` used ``unet``)."""
    return (checkpoint.get("stage") or {}).get("network", "unet")


def normalise(ct: np.ndarray, task: Task) -> np.ndarray:
    lo, hi = task.window_hu
    return ((np.clip(ct.astype(np.float32), lo, hi) - lo) / (hi - lo)).astype(np.float32)


class Sampler:
    """Random augmented patches, two thirds centred on a voxel of a known structure.

    The structure is drawn with weight 1 / (fraction of patients that have it), so a
    structure contoured for a third of the patients is centred as often as one contoured
    for all of them.  Each patch goes through ``training.augment`` (rotation, scaling,
    left-right mirroring with the laterality pairs swapped, intensity transforms) and
    carries its per-slice "known" flags (partial-length organs, missing structures).
    With ``teachers`` (one label map per case, ``training.pseudo``) the organs a patient
    lacks are filled from a teacher model's labels.
    A task with a context model (``Task.context``) gets that model's label map per case
    (``contexts``), cut and mirrored with the patch and appended as one-hot channels.
    """

    def __init__(
        self, cases: list[Case], task: Task, rng: np.random.Generator, cfg: AugmentConfig,
        contexts: list[np.ndarray] | None = None, teachers: list[np.ndarray] | None = None,
    ):
        self.task, self.rng, self.cfg = task, rng, cfg
        self.items = []
        self.contexts = contexts if contexts is not None else [None] * len(cases)
        self.context_swap = TASKS[task.context].mirror_pairs if task.context else ()
        clinician_known = []
        for n, c in enumerate(cases):
            refs = task.references(c)  # once per patient, for both the targets and the known slices
            clinician_known.append([r is not None for r in refs])
            if teachers is not None:  # organs the clinician left out, from a teacher model (training/pseudo.py)
                refs = with_teacher_labels(refs, teachers[n], task)
            tgt, known = task.targets(c, refs)
            self.items.append((normalise(c.ct, task), tgt, known, task.known_slices(c, refs)))
        # weights from the clinicians' references: teacher-filled organs add patches, take none away
        self.class_weight = 1.0 / np.maximum(np.mean(clinician_known, axis=0), 1e-3)

    def sample(self, rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One patch: (input channels, target, per-slice known flags), drawn from ``rng`` (default the
        sampler's own sequential stream; ``training.loader`` passes one generator per batch)."""
        rng = rng if rng is not None else self.rng
        n = rng.integers(len(self.items))
        img, tgt, known, known_z = self.items[n]
        p = np.array(self.task.patch_zyx)
        centre = None
        if rng.random() < 0.67:
            chans = np.flatnonzero(known)
            w = self.class_weight[chans]
            ch = rng.choice(chans, p=w / w.sum())
            fg = np.argwhere(tgt == ch + 1) if self.task.kind == "softmax" else np.argwhere(tgt[ch] > 0)
            if len(fg):
                centre = fg[rng.integers(len(fg))]
        if centre is None:
            centre = np.array([rng.integers(s) for s in img.shape])
        centre = centre + rng.integers(-p // 4, p // 4 + 1)
        patch = cut_patch(img, tgt, known_z, centre, self.task.patch_zyx, rng, self.cfg, self.contexts[n])
        if rng.random() < self.cfg.p_mirror:  # every task: lateral pairs swap, the rest just flips
            patch = mirror_lr(patch, self.task.mirror_pairs, self.task.kind == "softmax", self.context_swap)
        x = augment_intensity(patch.image, rng, self.cfg)[None]
        if patch.context is not None:
            x = np.concatenate([x, one_hot_context(patch.context, self.task.context_labels)])
        return x, patch.target, patch.known_z


# Weight of the per-structure recall term of softmax_marginal_loss (see there).
RECALL_WEIGHT = 0.1


def softmax_marginal_loss(
    logits: torch.Tensor, labels: torch.Tensor, known_z: torch.Tensor, recall_weight: float = RECALL_WEIGHT,
    batch_dice: bool = False,
) -> torch.Tensor:
    """Cross-entropy + soft Dice + per-structure recall, unknown structures merged into background.

    ``known_z`` (B, n_out, Z) says on which slices of the patch each structure's reference
    is valid.  Where a structure is unknown (not contoured for this patient, or beyond the
    length the clinician contoured a tubular organ over) it may still be in the image, so
    there its probability counts as "background" (marginal loss, Shi et al. 2021), and its
    Dice term only sees the slices where it is known.

    The recall term is the mean over the structures in the patch of the mean -log p
    inside each structure.  Without it a small structure whose probability has fallen
    near zero gets almost no push back: soft Dice's gradient vanishes through the
    saturated softmax and the voxel-averaged cross-entropy gives each of its ~200 voxels
    1/409600 of the patch's weight.  Measured at iteration 1000 of hn_oar 1.1.0 without
    it: Esophagus and Larynx had mean probability 0.000 inside their own contours on the
    held-out patients while the other five organs were at Dice 0.67-0.77.

    The term has no counterweight of its own, so a large weight over-segments: with 0.5,
    at iteration 2500 of hn_oar 1.1.0 every organ was predicted 2-4x its contoured volume
    on the held-out patients (Dice 0.3-0.75).  hn_oar 1.1.0 used 0.5 until iteration 3000
    and 0.1 from there on; 0.1 is the default.

    ``batch_dice`` (nnU-Net's option of that name): one Dice term per structure over the whole
    batch instead of one per patch, for the structures inside any of its patches; a patch
    without the structure then adds its false positives on the slices where it is known.
    """
    # log-space throughout: clamping probabilities before the log zeroes the gradient of any
    # class whose probability fell below the clamp, and it never comes back (this silenced
    # Esophagus and Larynx in hn_oar 1.0.0 before iteration 3000)
    logp = torch.log_softmax(logits.float(), dim=1)  # B, C, Z, Y, X
    known = known_z[:, :, :, None, None]  # B, n, Z, 1, 1
    fg = logp[:, 1:]
    unknown_fg = torch.where(known, torch.full_like(fg[:, :, :, :1, :1], -torch.inf), fg)
    bg = torch.logsumexp(torch.cat([logp[:, :1], unknown_fg], 1), 1)  # background + unknown
    lab = labels.clone()
    # a label on a slice where its structure is unknown cannot happen by construction; be safe
    onehot = F.one_hot(lab, logp.shape[1]).permute(0, 4, 1, 2, 3)[:, 1:].bool()  # B, n, Z, Y, X
    onehot &= known
    lab[~onehot.any(1)] = 0
    picked = logp.gather(1, lab[:, None])[:, 0]
    ce = -torch.where(lab > 0, picked, bg).mean()
    p = fg.exp() * known
    oh = onehot.float()
    size = oh.sum((2, 3, 4))
    in_patch = size > 0  # B, n: Dice only for structures inside this patch (see below)
    # A Dice term for a structure absent from the patch pushes its probability to zero
    # everywhere (it silenced the rarely-seen Esophagus and Larynx in hn_oar 1.0.0).
    inter, psum, ref, scored = (p * oh).sum((2, 3, 4)), p.sum((2, 3, 4)), size, in_patch
    if batch_dice:  # (B, n) -> (1, n): one term per structure in any patch of the batch
        inter, psum, ref, scored = (t.sum(0, keepdim=True) for t in (inter, psum, ref, in_patch))
    dice = 1 - (2 * inter + 1e-3) / (psum + ref + 1e-3)
    total = ce
    if in_patch.any():
        total = total + dice[scored > 0].mean()
        nll_in = -(fg * oh).sum((2, 3, 4)) / size.clamp_min(1)
        total = total + recall_weight * nll_in[in_patch].mean()
    return total


def sigmoid_loss(logits: torch.Tensor, target: torch.Tensor, known_z: torch.Tensor) -> torch.Tensor:
    """BCE + soft Dice per output, only on the slices where the output is known."""
    logits = logits.float()
    w = known_z[:, :, :, None, None].float().expand_as(logits)
    bce = F.binary_cross_entropy_with_logits(logits, target, weight=w, reduction="sum") / w.sum().clamp_min(1)
    p = torch.sigmoid(logits) * w
    t = target * w
    inter = (p * t).sum((2, 3, 4))
    denom = p.sum((2, 3, 4)) + t.sum((2, 3, 4))
    dice = 1 - (2 * inter + 1e-3) / (denom + 1e-3)
    # Dice only where the target is in the patch (see softmax_marginal_loss)
    use = t.sum((2, 3, 4)) > 0
    return bce + (dice * use).sum() / use.sum().clamp_min(1)


def network_input(case: Case, task: Task, context: np.ndarray | None = None) -> np.ndarray:
    """(in_channels, z, y, x) float32: the windowed CT, then the context's one-hot channels."""
    x = normalise(case.ct, task)[None]
    if task.context:
        x = np.concatenate([x, one_hot_context(context, task.context_labels)])
    return x


def holdout_dice(
    net: torch.nn.Module, cases: list[Case], task: Task, contexts: list[np.ndarray] | None = None
) -> list[float]:
    """Mean Dice per output over the holdout cases, on the slices where the output is known
    (partial-length organs on their reference's slices only).  The windows run in float32 on
    the network's device (a GPU's, while training there), the blending on the CPU."""
    net.eval()
    device = next(net.parameters()).device
    scores: list[list[float]] = [[] for _ in task.outputs]
    contexts = contexts if contexts is not None else [None] * len(cases)
    with torch.inference_mode():
        for c, ctx in zip(cases, contexts):
            refs = task.references(c)
            tgt, known = task.targets(c, refs)
            kz = task.known_slices(c, refs)
            x = torch.from_numpy(network_input(c, task, ctx))[None]
            out = sliding_window_inference(x, task.patch_zyx, 1, net, overlap=0.25, mode="gaussian",
                                           sw_device=device, device="cpu")[0]
            if task.kind == "softmax":
                pred = out.argmax(0).numpy()
                masks = [(pred == i + 1, tgt == i + 1) for i in range(len(task.outputs))]
            else:
                pred = (out > 0).numpy()
                masks = [(pred[i], tgt[i] > 0) for i in range(len(task.outputs))]
            for i, (p, t) in enumerate(masks):
                if known[i] and t.any():
                    p, t = p[kz[i]], t[kz[i]]
                    scores[i].append(2 * (p & t).sum() / (p.sum() + t.sum()))
    net.train()
    return [float(np.mean(s)) if s else float("nan") for s in scores]


def init_weights(path: Path) -> dict[str, torch.Tensor]:
    """The float32 weights of a released model's TorchScript file or a committed ``.pt`` checkpoint."""
    if Path(path).suffix == ".pt":  # a committed checkpoint (training/checkpoints/<task>/best.pt)
        src = torch.load(path, weights_only=False, map_location="cpu")["model"]
        return {k: v.float() if v.is_floating_point() else v for k, v in src.items()}
    return torch.jit.load(str(path), map_location="cpu").state_dict()


def init_from_torchscript(net: torch.nn.Module, path: Path, seed: int = 0, widen_noise: float = 0.0) -> None:
    """Warm start from a released model's TorchScript file or a committed ``.pt`` checkpoint
    (same architecture).

    An output layer with fewer channels than the network's is replicated across them, so
    a one-level target model can seed a three-level one.  An input layer with fewer input
    channels than the network's (a CT-only model seeding one with context channels) gets
    zero weights for the extra channels: the new network starts as the old one.  A network
    with wider levels than the source (``--channels``) gets the source's weights widened so
    that it starts as the same function (``networks.widen``, its random choices from ``seed``;
    ``widen_noise`` > 0 perturbs the new channels, so it starts only close to it).
    """
    src = init_weights(path)
    widths = networks.unet_channels(src)
    if isinstance(net, networks.UNet) and len(widths) == len(net.channels) and widths != tuple(net.channels):
        src = networks.widen(src, net, torch.Generator().manual_seed(seed), widen_noise)
    dst = net.state_dict()
    missing = [k for k in dst if k not in src and not k.startswith(networks.HEADS_PREFIX)]  # new heads start fresh
    if missing:
        raise ValueError(f"{path}: not the same network ({len(missing)} of its tensors missing, e.g. {missing[0]}); "
                         "start a new network from scratch (no --init)")
    for k, v in dst.items():
        if k not in src:
            continue
        w = src[k]
        if w.shape != v.shape:
            if w.ndim > 2 and w.shape[0] == v.shape[0] and w.shape[1] < v.shape[1] and w.shape[2:] == v.shape[2:]:
                # more input channels: the extra ones start at zero weight
                pad = torch.zeros((v.shape[0], v.shape[1] - w.shape[1], *v.shape[2:]), dtype=w.dtype)
                w = torch.cat([w, pad], 1)
            elif w.ndim > 1 and w.shape[:2] == (1, 1) and v.shape[0] == v.shape[1]:
                # a 1 -> 1 channel convolution becomes n independent copies (no mixing)
                eye = torch.eye(v.shape[0]).reshape(v.shape[0], v.shape[1], *([1] * (w.ndim - 2)))
                w = eye * w
            elif w.shape[0] == 1 or (w.ndim > 1 and w.shape[1] == 1):
                reps = [v.shape[i] // w.shape[i] for i in range(w.ndim)]
                w = w.repeat(*reps)
            if w.shape != v.shape:
                raise ValueError(f"{path}: {k} has shape {tuple(w.shape)}, the network needs {tuple(v.shape)}")
        dst[k] = w.to(v.dtype)
    net.load_state_dict(dst)


def _cast(state, dtype: torch.dtype):
    """Floating tensors of a (nested) state dict cast to ``dtype`` (float16 in the committed
    checkpoint, float32 when training resumes)."""
    if isinstance(state, torch.Tensor):
        return state.to(dtype) if state.is_floating_point() else state
    if isinstance(state, dict):
        return {k: _cast(v, dtype) for k, v in state.items()}
    if isinstance(state, list):
        return [_cast(v, dtype) for v in state]
    return state


def save_atomic(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def split_cases(cases: list[Case], holdout: int, extra: dict[str, list[Case]] | None = None
                ) -> tuple[list[Case], list[Case]]:
    """(trained on, held out): the last ``holdout`` of ``cases`` are held out for checkpoint
    selection; every patient of each ``extra`` folder is trained on (``--extra-data``).

    A patient in two folders is refused: it could put a held-out patient into training.
    """
    train, held = cases[:-holdout], cases[-holdout:]
    seen = {c.name for c in cases}
    for folder, more in (extra or {}).items():
        twice = sorted(seen & {c.name for c in more})
        if twice:
            raise SystemExit(f"--extra-data {folder}: patients {', '.join(twice[:5])} are already in the data; "
                             "give a folder of other patients (the OpenKBP validation set)")
        seen |= {c.name for c in more}
        logger.info("training also on the %d patients of %s", len(more), folder)
        train = train + more
    return train, held


def _repo_relative(path: Path) -> str:
    """``path`` as the stage records it: relative to the repository root where it can be, so a
    clean clone with ``../shared`` beside it (or a GPU machine) resumes the same stage."""
    return os.path.relpath(path.resolve(), ROOT)


def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX-512 BF16 or AMX), from its flags."""
    try:
        flags = next((line.split(":", 1)[1].split() for line in cpuinfo.read_text().splitlines()
                      if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def training_precision(device: torch.device, choice: str = "auto") -> str:
    """The forward pass's precision: ``choice``, or for ``auto`` on a CUDA GPU bf16 autocast where
    it has native bfloat16 (compute capability 8 and up) and fp16 autocast with gradient scaling
    elsewhere; on a CPU bf16 autocast where it has native bfloat16, fp32 otherwise.  Measured
    (training/README.md): on an AVX2-only AMD EPYC bf16 autocast is emulated and ran 13x
    *slower* than fp32; on a Zen 5 EPYC with AVX-512 BF16 it ran 1.3-1.6x faster per
    iteration.  Weights, optimiser, loss, held-out scoring and export stay fp32 whichever is
    chosen."""
    if choice != "auto":
        return choice
    if device.type == "cuda":  # bfloat16 where the GPU has it (A100, H100, H200): fp32's range, no scaling
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def make_optimizer(net: torch.nn.Module, stage: dict) -> torch.optim.Optimizer:
    """The stage's optimiser: AdamW (weight decay 1e-4, every stage before ``--optimizer``) or
    nnU-Net's SGD (Nesterov momentum 0.99, weight decay 3e-5); the schedule sets its rate."""
    if stage.get("optimizer", "adamw") == "sgd":
        return torch.optim.SGD(net.parameters(), lr=stage["lr"], momentum=0.99, nesterov=True, weight_decay=3e-5)
    return torch.optim.AdamW(net.parameters(), lr=stage["lr"], weight_decay=1e-4)


# What a stage of training is: stored in its checkpoint, so that resuming (make train, a new
# machine, a GPU) continues the same schedule without repeating the options.
STAGE_KEYS = ("iterations", "batch", "lr", "warmup", "seed", "recall_weight", "init", "augment", "context_model",
              "network", "channels", "widen_noise", "patch", "teacher", "elastic", "optimizer", "stream",
              "batch_dice")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=sorted(TASKS), required=True)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/openkbp/train")
    ap.add_argument("--iterations", type=int, default=12000, help="length of the stage's poly schedule")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=200, help="linear learning-rate warm-up iterations")
    ap.add_argument("--seed", type=int, default=20261202)
    ap.add_argument("--holdout", type=int, default=10)
    ap.add_argument("--ckpt-every", type=int, default=500)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--stop-at", type=int, help="stop after this iteration (the schedule still spans --iterations)")
    ap.add_argument("--recall-weight", type=float, default=RECALL_WEIGHT, help="softmax tasks: weight of the recall term")
    ap.add_argument("--max-minutes", type=float,
                    help="stop at the first checkpoint after this many minutes (a working day, a GPU lease)")
    ap.add_argument("--init", type=Path, help="warm start from a released model.ts (new stage only)")
    ap.add_argument("--context-model", type=Path,
                    help="tasks with a context (hn_target_ctx): that task's model.ts (default models/<context>/model.ts)")
    ap.add_argument("--no-augment", action="store_true", help="ablation: patches without augmentation")
    ap.add_argument("--network", choices=networks.NETWORKS, default="unet",
                    help="new stage: the network (training/networks.py; unet-ds trains with deep supervision)")
    ap.add_argument("--channels", type=int, nargs="+", metavar="C",
                    help="new stage: one width per level (default the task's); wider than --init's model, "
                         "its weights are widened to start as the same function (training/networks.py widen)")
    ap.add_argument("--widen-noise", type=float, default=0.0, metavar="F",
                    help="new stage widened from --init: Gaussian noise of F x each tensor's std on the new "
                         "channels' incoming weights (default 0: exactly the old function)")
    ap.add_argument("--patch", type=int, nargs=3, metavar=("Z", "Y", "X"),
                    help="new stage: the training patch and the app's window on the model grid (default the "
                         "task's 64 80 80; each a multiple of 2^(levels - 1)); recorded in the stage and model.yaml")
    ap.add_argument("--checkpoints", type=Path, default=ROOT / "training/checkpoints",
                    help="where the committed, resumable stage lives (<task>/state.pt, best.pt, history.json)")
    ap.add_argument("--new-stage", action="store_true", help="start a new stage even if a checkpoint exists")
    ap.add_argument("--extra-data", type=Path, action="append", default=[], metavar="DIR",
                    help="new stage: another OpenKBP folder whose patients are all trained on, never held out "
                         "(the validation set, once validation has fixed the recipe; recorded in the stage)")
    ap.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                    help="forward pass: auto = bf16 on a CUDA GPU with native bfloat16 (else fp16, gradients "
                         "scaled), bf16 on a CPU with native bfloat16, else fp32 (a property of the machine, "
                         "not of the stage: not recorded in it)")
    ap.add_argument("--workers", type=int, metavar="N",
                    help="processes drawing the patches (training/loader.py; default none on a CPU, all cores "
                         "but two, at most 8, on a CUDA GPU); the batches do not depend on it")
    ap.add_argument("--stream", choices=STREAMS, default="per-iteration",
                    help="new stage: the patch stream; per-iteration (default) draws batch i from (seed, i) in "
                         "any number of workers, sequential draws the patches of the stages before it; recorded")
    ap.add_argument("--teacher", type=Path, metavar="MODEL_TS",
                    help="new stage, softmax tasks: fill the organs a training patient lacks from this model's label "
                         "map (training/pseudo.py; the held-out patients keep their own references; recorded)")
    ap.add_argument("--elastic", type=float, metavar="P",
                    help="new stage: elastic deformation in the axial plane with probability P (nnU-Net v1: 0.2; "
                         "off by default, as in nnU-Net v2); recorded")
    ap.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw",
                    help="new stage: AdamW (default) or nnU-Net's SGD with Nesterov momentum 0.99 (nnU-Net's peak "
                         "rate is 1e-2); recorded")
    ap.add_argument("--batch-dice", action="store_true",
                    help="new stage, softmax tasks: one Dice term per structure over the batch, not per patch "
                         "(nnU-Net's batch_dice); recorded")
    ap.add_argument("--reschedule", type=int, metavar="N",
                    help="resume with the stage's poly schedule ending at iteration N instead (recorded in the stage)")
    args = ap.parse_args()
    if args.teacher and not args.teacher.is_file():
        raise SystemExit(f"--teacher {args.teacher}: no such file; give a released model.ts (models/<task>/model.ts)")
    if args.teacher and TASKS[args.task].kind != "softmax":
        raise SystemExit(f"--teacher: {args.task} is not a softmax task; teacher labels fill missing organs")
    if args.workers is not None and args.workers < 0:
        raise SystemExit(f"--workers {args.workers}: give 0 (draw the patches in the training process) or more")
    if args.batch_dice and TASKS[args.task].kind != "softmax":
        raise SystemExit(f"--batch-dice: {args.task} is not a softmax task; its loss has per-output Dice terms")
    if args.elastic and args.no_augment:
        raise SystemExit("--elastic with --no-augment: elastic deformation is part of the augmentation; drop one")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    task = TASKS[args.task]
    run = args.checkpoints / task.name
    run.mkdir(parents=True, exist_ok=True)
    state_path = run / "state.pt"

    stage = {k: getattr(args, k.replace("-", "_")) for k in STAGE_KEYS if k != "augment"}
    stage["init"] = str(args.init) if args.init else None
    if task.context:
        stage["context_model"] = str(args.context_model or Path("models") / task.context / "model.ts")
    stage["augment"] = not args.no_augment
    stage["extra_data"] = [_repo_relative(p) for p in args.extra_data]
    stage["teacher"] = _repo_relative(args.teacher) if args.teacher else None
    stage["teacher_sha256"] = hashlib.sha256(args.teacher.read_bytes()).hexdigest() if args.teacher else None
    it, best, history = 0, -1.0, []
    torch.manual_seed(stage["seed"])  # a new stage's initial weights (from scratch, or its new heads) follow its seed
    ck = None
    if state_path.exists() and not args.new_stage:
        ck = torch.load(state_path, weights_only=False, map_location="cpu")
        stage = ck["stage"]
        stage.setdefault("network", checkpoint_network(ck))
        task = checkpoint_task(ck, task)
        net = build_network(task, stage["network"], checkpoint_channels(ck, task)).to(device)
        net.load_state_dict(_cast(ck["model"], torch.float32))
        it, best, history = ck["iteration"], ck["best"], ck["history"]
        if args.reschedule:
            if args.reschedule <= it:
                raise SystemExit(f"--reschedule {args.reschedule}: the stage is already at iteration {it}")
            stage.setdefault("rescheduled", []).append({"at": it, "from": stage["iterations"], "to": args.reschedule})
            stage["iterations"] = args.reschedule
        logger.info("resumed %s at iteration %d of %d (best holdout %.3f), stage %s", state_path, it,
                    stage["iterations"], best, stage)
    else:
        if args.init and stage["channels"] is None:  # the warm start's own widths, e.g. a widened release
            widths = networks.unet_channels(init_weights(args.init))
            stage["channels"] = list(widths) if widths and widths != tuple(task.channels) else None
        net = build_network(task, stage["network"], stage["channels"]).to(device)
        task = checkpoint_task({"stage": stage}, task)
        multiple = 2 ** (len(stage["channels"] or task.channels) - 1)
        if any(p % multiple for p in task.patch_zyx):
            raise SystemExit(f"--patch {' '.join(map(str, task.patch_zyx))}: each side must be a multiple of {multiple}")
        if args.init:
            init_from_torchscript(net, args.init, stage["seed"], stage["widen_noise"])
            logger.info("new stage from %s: %s", args.init, stage)
        else:
            logger.info("new stage from scratch: %s", stage)
    opt = make_optimizer(net, stage)
    if ck is not None and ck.get("opt") is not None:
        opt.load_state_dict(_cast(ck["opt"], torch.float32))

    random.seed(stage["seed"])
    np.random.seed(stage["seed"])
    torch.manual_seed(stage["seed"] + it)
    cases = cached_cases(args.data, task.spacing_zyx, ROOT / "training/cache")
    extra = {folder: cached_cases(ROOT / folder, task.spacing_zyx, ROOT / "training/cache")
             for folder in stage.get("extra_data", [])}
    train_cases, hold_cases = split_cases(cases, args.holdout, extra)
    contexts = hold_contexts = None
    if task.context:
        ctx_model = ROOT / stage["context_model"]
        contexts = context_labels(train_cases, task, ctx_model, ROOT / "training/cache")
        hold_contexts = context_labels(hold_cases, task, ctx_model, ROOT / "training/cache")
    teachers = None
    if stage.get("teacher"):
        teacher = ROOT / stage["teacher"]
        if not teacher.exists() or hashlib.sha256(teacher.read_bytes()).hexdigest() != stage["teacher_sha256"]:
            raise SystemExit(f"{teacher}: missing or not the teacher this stage was started with; restore that file")
        teachers = model_label_maps(train_cases, task, teacher, ROOT / "training/cache")
    # The sampler's stream is re-seeded from (seed, iteration): a resumed run is repeatable.
    cfg = AugmentConfig(p_elastic=stage.get("elastic") or 0.0) if stage["augment"] else NO_AUGMENTATION
    sampler = Sampler(train_cases, task, np.random.default_rng([stage["seed"], it]), cfg, contexts, teachers)
    del cases, train_cases  # the sampler holds what it needs (normalised image, uint8 targets)
    if task.kind == "softmax":
        def head_loss(lg, y, k):
            return softmax_marginal_loss(lg, y, k, stage["recall_weight"], bool(stage.get("batch_dice")))
    else:
        head_loss = sigmoid_loss

    def loss_fn(lg, y, k):  # deep-supervised outputs: every head, weighted (training/networks.py)
        return networks.deep_supervision_loss(head_loss, lg, y, k)
    net.train()
    t0, run_loss = time.time(), []
    started = t0
    total = stage["iterations"]
    stop = min(total, args.stop_at or total)
    if it >= total:
        logger.info("the stage in %s is complete (%d iterations, best held-out %.3f): start the next one with "
                    "--new-stage --init %s [--lr ...] [--iterations ...], or extend it with --reschedule N",
                    state_path, it, best, run / "best.pt")
    precision = training_precision(device, args.precision)
    logger.info("forward pass in %s on %s", precision, device.type)
    autocast = (contextlib.nullcontext() if precision == "fp32"
                else torch.autocast(device.type, dtype=torch.float16 if precision == "fp16" else torch.bfloat16))
    # fp16's narrow range would flush small gradients to zero: scaled as torch.amp prescribes (no-op otherwise)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    workers = default_workers(device) if args.workers is None else args.workers
    feed = batches(sampler, stage, it, stop, workers, pin_memory=device.type == "cuda")  # logs who draws them
    for x, y, k in feed:
        lr = stage["lr"] * min(1.0, (it + 1) / max(stage["warmup"], 1)) * (1 - it / total) ** 0.9
        for g in opt.param_groups:
            g["lr"] = lr
        x, k = x.to(device, non_blocking=True), k.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        y = y.long() if task.kind == "softmax" else y.float()
        with autocast:
            logits = net(x)
        logits = logits.float()  # the loss in fp32 whatever the forward pass ran in
        loss = loss_fn(logits, y, k)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        it += 1
        run_loss.append(float(loss.detach()))
        if it % 50 == 0:
            logger.info("it %d loss %.4f lr %.2e %.2f s/it", it, np.mean(run_loss), lr, (time.time() - t0) / 50)
            t0, run_loss = time.time(), []
        if it % args.ckpt_every == 0 or it == stop:
            dice = holdout_dice(net, hold_cases, task, hold_contexts)  # on the training device
            mean = float(np.nanmean(dice))
            history.append({"iteration": it, "holdout_dice": dict(zip([o[0] for o in task.outputs], dice))})
            logger.info("it %d holdout dice %s mean %.3f", it, np.round(dice, 3).tolist(), mean)
            weights = _cast({k_: v.cpu() for k_, v in net.state_dict().items()}, torch.float16)
            if mean > best:
                best = mean
                save_atomic({"model": weights, "iteration": it, "holdout_mean": mean, "stage": stage}, run / "best.pt")
            save_atomic(
                {"model": weights, "iteration": it, "best": best, "history": history, "stage": stage},
                state_path,
            )
            (run / "history.json").write_text(json.dumps({"stage": stage, "history": history}, indent=1))
            t0 = time.time()
            if args.max_minutes and time.time() - started > 60 * args.max_minutes:
                logger.info("stopping after %.1f minutes (--max-minutes)", (time.time() - started) / 60)
                break
    feed.close()  # the worker processes, when the stage stops early
    logger.info("done: %d iterations, best holdout mean Dice %.3f", it, best)


if __name__ == "__main__":
    main()
