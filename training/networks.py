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


def _unet_layers(levels: int) -> list[tuple[str, str, int, list[str], int]]:
    """The weight tensors of a MONAI ``UNet`` (``num_res_units=1``) as ``(key prefix, space it
    produces, its output dim, spaces it consumes in order, their input dim)``.

    Feature spaces: ``D<i>`` the output of down level ``i`` (``channels[i]`` wide; the bottom
    level is ``D<levels-1>``), ``U<i>`` the output of up level ``i`` (``channels[i-1]`` wide;
    ``U0`` is the network's output, ``in`` its input).  Up level ``i`` reads ``D<i>`` and
    ``U<i+1>`` concatenated (``D<levels-1>`` for the deepest).
    """
    layers = []
    prefix = "model."
    for i in range(levels - 1):
        src = "in" if i == 0 else f"D{i - 1}"
        deeper = f"D{levels - 1}" if i == levels - 2 else f"U{i + 1}"
        for part in ("conv.unit0.conv", "residual"):
            layers.append((f"{prefix}0.{part}", f"D{i}", 0, [src], 1))
        layers.append((f"{prefix}2.0.conv", f"U{i}", 1, [f"D{i}", deeper], 0))  # transposed: (in, out, ...)
        layers.append((f"{prefix}2.1.conv.unit0.conv", f"U{i}", 0, [f"U{i}"], 1))  # identity residual
        prefix += "1.submodule."
    for part in ("conv.unit0.conv", "residual"):  # the bottom level's residual unit
        layers.append((f"{prefix}{part}", f"D{levels - 1}", 0, [f"D{levels - 2}"], 1))
    return layers


def unet_channels(state: dict[str, torch.Tensor]) -> tuple[int, ...]:
    """The widths of the MONAI ``UNet`` whose state dict is ``state`` (one per level; empty
    for any other network)."""
    widths, prefix = [], "model."
    while f"{prefix}0.conv.unit0.conv.weight" in state:
        widths.append(state[f"{prefix}0.conv.unit0.conv.weight"].shape[0])
        prefix += "1.submodule."
    bottom = state.get(f"{prefix}conv.unit0.conv.weight")
    return () if bottom is None else (*widths, bottom.shape[0])


def widen(
    src: dict[str, torch.Tensor], net: torch.nn.Module, generator: torch.Generator, noise: float = 0.0
) -> dict[str, torch.Tensor]:
    """``net``'s state dict holding the narrower MONAI ``UNet`` weights ``src``, widened so that
    ``net`` computes exactly the same function (Net2Net's function-preserving widening, Chen
    et al. 2016).

    Each new channel of a feature space copies a randomly chosen old one (its incoming weights
    and bias); every layer reading the space splits each old channel's weights among its
    copies by random fractions that sum to one, so the sums (and the instance norms and
    shared PReLUs after them) are unchanged.  The unequal fractions give the copies
    different gradients, so they drift apart in training and the extra channels become
    capacity.  Spaces of unchanged width are copied as they are.  ``noise`` > 0 adds Gaussian
    noise of that fraction of each tensor's standard deviation to the new channels' incoming
    weights, to break the symmetry harder (the start is then only close to the old function).
    """
    if not isinstance(net, UNet):
        raise ValueError(f"can only widen a MONAI UNet, not {type(net).__name__}")
    channels = tuple(net.channels)
    if len(unet_channels(src)) != len(channels):
        raise ValueError(f"widen: {len(unet_channels(src))} levels cannot become {len(channels)}")
    layers = _unet_layers(len(channels))
    old = {space: src[f"{key}.weight"].shape[dim] for key, space, dim, _, _ in layers}
    new = {f"D{i}": c for i, c in enumerate(channels)} | {f"U{i}": c for i, c in enumerate((net.out_channels,) + channels[:-2])}
    old["in"] = new["in"] = net.in_channels
    shrinks = [s for s in new if new[s] < old[s]]
    if shrinks:
        raise ValueError(f"widen: {', '.join(shrinks)} would get narrower ({old[shrinks[0]]} -> {new[shrinks[0]]})")
    # channel j of a space copies old channel maps[space][j]: itself for the old ones
    maps = {s: torch.cat([torch.arange(old[s]), torch.randint(old[s], (new[s] - old[s],), generator=generator)])
            for s in new}

    def fractions(space: str) -> torch.Tensor:
        # random split of each old channel among its copies (exactly 1 for a channel never copied)
        r = torch.rand(new[space], generator=generator) + 0.5
        total = torch.zeros(old[space]).index_add_(0, maps[space], r)
        return r / total[maps[space]]

    out = {k: v.clone() for k, v in net.state_dict().items()}
    for key, space, out_dim, reads, in_dim in layers:
        w = src[f"{key}.weight"].float()
        index = torch.cat([maps[s] + sum(old[t] for t in reads[:n]) for n, s in enumerate(reads)])
        scale = torch.cat([fractions(s) for s in reads])
        w = w.index_select(in_dim, index) * scale.reshape([-1 if d == in_dim else 1 for d in range(w.ndim)])
        w = w.index_select(out_dim, maps[space])
        if noise > 0 and new[space] > old[space]:
            fresh = [slice(None)] * w.ndim
            fresh[out_dim] = slice(old[space], None)
            w[tuple(fresh)] += noise * float(w.std()) * torch.randn(w[tuple(fresh)].shape, generator=generator)
        out[f"{key}.weight"] = w
        out[f"{key}.bias"] = src[f"{key}.bias"].float().index_select(0, maps[space])
    widened = {f"{key}.{p}" for key, *_ in layers for p in ("weight", "bias")}
    for k, v in src.items():  # the PReLUs' shared slopes
        if k not in widened:
            out[k] = v.float().clone()
    return out
