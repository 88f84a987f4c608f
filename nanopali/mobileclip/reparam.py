"""Structural reparameterisation: the multi-branch blocks MCi trains with, and the one conv each folds into.

MobileCLIP's image encoders (MCi, arXiv 2311.17049 §4; FastViT, arXiv 2303.14189 §3.2) train with
several linear branches per layer (a k×k conv + BN, a 1×1 "scale" conv + BN, a BN "identity" skip) and
run with one k×k conv: every branch is linear in x, so after training their kernels and biases add up
(RepVGG, arXiv 2101.03697). Four block kinds do this, each named and laid out as timm's
(`timm.models.fastvit`: MobileOneBlock, ReparamLargeKernelConv, RepMixer, RepConditionalPosEnc), so a
checkpoint's tensor names carry over unchanged. `reparameterize(model)` folds every one of them in
place; the folded block keeps one tensor pair, `reparam_conv.{weight,bias}`, as timm's does.
Letters: B batch, C channels, O output channels, G groups, k kernel side, Y/X height/width.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def conv2d(c_in: int, c_out: int, k: int, stride: int = 1, groups: int = 1, bias: bool = True) -> nn.Conv2d:
    """timm's `create_conv2d` with its default symmetric padding ((stride - 1) + (k - 1)) // 2."""
    return nn.Conv2d(c_in, c_out, k, stride, ((stride - 1) + (k - 1)) // 2, groups=groups, bias=bias)


class ConvBN(nn.Module):
    """conv (no bias) → BatchNorm: one linear branch (timm `ConvNormAct(apply_act=False)`)."""

    def __init__(self, c_in: int, c_out: int, k: int, stride: int = 1, groups: int = 1):
        super().__init__()
        self.conv = conv2d(c_in, c_out, k, stride, groups, bias=False)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


def fold_bn(kernel: torch.Tensor, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """The (kernel, bias) of conv(kernel) → bn at inference: BN is x ↦ γ (x - μ) / σ + β per channel."""
    std = (bn.running_var + bn.eps).sqrt()
    t = bn.weight / std
    return kernel * t.reshape(-1, 1, 1, 1), bn.bias - bn.running_mean * t


def identity_kernel(channels: int, groups: int, k: int, like: torch.Tensor) -> torch.Tensor:
    """The (C, C/G, k, k) kernel that copies each channel: a 1 at the centre of its own input slot."""
    w = torch.zeros(channels, channels // groups, k, k, dtype=like.dtype, device=like.device)
    w[torch.arange(channels), torch.arange(channels) % (channels // groups), k // 2, k // 2] = 1
    return w


def _pad_to(kernel: torch.Tensor, k: int) -> torch.Tensor:
    """A small centred kernel as a k×k one (the padding keeps the same output positions)."""
    p = (k - kernel.shape[-1]) // 2
    return F.pad(kernel, [p, p, p, p])


def _fused_conv(block: nn.Module, weight: torch.Tensor, bias: torch.Tensor, stride: int, groups: int) -> None:
    """Replace `block`'s branches by `reparam_conv` holding (weight, bias)."""
    conv = conv2d(weight.shape[1] * groups, weight.shape[0], weight.shape[-1], stride, groups)
    conv.weight, conv.bias = nn.Parameter(weight.detach().clone()), nn.Parameter(bias.detach().clone())
    block.reparam_conv = conv.to(weight.device)


class SqueezeExcite(nn.Module):
    """x · sigmoid(fc2(relu(fc1(mean over Y, X)))) (timm `SEModule`; its rd_channels is passed in)."""

    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, reduced, 1)
        self.fc2 = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True)))))


