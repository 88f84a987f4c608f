"""Prefix-LM flash attention in Triton, forward and backward (FlashAttention-2, Dao 2023, arXiv 2307.08691).

What is fused: q·kᵀ, the scale, Gemma 2's tanh soft-cap, the prefix-LM mask (masking.py), the softmax
and the product with v run tile by tile in on-chip memory; the (T, S) score matrix is never written.
The forward keeps a running max and sum per query row (online softmax, FA2 Algorithm 1) and saves only
the row's logsumexp; the backward recomputes the probabilities from it (FA2 Algorithm 2): one kernel
per key tile accumulates dK, dV over all query tiles and all G query heads sharing that K/V head (so
GQA needs neither repeated K/V nor atomics), a second kernel per query tile accumulates dQ.

Why by hand: SDPA has no soft-cap, its flash backend takes no arbitrary mask, and FlexAttention
evaluates the mask and score_mod per element (docs/performance.md#attention-alone has the numbers).
Here the whole mask of a row is two integers (start, prefix_end) plus the window, so a few scalar
comparisons classify every (query tile, key tile) pair: tiles nobody may read are never loaded, tiles
every query of the tile may read skip the mask, and only the boundary tiles evaluate the rule element
by element.
"""
import torch
import triton
import triton.language as tl

from .tuning import INTERPRETED, target_arch, tile_config

# Letters: B batch, N query heads, K key/value heads, G = N // K, T queries, S keys, H head dim.
# A query's absolute index is i = slot + t; keys are j = 0..S-1. BLOCK_H is H padded to a power of
# two (72 → 128; the padding columns load as 0, so they add nothing to q·kᵀ and are never stored).
# Each kernel first moves its pointers to its head in int64 ((b·N + n)·T·H can pass 2³¹); offsets
# inside a head stay int32, which keeps the 256-wide tiles' offsets in half the registers.

LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x·log2 e); exp2 is the GPU's native exponential


