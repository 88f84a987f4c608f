"""The fused Triton attention (nanopali/kernels) equals the reference attention, outputs and gradients.

Runs on CPU through Triton's interpreter: TRITON_INTERPRET=1 must be set before triton.jit sees the
kernels, so it is set here, before nanopali.kernels is imported. The interpreter is slow, so shapes
are tiny; the kernels use 16 x 16 tiles there, so these shapes still cross many tile boundaries
(pads, prefix end, window edge, the diagonal, the last partial tile) and every tile class.
"""
import os
from unittest import mock

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton", reason="triton is not installed: the fused kernels cannot run")
import triton.language as tl  # noqa: E402

from nanopali import kernels  # noqa: E402
from nanopali.kernels.flash import key_tiles, query_tiles, row_mask, flash_forward  # noqa: E402
from nanopali.kernels.decode import decode_forward  # noqa: E402
from nanopali.attention import attention, choose, reference_attention  # noqa: E402
from nanopali.masking import PrefixLMMask  # noqa: E402
from tolerance import assert_rounding_close, paligemma_terms

# Letters: B batch, N query heads, K key/value heads, T queries, S keys, H head dim.

if not kernels.INTERPRETED:
    pytest.skip("nanopali.kernels was imported before TRITON_INTERPRET=1 was set (another test module "
                "imported it first); run this file on its own", allow_module_level=True)


def run_both(start, prefix_end, *, N=1, K=1, T=33, S=None, H=16, slot=0, softcap=None, window=None,
             dtype=torch.float32, logit_gain=1.0, decode_splits=None, seed=0):
    """Kernel and reference on the same random inputs: (out, grads), (ref_out, ref_grads), fp32 reference.

    The reference runs in fp32 on the same (rounded) inputs, so low-precision cases measure the kernel's
    own error. logit_gain scales q so that logits reach the soft-cap's saturated range."""
    S = slot + T if S is None else S
    start, prefix_end = torch.tensor(start), torch.tensor(prefix_end)
    B = start.shape[0]
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, N, T, H, generator=g) * logit_gain).to(dtype).requires_grad_()
    k = torch.randn(B, K, S, H, generator=g).to(dtype).requires_grad_()
    v = torch.randn(B, K, S, H, generator=g).to(dtype).requires_grad_()
    do = torch.randn(B, N, T, H, generator=g).to(dtype)
    scale = H ** -0.5
    if decode_splits is None:
        o = kernels.flash_attention(q, k, v, start, prefix_end, scale=scale, softcap=softcap, window=window,
                                    slot=slot)
    else:
        o = kernels.flash_decode(q, k, v, start, prefix_end, scale=scale, softcap=softcap, window=window,
                                 slot=slot, num_splits=decode_splits)
    grads = torch.autograd.grad(o, (q, k, v), do)
    allowed = PrefixLMMask(start, prefix_end, S).allowed(slot, T, S, window)
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    ref = reference_attention(q32, k32, v32, allowed, scale, softcap)
    ref_grads = torch.autograd.grad(ref, (q32, k32, v32), do.float())
    assert o.dtype == dtype and o.shape == q.shape
    return (o, *grads), (ref, *ref_grads)


def assert_matches_reference(*args, rtol=None, **kw):
    """Output and dq, dk, dv within fp32 rounding of the reference (tests/tolerance.py: each sums over
    the keys, then the head dim; backward once more), or within rtol of each tensor's largest entry."""
    got, want = run_both(*args, **kw)
    terms = 2 * (want[0].shape[-1] + want[1].shape[-2] + want[2].shape[-2])   # 2·(H + T + S)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        if rtol is None:
            assert_rounding_close(a.float(), b, torch.float32, terms, name)
        else:
            err, tol = (a.float() - b).abs().max().item(), rtol * b.abs().max().item()
            assert err <= tol, f"{name}: max abs diff {err:.3g} > {tol:.3g}"


