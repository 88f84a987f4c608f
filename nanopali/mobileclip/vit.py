"""The ViT image encoders of MobileCLIP2-B and MobileCLIP2-L-14 (arXiv 2508.20691 §4; MobileCLIP §5).

Both are plain pre-LN ViTs with a class token read out after the final LayerNorm, then a linear head
to the embedding. They differ at the input:
  B ("ViT-B/16 with MCi's convolutional stem", timm `vit_base_mci_224`): 4×4/4 conv+BN+GELU,
    2×2/2 conv+BN+GELU, 2×2/2 conv to the width (the 16×16 patch grid), positions for the patches only,
    then the class token (timm no_embed_class); LayerNorm eps 1e-6.
  L-14 (timm `vit_large_patch14_clip_224`, the OpenAI CLIP layout): a 14×14 patch conv without bias,
    positions for [class, patches], a LayerNorm before the blocks (norm_pre); eps 1e-5.
Names and layouts are timm's `VisionTransformer` (open_clip wraps it as `visual.trunk`).
Letters: B batch, P patches, T = 1 + P tokens, W width, N heads, H head dim, E embedding.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..attention import attention


@dataclass(frozen=True)
class ViTConfig:
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    patch_size: int = 16
    image_size: int = 224
    stem: str = "conv"
    """"conv": MCi's three-conv stem and positions for patches only (B); "patch": one patch conv and
    positions that include the class token, plus a LayerNorm before the blocks (CLIP L-14)."""
    layer_norm_eps: float = 1e-6
    embed_dim: int = 512

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class ConvNormAct(nn.Module):
    def __init__(self, c_in: int, c_out: int, k: int, norm_act: bool):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, k, bias=not norm_act)
        self.bn = nn.BatchNorm2d(c_out) if norm_act else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return x if self.bn is None else F.gelu(self.bn(x))


class ConvStem(nn.Module):
    """timm `HybridEmbed(ConvStem(channels=(W/4, W/4, W), stride=kernel=(4, 2, 2)), proj=False)`."""

    def __init__(self, width: int):
        super().__init__()
        self.backbone = nn.Sequential(ConvNormAct(3, width // 4, 4, True), ConvNormAct(width // 4, width // 4, 2, True),
                                      ConvNormAct(width // 4, width, 2, False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x).flatten(2).transpose(1, 2)                                # (B, P, W)


class PatchConv(nn.Module):
    def __init__(self, width: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(3, width, patch, patch, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)                                    # (B, P, W)


class Attention(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.width // cfg.num_heads
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)
        self.attn_impl = "auto"   # attention.py's choice; MobileCLIP.attn_impl sets it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, W = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, N, T, H)
        o = attention(q, k, v, scale=self.head_dim ** -0.5, impl=self.attn_impl)                 # (B, N, T, H)
        return self.proj(o.transpose(1, 2).reshape(B, T, W))


class Mlp(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))   # exact (erf) GELU, timm's nn.GELU default


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = Mlp(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        conv = cfg.stem == "conv"
        self.patch_embed = ConvStem(cfg.width) if conv else PatchConv(cfg.width, cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches + (0 if conv else 1), cfg.width))
        self.norm_pre = None if conv else nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.blocks = nn.Sequential(*(Block(cfg) for _ in range(cfg.depth)))
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.head = nn.Linear(cfg.width, cfg.embed_dim)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised pixels → (B, E) image features, not normalised."""
        x = self.patch_embed(pixel_values)                                                # (B, P, W)
        if x.shape[1] != self.cfg.num_patches:
            raise ValueError(f"Images of {tuple(pixel_values.shape[-2:])} px give {x.shape[1]} patches; this "
                             f"tower has positions for {self.cfg.image_size} px ({self.cfg.num_patches} patches)")
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        if self.norm_pre is None:
            x = torch.cat([cls, x + self.pos_embed], 1)                                   # (B, T, W)
        else:
            x = self.norm_pre(torch.cat([cls, x], 1) + self.pos_embed)
        return self.head(self.norm(self.blocks(x))[:, 0])                                 # (B, E)


VIT_PRESETS: dict[str, ViTConfig] = {
    "vit-b-mci": ViTConfig(768, 12, 12, 3072, 16, 224, "conv", 1e-6, 512),             # MobileCLIP(2)-B
    "vit-l14-clip": ViTConfig(1024, 24, 16, 4096, 14, 224, "patch", 1e-5, 768),       # MobileCLIP2-L-14
}

__all__ = ["ViTConfig", "ViT", "VIT_PRESETS"]
