"""MCi: the hybrid convolutional image encoder of MobileCLIP S0–S4 (arXiv 2311.17049 §4, 2508.20691 §4).

An MCi is a FastViT (arXiv 2303.14189): a MobileOne stem (/4), then stages of blocks at /4, /8, /16,
/32 (and /64 for MCi3 / MCi4, MobileCLIP2's new larger encoders). The early stages mix tokens with
RepMixer (a depthwise conv, reparameterisable); the late stages with self-attention, each preceded by
a conditional positional encoding. A stage after the first starts with a strided patch embedding
(large-kernel conv + 1×1 MobileOne). A final MobileOne conv doubles the width, global average pooling
and a linear head give the embedding. Module names and the layout of every tensor are timm's
(`timm.models.fastvit.FastVit`, `fastvit_mci0` … `fastvit_mci4`), which open_clip wraps as `visual.trunk`.
Letters: B batch, C channels, Y/X height/width of a feature map, T = Y·X tokens, N heads, H head dim, E embedding.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..attention import attention
from .reparam import ConvBN, LayerScale2d, MobileOneBlock, RepConditionalPosEnc, RepMixer, ReparamLargeKernelConv


@dataclass(frozen=True)
class MCiConfig:
    depths: tuple[int, ...] = (2, 6, 10, 2)
    widths: tuple[int, ...] = (64, 128, 256, 512)
    mlp_ratio: float = 3.0
    attention_stages: int = 1
    """How many of the last stages use self-attention (with a positional encoding) instead of RepMixer."""
    se_downsamples: tuple[bool, ...] = (False, False, True, True)
    """Stages whose patch embedding has a squeeze-excite (MCi0–2: the last two; MCi3/4: none)."""
    attention_norm: str = "batch"
    """The norm before attention: "batch" (BatchNorm2d, MCi0–2) or "layer" (LayerNorm over C, eps 1e-5,
    timm LayerNorm2d: MCi3 / MCi4)."""
    stem_scale_branch: bool = True   # MCi3 / MCi4 drop the stem's 1×1 scale branches
    embed_dim: int = 512             # E, the output of the linear head (open_clip's embed_dim)
    image_size: int = 256
    fused: bool = False
    """True: the reparameterised (inference) layout, one `reparam_conv` per block (`reparam.reparameterize`);
    False: the train-time multi-branch layout. Checkpoints come in either; the loader reads which."""

    @property
    def num_features(self) -> int:
        return 2 * self.widths[-1]   # the final conv's width (timm's cls_ratio = 2)


class ConvMlp(nn.Module):
    """Depthwise 7×7 conv+BN → 1×1 expand → GELU → 1×1 project (FastViT's ConvFFN, §3.2.4)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.conv = ConvBN(dim, dim, 7, groups=dim)
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.conv(x))))


class RepMixerBlock(nn.Module):
    def __init__(self, dim: int, mlp_ratio: float, fused: bool):
        super().__init__()
        self.token_mixer = RepMixer(dim, 3, fused)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio))
        self.layer_scale = LayerScale2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.token_mixer(x)
        return x + self.layer_scale(self.mlp(x))


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, Y, X) map (timm `LayerNorm2d`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class Attention(nn.Module):
    """Self-attention over the Y·X positions of a map; heads of H = 32 channels, q/k/v without bias."""

    def __init__(self, dim: int, head_dim: int = 32):
        super().__init__()
        self.num_heads, self.head_dim = dim // head_dim, head_dim
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.attn_impl = "auto"   # attention.py's choice; MobileCLIP.attn_impl sets it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, Y, X = x.shape
        t = x.flatten(2).transpose(1, 2)                                                   # (B, T, C)
        q, k, v = self.qkv(t).view(B, Y * X, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, N, T, H)
        o = attention(q, k, v, scale=self.head_dim ** -0.5, impl=self.attn_impl)              # (B, N, T, H)
        o = o.transpose(1, 2).reshape(B, Y * X, C)
        return self.proj(o).transpose(1, 2).reshape(B, C, Y, X)


class AttentionBlock(nn.Module):
    def __init__(self, dim: int, mlp_ratio: float, norm: str):
        super().__init__()
        self.norm = nn.BatchNorm2d(dim) if norm == "batch" else LayerNorm2d(dim, eps=1e-5)
        self.token_mixer = Attention(dim)
        self.layer_scale_1 = LayerScale2d(dim)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio))
        self.layer_scale_2 = LayerScale2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.layer_scale_1(self.token_mixer(self.norm(x)))
        return x + self.layer_scale_2(self.mlp(x))