@triton.jit
def _tile_ranges_kernel(KEY_RANGES, QUERY_RANGES, START, PREFIX_END, window, slot, T, S,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Stores the kernels' tile ranges: per query tile its key ranges, per key tile its query ranges."""
    tile, b = tl.program_id(0), tl.program_id(1)              # grid (max(#query tiles, #key tiles), B)
    start, pe = row_mask(START, PREFIX_END, b)
    if tile * BLOCK_M < T:
        i_lo = slot + tile * BLOCK_M
        r0, r1, r2, r3 = key_tiles(i_lo, tl.minimum(i_lo + BLOCK_M, slot + T) - 1, start, pe, window, S,
                                    BLOCK_N)
        out = KEY_RANGES + (b * tl.cdiv(T, BLOCK_M) + tile) * 4
        tl.store(out, r0), tl.store(out + 1, r1), tl.store(out + 2, r2), tl.store(out + 3, r3)
    if tile * BLOCK_N < S:
        j_lo = tile * BLOCK_N
        r0, r1, r2, r3 = query_tiles(j_lo, tl.minimum(j_lo + BLOCK_N, S) - 1, start, pe, window, slot, T,
                                      BLOCK_M)
        out = QUERY_RANGES + (b * tl.cdiv(S, BLOCK_N) + tile) * 4
        tl.store(out, r0), tl.store(out + 1, r1), tl.store(out + 2, r2), tl.store(out + 3, r3)


@pytest.mark.parametrize("window", [None, 4])
def test_tiles_are_skipped_only_when_fully_masked_and_unmasked_only_when_fully_visible(window):
    """Checks the tile classification against the dense mask, tile by tile, with 4 x 8 tiles.

    Skipped tiles must hold no allowed pair and mask-free tiles only allowed pairs (else the kernel is
    wrong); every other tile must be a real boundary (else the kernel wastes work). One exception: with
    a window, a tile of queries (keys) on both sides of the prefix end can see two separate key (query)
    ranges, and the masked tiles between them are visited."""
    BM, BN = 4, 8
    # rows: causal after 5 pads; full; prefix + suffix; the same after 9 pads; full after 3 pads; 21 pads
    start = torch.tensor([5, 0, 0, 9, 3, 21])
    prefix_end = torch.tensor([5, 23, 13, 17, 23, 23])
    for slot, T, S in ((0, 23, 23), (10, 6, 23), (20, 1, 23)):  # training/prefill, chunked prefill, decode
        B, n_q, n_k = start.shape[0], -(-T // BM), -(-S // BN)
        key_ranges = torch.zeros(B, n_q, 4, dtype=torch.int64)
        query_ranges = torch.zeros(B, n_k, 4, dtype=torch.int64)
        _tile_ranges_kernel[(max(n_q, n_k), B)](key_ranges, query_ranges, start, prefix_end,
                                                T + slot if window is None else window, slot, T, S, BM, BN)
        allowed = PrefixLMMask(start, prefix_end, S).allowed(slot, T, S, window)[:, 0]   # (B, T, S)
        for b in range(B):
            pe = prefix_end[b].item()
            for m in range(n_q):
                i_lo, i_hi = slot + m * BM, slot + min((m + 1) * BM, T) - 1
                for n in range(n_k):
                    j_lo, j_hi = n * BN, min((n + 1) * BN, S) - 1
                    tile = allowed[b, m * BM:(m + 1) * BM, n * BN:(n + 1) * BN]
                    gap = window is not None and i_lo < pe <= i_hi
                    check_tile_class(tile, j_lo, *key_ranges[b, m].tolist(), j_hi == j_lo + BN - 1, gap)
                    gap = window is not None and j_lo < pe <= j_hi
                    check_tile_class(tile, m * BM, *query_ranges[b, n].tolist(), i_hi == i_lo + BM - 1, gap)


def check_tile_class(tile, at, lo, full_lo, full_hi, hi, complete, gap):
    """A tile starting at `at` (along the ranges' axis) against the ranges lo ≤ full_lo ≤ full_hi ≤ hi."""
    if not lo <= at < hi:
        assert not tile.any(), "a skipped tile holds allowed pairs"
    elif full_lo <= at < full_hi:
        assert tile.all() and complete, "a tile that skips the mask holds masked pairs"
    else:
        assert not (tile.all() and complete), "a fully visible tile takes the masked path"
        assert tile.any() or gap, "a fully masked tile is visited"


def test_prefix_lm_rows_with_different_pads_and_prefix_lengths_match_reference():
    # row 0: no pads, prefix 0..19, suffix 20..32; row 1: 5 pads, prefix 5..11; row 2: 9 pads, all prefix
    assert_matches_reference((0, 5, 9), (20, 12, 33))


def test_causal_attention_with_left_pads_matches_reference():
    assert_matches_reference((0, 7), (0, 7))


def test_full_bidirectional_attention_at_siglip_head_dim_72_matches_reference():
    assert_matches_reference((0,), (33,), H=72)


def test_grouped_query_attention_4_heads_on_2_matches_reference():
    assert_matches_reference((3,), (21,), N=4, K=2)


def test_multi_query_attention_4_heads_on_1_matches_reference():
    assert_matches_reference((3,), (21,), N=4, K=1)


def test_soft_capped_logits_and_their_gradient_match_reference():
    # logits of size ~±15 against a cap of 5: tanh is saturated, so 1 - tanh² matters in the backward
    assert_matches_reference((0, 6), (18, 10), softcap=5.0, logit_gain=4.0)


def test_sliding_window_limits_suffix_but_not_prefix_queries():
    # window 5 is shorter than the prefix (0..24): prefix queries still see all of it
    assert_matches_reference((0, 4), (25, 9), window=5, softcap=50.0)


def test_head_dim_128_matches_reference():
    assert_matches_reference((2,), (11,), T=20, H=128)


def test_head_dim_256_matches_reference():
    assert_matches_reference((2,), (11,), T=20, H=256)


def test_decode_of_one_query_against_a_longer_cache_takes_the_split_kernel_and_matches_reference():
    # query at index 30 of a 40-slot cache: slots 31..39 hold garbage and must be ignored
    with mock.patch.object(kernels, "decode_forward", wraps=decode_forward) as split_kernel:
        assert_matches_reference((3, 0), (20, 25), T=1, slot=30, S=40, N=2, K=1, softcap=50.0)
    split_kernel.assert_called_once()


def test_decode_of_a_few_queries_split_into_key_chunks_matches_reference():
    assert_matches_reference((3, 0), (20, 25), T=3, slot=28, S=40, N=2, K=1, softcap=50.0, window=7,
                             decode_splits=3)


def test_split_key_decode_gives_the_tiled_kernels_output_and_logsumexp_for_any_chunk_count():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, 2, 16, generator=g)                             # 2 queries at 30, 31
    k, v = torch.randn(2, 2, 40, 16, generator=g), torch.randn(2, 2, 40, 16, generator=g)
    start, prefix_end = torch.tensor([3, 0]), torch.tensor([20, 25])
    args = (q, k, v, start, prefix_end, 0.25, 50.0, None, 30)
    o, lse = flash_forward(*args)
    for splits in (1, 2, 3):
        o_split, lse_split = decode_forward(*args, num_splits=splits)
        # the same softmax merged from chunks: rounding over the 40 keys and the head dim only
        assert_rounding_close(o_split, o, torch.float32, 40 + 16, "output")
        assert_rounding_close(lse_split, lse, torch.float32, 40 + 16, "logsumexp")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_stay_within_one_percent_of_fp32_reference(dtype):
    # inputs and output rounded to 8 (bf16) or 11 (fp16) bits: 2^-9 and 2^-12 each way; 1 % leaves a few
    # of those roundings, where a wrong mask or a lost tile moves a value by its whole size
    assert_matches_reference((0, 5), (20, 12), N=2, K=1, softcap=50.0, dtype=dtype, rtol=1e-2)


def test_auto_dispatch_does_not_pick_triton_on_cpu():
    # even with the interpreter on (kernels.is_supported("cpu") is True here): it is for tests, not speed
    for softcap in (None, 50.0):
        assert choose("auto", torch.device("cpu"), torch.bfloat16, 16, 1, softcap) in ("reference", "sdpa")


def test_attention_with_impl_triton_equals_reference_path():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, 20, 16, generator=g) for _ in range(3))
    mask = PrefixLMMask(torch.tensor([0, 3]), torch.tensor([12, 8]), 20)
    for m in (mask, None):
        want = attention(q, k, v, m, scale=0.25, softcap=50.0, impl="reference")
        got = attention(q, k, v, m, scale=0.25, softcap=50.0, impl="triton")
        assert_rounding_close(got, want, torch.float32, 20 + 16, "attention")


