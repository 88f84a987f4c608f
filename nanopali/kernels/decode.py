"""Split-K flash attention for decode ("flash-decoding", Dao, Haziza, Massa & Sizov 2023).

A decode step has a few queries (T ≤ 16) against a long static KV cache. flash.py gives each
(query tile, head) one program, so B·N programs would each walk the whole cache while most of the GPU
waits. Here the keys are cut into chunks, one program per (chunk, batch row, K/V head), and a second
small kernel merges the partial softmaxes: with row max m_c, sum l_c and unnormalized output acc_c of
chunk c, and m = max_c m_c,
    o = Σ_c exp(m_c − m)·acc_c / Σ_c exp(m_c − m)·l_c,    lse = m + log Σ_c exp(m_c − m)·l_c.
The G query heads sharing a K/V head are stacked into one tile of G·T rows (they are contiguous in
q's memory), so each chunk of K/V is read once per group, not once per query head. Inside a chunk
the tiles go through flash.py's loop, with the same tile skipping and mask-free path.
"""
import torch
import triton
import triton.language as tl

from .flash import LOG2E, fwd_tiles, key_tiles, load_rows, row_mask, kernel_args, target_arch
from .tuning import tile_config

# Letters as in flash.py; R = G·T stacked query rows of one K/V head, C number of key chunks (splits).


