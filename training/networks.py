"""The networks a training stage may use, and deep supervision.

A stage names its network (``--network``, recorded in the stage like its other settings);
``training.export`` reads it back from the checkpoint, so a checkpoint is always rebuilt
with the network it was trained with.

* ``unet``: MONAI ``UNet`` (residual units 1, instance norm), the network of every released
  model.  Its first layer is a stride-2 residual unit, so almost nothing is
  computed at full resolution: that is what keeps a 64x80x80 window near 0.3 s on one CPU
  core.  nnU-Net's blocks (MONAI ``DynUNet``: two 3x3x3 convolutions at full resolution)
  with the same widths cost 6.8x that per window (3.99 s against 0.59 s per batch of two,
  one ONNX Runtime thread; 4.0x at 3/4 of the widths; ``python -m training.network_speed``,
  training/results/network-speed-hn_oar.json), which the app's 6 s budget on two cores
  cannot carry.
* ``unet-ds``: the same ``UNet`` trained with deep supervision: 1x1x1 heads on the
  decoder's outputs at 1/2 and 1/4 resolution (upsampled to the patch), whose losses are
  added with weights 1/2 and 1/4 of the full-resolution one (nnU-Net's halving weights,
  normalised to 1; ``deep_supervision_loss``).  The heads exist only while training: in
  ``eval`` mode the network returns the full-resolution logits, the exported ONNX model is
  the plain UNet's graph (same speed), and a released ``unet`` model warm-starts it (the
  heads start fresh).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from monai.networks.nets import UNet

NETWORKS = ("unet", "unet-ds")
DEEP_SUPERVISION_HEADS = 2  # decoder outputs below full resolution that are supervised too
HEADS_PREFIX = "deep_supervision."  # state-dict keys of the training-only heads


class DeepSupervisedUNet(UNet):
    """MONAI ``UNet`` whose decoder outputs at 1/2, 1/4, ... resolution get 1x1x1 heads
    while training; ``forward`` then returns (B, 1 + heads, C, Z, Y, X), full resolution first."""

    def __init__(self, *, heads: int = DEEP_SUPERVISION_HEADS, **kwargs):
        super().__init__(**kwargs)
        if heads >= len(self.channels) - 1:
            raise ValueError(f"{heads} deep-supervision heads need more than {len(self.channels)} levels")
        self._decoded: list[torch.Tensor | None] = [None] * heads
        level = self.model  # Sequential(down, SkipConnection(inner level), up) per level
        for i in range(heads):
            level = level[1].submodule
            level[2].register_forward_hook(self._keep(i))
        # level i + 1's up layer returns channels[i] features at 1 / 2^(i + 1) resolution
        self.deep_supervision = torch.nn.ModuleList(
            torch.nn.Conv3d(self.channels[i], self.out_channels, 1) for i in range(heads)
        )

    def _keep(self, i: int):
        def hook(module, inputs, output):
            if self.training:
                self._decoded[i] = output

        return hook

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if not self.training:
            return out
        heads = [
            F.interpolate(head(self._decoded[i]), size=out.shape[2:], mode="trilinear", align_corners=False)
            for i, head in enumerate(self.deep_supervision)
        ]
        self._decoded = [None] * len(heads)
        return torch.stack([out, *heads], 1)


def build_network(name: str, in_channels: int, out_channels: int, channels: tuple[int, ...]) -> torch.nn.Module:
    """The network ``name`` (one of ``NETWORKS``) with one width per resolution level."""
    kwargs = dict(spatial_dims=3, in_channels=in_channels, out_channels=out_channels, channels=channels,
                  strides=(2,) * (len(channels) - 1), num_res_units=1, norm="instance")
    if name == "unet":
        return UNet(**kwargs)
    if name == "unet-ds":
        return DeepSupervisedUNet(**kwargs)
    raise ValueError(f"unknown network {name!r}: choose one of {', '.join(NETWORKS)}")


def deployable(net: torch.nn.Module) -> torch.nn.Module:
    """What is exported: a deep-supervised UNet becomes the plain ``UNet`` with the same
    weights (its training-only heads dropped); any other network is itself."""
    if not isinstance(net, DeepSupervisedUNet):
        return net
    plain = build_network("unet", net.in_channels, net.out_channels, tuple(net.channels))
    plain.load_state_dict({k: v for k, v in net.state_dict().items() if not k.startswith(HEADS_PREFIX)})
    return plain.train(net.training)


def describe(name: str) -> str:
    """The network's one-line description for model.yaml and the model card."""
    return {
        "unet": "MONAI UNet (3-D, residual units 1, instance norm)",
        "unet-ds": "MONAI UNet (3-D, residual units 1, instance norm), trained with deep supervision on "
        f"{DEEP_SUPERVISION_HEADS} coarser decoder outputs (heads dropped at export)",
    }[name]


def deep_supervision_loss(
    loss_fn: Callable[..., torch.Tensor], output: torch.Tensor, *targets: torch.Tensor
) -> torch.Tensor:
    """``loss_fn(output, *targets)``; for a deep-supervised output (B, heads, C, Z, Y, X),
    the heads' losses weighted 1, 1/2, 1/4, ... and normalised to sum to 1.

    Every head is upsampled to the patch, so each is scored against the same
    full-resolution targets and known-slice flags as the main output.
    """
    if output.dim() != 6:
        return loss_fn(output, *targets)
    heads = output.shape[1]
    weights = torch.tensor([0.5**i for i in range(heads)])
    weights = weights / weights.sum()
    return sum(float(w) * loss_fn(output[:, i], *targets) for i, w in enumerate(weights))
