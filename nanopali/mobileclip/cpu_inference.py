"""MobileCLIP2 inference on CPU: the MCi towers in channels-last, the products through oneDNN. Swaps at load.

oneDNN's convolutions compute in a channels-last (B, Y, X, C) layout; given PyTorch's default (B, C, Y,
X), each convolution reorders its input and output around the kernel, a full pass over the map each
way, and the depthwise convolutions of RepMixer, the positional encoding and the ConvMlp are cheap
enough that those passes dominate them. A map that is channels-last from the stem on stays so through
every convolution, norm, GELU and residual add of MCi, and its attention reads it as (B, T, C) without
a copy (mci.Attention's flatten + transpose is then a view). Measured on MobileCLIP2-S0, batch 1, one
core of an AMD EPYC: 1.22x in bf16, 1.06x in fp32 (docs/speed.md#two-tower-encoders).

Only inference runs channels-last: with autograd recording, MCi runs as written (a channels-last input
made the CPU conv backward of torch 2.13 corrupt the heap, mci.py). The Linears and MLPs of both
towers go through siglip/onednn.py. `use_cpu_inference` is what load_mobileclip_model applies.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..siglip.onednn import onednn_linear, runs_onednn, use_onednn
from .mci import ConvMlp, MCi
from .text import Mlp as TextMlp
from .vit import Mlp as ViTMlp

# MLP class → (up Linear, down Linear, GELU approximation): exact GELU in both towers (open_clip, timm)
MLPS = {TextMlp: ("c_fc", "c_proj", "none"), ViTMlp: ("fc1", "fc2", "none")}


class ChannelsLastMCi(MCi):
    """MCi whose inference on the CPU runs on a channels-last map (see the module docstring)."""

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or pixel_values.device.type != "cpu":
            return super().forward(pixel_values)
        x = self.stem(pixel_values.contiguous(memory_format=torch.channels_last))
        return self.head(self.final_conv(self.stages(x)))


def _pointwise(x: torch.Tensor, conv: nn.Conv2d, gelu: str | None = None) -> torch.Tensor:
    """A 1×1 convolution of a channels-last map as the product it is: (B, Y, X, C) · Wᵀ, GELU fused."""
    y = onednn_linear(x.permute(0, 2, 3, 1), conv.weight.flatten(1), conv.bias, gelu)         # (B, Y, X, O)
    return y.permute(0, 3, 1, 2)                                                            # (B, O, Y, X)


def _runs_pointwise(x: torch.Tensor, *convs: nn.Conv2d) -> bool:
    """oneDNN's product for these 1×1 convolutions of x: inference (siglip/onednn.py), on a channels-last map."""
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and \
        runs_onednn(x, *(c.weight for c in convs))


class OneDNNConvMlp(ConvMlp):
    """ConvMlp with its 1×1 expansion and projection as oneDNN products of the channels-last map, the GELU
    fused into the first (siglip/onednn.py): the GELU's own pass over the (B, 3C, Y, X) hidden map was
    ~15 % of MCi's bf16 time at batch 32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        if not _runs_pointwise(h, self.fc1, self.fc2):
            return super().forward(x)
        return _pointwise(_pointwise(h, self.fc1, "none"), self.fc2)


def use_cpu_inference(model: nn.Module) -> nn.Module:
    """Swap, in place, the MCi tower for ChannelsLastMCi, its ConvMlps for OneDNNConvMlp, and the Linears
    and MLPs of both towers for their oneDNN forms (siglip/onednn.py): the same modules under subclasses,
    parameters and state_dict keys unchanged. Returns the model."""
    for m in model.modules():
        if type(m) is MCi:
            m.__class__ = ChannelsLastMCi
        elif type(m) is ConvMlp:
            m.__class__ = OneDNNConvMlp
    return use_onednn(model, MLPS)


__all__ = ["ChannelsLastMCi", "OneDNNConvMlp", "use_cpu_inference"]
