"""Scaled dot-product attention for both towers: the reference math, its fast forms, and the one choice.

Reference math (transformers `modeling_gemma2.eager_attention_forward`, big_vision `ppp/gemma.Attention`):
    s = (q · kᵀ) · scale                    scale = query_pre_attn_scalar^-½ (Gemma 2), head_dim^-½ otherwise
    s = c · tanh(s / c)                     Gemma 2 attention-logit soft-cap, c = 50 (PaliGemma 2 only)
    s = s where allowed else -inf           prefix-LM mask (masking.py), sliding window on some layers
    o = softmax(s in float32).to(dtype) · v

GQA/MQA: N query heads share K key/value heads, G = N / K query heads per group.

Implementations (`impl`), one chosen per call by `choose`:
  "reference"  the math above (grouped_attention, the copy-free form of reference_attention); any mask,
               soft-cap, window, dtype, device.
  "sdpa"       torch's scaled_dot_product_attention with a boolean mask: exact, but has no soft-cap.
  "triton"     the fused flash-attention kernel in nanopali/kernels (CUDA, or TRITON_INTERPRET=1).
  "auto"       triton on CUDA where kernels/dispatch.py trusts it (fp16 / bf16, self-checked), else sdpa
               when there is no soft-cap, else reference.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from .masking import PrefixLMMask

# Letters: B batch, N query heads, K key/value heads, G = N // K, T queries, S keys, H head dim.

IMPLS = ("reference", "sdpa", "triton", "auto")


def reference_attention(q, k, v, allowed, scale: float, softcap: float | None = None):
    """The definition: q (B, N, T, H), k/v (B, K, S, H), allowed (B, 1, T, S) bool or None → (B, N, T, H).

    Query head n = k·G + g reads K/V head k (big_vision's einsum "BTKGH,BSKH->BKGTS")."""
    B, N, T, H = q.shape
    K = k.shape[1]
    q = q.view(B, K, N // K, T, H)                                                # (B, K, G, T, H)
    s = torch.einsum("BKGTH,BKSH->BKGTS", q, k) * scale
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    if allowed is not None:
        s = s.masked_fill(~allowed.unsqueeze(1), float("-inf"))                   # allowed (B, 1, 1, T, S)
    p = torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.einsum("BKGTS,BKSH->BKGTH", p, v).reshape(B, N, T, H)


def grouped_attention(q, k, v, allowed, scale: float, softcap: float | None = None):
    """reference_attention with the G query heads of a K/V head stacked as G·T rows: one matmul per
    K/V head, K/V read in place. The same sums; half the per-call overhead of einsum, which is most of a
    small decode step's attention time on CPU (tests/test_attention_dispatch.py holds them equal)."""
    B, N, T, H = q.shape
    K, S = k.shape[1], k.shape[2]
    G = N // K
    s = (torch.matmul(q.reshape(B, K, G * T, H), k.transpose(-1, -2)) * scale).view(B, K, G, T, S)
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    if allowed is not None:
        s = s.masked_fill(~allowed.unsqueeze(1), float("-inf"))                   # allowed (B, 1, 1, T, S)
    p = torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(p.view(B, K, G * T, S), v).view(B, N, T, H)               # (B, K, G·T, H) → (B, N, T, H)


def sdpa_attention(q, k, v, allowed, scale: float):
    """PyTorch SDPA; exact where there is no soft-cap. enable_gqa avoids repeating K/V."""
    gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, enable_gqa=gqa)


FUSED_DEVICES = ("cuda",)   # device types where "auto" asks kernels/dispatch.py about the fused kernel


def choose(impl: str, device: torch.device, dtype: torch.dtype, head_dim: int, groups: int,
           softcap: float | None, key_mask: bool = False) -> str:
    """The one place that decides which implementation runs: "reference", "sdpa" or "triton".

    key_mask: keys are masked per row (SigLIP's text tower, NaFlex patches), not by the prefix-LM rule
    the kernel implements, so "triton" and "auto" run the exact unfused path. groups: G."""
    if impl not in IMPLS:
        raise ValueError(f"attn_impl must be one of {IMPLS}, got {impl!r}")
    exact = "reference" if softcap is not None else "sdpa"
    if key_mask:
        return "reference" if impl == "reference" else exact
    if impl != "auto":
        return impl
    if device.type in FUSED_DEVICES:
        from .kernels.dispatch import fused_for_auto
        if fused_for_auto(device, dtype, head_dim, groups):
            return "triton"
    return exact


LOGGED_CHOICES: set[str] = set()


def log_choice(impl: str, chosen: str, device: torch.device, softcap: float | None) -> None:
    """Say once per distinct choice (logger "nanopali") what `impl` runs: PaliGemma.attn_impl's setter."""
    msg = f"attention: attn_impl={impl!r} runs {chosen!r} on {device.type}" + (
        " (soft-capped: SDPA cannot)" if softcap is not None and impl == "auto" and chosen == "reference" else "")
    if msg not in LOGGED_CHOICES:
        LOGGED_CHOICES.add(msg)
        logging.getLogger("nanopali").info(msg)


def attention(q, k, v, mask: PrefixLMMask | None = None, *, scale: float, softcap: float | None = None,
              window: int | None = None, slot=0, key_mask: torch.Tensor | None = None, impl: str = "reference"):
    """The one attention call of the package: the decoder, SigLIP's encoders and its pooling head.

    Queries at absolute indices slot.. (the cache slot of the first query: an int, or a 0-d tensor on
    the device) over keys 0..S-1. Which keys a query may read: `mask` (the decoder's prefix-LM rule,
    with the layer's window), or `key_mask` (B, S), 1 = real key, for rows padded on the right;
    neither = full attention (SigLIP on fixed-size images). Returns (B, N, T, H)."""
    if key_mask is not None and mask is not None:
        raise ValueError("give the prefix-LM mask or a key mask, not both")
    impl = choose(impl, q.device, q.dtype, q.shape[3], q.shape[1] // k.shape[1], softcap, key_mask is not None)
    T, S = q.shape[2], k.shape[2]
    if impl == "triton":
        from .kernels import flash_attention
        if mask is None:
            mask = PrefixLMMask.full(q.shape[0], S, q.device)
        return flash_attention(q, k, v, mask.start, mask.prefix_end, scale=scale, softcap=softcap,
                               window=window, slot=slot)
    if key_mask is not None:
        allowed = key_mask.bool()[:, None, None, :]                                 # (B, 1, 1, S)
    else:
        allowed = None if mask is None else mask.allowed(slot, T, S, window)        # (B, 1, T, S)
    if impl == "sdpa":
        if softcap is not None:
            raise ValueError("attn_impl='sdpa' cannot apply Gemma 2's attention soft-cap; use 'reference' or 'triton'")
        return sdpa_attention(q, k, v, allowed, scale)
    return grouped_attention(q, k, v, allowed, scale, softcap)