@triton.jit
def _logits(q, k, scale, softcap, SOFTCAP: tl.constexpr, PRECISION: tl.constexpr):
    """(BLOCK_M, BLOCK_N) logits in log2 units, and tanh(s / c), which the soft-cap's derivative needs."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
    if SOFTCAP:
        th = 1 - 2 / (tl.exp(2 * s / softcap) + 1)         # tanh, spelled with exp: the interpreter has no tanh
        s = softcap * th
    else:
        th = s                                             # unused without a soft-cap
    return s * LOG2E, th


@triton.jit
def _allowed(i, j, start, pe, window, S):
    """masking.PrefixLMMask.allowed for absolute query indices i (BLOCK_M, 1) and keys j (1, BLOCK_N)."""
    real = (i >= start) & (j >= start)
    both_prefix = (i < pe) & (j < pe)
    causal = (j <= i) & (i - j < window)
    return ((real & (both_prefix | causal)) | (i == j)) & (j < S)


@triton.jit
def row_mask(START, PREFIX_END, b):
    """(start, prefix_end) of row b; a prefix_end below start means "no prefix", as in the rule."""
    start = tl.load(START + b).to(tl.int32)
    return start, tl.maximum(tl.load(PREFIX_END + b).to(tl.int32), start)


@triton.jit
def load_rows(ptr, rows, n_rows, d, H, DOT: tl.constexpr):
    """(len(rows), BLOCK_H) tile of a contiguous (n_rows, H) matrix as DOT; rows, columns past the end read 0."""
    inside = (rows[:, None] < n_rows) & (d[None, :] < H)
    return tl.load(ptr + rows[:, None] * H + d[None, :], mask=inside, other=0.0).to(DOT)


@triton.jit
def key_tiles(i_lo, i_hi, start, pe, window, S, BLOCK_N: tl.constexpr):
    """Key ranges for query rows i_lo..i_hi (absolute, inclusive), as (lo, full_lo, full_hi, hi).

    Keys outside [lo, hi) are read by no row: their tiles are skipped. Keys in [full_lo, full_hi) are
    read by every row: those tiles skip the mask. Both ranges are whole tiles (hi may end mid-tile at S).
    Per row the rule gives an interval: a pad row sees itself, a prefix row [start, pe), a suffix row
    [max(start, i - window + 1), i]; so the union is (at most) one interval, the intersection another.
    """
    real = i_hi >= start
    has_prefix_row = real & (tl.maximum(i_lo, start) < pe)
    first_suffix_row = tl.maximum(i_lo, pe)
    lo = tl.where(has_prefix_row, start, tl.maximum(start, first_suffix_row - window + 1))
    lo = tl.where(real, tl.minimum(i_lo, lo), i_lo)
    hi = tl.where(has_prefix_row, tl.maximum(i_hi + 1, pe), i_hi + 1)
    hi = tl.minimum(hi, S)
    a = tl.where(i_hi >= pe, tl.maximum(start, i_hi - window + 1), start)
    b = tl.where(i_lo < pe, tl.minimum(pe, S), S)
    b = tl.where(i_hi >= pe, tl.minimum(b, first_suffix_row + 1), b)
    full_lo = (a + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    full_hi = b // BLOCK_N * BLOCK_N
    hi_up = (hi + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    empty = (i_lo < start) | (full_lo >= full_hi)          # a pad row sees only itself: no tile is full
    return lo // BLOCK_N * BLOCK_N, tl.where(empty, hi_up, full_lo), tl.where(empty, hi_up, full_hi), hi


@triton.jit
def query_tiles(j_lo, j_hi, start, pe, window, slot, T, BLOCK_M: tl.constexpr):
    """The mirror of key_tiles for keys j_lo..j_hi: (lo, full_lo, full_hi, hi) as query rows t = i - slot.

    Per key: a pad key is read by itself, a prefix key by [start, max(pe, j + window)), a suffix key
    by [j, j + window)."""
    q_end = slot + T
    real = j_hi >= start
    has_prefix_key = real & (tl.maximum(j_lo, start) < pe)
    lo = tl.where(has_prefix_key, tl.minimum(j_lo, start), j_lo)
    hi = tl.where(real, j_hi + window, j_hi + 1)
    hi = tl.where(has_prefix_key, tl.maximum(hi, pe), hi)
    a = tl.where(j_hi >= pe, tl.maximum(start, j_hi), start)
    b = tl.where(j_lo < pe, tl.minimum(q_end, tl.maximum(pe, j_lo + window)), q_end)
    b = tl.where(j_hi >= pe, tl.minimum(b, tl.maximum(j_lo, pe) + window), b)
    lo = tl.maximum(lo - slot, 0)
    hi = tl.maximum(tl.minimum(hi, q_end) - slot, 0)
    hi = tl.where(lo < hi, hi, 0)  # no query of this call reads these keys (e.g. the cache's future slots)
    lo = lo // BLOCK_M * BLOCK_M
    full_lo = (tl.maximum(a - slot, 0) + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    full_hi = tl.maximum(b - slot, 0) // BLOCK_M * BLOCK_M
    hi_up = (hi + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    empty = (j_lo < start) | (full_lo >= full_hi)
    return lo, tl.where(empty, hi_up, full_lo), tl.where(empty, hi_up, full_hi), hi


@triton.jit
def fwd_tiles(acc, l, m, q, i, K, V, lo, hi, start, pe, window, S, d, H, scale, softcap, BLOCK_N: tl.constexpr,
               SOFTCAP: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr, MASKED: tl.constexpr):
    """Online softmax over the key tiles in [lo, hi): FA2 Algorithm 1's inner loop."""
    for n0 in range(lo, hi, BLOCK_N):
        j = n0 + tl.arange(0, BLOCK_N)
        k = load_rows(K, j, S, d, H, DOT)                 # (BLOCK_N, BLOCK_H)
        v = load_rows(V, j, S, d, H, DOT)
        s, _ = _logits(q, k, scale, softcap, SOFTCAP, PRECISION)  # (BLOCK_M, BLOCK_N)
        if MASKED:
            s = tl.where(_allowed(i[:, None], j[None, :], start, pe, window, S), s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)                         # rescales what was summed under the previous max
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)  # (BLOCK_M, BLOCK_H)
        m = m_new
    return acc, l, m


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, START, PREFIX_END, scale, softcap, window, SLOT, N, T, S, H,
                G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
                SOFTCAP: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr):
    slot = tl.load(SLOT).to(tl.int32)                # read on the device (kernel_args)
    pid_m, bn = tl.program_id(0), tl.program_id(1)         # grid (cdiv(T, BLOCK_M), B * N)
    start, pe = row_mask(START, PREFIX_END, bn // N)
    head = bn.to(tl.int64)
    Q += head * T * H                                      # this head's (T, H) queries
    O += head * T * H
    LSE += head * T
    K += head // G * S * H                                 # query head n reads K/V head n // G
    V += head // G * S * H
    t = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_H)
    q = load_rows(Q, t, T, d, H, DOT)                     # (BLOCK_M, BLOCK_H)
    i_lo = slot + pid_m * BLOCK_M
    lo, full_lo, full_hi, hi = key_tiles(i_lo, tl.minimum(i_lo + BLOCK_M, slot + T) - 1,
                                          start, pe, window, S, BLOCK_N)
    # -1e30, not -inf: a row whose first tiles are all masked must give exp2(-inf - m) = 0, not NaN.
    m = tl.full((BLOCK_M,), -1.0e30, tl.float32)
    l = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_H), tl.float32)
    i = slot + t
    acc, l, m = fwd_tiles(acc, l, m, q, i, K, V, lo, full_lo, start, pe, window, S, d, H, scale, softcap,
                           BLOCK_N, SOFTCAP, DOT, PRECISION, True)
    acc, l, m = fwd_tiles(acc, l, m, q, i, K, V, full_lo, full_hi, start, pe, window, S, d, H, scale, softcap,
                           BLOCK_N, SOFTCAP, DOT, PRECISION, False)
    acc, l, m = fwd_tiles(acc, l, m, q, i, K, V, full_hi, hi, start, pe, window, S, d, H, scale, softcap,
                           BLOCK_N, SOFTCAP, DOT, PRECISION, True)
    l = tl.where(t < T, l, 1.0)                            # rows past T (not stored) may have seen no key at all
    rows = (t[:, None] < T) & (d[None, :] < H)
    o = acc / l[:, None]
    tl.store(O + t[:, None] * H + d[None, :], o.to(O.dtype.element_ty), mask=rows)
    tl.store(LSE + t, (m + tl.log2(l)) / LOG2E, mask=t < T)  # natural-log logsumexp


