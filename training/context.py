"""Another model's output as extra input channels ("context"), for training and holdout.

A task with ``Task.context = "hn_oar"`` sees, beside the CT, the released organ model's
label map (argmax of its softmax, the raw network output before post-processing) as one-hot
channels, one per organ.  During training the labels come from that model's TorchScript
file run over each cached patient once (cached on disk under ``training/cache/context/``,
keyed by the model file's hash): the target model learns from the organ model's real
mistakes, not from the clinicians' contours it will never see at inference.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np

from training.data import Case
from training.tasks import TASKS, Task

logger = logging.getLogger(__name__)

__all__ = ["context_labels", "model_label_maps", "one_hot_context"]


def context_labels(cases: list[Case], task: Task, model_ts: Path, cache_dir: Path) -> list[np.ndarray]:
    """uint8 label map (0 = background, i = the context task's output i) per case, from the
    context task's released TorchScript model ``model_ts``; cached per model file."""
    ctx = TASKS[task.context]
    if ctx.kind != "softmax" or tuple(ctx.spacing_zyx) != tuple(task.spacing_zyx):
        raise ValueError(f"{task.name}: context {ctx.name} must be a softmax model on the same grid")
    return model_label_maps(cases, ctx, model_ts, cache_dir)


def model_label_maps(cases: list[Case], source: Task, model_ts: Path, cache_dir: Path) -> list[np.ndarray]:
    """uint8 label map (argmax of the softmax, 0 = background) of the softmax task ``source``'s
    TorchScript model ``model_ts`` over each case (already on ``source``'s grid), cached on disk
    under ``cache_dir/context/<task>-<hash of the model file>/``.  Used for context channels and
    for teacher labels (``training.pseudo``)."""
    import torch  # the training venv's; one_hot_context stays importable without it
    from monai.inferers import sliding_window_inference

    from training.train import normalise

    if source.kind != "softmax":
        raise ValueError(f"{source.name}: label maps come from a softmax model")
    digest = hashlib.sha256(Path(model_ts).read_bytes()).hexdigest()[:12]
    cdir = cache_dir / "context" / f"{source.name}-{digest}"
    cdir.mkdir(parents=True, exist_ok=True)
    net = None
    out = []
    for c in cases:
        path = cdir / f"{c.name}-{c.ct.shape[0]}x{c.ct.shape[1]}x{c.ct.shape[2]}.npy"
        if not path.exists():
            if net is None:
                net = torch.jit.load(str(model_ts), map_location="cpu").eval()
                logger.info("running %s over the patients without a cached label map", model_ts)
            with torch.inference_mode():
                x = torch.from_numpy(normalise(c.ct, source))[None, None]
                logits = sliding_window_inference(x, source.patch_zyx, 1, net, overlap=0.25, mode="gaussian")[0]
            lab = logits.argmax(0).numpy().astype(np.uint8)
            tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
            np.save(tmp, lab)
            os.replace(tmp, path)
        out.append(np.load(path))
    return out


def one_hot_context(labels: np.ndarray, n_labels: int) -> np.ndarray:
    """(n_labels, ...) float32 one-hot of a label map, background (0) left out."""
    return (labels[None] == np.arange(1, n_labels + 1).reshape(-1, *([1] * labels.ndim))).astype(np.float32)
