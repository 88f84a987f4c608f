"""Scaled dot-product attention for both towers: one readable reference, and the dispatch to fast paths.

Reference math (transformers `modeling_gemma2.eager_attention_forward`, big_vision `ppp/gemma.Attention`):
    s = (q · kᵀ) · scale                    scale = query_pre_attn_scalar^-½ (Gemma 2), head_dim^-½ otherwise
    s = c · tanh(s / c)                     Gemma 2 attention-logit soft-cap, c = 50 (PaliGemma 2 only)
    s = s where allowed else -inf           prefix-LM mask (masking.py), sliding window on some layers
    o = softmax(s in float32).to(dtype) · v

GQA/MQA: N query heads share K key/value heads (G = N / K per group). The reference stacks each
group's G heads as G·T query rows against its K/V head, so K/V are never copied.

Implementations (`impl`):
  "reference"  the plain PyTorch above; any mask, soft-cap, window, dtype, device.
  "sdpa"       torch's scaled_dot_product_attention with a boolean mask: exact, but has no soft-cap.
  "triton"     the fused flash-attention kernel in nanopali/kernels (CUDA, or TRITON_INTERPRET=1).
  "auto"       triton on CUDA (fp16 / bf16) when importable, else sdpa when there is no soft-cap, else
               reference. On each (device, dtype, head dim) the kernel first checks itself against the reference
               (kernels/selfcheck.py); if it fails, "auto" runs sdpa / reference there, with one warning.
               NANOPALI_FUSED_ATTENTION=on skips that check, =off keeps "auto" off the kernel.
"""
from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

from .masking import PrefixLMMask

# Letters: B batch, N query heads, K key/value heads, G = N // K, T queries, S keys, H head dim.

IMPLS = ("reference", "sdpa", "triton", "auto")


def reference_attention(q, k, v, allowed, scale: float, softcap: float | None = None):
    """q (B, N, T, H), k/v (B, K, S, H), allowed (B, 1, T, S) bool or None → (B, N, T, H)."""
    B, N, T, H = q.shape
    K, S = k.shape[1], k.shape[2]
    G = N // K
    # The G query heads of a K/V head are stacked as G·T rows against that head's keys: one matmul per
    # K/V head, and K/V are read in place (broadcasting them over G would copy the whole cache each layer).
    q = q.reshape(B, K, G * T, H)                                     # (B, K, G·T, H)
    s = (torch.matmul(q, k.transpose(-1, -2)) * scale).view(B, K, G, T, S)
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    if allowed is not None:
        s = s.masked_fill(~allowed.unsqueeze(1), float("-inf"))       # allowed (B, 1, 1, T, S)
    p = torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
    o = torch.matmul(p.view(B, K, G * T, S), v)                       # (B, K, G·T, H)
    return o.view(B, N, T, H)


def sdpa_attention(q, k, v, allowed, scale: float):
    """PyTorch SDPA; exact where there is no soft-cap. enable_gqa avoids repeating K/V."""
    gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, enable_gqa=gqa)


def _triton_available(device: torch.device) -> bool:
    try:
        from . import kernels  # noqa: F401
    except ImportError:
        return False
    return kernels.is_supported(device)


def resolve_impl(impl: str, device: torch.device, softcap: float | None) -> str:
    """The implementation `auto` stands for on this device; others are returned as they are."""
    if impl not in IMPLS:
        raise ValueError(f"attn_impl must be one of {IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    fused_off = os.environ.get("NANOPALI_FUSED_ATTENTION") == "off"   # kernels/selfcheck.py
    if device.type == "cuda" and not fused_off and _triton_available(device):
        return "triton"
    return "reference" if softcap is not None else "sdpa"


def _kernel_passes_self_check(q, k) -> bool:
    """Once per (device, dtype, head dim), then a cached answer: kernels/selfcheck.py."""
    from .kernels.selfcheck import passes
    return passes(q.device, q.dtype, q.shape[3], q.shape[1] // k.shape[1])


LOGGED_CHOICES: set[str] = set()


def log_choice(impl: str, device: torch.device, softcap: float | None) -> str:
    """Resolve `impl` and log the outcome once per distinct choice (logger "nanopali")."""
    chosen = resolve_impl(impl, device, softcap)
    msg = f"attention: attn_impl={impl!r} runs {chosen!r} on {device.type}" + (
        " (soft-capped: SDPA cannot)" if softcap is not None and impl == "auto" and chosen == "reference" else "")
    if msg not in LOGGED_CHOICES:
        LOGGED_CHOICES.add(msg)
        logging.getLogger("nanopali").info(msg)
    return chosen


def attention(q, k, v, mask: PrefixLMMask | None = None, *, scale: float, softcap: float | None = None,
              window: int | None = None, q_start=0, key_mask: torch.Tensor | None = None, impl: str = "reference"):
    """The one attention dispatch of the package: the decoder, SigLIP's encoders and its pooling head.

    Queries at absolute indices q_start.. (an int, or a decode step's slot as a 0-d tensor) over keys
    0..S-1. Which keys a query may read: `mask` (the decoder's prefix-LM rule, with the layer's
    window), or `key_mask` (B, S), 1 = real key: rows padded on the right (SigLIP's text tower, NaFlex
    patches), which is not a prefix-LM layout and so goes to the unfused paths; neither = full
    attention (SigLIP on fixed-size images). Returns (B, N, T, H)."""
    auto, impl = impl == "auto", resolve_impl(impl, q.device, softcap)
    T, S = q.shape[2], k.shape[2]
    if key_mask is not None:
        if mask is not None:
            raise ValueError("give the prefix-LM mask or a key mask, not both")
        allowed = key_mask.bool()[:, None, None, :]                          # (B, 1, 1, S)
        impl = "reference" if impl == "reference" or softcap is not None else "sdpa"
    else:
        if impl == "triton" and auto and (q.dtype == torch.float32 or not _kernel_passes_self_check(q, k)):
            # exact either way; the check has warned why. fp32 tiles spill and overflow shared memory on
            # every GPU generation (docs/gpu.md#compiled-for-real-targets): "auto" keeps them for fp16 / bf16.
            impl = "reference" if softcap is not None else "sdpa"
        if impl == "triton":
            from .kernels import flash_attention
            if mask is None:
                mask = PrefixLMMask.full(q.shape[0], S, q.device)
            return flash_attention(q, k, v, mask.start, mask.prefix_end, scale=scale, softcap=softcap,
                                   window=window, q_start=q_start)
        allowed = None if mask is None else mask.allowed(q_start, T, S, window)
    if impl == "sdpa":
        if softcap is not None:
            raise ValueError("attn_impl='sdpa' cannot apply Gemma 2's attention soft-cap; use 'reference' or 'triton'")
        return sdpa_attention(q, k, v, allowed, scale)
    return reference_attention(q, k, v, allowed, scale, softcap)
