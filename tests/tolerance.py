"""How far apart two float computations of the same quantity may be: derived once, used by every test.

Two computations of one value that differ only in how they sum (a cached decode step adds its keys in
another order than a full forward; oneDNN blocks a GEMM differently on AVX-512, AMX and AVX2, and a
batch of 1 takes another kernel than a batch of 4) round differently. Each rounding moves a running sum
by at most half a unit in the last place; over a sum of n products the errors add like a random walk, so
the result moves by ~√n · eps · |value| (Higham, *Accuracy and
Stability of Numerical Algorithms*, ch. 2-3: the worst case is n · eps, which real data does not approach). Through a network the error of
one layer is carried by the residual stream into the next, so n counts the products along the longest
chain of dependent sums: per layer, the width, the MLP width and the keys attended to, plus the head.

    bound = 8 · eps(dtype) · √n · magnitude

magnitude is the largest |value| compared; 8 = 2 (both sides round) × 4 (the tail of the random walk and
the norms' rescaling). A real bug (a key at the wrong position, an unwritten cache slot that leaks into
the softmax, a scale off by one head dim) moves a value by a fraction of its size: thousands of eps, far
above the bound; tests that check a path against another also check that such a bug fails (see
tests/test_generation.py). Bit-for-bit comparisons are kept only where both sides run the very same
kernels on the same machine (resume, save and load), and say so.
"""
from __future__ import annotations

import math

import torch

HEADROOM = 8


def eps(dtype: torch.dtype) -> float:
    """The spacing of floats at 1.0: 2^-23 for float32, 2^-7 for bfloat16, 2^-10 for float16."""
    return torch.finfo(dtype).eps


def rounding_bound(dtype: torch.dtype, magnitude: float, terms: int) -> float:
    """Most |a - b| that rounding alone explains for values up to `magnitude`, each computed from a chain
    of `terms` products in `dtype` (see the module docstring)."""
    return HEADROOM * eps(dtype) * math.sqrt(max(terms, 1)) * magnitude


def decoder_terms(text_cfg, keys: int) -> int:
    """Products along the longest chain of a decoder's logits: each layer sums over its width (q, k, v, o
    and the norms), its MLP width and `keys` attended positions; the head sums over the width once more."""
    return text_cfg.depth * (text_cfg.width + text_cfg.mlp_dim + keys) + text_cfg.width


def paligemma_terms(cfg, keys: int) -> int:
    """decoder_terms after the image encoder's chain (patch embedding, then per layer its width, MLP width
    and patches attended) and the projector, which feed the image tokens' keys."""
    v = cfg.vision
    vision = 3 * v.patch_size ** 2 + v.depth * (v.width + v.mlp_dim + v.num_patches) + v.width
    return vision + decoder_terms(cfg.text, keys)


def loss_terms(text_cfg, keys: int) -> int:
    """decoder_terms, plus the vocabulary the loss's log-softmax sums over."""
    return decoder_terms(text_cfg, keys) + text_cfg.vocab_size


def backward_terms(text_cfg, keys: int) -> int:
    """Products along the longest chain of a gradient: the forward's chain, then back down through every layer."""
    return 2 * decoder_terms(text_cfg, keys) + text_cfg.vocab_size


def module_terms(module) -> int:
    """Products along a network's chain when its config says little (convolutions, re-parameterised
    branches): every weight's fan-in, summed. Branches side by side are counted as if one after the
    other, which only errs toward a looser bound."""
    return sum(p[0].numel() for p in module.parameters() if p.dim() >= 2)


def max_abs(t) -> float:
    return t.detach().abs().max().item() if isinstance(t, torch.Tensor) else max(abs(float(v)) for v in t)


def assert_rounding_close(actual, expected, dtype: torch.dtype, terms: int, what: str = "values") -> float:
    """actual and expected differ by at most rounding_bound (magnitude: the larger side); returns the
    difference, so a test can also record it."""
    a = torch.as_tensor(actual, dtype=torch.float64)
    b = torch.as_tensor(expected, dtype=torch.float64)
    assert a.shape == b.shape, f"{what}: shapes {tuple(a.shape)} and {tuple(b.shape)}"
    assert torch.isfinite(a).all() and torch.isfinite(b).all(), f"{what}: not finite"
    diff = (a - b).abs().max().item() if a.numel() else 0.0
    bound = rounding_bound(dtype, max(max_abs(a), max_abs(b)) if a.numel() else 0.0, terms)
    assert diff <= bound, (f"{what}: max abs diff {diff:.3e} > {bound:.3e}, the rounding bound for {dtype} "
                           f"over {terms} terms ({diff / (eps(dtype) * max(max_abs(b), 1e-30)):.0f} eps of the largest value)")
    return diff