@triton.jit
def _dkdv_tiles(dk, dv, k, v, j, Q, DO, LSE, DELTA, lo, hi, slot, T, start, pe, window, S, d, H, scale, softcap,
                BLOCK_M: tl.constexpr, SOFTCAP: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
                MASKED: tl.constexpr):
    """dK, dV of one key tile from the query tiles in [lo, hi) of one query head: FA2 Algorithm 2."""
    for m0 in range(lo, hi, BLOCK_M):
        t = m0 + tl.arange(0, BLOCK_M)
        q = load_rows(Q, t, T, d, H, DOT)                 # (BLOCK_M, BLOCK_H)
        do = load_rows(DO, t, T, d, H, DOT)
        lse = tl.load(LSE + t, mask=t < T, other=float("inf")) * LOG2E  # rows past T: p = 0
        delta = tl.load(DELTA + t, mask=t < T, other=0.0)
        s, th = _logits(q, k, scale, softcap, SOFTCAP, PRECISION)
        p = tl.exp2(s - lse[:, None])                      # (BLOCK_M, BLOCK_N)
        if MASKED:
            p = tl.where(_allowed((slot + t)[:, None], j[None, :], start, pe, window, S), p, 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)  # (BLOCK_N, BLOCK_H)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])                     # softmax backward: dS = P ∘ (dP − rowsum(dO ∘ O))
        if SOFTCAP:
            ds = ds * (1 - th * th)                        # d/ds c·tanh(s/c) = 1 − tanh²(s/c)
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, START, PREFIX_END, scale, softcap, window, SLOT,
                     KV_HEADS, T, S, H, G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_H: tl.constexpr, SOFTCAP: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr):
    slot = tl.load(SLOT).to(tl.int32)                # read on the device (kernel_args)
    pid_n, bk = tl.program_id(0), tl.program_id(1)         # grid (cdiv(S, BLOCK_N), B * K)
    start, pe = row_mask(START, PREFIX_END, bk // KV_HEADS)
    head = bk.to(tl.int64)
    K += head * S * H                                      # this K/V head's (S, H) keys
    V += head * S * H
    DK += head * S * H
    DV += head * S * H
    Q += head * G * T * H                                  # its G query heads, one after another
    DO += head * G * T * H
    LSE += head * G * T
    DELTA += head * G * T
    j = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_H)
    k = load_rows(K, j, S, d, H, DOT)                     # (BLOCK_N, BLOCK_H)
    v = load_rows(V, j, S, d, H, DOT)
    j_lo = pid_n * BLOCK_N
    lo, full_lo, full_hi, hi = query_tiles(j_lo, tl.minimum(j_lo + BLOCK_N, S) - 1, start, pe, window,
                                            slot, T, BLOCK_M)
    dk = tl.zeros((BLOCK_N, BLOCK_H), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_H), tl.float32)
    for g in range(G):  # the G query heads reading this K/V head: summed here, so no atomics
        Qn, DOn, LSEn, DELTAn = Q + g * T * H, DO + g * T * H, LSE + g * T, DELTA + g * T
        dk, dv = _dkdv_tiles(dk, dv, k, v, j, Qn, DOn, LSEn, DELTAn, lo, full_lo, slot, T, start, pe, window,
                             S, d, H, scale, softcap, BLOCK_M, SOFTCAP, DOT, PRECISION, True)
        dk, dv = _dkdv_tiles(dk, dv, k, v, j, Qn, DOn, LSEn, DELTAn, full_lo, full_hi, slot, T, start, pe,
                             window, S, d, H, scale, softcap, BLOCK_M, SOFTCAP, DOT, PRECISION, False)
        dk, dv = _dkdv_tiles(dk, dv, k, v, j, Qn, DOn, LSEn, DELTAn, full_hi, hi, slot, T, start, pe, window,
                             S, d, H, scale, softcap, BLOCK_M, SOFTCAP, DOT, PRECISION, True)
    rows = (j[:, None] < S) & (d[None, :] < H)
    tl.store(DK + j[:, None] * H + d[None, :], (dk * scale).to(DK.dtype.element_ty), mask=rows)
    tl.store(DV + j[:, None] * H + d[None, :], dv.to(DV.dtype.element_ty), mask=rows)


