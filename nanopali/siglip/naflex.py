"""SigLIP 2 NaFlex: one image tower for any aspect ratio and any number of patches (arXiv 2502.14786).

Instead of squashing every image to S×S, NaFlex resizes it so that both sides are multiples of the
patch size p, the aspect ratio is kept as well as it can be, and the patch count is at most a budget
(256 by default): `naflex_size`. The h×w grid of patches is flattened row-major and padded to the
budget; a mask marks the real patches, which is all attention and the pooling head ever read. The
learned position table is one fixed square grid (16×16 in the released models), resized per image to
h×w with antialiased bilinear interpolation. The patch embedding is a linear layer on flattened
patches (p, p, 3) instead of a convolution; everything after the embedding is vit.py's blocks.
References: transformers `Siglip2VisionEmbeddings`, `image_processing_siglip2`; big_vision
`models/proj/image_text/naflex_vit.py`, `pp/proj/image_text/ops_naflex.py`.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..vit import EncoderBlock, SigLIPConfig

# Letters: I images, P patch slots (the budget), h×w an image's patch grid, g×g the table, W width.


def naflex_size(height: int, width: int, patch: int, max_patches: int, eps: float = 1e-5) -> tuple[int, int]:
    """Pixel size (H', W') to resize an image to: multiples of `patch`, at least one patch a side, and
    (H'/p)·(W'/p) ≤ max_patches, from the largest scale a bisection finds (transformers'
    `get_image_size_for_max_num_patches`, step for step, so that the chosen sizes agree exactly)."""

    def side(scale: float, size: int) -> int:
        return max(patch, math.ceil(size * scale / patch) * patch)

    lo, hi = eps / 10, 100.0
    while hi - lo >= eps:
        mid = (lo + hi) / 2
        if (side(mid, height) / patch) * (side(mid, width) / patch) <= max_patches:
            lo = mid
        else:
            hi = mid
    return side(lo, height), side(lo, width)


def patchify(x: np.ndarray, patch: int, max_patches: int) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """(H, W, 3) pixels → (patches (P, p·p·3) zero-padded to P = max_patches, mask (P,), grid (h, w)).

    Patches in row-major order; inside a patch, pixels row-major with the 3 channels last."""
    H, W, C = x.shape
    h, w = H // patch, W // patch
    if h * w > max_patches:
        raise ValueError(f"{h}x{w} = {h * w} patches exceed the budget of {max_patches}")
    p = x.reshape(h, patch, w, patch, C).transpose(0, 2, 1, 3, 4).reshape(h * w, patch * patch * C)
    out = np.zeros((max_patches, p.shape[1]), dtype=x.dtype)
    out[: h * w] = p
    mask = np.zeros(max_patches, dtype=np.int64)
    mask[: h * w] = 1
    return out, mask, (h, w)


def resize_pos_embed(pos: torch.Tensor, grid_hw: torch.Tensor, length: int) -> torch.Tensor:
    """The g×g learned table (g², W) resized to each image's h×w grid → (I, length, W).

    Bilinear, half-pixel centres (align_corners=False) and antialias=True, in float32 (torch has no
    antialiased bf16 kernel on CPU; transformers upcasts there too). Slots past h·w, which are
    masked, repeat the first position as transformers fills them."""
    g = int(round(pos.shape[0] ** 0.5))
    table = pos.float().T.reshape(1, -1, g, g)                                     # (1, W, g, g)
    out = pos.new_empty(grid_hw.shape[0], length, pos.shape[1])
    for i, (h, w) in enumerate(grid_hw.tolist()):
        if h < 1 or w < 1 or h * w > length:
            raise ValueError(f"image {i}: a {h}x{w} patch grid does not fit {length} patch slots")
        r = F.interpolate(table, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        r = r.reshape(pos.shape[1], h * w).T.to(pos.dtype)                           # (h·w, W)
        out[i, : h * w] = r
        out[i, h * w:] = r[0]
    return out


class NaFlexViT(nn.Module):
    """vit.SigLIPEncoder with a linear patch embedding, per-image positions and a patch mask."""

    def __init__(self, cfg: SigLIPConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Linear(3 * cfg.patch_size ** 2, cfg.width)
        self.pos_embed = nn.Parameter(torch.empty(cfg.num_patches, cfg.width))      # the g×g table
        self.blocks = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.attn_impl = "auto"

    def forward(self, patches: torch.Tensor, patch_mask: torch.Tensor, grid_hw: torch.Tensor) -> torch.Tensor:
        """patches (I, P, p·p·3) in [-1, 1], patch_mask (I, P), grid_hw (I, 2) → tokens (I, P, W)."""
        x = self.patch_embed(patches.to(self.patch_embed.weight.dtype))               # (I, P, W)
        x = x + resize_pos_embed(self.pos_embed, grid_hw, patches.shape[1])
        for block in self.blocks:
            x = block(x, self.attn_impl, patch_mask)
        return self.norm(x)
