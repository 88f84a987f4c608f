"""The Gemma (PaliGemma 1) and Gemma 2 (PaliGemma 2) decoder (PaliGemma §3.1, PaliGemma 2 §2).

Both are pre-norm decoders with RoPE, GeGLU MLPs, RMSNorm with (1 + w) weights, a √D-scaled
embedding tied to the LM head. Gemma 2 adds (all switched by config fields, so one class serves both):
  - a norm after attention and after the MLP as well as before (four norms per block);
  - attention-logit soft-capping c·tanh(s/c), c = 50, and final-logit soft-capping, c = 30;
  - attention scale query_pre_attn_scalar^-½ (= head_dim^-½ except the 28B: 144, docs/variants.md#decoder-sizes);
  - a 4096-token sliding window on even layers (transformers' `layer_types`; big_vision ignores it).
References: transformers `modeling_gemma.GemmaDecoderLayer`, `modeling_gemma2.Gemma2DecoderLayer`;
big_vision `models/ppp/gemma.py`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import attention
from .masking import PrefixLMMask

# Letters: B batch, T tokens, S keys, D width, N query heads, K kv heads, H head dim, F mlp dim, V vocab.


@dataclass(frozen=True)
class GemmaConfig:
    vocab_size: int = 257216
    width: int = 2048                 # D
    depth: int = 18                   # L
    mlp_dim: int = 16384              # F
    num_heads: int = 8                # N
    num_kv_heads: int = 1             # K (1 = MQA)
    head_dim: int = 256               # H
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10_000.0
    max_positions: int = 8192
    """Positions the decoder was trained for (config.json `max_position_embeddings`; 8192 for every
    released PaliGemma). RoPE itself has no limit, so a longer sequence would run and answer from
    positions the model never saw: prompts, generation and training examples past it are refused."""
    # Gemma 2 only (None / False for Gemma 1):
    post_norms: bool = False                  # the extra norm after attention and after the MLP
    query_pre_attn_scalar: float | None = None  # None: scale by head_dim^-½
    attn_softcap: float | None = None
    final_softcap: float | None = None
    """Final-logit soft-cap c·tanh(logits/c); None = off (docs/disagreements.md #7). transformers: 30.0
    from a PaliGemma 2 config.json (the default here, and big_vision's model default); big_vision's
    transfer configs (forkme.py, the fine-tuning notebook) set `final_logits_softcap=0.0`, i.e. off: set
    None for that."""
    sliding_window: int | None = None
    """Keys a suffix query sees on "sliding_attention" layers; None = full attention
    (docs/disagreements.md #5, #6). transformers: 4096 on PaliGemma 2's even layers (the default here);
    the prefix is never windowed.
    big_vision: not implemented ("we mostly use sequences <4096"): set None for that. Only differs when a
    suffix token is ≥ 4096 tokens after a key, i.e. PaliGemma 2 at 896 px (4096 image tokens)."""
    layer_types: tuple[str, ...] = ()         # "sliding_attention" / "full_attention" per layer

    def window(self, layer: int) -> int | None:
        sliding = self.layer_types and self.layer_types[layer] == "sliding_attention"
        return self.sliding_window if sliding else None

    @property
    def attn_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5


class RMSNorm(nn.Module):
    """y = x / rms(x) · (1 + w), all in float32, then cast back (Gemma's order, not Llama's:
    transformers PR #29402). w is stored as an offset from 1 and initialised to 0."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).to(x.dtype)


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos and sin (B, 1, T, H) of the rotary embedding at these positions (B, T): computed once per
    forward and shared by every layer. Angles in float32, then cast to the activations' dtype before
    rotating, as transformers does (docs/disagreements.md #12)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32)
                                / head_dim)                                       # (H/2,)
    ang = positions.float()[..., None] * inv_freq                                 # (B, T, H/2)
    ang = torch.cat((ang, ang), dim=-1)[:, None]                                  # (B, 1, T, H)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, split-half form (rotate_half): x (B, N, T, H) rotated by the tables."""
    H = x.shape[-1]
    x1, x2 = x[..., : H // 2], x[..., H // 2:]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class TiedEmbedding(nn.Embedding):
    """The token embedding E (V, D), read two ways: rows for input ids, and h · Eᵀ as the LM head
    (PaliGemma ties the two, paper §3.1). A quantized model swaps in a module with the same two calls."""

    def unembed(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.weight)                                             # (..., V)


class Attention(nn.Module):
    def __init__(self, cfg: GemmaConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        N, K, H, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.width
        self.q = nn.Linear(D, N * H, bias=False)   # note N·H ≠ D in PaliGemma 2 (2048 vs 2304)
        self.k = nn.Linear(D, K * H, bias=False)
        self.v = nn.Linear(D, K * H, bias=False)
        self.o = nn.Linear(N * H, D, bias=False)
        self.impl = "auto"                         # attention.IMPLS; set for every layer by Gemma.attn_impl

    def forward(self, x, mask: PrefixLMMask, rope_cs, slot: torch.Tensor, cache=None):
        """x (B, T, D): the tokens at cache slots slot..slot+T-1 (slot a 0-d tensor: 0 for a whole
        sequence, the step's slot in decoding). With a cache, their keys/values are written there and
        the queries read all S slots, the mask hiding the unwritten ones; without, they read each other."""
        cfg = self.cfg
        B, T, _ = x.shape
        q = self.q(x).view(B, T, cfg.num_heads, cfg.head_dim).transpose(1, 2)       # (B, N, T, H)
        k = self.k(x).view(B, T, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)    # (B, K, T, H)
        v = self.v(x).view(B, T, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)    # (B, K, T, H)
        q, k = apply_rope(q, *rope_cs), apply_rope(k, *rope_cs)
        if cache is not None:
            k, v = cache.update(self.layer, slot, k, v)                              # (B, K, S, H)
        o = attention(q, k, v, mask, scale=cfg.attn_scale, softcap=cfg.attn_softcap,
                      window=cfg.window(self.layer), slot=slot, impl=self.impl)     # (B, N, T, H)
        return self.o(o.transpose(1, 2).reshape(B, T, -1))


class GeGLU(nn.Module):
    """GeGLU: down(gelu_tanh(gate(x)) · up(x)); big_vision's gating_einsum[0] / [1] and linear."""

    def __init__(self, cfg: GemmaConfig):
        super().__init__()
        self.gate = nn.Linear(cfg.width, cfg.mlp_dim, bias=False)
        self.up = nn.Linear(cfg.width, cfg.mlp_dim, bias=False)
        self.down = nn.Linear(cfg.mlp_dim, cfg.width, bias=False)

    def forward(self, x):
        return self.down(F.gelu(self.gate(x), approximate="tanh") * self.up(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: GemmaConfig, layer: int):
        super().__init__()
        D, eps = cfg.width, cfg.rms_norm_eps
        self.pre_attn_norm = RMSNorm(D, eps)
        self.attn = Attention(cfg, layer)
        self.post_attn_norm = RMSNorm(D, eps) if cfg.post_norms else nn.Identity()
        self.pre_ffw_norm = RMSNorm(D, eps)
        self.mlp = GeGLU(cfg)
        self.post_ffw_norm = RMSNorm(D, eps) if cfg.post_norms else nn.Identity()

    def forward(self, x, mask, rope_cs, slot, cache=None):
        x = x + self.post_attn_norm(self.attn(self.pre_attn_norm(x), mask, rope_cs, slot, cache))
        return x + self.post_ffw_norm(self.mlp(self.pre_ffw_norm(x)))


class Gemma(nn.Module):
    def __init__(self, cfg: GemmaConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = TiedEmbedding(cfg.vocab_size, cfg.width)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.depth))
        self.final_norm = RMSNorm(cfg.width, cfg.rms_norm_eps)
        self.gradient_checkpointing = False

    @property
    def attn_impl(self) -> str:
        """The attention implementation asked for (attention.IMPLS); each layer holds it."""
        return self.layers[0].attn.impl

    @attn_impl.setter
    def attn_impl(self, impl: str) -> None:
        for block in self.layers:
            block.attn.impl = impl

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """E[ids] · √D, with √D rounded to the weight dtype first (45.25 in bf16 for D=2048) as both
        references do."""
        x = self.embed(ids)
        return x * torch.tensor(self.cfg.width ** 0.5, dtype=x.dtype)

    def forward(self, x, mask: PrefixLMMask, positions, slot: torch.Tensor, cache=None) -> torch.Tensor:
        """x (B, T, D) embeddings at RoPE positions (B, T) and cache slots slot.. → final-normed hidden
        states (B, T, D); slot and cache as in Attention."""
        rope_cs = rope_tables(positions, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        for block in self.layers:
            if self.gradient_checkpointing and self.training and cache is None:
                x = torch.utils.checkpoint.checkpoint(block, x, mask, rope_cs, slot, use_reentrant=False)
            else:
                x = block(x, mask, rope_cs, slot, cache)
        return self.final_norm(x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Tied LM head (h · Eᵀ) and Gemma 2's final soft-cap, in the model dtype as transformers does."""
        y = self.embed.unembed(h)                                                   # (..., V)
        if self.cfg.final_softcap is not None:
            y = torch.tanh(y / self.cfg.final_softcap) * self.cfg.final_softcap
        return y