def test_queries_without_their_own_keys_are_refused_with_a_clear_error():
    q, k = torch.zeros(1, 1, 4, 16), torch.zeros(1, 1, 10, 16)
    with pytest.raises(ValueError, match="indices 8..11 need their own keys"):
        kernels.flash_attention(q, k, k, torch.tensor([0]), torch.tensor([0]), scale=1.0, slot=8)


@pytest.mark.parametrize("name", ["pg1", "pg2"])
def test_the_whole_model_through_the_triton_path_gives_the_reference_logits_and_tokens(hf_checkpoint, name):
    """End to end at tiny size: both towers and the decoder on the fused kernel (prefill and decode)."""
    import numpy as np
    from PIL import Image

    import nanopali
    from nanopali.generate import generate

    model, proc = nanopali.load(hf_checkpoint(name), attn_impl="reference")
    rng = np.random.RandomState(0)
    imgs = [Image.fromarray(rng.randint(0, 255, (30, 40, 3), dtype=np.uint8)) for _ in range(2)]
    prompts = ["caption en", "answer en what color is the circle"]
    batch = proc(imgs, prompts, suffixes=["a red circle", "red"])
    with torch.no_grad():
        want = model(**batch)
        ids_want = generate(model, proc, imgs, prompts, max_new_tokens=4, return_ids=True)[1]
        model.attn_impl = "triton"
        got = model(**batch)
        ids_got = generate(model, proc, imgs, prompts, max_new_tokens=4, return_ids=True)[1]
    real = batch["attention_mask"][batch["input_ids"] != model.cfg.image_token_id].view(got.shape[:2]).bool()
    assert_rounding_close(got[real], want[real], torch.float32,
                          paligemma_terms(model.cfg, batch["input_ids"].shape[1]), "logits")
    assert ids_got == ids_want
