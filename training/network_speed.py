"""What a candidate network would cost the app: ONNX Runtime CPU seconds per batch of two
windows, before any training (random weights; the cost does not depend on them).

    python -m training.network_speed                       # unet (float32, int8) and nnU-Net blocks, hn_oar's widths
    python -m training.network_speed --threads 1 --json training/results/network-speed.json

The app runs each model with one ONNX Runtime thread beside the other (``--workers 2``),
so ``--threads 1`` is the figure that matters; the hn_oar branch (6 windows on hn-chus-052)
is the app's critical path.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from monai.networks.nets import DynUNet

from training.networks import build_network
from training.tasks import TASKS


def nnunet_blocks(in_channels: int, out_channels: int, channels: tuple[int, ...]) -> torch.nn.Module:
    """MONAI DynUNet as nnU-Net builds it (two 3x3x3 convolutions per level, the first level at
    full resolution, residual blocks, instance norm), with the given widths."""
    levels = len(channels)
    return DynUNet(spatial_dims=3, in_channels=in_channels, out_channels=out_channels, kernel_size=[3] * levels,
                   strides=[1] + [2] * (levels - 1), upsample_kernel_size=[2] * (levels - 1), filters=list(channels),
                   norm_name="instance", res_block=True)


def int8(path: str, patch: tuple[int, int, int]) -> str:
    """``path`` statically quantised to int8 (ONNX Runtime's QDQ format, unsigned activations,
    signed per-channel weights), calibrated on random windows: the scales do not change the cost."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quant_pre_process, quantize_static

    class Windows(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(1)
            self.batches = iter([{"image": rng.random((1, 1, *patch), dtype=np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self.batches, None)

    pre, out = path.replace(".onnx", "-pre.onnx"), path.replace(".onnx", "-int8.onnx")
    quant_pre_process(path, pre)
    quantize_static(pre, out, Windows(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, per_channel=True)
    return out


def seconds_per_batch(
    net: torch.nn.Module, patch: tuple[int, int, int], threads: int, repeats: int, quantise: bool = False
) -> float:
    """Median ONNX Runtime seconds for one batch of two windows of ``patch`` (after one warm-up run);
    ``quantise``: of the network quantised to int8 (``int8``)."""
    x = torch.zeros(1, 1, *patch)
    with tempfile.TemporaryDirectory() as d:
        path = str(Path(d) / "net.onnx")
        torch.onnx.export(net.eval(), x, path, input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "batch"}}, opset_version=17, dynamo=False)
        if quantise:
            path = int8(path, patch)
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    batch = np.random.default_rng(0).random((2, 1, *patch), dtype=np.float32)
    session.run(None, {"image": batch})
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        session.run(None, {"image": batch})
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=sorted(TASKS), default="hn_oar")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    task = TASKS[args.task]
    narrow = tuple(max(4, c * 3 // 4) for c in task.channels)
    wide = tuple(c * 3 // 2 for c in task.channels)
    unet = build_network("unet", 1, task.out_channels, task.channels)
    candidates = [
        ("unet", task.channels, unet, False),
        ("unet, int8 (static, QDQ)", task.channels, unet, True),
        ("unet, 1.5x widths", wide, build_network("unet", 1, task.out_channels, wide), False),
        ("nnU-Net blocks (DynUNet)", task.channels, nnunet_blocks(1, task.out_channels, task.channels), False),
        ("nnU-Net blocks (DynUNet)", narrow, nnunet_blocks(1, task.out_channels, narrow), False),
    ]
    rows = []
    for name, widths, net, quantise in candidates:
        s = seconds_per_batch(net, task.patch_zyx, args.threads, args.repeats, quantise)
        rows.append({"network": name, "channels": list(widths), "parameters": sum(p.numel() for p in net.parameters()),
                     "ort_s_per_batch_of_2": round(s, 3)})
        print(f"{name:26s} channels {str(list(widths)):26s} {rows[-1]['parameters'] / 1e6:5.2f} M parameters  "  # noqa: T201
              f"{s:.3f} s per batch of 2 ({args.threads} thread(s))")
    if args.json:
        args.json.write_text(json.dumps({"task": task.name, "patch_zyx": list(task.patch_zyx), "threads": args.threads,
                                         "host_cpus": __import__("os").cpu_count(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
