"""This machine's own rates, measured in the benchmark's process, and the decode floor they set.

Decoding one token at batch 1 reads every weight of the decoder once: its Linears and the tied
257,216-row LM head (SigLIP runs only in the prefill). Each read is a GEMV, so the fastest a decoder
can go is (bytes of those weights) / (the rate this machine streams weights through its best GEMV for
that format): the floor. A result's ratio to it says how much is left on the table, on this machine.
Rates are GB/s of weight bytes (int4: packed nibbles; scales and zeros included), measured on PaliGemma
2's 9216 x 2304 MLP shape, cycling through enough copies (>= 256 MiB) that no cache holds them.
"""
from __future__ import annotations

import os
import time

import torch
import torch.nn.functional as F

from nanopali.cpu import machine

N_ROWS, K_COLS, GROUP = 9216, 2304, 64
_SPAN = 256 << 20   # bytes of distinct weights cycled through per measurement: past any L3


def _best_time(fn, repeats: int = 7) -> float:
    """The fastest of `repeats` calls: a rate is what the machine can do, which another process's
    load only ever hides (the benchmark's own results are medians, and so are fair to both sides)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def read_bandwidth() -> float:
    """GB/s of a 512 MiB fp32 sum: the rate memory feeds this process, with no arithmetic to hide it."""
    x = torch.ones(128 << 20)
    return x.numel() * 4 / _best_time(x.sum) / 1e9


def _gemv_rate(make, call, nbytes: int) -> float:
    """GB/s of weights streamed by call(x, weight), cycling through enough weights to defeat the caches."""
    weights = [make() for _ in range(max(1, _SPAN // nbytes))]
    x = torch.randn(1, K_COLS, dtype=torch.bfloat16)

    def sweep():
        for w in weights:
            call(x, w)

    return len(weights) * nbytes / _best_time(sweep) / 1e9


def gemv_rates() -> dict[str, float | str]:
    """GB/s per weight format (the key is the mode): F.linear in bf16 and fp32 (activations of the same
    dtype), torch's packed int8 and CPU int4 kernels with bf16 activations. A kernel this build lacks
    gives its error message instead of a rate."""
    n, k = N_ROWS, K_COLS
    g = torch.Generator().manual_seed(0)
    rates: dict[str, float | str] = {
        "bf16": _gemv_rate(lambda: torch.randn(n, k, generator=g).to(torch.bfloat16),
                           F.linear, 2 * n * k),
        "fp32": _gemv_rate(lambda: torch.randn(n, k, generator=g),
                           lambda x, w: F.linear(x.float(), w), 4 * n * k),
    }

    def int8():
        return torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g), torch.rand(n).to(torch.bfloat16)

    def int4():
        q = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=g)
        sz = torch.rand(k // GROUP, n, 2).to(torch.bfloat16)   # (K/G, N, 2): [scale, zero] per group
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2), sz

    kernels = {
        "int8": (int8, lambda x, w: torch.ops.aten._weight_int8pack_mm(x, *w), n * k + 2 * n),
        "int4": (int4, lambda x, w: torch.ops.aten._weight_int4pack_mm_for_cpu(x, w[0], GROUP, w[1]),
                 n * k // 2 + 4 * n * k // GROUP),
    }
    for mode, (make, call, nbytes) in kernels.items():
        try:
            rates[mode] = _gemv_rate(make, call, nbytes)
        except (RuntimeError, NotImplementedError, AttributeError) as e:
            rates[mode] = f"unavailable ({str(e).splitlines()[0][:100]})"
    return rates


def decode_bytes(text_cfg, mode: str) -> float:
    """Bytes of weights one decoded token reads (batch 1): every Linear of the decoder and the tied head,
    stored as `mode` stores them (int8: a bf16 scale per row; int4: a bf16 scale and zero per group)."""
    t = text_cfg
    per_layer = (2 * t.num_heads * t.head_dim * t.width            # q, o
                 + 2 * t.num_kv_heads * t.head_dim * t.width       # k, v
                 + 3 * t.mlp_dim * t.width)                        # gate, up, down
    weights = t.depth * per_layer + t.vocab_size * t.width
    rows = t.depth * (t.num_heads * t.head_dim + 2 * t.num_kv_heads * t.head_dim + t.width
                      + 2 * t.mlp_dim + t.width) + t.vocab_size
    return {"fp32": 4 * weights, "bf16": 2 * weights, "int8": weights + 2 * rows,
            "int4": weights / 2 + 4 * weights / GROUP}[mode]


def describe(threads: int) -> str:
    """nanopali.cpu.machine's line (CPU, the features torch may use, torch, threads) and the load average:
    a rate measured while another process holds the cores says less about the machine."""
    load1, load5, _ = os.getloadavg()
    busy = "" if load1 < 0.5 else f" (another process is using the CPU: load {load1:.2f} before this run started)"
    return f"{machine.describe(threads)}; load average {load1:.2f} (1 min) {load5:.2f} (5 min){busy}"