class PatchEmbed(nn.Module):
    """Stride-2 downsampling between stages: depthwise-grouped 7×7 (+3×3) conv to the new width, then a
    1×1 MobileOne block. `proj.0.act` is applied (timm's lkc_use_act=True for every MCi)."""

    def __init__(self, c_in: int, c_out: int, use_se: bool, fused: bool):
        super().__init__()
        self.proj = nn.Sequential(ReparamLargeKernelConv(c_in, c_out, 7, 2, groups=c_in, use_se=use_se, fused=fused),
                                  MobileOneBlock(c_out, c_out, 1, fused=fused))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class Stage(nn.Module):
    def __init__(self, c_in: int, c_out: int, depth: int, attention: bool, cfg: MCiConfig, use_se: bool):
        super().__init__()
        self.downsample = PatchEmbed(c_in, c_out, use_se, cfg.fused) if c_in != c_out else nn.Identity()
        self.pos_emb = RepConditionalPosEnc(c_out, 7, cfg.fused) if attention else nn.Identity()
        self.blocks = nn.Sequential(*(AttentionBlock(c_out, cfg.mlp_ratio, cfg.attention_norm) if attention
                                      else RepMixerBlock(c_out, cfg.mlp_ratio, cfg.fused) for _ in range(depth)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.pos_emb(self.downsample(x)))


class ClassifierHead(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.fc = nn.Linear(c_in, c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean((2, 3)))                                                     # (B, C) → (B, E)


class MCi(nn.Module):
    def __init__(self, cfg: MCiConfig):
        super().__init__()
        self.cfg = cfg
        c0, f = cfg.widths[0], cfg.fused
        self.stem = nn.Sequential(                                  # /4: 3×3 s2 full, 3×3 s2 depthwise, 1×1
            MobileOneBlock(3, c0, 3, 2, scale_branch=cfg.stem_scale_branch, fused=f),
            MobileOneBlock(c0, c0, 3, 2, groups=c0, scale_branch=cfg.stem_scale_branch, fused=f),
            MobileOneBlock(c0, c0, 1, fused=f))
        n = len(cfg.depths)
        self.stages = nn.Sequential(*(
            Stage(cfg.widths[max(i - 1, 0)], cfg.widths[i], cfg.depths[i], i >= n - cfg.attention_stages, cfg,
                  cfg.se_downsamples[i]) for i in range(n)))
        self.final_conv = MobileOneBlock(cfg.widths[-1], cfg.num_features, 3, groups=cfg.widths[-1], use_se=True,
                                         fused=f)
        self.head = ClassifierHead(cfg.num_features, cfg.embed_dim)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised pixels → (B, E) image features, not normalised."""
        # A channels-last view (an (B, S, S, 3) image batch permuted) made the CPU conv backward of torch
        # 2.13 corrupt the heap here (the shapes student, nanopali/mobileclip/shapes.py); a copy avoids it.
        x = self.stem(pixel_values.contiguous())
        return self.head(self.final_conv(self.stages(x)))


# ---- presets: timm's fastvit_mci0 … fastvit_mci4 ----
MCI_PRESETS: dict[str, MCiConfig] = {
    "mci0": MCiConfig((2, 6, 10, 2), (64, 128, 256, 512)),                     # MobileCLIP(2)-S0
    "mci1": MCiConfig((4, 12, 20, 4), (64, 128, 256, 512)),                    # MobileCLIP-S1
    "mci2": MCiConfig((4, 12, 24, 4), (80, 160, 320, 640)),                    # MobileCLIP(2)-S2
    "mci3": MCiConfig((2, 12, 24, 4, 2), (96, 192, 384, 768, 1536), 4.0, 2, (False,) * 5, "layer", False, 768),
    "mci4": MCiConfig((2, 12, 24, 4, 4), (128, 256, 512, 1024, 2048), 4.0, 2, (False,) * 5, "layer", False, 768),
}

__all__ = ["MCiConfig", "MCi", "MCI_PRESETS"]