@triton.jit
def _decode_kernel(Q, K, V, M_PART, L_PART, ACC_PART, START, PREFIX_END, scale, softcap, window, SLOT,
                   KV_HEADS, T, S, H, CHUNK, SPLITS, G: tl.constexpr, BLOCK_R: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, SOFTCAP: tl.constexpr, DOT: tl.constexpr,
                   PRECISION: tl.constexpr):
    slot = tl.load(SLOT).to(tl.int32)
    split, bk = tl.program_id(0), tl.program_id(1)         # grid (C, B * K)
    start, pe = row_mask(START, PREFIX_END, bk // KV_HEADS)
    head = bk.to(tl.int64)                                 # int64 head offsets, as in flash.py
    Q += head * G * T * H                                  # the G query heads of this K/V head
    K += head * S * H
    V += head * S * H
    r = tl.arange(0, BLOCK_R)
    d = tl.arange(0, BLOCK_H)
    q = load_rows(Q, r, G * T, d, H, DOT)                 # (BLOCK_R, BLOCK_H), row r = g·T + t
    lo, full_lo, full_hi, hi = key_tiles(slot, slot + T - 1, start, pe, window, S, BLOCK_N)
    c0 = split * CHUNK                                     # this program's keys: [c0, c0 + CHUNK)
    c1 = c0 + CHUNK
    m = tl.full((BLOCK_R,), -1.0e30, tl.float32)
    l = tl.zeros((BLOCK_R,), tl.float32)
    acc = tl.zeros((BLOCK_R, BLOCK_H), tl.float32)
    i = slot + r % T
    # flash.py's three tile classes, each cut to this chunk
    acc, l, m = fwd_tiles(acc, l, m, q, i, K, V, tl.maximum(lo, c0), tl.minimum(full_lo, c1), start, pe,
                           window, S, d, H, scale, softcap, BLOCK_N, SOFTCAP, DOT, PRECISION, True)
    acc, l, m = fwd_tiles(acc, l, m, q, i, K, V, tl.maximum(full_lo, c0), tl.minimum(full_hi, c1), start, pe,
                           window, S, d, H, scale, softcap, BLOCK_N, SOFTCAP, DOT, PRECISION, False)
    acc, l, m = fwd_tiles(acc, l, m, q, i, K, V, tl.maximum(full_hi, c0), tl.minimum(hi, c1), start, pe,
                           window, S, d, H, scale, softcap, BLOCK_N, SOFTCAP, DOT, PRECISION, True)
    part = (bk * SPLITS + split) * BLOCK_R + r             # partials: (B * K, C, BLOCK_R[, BLOCK_H]) fp32
    tl.store(M_PART + part, m)                             # a chunk with no allowed key: m = -1e30, l = 0
    tl.store(L_PART + part, l)
    tl.store(ACC_PART + part[:, None] * BLOCK_H + d[None, :], acc)


@triton.jit
def _combine_kernel(M_PART, L_PART, ACC_PART, O, LSE, SPLITS, R, H, BLOCK_R: tl.constexpr,
                    BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr):
    r, bk = tl.program_id(0), tl.program_id(1)             # grid (R, B * K)
    c = tl.arange(0, BLOCK_C)
    d = tl.arange(0, BLOCK_H)
    part = (bk * SPLITS + c) * BLOCK_R + r                 # (BLOCK_C,)
    m = tl.load(M_PART + part, mask=c < SPLITS, other=-1.0e30)
    l = tl.load(L_PART + part, mask=c < SPLITS, other=0.0)
    acc = tl.load(ACC_PART + part[:, None] * BLOCK_H + d[None, :], mask=c[:, None] < SPLITS, other=0.0)
    m_all = tl.max(m, 0)
    w = tl.exp2(m - m_all)                                 # (BLOCK_C,) each chunk's rescaling
    l_all = tl.sum(l * w, 0)
    o = tl.sum(acc * w[:, None], 0) / l_all                # (BLOCK_H,)
    tl.store(O + (bk.to(tl.int64) * R + r) * H + d, o.to(O.dtype.element_ty), mask=d < H)
    tl.store(LSE + bk * R + r, (m_all + tl.log2(l_all)) / LOG2E)


def default_splits(B: int, KV: int, S: int, device: torch.device) -> int:
    """Enough chunks for about two programs per GPU multiprocessor, and never a chunk with no keys."""
    _, BLOCK_N, _, _ = tile_config("decode", 0, torch.float16, target_arch(device))
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
    return max(1, min(triton.cdiv(S, BLOCK_N), triton.cdiv(2 * sms, B * KV)))


def decode_forward(q, k, v, start, prefix_end, scale, softcap, window, slot, num_splits=None):
    """Like flash.flash_forward, (o, lse), for few queries: keys split into num_splits chunks."""
    B, N, T, H = q.shape
    KV, S = k.shape[1], k.shape[2]
    R = N // KV * T
    _, BLOCK_N, warps, stages = tile_config("decode", H, q.dtype, target_arch(q.device))
    splits = num_splits or default_splits(B, KV, S, q.device)
    chunk = triton.cdiv(triton.cdiv(S, splits), BLOCK_N) * BLOCK_N  # a multiple of BLOCK_N: tiles stay aligned
    splits = triton.cdiv(S, chunk)
    args = kernel_args(q, k, window, slot)
    BLOCK_R, BLOCK_H = max(16, triton.next_power_of_2(R)), args["BLOCK_H"]
    m_part = torch.empty(B * KV, splits, BLOCK_R, device=q.device, dtype=torch.float32)
    l_part = torch.empty_like(m_part)
    acc_part = torch.empty(B * KV, splits, BLOCK_R, BLOCK_H, device=q.device, dtype=torch.float32)
    _decode_kernel[(splits, B * KV)](
        q, k, v, m_part, l_part, acc_part, start, prefix_end, scale, softcap or 1.0, KV_HEADS=KV, CHUNK=chunk,
        SPLITS=splits, BLOCK_R=BLOCK_R, BLOCK_N=BLOCK_N, SOFTCAP=softcap is not None, num_warps=warps,
        num_stages=stages, **args)
    o = torch.empty_like(q)
    lse = torch.empty(B, N, T, device=q.device, dtype=torch.float32)
    _combine_kernel[(R, B * KV)](m_part, l_part, acc_part, o, lse, splits, R, H, BLOCK_R=BLOCK_R, BLOCK_H=BLOCK_H,
                                 BLOCK_C=max(2, triton.next_power_of_2(splits)))
    return o, lse
