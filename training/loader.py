"""The training loop's patch batches, drawn in worker processes so that a GPU does not wait.

One augmented 64 x 80 x 80 patch costs about 28 ms of one CPU core (rotation and scaling by
``map_coordinates``, intensity transforms; AMD EPYC Zen 3).  On two CPU cores that is 5 % of
an iteration; on a GPU, whose forward and backward pass of batch two take a few tens of
milliseconds, one process drawing the patches would leave the GPU idle most of the time.

A stage's patch stream (its ``stream`` key) is one of two kinds:

* ``per-iteration`` (new stages from 2026-12-05): batch ``i`` is drawn with its own generator,
  seeded from (stage seed, ``i``).  Any number of worker processes (``--workers``, torch's
  ``DataLoader``) yields exactly the same batches in the same order, and a resumed stage
  continues the very stream an uninterrupted run would have drawn.
* ``sequential`` (every stage before; ``--stream sequential`` for a new one that must draw the
  patches of such a stage, e.g. to match an older control): one generator drawn in order,
  seeded from (seed, iteration) when the stage starts or resumes.  It can only be drawn in
  the training process; ``--workers`` is then not used.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

logger = logging.getLogger(__name__)

STREAMS = ("per-iteration", "sequential")
# separates the per-iteration generators from the sequential stream's (seed, iteration)
_PER_ITERATION = 1


def batch_generator(seed: int, iteration: int) -> np.random.Generator:
    """The generator of batch ``iteration`` of a per-iteration stream."""
    return np.random.default_rng([seed, _PER_ITERATION, iteration])


def stack(patches: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(inputs, targets, known flags) of a batch, each stacked along a new first axis."""
    return tuple(np.stack([p[j] for p in patches]) for j in range(3))


class PatchBatches(Dataset):
    """Batch ``i`` of a per-iteration stream: ``batch`` patches of ``sampler`` (``training.train.Sampler``)
    drawn with :func:`batch_generator`."""

    def __init__(self, sampler, batch: int, seed: int):
        self.sampler, self.batch, self.seed = sampler, batch, seed

    def __getitem__(self, iteration: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rng = batch_generator(self.seed, iteration)
        return stack([self.sampler.sample(rng) for _ in range(self.batch)])


def default_workers(device: torch.device) -> int:
    """Worker processes when ``--workers`` is not given: none on a CPU (the training threads
    have the cores), on a CUDA GPU all cores but two, at most 8."""
    if device.type != "cuda":
        return 0
    return max(0, min(8, (os.cpu_count() or 1) - 2))


def batches(
    sampler, stage: dict, start: int, stop: int, workers: int = 0, pin_memory: bool = False
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The stage's batches ``start`` .. ``stop - 1`` as CPU tensors (inputs, targets, known flags).

    ``stage`` gives ``batch``, ``seed`` and ``stream`` (absent: ``sequential``, every stage saved
    before the key existed)."""
    stream = stage.get("stream", "sequential")
    if stream not in STREAMS:
        raise ValueError(f"stage stream {stream!r}: expected one of {', '.join(STREAMS)}")
    if stream == "sequential":
        if workers:
            logger.info("this stage's patch stream is sequential (a stage started before --workers, or "
                        "--stream sequential): drawn in the training process, --workers %d not used", workers)
        else:
            logger.info("patch stream sequential, drawn in the training process")
        for _ in range(start, stop):
            yield tuple(torch.from_numpy(a) for a in stack([sampler.sample() for _ in range(stage["batch"])]))
        return
    logger.info("patch stream per-iteration, %d worker processes", workers)
    loader = DataLoader(
        PatchBatches(sampler, stage["batch"], stage["seed"]), batch_size=None, sampler=range(start, stop),
        num_workers=workers, pin_memory=pin_memory, prefetch_factor=4 if workers else None,
        multiprocessing_context="fork" if workers else None,  # the workers share the sampler's volumes
    )
    yield from loader


def main() -> None:
    """Time the patch stream alone: batches per second with ``--workers`` processes."""
    import argparse
    import time
    from pathlib import Path

    from training.augment import AugmentConfig
    from training.tasks import TASKS
    from training.train import ROOT, Sampler, cached_cases, split_cases

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--task", choices=sorted(TASKS), default="hn_oar")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/openkbp/train")
    ap.add_argument("--batches", type=int, default=50)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--workers", type=int, nargs="+", default=[0])
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    task = TASKS[args.task]
    if task.context:
        raise SystemExit(f"{args.task}: a task with a context model; time its stream through training.train")
    train_cases, _ = split_cases(cached_cases(args.data, task.spacing_zyx, ROOT / "training/cache"), 10)
    sampler = Sampler(train_cases, task, np.random.default_rng(0), AugmentConfig())
    stage = {"batch": args.batch, "seed": 0, "stream": "per-iteration"}
    for workers in args.workers:
        warmup = 4 * max(workers, 1)  # the workers started and their first batches out
        feed = batches(sampler, stage, 0, warmup + args.batches, workers)
        for _ in range(warmup):
            next(feed)
        t0 = time.perf_counter()
        for _ in range(args.batches):
            next(feed)
        seconds = (time.perf_counter() - t0) / args.batches
        feed.close()
        print(f"{args.task}: {workers} workers, {seconds * 1000:.0f} ms per batch of {args.batch} "
              f"({1 / seconds:.1f} batches/s, {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
