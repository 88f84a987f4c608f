"""When "auto" may run the fused kernel: the policy behind attention.choose, on a GPU only.

attention.choose decides which implementation runs and asks `fused_for_auto` on device types where the
kernel could run (attention.FUSED_DEVICES, CUDA). Only then is this package imported, so inference on
a CPU never loads Triton.

The kernel runs for "auto" when Triton can launch it here, in fp16 / bf16 (fp32 tiles spill and
overflow shared memory on every GPU generation, docs/gpu.md#compiled-for-real-targets), and once it has
passed its self-check on this (device, dtype, head dim) (selfcheck.py; a failure warns once, and
"auto" runs the exact alternative there). NANOPALI_FUSED_ATTENTION=on skips the self-check, =off keeps
"auto" off the kernel (docs/gpu.md#the-self-check).
"""
from __future__ import annotations

import torch

from . import is_supported
from .selfcheck import mode, passes


def fused_for_auto(device: torch.device, dtype: torch.dtype, head_dim: int, groups: int) -> bool:
    """May attn_impl="auto" run the fused kernel for attention of this kind? groups: query heads per
    K/V head, so that the self-check compiles the kernel the caller will run."""
    if mode() == "off" or not is_supported(device) or dtype == torch.float32:
        return False
    return passes(device, dtype, head_dim, groups)
