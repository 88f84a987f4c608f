"""The text tower of MobileCLIP2: OpenAI CLIP's text transformer (arXiv 2103.00020 §2.4).

[SOT] text [EOT] 0 0 … (77 ids, tokenizer.py) → token embedding + learned positions → pre-LN blocks
(exact GELU, LayerNorm eps 1e-5) → final LayerNorm → the features at the EOT position (EOT is the
largest id, so it is found as the argmax of the ids) → (W, E) projection without bias.
MobileCLIP2-B keeps CLIP's causal mask; S0–S4 and L-14 attend both ways (open_clip `no_causal_mask`).
Pads are attended in either case, as in the reference: padding is part of the trained input.
Names and layouts are open_clip's `TextTransformer` (q/k/v as one `in_proj_weight`, the layout of
torch's nn.MultiheadAttention). Letters: J texts, L positions, W width, N heads, H head dim, E embedding.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..attention import attention
from ..masking import PrefixLMMask


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 49408
    context_length: int = 77
    width: int = 512
    num_heads: int = 8
    depth: int = 12
    mlp_ratio: float = 4.0
    causal: bool = False
    """True: each token sees only those before it (CLIP, MobileCLIP2-B); False: all tokens (S0–S4, L-14)."""
    embed_dim: int = 512


class MultiheadAttention(nn.Module):
    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, width // num_heads
        self.attn_impl = "auto"   # attention.py's choice; MobileCLIP.attn_impl sets it
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, mask: PrefixLMMask | None) -> torch.Tensor:
        J, L, W = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(J, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)       # (J, N, L, H)
        o = attention(q, k, v, mask, scale=self.head_dim ** -0.5, impl=self.attn_impl)           # (J, N, L, H)
        return self.out_proj(o.transpose(1, 2).reshape(J, L, W))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.width)
        self.attn = MultiheadAttention(cfg.width, cfg.num_heads)
        self.ln_2 = nn.LayerNorm(cfg.width)
        self.mlp = Mlp(cfg.width, int(cfg.width * cfg.mlp_ratio))

    def forward(self, x: torch.Tensor, mask: PrefixLMMask | None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(cfg) for _ in range(cfg.depth))


class TextTransformer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.transformer = Transformer(cfg)
        self.ln_final = nn.LayerNorm(cfg.width)
        self.text_projection = nn.Parameter(torch.empty(cfg.width, cfg.embed_dim))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (J, L ≤ context_length) → (J, E) text features, not normalised."""
        J, L = input_ids.shape
        if L > self.cfg.context_length:
            raise ValueError(f"Text of {L} tokens; the text tower has {self.cfg.context_length} positions")
        x = self.token_embedding(input_ids) + self.positional_embedding[:L]               # (J, L, W)
        # CLIP's causal mask is the prefix-LM mask with an empty prefix: every token is "suffix", so it
        # sees itself and those before it (masking.py), and the one dispatch runs it on every path.
        none = torch.zeros(J, dtype=torch.long, device=x.device)
        mask = PrefixLMMask(none, none, L) if self.cfg.causal else None
        for block in self.transformer.resblocks:
            x = block(x, mask)
        x = self.ln_final(x)
        return x[torch.arange(J, device=x.device), input_ids.argmax(-1)] @ self.text_projection  # (J, E)


__all__ = ["TextConfig", "TextTransformer"]
