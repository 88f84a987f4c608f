"""Fused attention kernels (Triton): the "triton" implementation behind nanopali.attention.

flash_attention is exact prefix-LM attention (masking.PrefixLMMask's rule, Gemma 2's soft-cap and
sliding window, GQA/MQA) as one differentiable call: flash.py holds the FlashAttention-2 forward and
backward, decode.py the split-K kernel that a call with few queries (decode) uses instead, tuning.py
their tile sizes per GPU generation, selfcheck.py the check against the reference attention that
attn_impl="auto" runs once per device, dtype and head dim before it trusts them, dispatch.py the rule
by which attention.choose lets "auto" run them.

Triton is optional: without it this package still imports, is_supported says False and the kernels
raise. CPU tensors run through Triton's interpreter when TRITON_INTERPRET=1 is set before this package
is imported (triton.jit reads it once); that is how the tests run without a GPU.
"""
from __future__ import annotations

import importlib

import torch

try:
    importlib.import_module("triton")   # only to learn whether it is installed; flash.py uses it
except ImportError as err:
    _MISSING_TRITON: ImportError | None = err
    INTERPRETED = False
else:
    _MISSING_TRITON = None
    from .flash import INTERPRETED, flash_backward, flash_forward
    from .decode import decode_forward, default_splits

# Letters: B batch, N query heads, K key/value heads, T queries, S keys, H head dim.

MAX_DECODE_QUERIES = 16  # at most this many queries (per K/V head group: G·T ≤ 64) → the split-K kernel


def is_supported(device) -> bool:
    """Can flash_attention run on tensors of this device? CUDA with triton, or anything in the interpreter."""
    if _MISSING_TRITON is not None:
        return False
    return torch.device(device).type == "cuda" or INTERPRETED


class _FlashAttention(torch.autograd.Function):
    """Forward by the tiled kernel (num_splits None) or the split-K one; one backward for both, from lse."""

    @staticmethod
    def forward(ctx, q, k, v, start, prefix_end, scale, softcap, window, slot, num_splits):
        if num_splits is None:
            o, lse = flash_forward(q, k, v, start, prefix_end, scale, softcap, window, slot)
        else:
            o, lse = decode_forward(q, k, v, start, prefix_end, scale, softcap, window, slot, num_splits)
        ctx.save_for_backward(q, k, v, o, lse, start, prefix_end)
        ctx.args = (scale, softcap, window, slot)
        return o

    @staticmethod
    def backward(ctx, do):
        dq, dk, dv = flash_backward(do, *ctx.saved_tensors, *ctx.args)
        return dq, dk, dv, None, None, None, None, None, None, None


def _checked(q, k, v, start, prefix_end, window, slot):
    """The inputs as the kernels need them (contiguous, int64 on q's device), or a ValueError that says why."""
    if _MISSING_TRITON is not None:
        raise RuntimeError(f"nanopali.kernels needs triton (pip install triton): {_MISSING_TRITON}")
    if not is_supported(q.device):
        raise RuntimeError(f"flash_attention got {q.device.type} tensors: it needs CUDA, or TRITON_INTERPRET=1 "
                           "set before nanopali.kernels is imported (Triton's CPU interpreter, for tests)")
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"expected q (B, N, T, H) and k, v (B, K, S, H); got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    B, N, T, H = q.shape
    if k.shape[0] != B or k.shape[3] != H or N % k.shape[1] != 0:
        raise ValueError(f"k, v {tuple(k.shape)} do not fit q {tuple(q.shape)}: need the same B and H, "
                         "and a number of K/V heads that divides the number of query heads")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype among float16, bfloat16, float32; "
                         f"got {q.dtype}, {k.dtype}, {v.dtype}")
    if H > 256:
        raise ValueError(f"head dim {H} is larger than the kernels' limit of 256")
    if start.shape != (B,) or prefix_end.shape != (B,):
        raise ValueError(f"start and prefix_end must have shape ({B},); got {tuple(start.shape)}, "
                         f"{tuple(prefix_end.shape)}")
    if isinstance(slot, torch.Tensor):  # on the device (a decode step): its caller checked it
        if slot.numel() != 1:
            raise ValueError(f"slot must be an int or a 0-d tensor, got shape {tuple(slot.shape)}")
    elif slot < 0 or slot + T > k.shape[2]:
        raise ValueError(f"queries at indices {slot}..{slot + T - 1} need their own keys, "
                         f"but k holds {k.shape[2]}")
    if window is not None and window < 1:
        raise ValueError(f"window must be None or ≥ 1, got {window}")
    # The kernels index with contiguous strides: a no-op for a KV cache, a small copy for a transposed q.
    return (q.contiguous(), k.contiguous(), v.contiguous(), start.to(q.device, torch.int64).contiguous(),
            prefix_end.to(q.device, torch.int64).contiguous(), slot)


def flash_attention(q, k, v, start, prefix_end, *, scale: float, softcap: float | None = None,
                    window: int | None = None, slot=0):
    """Exact attention of queries at absolute indices slot.. over keys 0..S-1 under the prefix-LM rule.

    slot: the cache slot of the first query; an int, or a 0-d int64 tensor (a compiled decode step's,
    which only the device knows).
    q (B, N, T, H), k/v (B, K, S, H), start/prefix_end (B,) → (B, N, T, H) in q's dtype; differentiable
    in q, k, v. Few queries (decode) go to the split-K kernel, everything else to the tiled one."""
    q, k, v, start, prefix_end, slot = _checked(q, k, v, start, prefix_end, window, slot)
    T, G = q.shape[2], q.shape[1] // k.shape[1]
    splits = None
    if T <= MAX_DECODE_QUERIES and G * T <= 64 and k.shape[2] > T:
        splits = default_splits(q.shape[0], k.shape[1], k.shape[2], q.device)
    return _FlashAttention.apply(q, k, v, start, prefix_end, scale, softcap, window, slot, splits)


def flash_decode(q, k, v, start, prefix_end, *, scale: float, softcap: float | None = None,
                 window: int | None = None, slot=0, num_splits: int | None = None):
    """flash_attention through the split-K decode kernel, whatever T is (G·T ≤ 128 rows per K/V head);
    num_splits chunks of keys (default: enough to fill the GPU)."""
    q, k, v, start, prefix_end, slot = _checked(q, k, v, start, prefix_end, window, slot)
    if q.shape[1] // k.shape[1] * q.shape[2] > 128:
        raise ValueError(f"flash_decode stacks G·T = {q.shape[1] // k.shape[1] * q.shape[2]} query rows "
                         "in one tile; use at most 128, or flash_attention")
    if num_splits is None:
        num_splits = default_splits(q.shape[0], k.shape[1], k.shape[2], q.device)
    return _FlashAttention.apply(q, k, v, start, prefix_end, scale, softcap, window, slot, num_splits)
