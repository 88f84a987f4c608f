"""The peers nanopali is timed against in `bench.py --full`: transformers' model, plain or quantized by torchao.

torchao's weight-only configs are probed on a small Linear before the 3B model is touched, so a config
that does not run on this device is reported (with torchao's own reason) instead of failing halfway
through a model. In torchao 0.18 on CPU: Int8WeightOnlyConfig runs; Int4WeightOnlyConfig does not (its
"plain" packing needs the mslk kernels, "plain_int32" is CUDA/XPU only, "tile_packed_to_4d" CUDA), so
int4 falls back to IntxWeightOnlyConfig(int4, groups of 64), which keeps one int4 value per int8 byte.
"""
from __future__ import annotations

import torch

_PROBE_ERRORS = (RuntimeError, ValueError, ImportError, NotImplementedError, AssertionError, TypeError)


def load_transformers(path: str, dtype: torch.dtype):
    from transformers import PaliGemmaForConditionalGeneration
    from transformers.utils import logging

    logging.disable_progress_bar()
    return PaliGemmaForConditionalGeneration.from_pretrained(path, dtype=dtype).eval()


def _candidates(mode: str, group_size: int):
    import torchao.quantization as tq
    from torchao.quantization.granularity import PerGroup

    return {
        "int8": [("Int8WeightOnlyConfig()", tq.Int8WeightOnlyConfig)],
        "int4": [(f"Int4WeightOnlyConfig(group_size={group_size})",
                  lambda: tq.Int4WeightOnlyConfig(group_size=group_size)),
                 (f"IntxWeightOnlyConfig(int4, PerGroup({group_size}))",
                  lambda: tq.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size)))],
    }[mode]


def torchao_config(mode: str, group_size: int, dtype=torch.bfloat16):
    """(make_config, label, reasons): the first torchao weight-only config for `mode` that quantizes and
    runs a Linear on the CPU, and why each one before it did not; make_config is None if none runs."""
    try:
        from torchao.quantization import quantize_
        candidates = _candidates(mode, group_size)
    except ImportError as e:
        return None, None, [f"torchao is not installed ({e})"]
    reasons = []
    for label, make in candidates:
        probe = torch.nn.Sequential(torch.nn.Linear(256, 128, bias=False)).to(dtype)
        try:
            quantize_(probe, make())
            with torch.inference_mode():
                probe(torch.randn(1, 256, dtype=dtype))
            return make, label, reasons
        except _PROBE_ERRORS as e:
            reasons.append(f"torchao {label} does not run on CPU: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
    return None, None, reasons


def load_torchao(path: str, make_config, group_size: int | None = None, dtype=torch.bfloat16):
    """transformers' model in `dtype`, then every nn.Linear quantized by torchao (the tied lm_head
    included: quantize_ gives it its own quantized weight, the embedding stays in `dtype`). With
    group_size, a Linear whose input width it does not divide (SigLIP's fc2, 4304 wide) stays in
    `dtype`: torchao asserts on it, where nanopali stores that layer as int8."""
    from torchao.quantization import quantize_

    model = load_transformers(path, dtype)
    quantize_(model, make_config(), filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and (
        group_size is None or m.in_features % group_size == 0))
    return model
