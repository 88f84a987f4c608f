"""SigLIP So400m/14: the image encoder (PaliGemma paper §3.1; SigLIP, arXiv 2303.15343).

A plain pre-LayerNorm ViT: 14x14 patches → linear patch embedding → + learned position embedding
(one vector per patch, no class token) → L blocks → final LayerNorm. PaliGemma uses every patch
token (no pooling head), so a 224 px image becomes 16x16 = 256 tokens, 448 px 1024, 896 px 4096.
References: transformers `modeling_siglip.SiglipVisionTransformer` (with `vision_use_head=False`),
big_vision `models/vit.py` `_Model(pool_type='none')`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import attention

# Letters: B batch, P patches (image tokens), W width, N heads, H head dim.


@dataclass(frozen=True)
class SigLIPConfig:
    width: int = 1152          # W
    depth: int = 27
    mlp_dim: int = 4304
    num_heads: int = 16        # N; head dim H = W / N = 72
    patch_size: int = 14
    image_size: int = 224
    layer_norm_eps: float = 1e-6

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads


class SelfAttention(nn.Module):
    def __init__(self, cfg: SigLIPConfig):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.q = nn.Linear(cfg.width, cfg.width)
        self.k = nn.Linear(cfg.width, cfg.width)
        self.v = nn.Linear(cfg.width, cfg.width)
        self.o = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor, attn_impl: str, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """key_mask (B, P), 1 = real: rows padded on the right (SigLIP's text tower, SigLIP 2 NaFlex patches),
        whose pads no query may read. None = full attention (PaliGemma's fixed-size images)."""
        B, P, W = x.shape
        q, k, v = (proj(x).view(B, P, self.num_heads, self.head_dim).transpose(1, 2)  # (B, N, P, H)
                   for proj in (self.q, self.k, self.v))
        o = attention(q, k, v, key_mask=key_mask, scale=self.head_dim ** -0.5, impl=attn_impl)  # (B, N, P, H)
        return self.o(o.transpose(1, 2).reshape(B, P, W))


class MLP(nn.Module):
    def __init__(self, cfg: SigLIPConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.width)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class EncoderBlock(nn.Module):
    def __init__(self, cfg: SigLIPConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.attn = SelfAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, attn_impl: str, key_mask: torch.Tensor | None = None):
        x = x + self.attn(self.norm1(x), attn_impl, key_mask)
        return x + self.mlp(self.norm2(x))


class SigLIPEncoder(nn.Module):
    def __init__(self, cfg: SigLIPConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size)
        self.pos_embed = nn.Parameter(torch.empty(cfg.num_patches, cfg.width))
        self.blocks = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.attn_impl = "auto"
        self.gradient_checkpointing = False

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (B, 3, S, S) in [-1, 1] → image tokens (B, P, W)."""
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))  # (B, W, S/14, S/14)
        x = x.flatten(2).transpose(1, 2) + self.pos_embed                     # (B, P, W), row-major patches
        for block in self.blocks:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, self.attn_impl, use_reentrant=False)
            else:
                x = block(x, self.attn_impl)
        return self.norm(x)


def resample_pos_embed(pos: torch.Tensor, num_patches: int) -> torch.Tensor:
    """Learned position embeddings (P, W) moved to another grid (num_patches, W): the paper's stage 2
    (PaliGemma §3.2.3, 224 → 448 → 896 px) starts from the lower resolution's table this way.

    Bilinear on the 2-D grid with corners aligned, which is what big_vision's `resample_posemb`
    computes (scipy.ndimage.zoom, order=1). The same size returns the table unchanged."""
    old, new = int(round(pos.shape[0] ** 0.5)), int(round(num_patches ** 0.5))
    if old * old != pos.shape[0] or new * new != num_patches:
        raise ValueError(f"position tables must be square grids, got {pos.shape[0]} → {num_patches} patches")
    if old == new:
        return pos
    grid = pos.float().T.reshape(1, -1, old, old)                                # (1, W, g, g)
    grid = F.interpolate(grid, size=(new, new), mode="bilinear", align_corners=True)
    return grid.reshape(pos.shape[1], new * new).T.to(pos.dtype).contiguous()     # (num_patches, W)