@triton.jit
def _dq_tiles(dq, q, do, lse, delta, i, K, V, lo, hi, start, pe, window, S, d, H, scale, softcap,
              BLOCK_N: tl.constexpr, SOFTCAP: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
              MASKED: tl.constexpr):
    """dQ of one query tile from the key tiles in [lo, hi)."""
    for n0 in range(lo, hi, BLOCK_N):
        j = n0 + tl.arange(0, BLOCK_N)
        k = load_rows(K, j, S, d, H, DOT)                 # (BLOCK_N, BLOCK_H)
        v = load_rows(V, j, S, d, H, DOT)
        s, th = _logits(q, k, scale, softcap, SOFTCAP, PRECISION)
        p = tl.exp2(s - lse[:, None])                      # (BLOCK_M, BLOCK_N)
        if MASKED:
            p = tl.where(_allowed(i[:, None], j[None, :], start, pe, window, S), p, 0.0)
        ds = p * (tl.dot(do, tl.trans(v), input_precision=PRECISION) - delta[:, None])
        if SOFTCAP:
            ds = ds * (1 - th * th)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)  # (BLOCK_M, BLOCK_H)
    return dq


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, START, PREFIX_END, scale, softcap, window, SLOT, N, T, S, H,
                   G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
                   SOFTCAP: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr):
    slot = tl.load(SLOT).to(tl.int32)                # read on the device (kernel_args)
    pid_m, bn = tl.program_id(0), tl.program_id(1)         # grid (cdiv(T, BLOCK_M), B * N)
    start, pe = row_mask(START, PREFIX_END, bn // N)
    head = bn.to(tl.int64)
    Q += head * T * H
    DO += head * T * H
    DQ += head * T * H
    LSE += head * T
    DELTA += head * T
    K += head // G * S * H
    V += head // G * S * H
    t = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_H)
    q = load_rows(Q, t, T, d, H, DOT)                     # (BLOCK_M, BLOCK_H)
    do = load_rows(DO, t, T, d, H, DOT)
    lse = tl.load(LSE + t, mask=t < T, other=float("inf")) * LOG2E
    delta = tl.load(DELTA + t, mask=t < T, other=0.0)
    i_lo = slot + pid_m * BLOCK_M
    lo, full_lo, full_hi, hi = key_tiles(i_lo, tl.minimum(i_lo + BLOCK_M, slot + T) - 1,
                                          start, pe, window, S, BLOCK_N)
    dq = tl.zeros((BLOCK_M, BLOCK_H), tl.float32)
    i = slot + t
    dq = _dq_tiles(dq, q, do, lse, delta, i, K, V, lo, full_lo, start, pe, window, S, d, H, scale, softcap,
                   BLOCK_N, SOFTCAP, DOT, PRECISION, True)
    dq = _dq_tiles(dq, q, do, lse, delta, i, K, V, full_lo, full_hi, start, pe, window, S, d, H, scale, softcap,
                   BLOCK_N, SOFTCAP, DOT, PRECISION, False)
    dq = _dq_tiles(dq, q, do, lse, delta, i, K, V, full_hi, hi, start, pe, window, S, d, H, scale, softcap,
                   BLOCK_N, SOFTCAP, DOT, PRECISION, True)
    rows = (t[:, None] < T) & (d[None, :] < H)
    tl.store(DQ + t[:, None] * H + d[None, :], (dq * scale).to(DQ.dtype.element_ty), mask=rows)