def se_channels(channels: int, ratio: float, divisor: int) -> int:
    """timm `make_divisible(channels · ratio, divisor, round_limit=0)`: the SE bottleneck width."""
    return max(divisor, int(channels * ratio + divisor / 2) // divisor * divisor)


class MobileOneBlock(nn.Module):
    """act(se(Σ branches)): k×k conv+BN (×num_conv_branches), 1×1 conv+BN (the scale branch, k > 1),
    BN alone (the identity branch, when shapes allow). MobileOne, arXiv 2206.04040 §3."""

    def __init__(self, c_in: int, c_out: int, k: int, stride: int = 1, groups: int = 1, *, use_se: bool = False,
                 act: bool = True, scale_branch: bool = True, num_conv_branches: int = 1, fused: bool = False):
        super().__init__()
        self.c_in, self.c_out, self.k, self.stride, self.groups = c_in, c_out, k, stride, groups
        self.se = SqueezeExcite(c_out, se_channels(c_out, 1 / 16, 1)) if use_se else nn.Identity()
        self.act = nn.GELU() if act else nn.Identity()
        if fused:
            self.reparam_conv = conv2d(c_in, c_out, k, stride, groups)
            return
        self.reparam_conv = None
        self.identity = nn.BatchNorm2d(c_in) if c_in == c_out and stride == 1 else None
        self.conv_kxk = nn.ModuleList(ConvBN(c_in, c_out, k, stride, groups) for _ in range(num_conv_branches)) \
            if num_conv_branches else None
        self.conv_scale = ConvBN(c_in, c_out, 1, stride, groups) if k > 1 and scale_branch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reparam_conv is not None:
            return self.act(self.se(self.reparam_conv(x)))
        out = 0
        if self.conv_scale is not None:
            out = self.conv_scale(x)
        if self.identity is not None:
            out = out + self.identity(x)
        for branch in self.conv_kxk or ():
            out = out + branch(x)
        return self.act(self.se(out))

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(O, C/G, k, k) kernel and (O,) bias of the sum of the branches."""
        if self.reparam_conv is not None:
            return self.reparam_conv.weight, self.reparam_conv.bias
        like = next(self.parameters())
        w = torch.zeros(self.c_out, self.c_in // self.groups, self.k, self.k, dtype=like.dtype, device=like.device)
        b = torch.zeros(self.c_out, dtype=like.dtype, device=like.device)
        parts = [(br.conv.weight, br.bn) for br in self.conv_kxk or ()]
        if self.conv_scale is not None:
            parts.append((_pad_to(self.conv_scale.conv.weight, self.k), self.conv_scale.bn))
        if self.identity is not None:
            parts.append((identity_kernel(self.c_in, self.groups, self.k, like), self.identity))
        for kernel, bn in parts:
            kw, kb = fold_bn(kernel, bn)
            w, b = w + kw, b + kb
        return w, b

    def reparameterize(self) -> None:
        if self.reparam_conv is not None:
            return
        w, b = self.folded()
        _fused_conv(self, w, b, self.stride, self.groups)
        self.identity = self.conv_kxk = self.conv_scale = None


class ReparamLargeKernelConv(nn.Module):
    """act(se(large k×k conv+BN + small 3×3 conv+BN)): the downsampling conv of MCi's patch embedding
    (RepLKNet, arXiv 2203.06717; FastViT §3.2.3)."""

    def __init__(self, c_in: int, c_out: int, k: int, stride: int, groups: int, small_k: int = 3, *,
                 use_se: bool = False, act: bool = True, fused: bool = False):
        super().__init__()
        self.k, self.stride, self.groups = k, stride, groups
        self.se = SqueezeExcite(c_out, se_channels(c_out, 0.25, 8)) if use_se else nn.Identity()
        self.act = nn.GELU() if act else nn.Identity()
        if fused:
            self.reparam_conv = conv2d(c_in, c_out, k, stride, groups)
            return
        self.reparam_conv = None
        self.large_conv = ConvBN(c_in, c_out, k, stride, groups)
        self.small_conv = ConvBN(c_in, c_out, small_k, stride, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.reparam_conv(x) if self.reparam_conv is not None else self.large_conv(x) + self.small_conv(x)
        return self.act(self.se(out))

    def reparameterize(self) -> None:
        if self.reparam_conv is not None:
            return
        w, b = fold_bn(self.large_conv.conv.weight, self.large_conv.bn)
        sw, sb = fold_bn(self.small_conv.conv.weight, self.small_conv.bn)
        _fused_conv(self, w + _pad_to(sw, self.k), b + sb, self.stride, self.groups)
        del self.large_conv, self.small_conv


class LayerScale2d(nn.Module):
    """x · γ per channel; γ (C, 1, 1) as timm stores it."""

    def __init__(self, channels: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((channels, 1, 1), 1e-5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class RepMixer(nn.Module):
    """x + γ · (mixer(x) - norm(x)): FastViT's token mixer (§3.2.1), a depthwise k×k conv that, with
    its BN "norm" subtracted, folds together with the skip into one depthwise conv at inference."""

    def __init__(self, dim: int, k: int = 3, fused: bool = False):
        super().__init__()
        self.dim, self.k = dim, k
        if fused:
            self.reparam_conv = conv2d(dim, dim, k, groups=dim)
            return
        self.reparam_conv = None
        self.norm = MobileOneBlock(dim, dim, k, groups=dim, act=False, scale_branch=False, num_conv_branches=0)
        self.mixer = MobileOneBlock(dim, dim, k, groups=dim, act=False)
        self.layer_scale = LayerScale2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reparam_conv is not None:
            return self.reparam_conv(x)
        return x + self.layer_scale(self.mixer(x) - self.norm(x))

    def reparameterize(self) -> None:
        if self.reparam_conv is not None:
            return
        (mw, mb), (nw, nb) = self.mixer.folded(), self.norm.folded()
        g = self.layer_scale.gamma                                                   # (C, 1, 1)
        w = identity_kernel(self.dim, self.dim, self.k, mw) + g.unsqueeze(-1) * (mw - nw)   # (C, 1, k, k)
        _fused_conv(self, w, g.flatten() * (mb - nb), 1, self.dim)
        del self.norm, self.mixer, self.layer_scale


class RepConditionalPosEnc(nn.Module):
    """x + depthwise 7×7 conv(x): conditional positional encoding (arXiv 2102.10882) before MCi's
    attention stages; the skip folds into the kernel's centre."""

    def __init__(self, dim: int, k: int = 7, fused: bool = False):
        super().__init__()
        self.dim, self.k = dim, k
        if fused:
            self.reparam_conv = conv2d(dim, dim, k, groups=dim)
            return
        self.reparam_conv = None
        self.pos_enc = conv2d(dim, dim, k, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reparam_conv(x) if self.reparam_conv is not None else self.pos_enc(x) + x

    def reparameterize(self) -> None:
        if self.reparam_conv is not None:
            return
        w = identity_kernel(self.dim, self.dim, self.k, self.pos_enc.weight) + self.pos_enc.weight
        _fused_conv(self, w, self.pos_enc.bias, 1, self.dim)
        del self.pos_enc


REPARAMETERIZABLE = (MobileOneBlock, ReparamLargeKernelConv, RepMixer, RepConditionalPosEnc)


@torch.no_grad()
def reparameterize(model: nn.Module) -> nn.Module:
    """Fold every multi-branch block of `model` into its single conv, in place; returns the model.

    The folded model computes what the train-time one computes in eval mode (BN with its running
    statistics), up to float rounding; training it afterwards trains the plain convs. A RepMixer folds
    its own two inner MobileOneBlocks, so those are not folded on their own."""
    inner = {id(m) for r in model.modules() if isinstance(r, RepMixer) for m in (getattr(r, "norm", None),
                                                                                getattr(r, "mixer", None))}
    for m in list(model.modules()):
        if isinstance(m, REPARAMETERIZABLE) and id(m) not in inner:
            m.reparameterize()
    return model
