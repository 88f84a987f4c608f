"""Tile sizes, warps and pipeline stages of the fused kernels, per GPU generation.

A kernel's tiles live in registers (the accumulators, the score tile) and in shared memory (K/V tiles,
one buffer per pipeline stage), so one tiling does not fit every GPU: an L4/L40S (sm_89) has 99 KiB of
shared memory per block where an H100 has 227 KiB, and a tile that needs more fails to launch. The
values were chosen from ptxas' reports for sm_80/89/90 (`python bench.py compile-report`, tables in
docs/gpu.md#compiled-for-real-targets): no shared memory over the limit, fewest spilled registers, then
the largest tiles. They have not been timed on a GPU yet; `bench.py gpu` measures them.
"""
from __future__ import annotations

import os

import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # as triton.jit reads it when flash.py is imported

# Shared memory one block may use, bytes (the opt-in maximum: CUDA C++ Programming Guide, "Technical
# Specifications per Compute Capability"). Triton refuses to launch a kernel that asks for more.
SHARED_MEMORY_PER_BLOCK = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448}


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, for head dims padded to ≤ 128 (SigLIP's 72,
# the 28B decoder's 128) and to 256 (Gemma's); BLOCK_M counts queries and BLOCK_N keys in every kernel.
# Per ptxas (bf16 and fp16 alike, docs/gpu.md#compiled-for-real-targets):
#   sm_80 / sm_89: every tile fits 99 KiB (L4, L40S) and none spills; the previous 64 x 64 tiles at
#     H 256 spilled 56-1000 B and needed 100-104 KiB: over the sm_89 limit.
#   sm_90: Hopper's wgmma reads operands from shared memory, of which it has 227 KiB: longer tiles; no
#     spills but 20 B in PaliGemma 1's forward (before: 20-1100 B in most kernels).
PRE_HOPPER = {
    128: {"fwd": (64, 64, 8, 2), "dq": (64, 64, 8, 2), "dkdv": (32, 64, 8, 1), "decode": (None, 64, 8, 2)},
    256: {"fwd": (64, 32, 8, 2), "dq": (64, 32, 8, 1), "dkdv": (16, 64, 8, 1), "decode": (None, 64, 8, 2)},
}
HOPPER = {
    128: {"fwd": (128, 64, 8, 2), "dq": (64, 64, 8, 2), "dkdv": (32, 64, 8, 2), "decode": (None, 64, 8, 2)},
    256: {"fwd": (128, 32, 8, 3), "dq": (32, 64, 8, 2), "dkdv": (32, 64, 8, 1), "decode": (None, 64, 8, 2)},
}


def tile_config(kernel: str, H: int, dtype: torch.dtype, arch: int | None):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of a kernel ("fwd", "dq", "dkdv", "decode") on sm_`arch`.

    arch None is Triton's CPU interpreter, where a tile is numpy arrays: 16 x 16 keeps the tests fast and
    crosses many tile boundaries. The sm_90 table is for Hopper only: newer or smaller GPUs get the one
    that fits 99 KiB. fp32 tiles take twice the bytes of bf16, so they get the 256-wide ones."""
    if arch is None:
        return 16, 16, 1, 1
    table = HOPPER if arch == 90 else PRE_HOPPER
    return table[256 if H > 128 or dtype == torch.float32 else 128][kernel]


_ARCHS: dict[int, int] = {}   # CUDA device index → compute capability, filled at the first launch


def target_arch(device: torch.device) -> int | None:
    """The compute capability the kernels compile for (major·10 + minor), or None in the interpreter.

    A cached lookup, so that a torch.compile'd caller traces a dictionary read, not the CUDA runtime. A
    non-CUDA tensor outside the interpreter is the compile report's (benchmarks/compile_report.py): its
    stand-in Triton driver names the target."""
    if INTERPRETED:
        return None
    if device.type != "cuda":
        import triton
        return triton.runtime.driver.active.get_current_target().arch
    index = torch.cuda.current_device() if device.index is None else device.index
    return _ARCHS[index] if index in _ARCHS else _read_arch(index)


@torch.compiler.disable
def _read_arch(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    _ARCHS[index] = 10 * major + minor
    return _ARCHS[index]