def kernel_args(q, k, window, slot):
    """Arguments every kernel takes: shapes, the window as an int (None: S, longer than any row), the first
    query index as one int64 on q's device (the kernels read it from memory, so a compiled decode step
    never bakes it in), and how tiles multiply: fp32 as full fp32 ("ieee", not TF32), within 1e-5 of the
    reference; bf16 as fp32 in the interpreter, whose bf16 dot multiplies raw bits."""
    B, N, T, H = q.shape
    slot = torch.as_tensor(slot, dtype=torch.int64, device=q.device).reshape(())
    dot = {torch.float16: tl.float16, torch.float32: tl.float32,
           torch.bfloat16: tl.float32 if INTERPRETED else tl.bfloat16}[q.dtype]
    return dict(T=T, S=k.shape[2], H=H, G=N // k.shape[1], BLOCK_H=max(16, triton.next_power_of_2(H)),
                window=k.shape[2] if window is None else window, SLOT=slot,
                DOT=dot, PRECISION="ieee" if q.dtype == torch.float32 else "tf32")


def flash_forward(q, k, v, start, prefix_end, scale, softcap, window, slot):
    """o (B, N, T, H) in q's dtype and the logsumexp of every query row, lse (B, N, T) fp32."""
    B, N, T, H = q.shape
    BLOCK_M, BLOCK_N, warps, stages = tile_config("fwd", H, q.dtype, target_arch(q.device))
    o = torch.empty_like(q)
    lse = torch.empty(B, N, T, device=q.device, dtype=torch.float32)
    _fwd_kernel[(triton.cdiv(T, BLOCK_M), B * N)](
        q, k, v, o, lse, start, prefix_end, scale, softcap or 1.0, N=N, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        SOFTCAP=softcap is not None, num_warps=warps, num_stages=stages, **kernel_args(q, k, window, slot))
    return o, lse


def flash_backward(do, q, k, v, o, lse, start, prefix_end, scale, softcap, window, slot):
    """dq, dk, dv from the output gradient do (B, N, T, H) and the forward's o and lse."""
    B, N, T, H = q.shape
    KV, S = k.shape[1], k.shape[2]
    do = do.contiguous()
    delta = (o.float() * do.float()).sum(-1)               # (B, N, T) = rowsum(dO ∘ O) = rowsum(P ∘ dP)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    args, arch = dict(SOFTCAP=softcap is not None, **kernel_args(q, k, window, slot)), target_arch(q.device)
    BLOCK_M, BLOCK_N, warps, stages = tile_config("dkdv", H, q.dtype, arch)
    _bwd_dkdv_kernel[(triton.cdiv(S, BLOCK_N), B * KV)](
        q, k, v, do, lse, delta, dk, dv, start, prefix_end, scale, softcap or 1.0, KV_HEADS=KV,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=warps, num_stages=stages, **args)
    BLOCK_M, BLOCK_N, warps, stages = tile_config("dq", H, q.dtype, arch)
    _bwd_dq_kernel[(triton.cdiv(T, BLOCK_M), B * N)](
        q, k, v, do, lse, delta, dq, start, prefix_end, scale, softcap or 1.0, N=N,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=warps, num_stages=stages, **args)
    return dq, dk, dv
