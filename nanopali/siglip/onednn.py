"""The two-tower encoders' products on CPU through oneDNN, with their bias and GELU fused: module swaps at load.

An encoder spends most of its time in x · Wᵀ + b, and each MLP follows its first product with a GELU.
torch.ops.mkldnn._linear_pointwise (the op torch.compile's CPU backend emits for a Linear) runs the
product in oneDNN and applies the bias and the GELU to the accumulators before they are written: one
pass over the (B, T, 4W) hidden activations where F.linear + F.gelu make three (the bias copied in, the
product, the GELU), and the GELU of the float32 sums rather than of their bf16 rounding. In fp32 it
also replaces torch's BLAS GEMM, which need not be the faster one: on an AMD EPYC, MKL runs its generic
path (MKL_VERBOSE: "Intel(R) Architecture processors") and is 1.2-1.5x slower than oneDNN's AVX-512
kernels (docs/speed.md#two-tower-encoders).

Whether oneDNN runs is decided once per process, dtype and thread count by `onednn_is_faster` and
logged on the "nanopali" logger: in bf16 on a CPU with native bf16 always (F.linear runs the same GEMM
there), otherwise timed on one MLP-sized product and kept only where it beats F.linear + F.gelu by
NOISE. The loaders apply `use_onednn` (as gpt-fast's quantize.py swaps modules), so the model files
keep nn.Linear and F.gelu and no state_dict key changes. Only inference takes the oneDNN path
(torch.no_grad or inference_mode, on the CPU): these ops have no backward, so a forward that may
record gradients runs the plain modules.
"""
from __future__ import annotations

import functools
import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..cpu import machine
from ..cpu.products import best_seconds
from ..vit import MLP

log = logging.getLogger("nanopali")

NOISE = 0.05        # oneDNN must be this much faster than F.linear + F.gelu to be used
ROUNDS = 5
MLPS = {MLP: ("fc1", "fc2", "tanh")}   # MLP class → (up Linear, down Linear, GELU approximation): SigLIP's


def onednn_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, gelu: str | None = None):
    """x · wᵀ + b, then GELU when `gelu` is given ("none": erf, "tanh": its tanh approximation): one oneDNN call."""
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "gelu" if gelu else "none", [], gelu or "")


def plain_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, gelu: str | None = None):
    y = F.linear(x, w, b)
    return F.gelu(y, approximate=gelu) if gelu else y


@functools.lru_cache(maxsize=None)
def onednn_is_faster(dtype: torch.dtype, threads: int) -> bool:
    """Does the fused oneDNN product beat F.linear + F.gelu here, for `dtype` at `threads` threads?

    bf16 on a CPU that multiplies it natively (AVX-512 BF16, AMX): yes, without timing, because F.linear
    runs oneDNN's GEMM there too and the fused call only drops passes (a timing would be a coin toss on a
    busy machine, ~10 % apart). Otherwise timed: 256 rows through a 1024 → 4096 MLP product (a ViT-B /
    So400m fc1 at batch 1, ~2 GFLOP), oneDNN kept only NOISE ahead."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    name = str(dtype).removeprefix("torch.")
    if dtype == torch.bfloat16 and machine.native_bf16():
        log.info("nanopali: encoder products in bfloat16: oneDNN, bias and GELU fused (native bf16: the GEMM "
                 "F.linear runs too)")
        return True
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 1024, generator=g).to(dtype)
    w = (torch.randn(4096, 1024, generator=g) / 32).to(dtype)
    b = torch.zeros(4096, dtype=dtype)
    try:
        with torch.no_grad():
            s = best_seconds({"F.linear + F.gelu": lambda: plain_linear(x, w, b, "none"),
                              "oneDNN": lambda: onednn_linear(x, w, b, "none")}, rounds=ROUNDS)
    except RuntimeError as e:   # no oneDNN kernel for this dtype on this CPU
        log.info("nanopali: encoder products in %s: F.linear (oneDNN has none: %s)", name, str(e).splitlines()[0])
        return False
    faster = s["oneDNN"] < s["F.linear + F.gelu"] * (1 - NOISE)
    log.info("nanopali: encoder products in %s at %d threads: %s (%s)", name, threads,
             "oneDNN, bias and GELU fused" if faster else "F.linear",
             ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in s.items()))
    return faster


def runs_onednn(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """The one decision of every swapped module: inference (no autograd) on the CPU, in a dtype where
    oneDNN was measured faster."""
    if torch.is_grad_enabled() or x.device.type != "cpu" or any(w.dtype != x.dtype for w in weights):
        return False
    return x.is_floating_point() and onednn_is_faster(x.dtype, torch.get_num_threads())


class OneDNNLinear(nn.Linear):
    """nn.Linear whose inference product runs in oneDNN where that was measured faster."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if runs_onednn(x, self.weight):
            return onednn_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


@functools.lru_cache(maxsize=None)
def fused_mlp(cls: type, up: str, down: str, gelu: str) -> type:
    """A subclass of the MLP class `cls` (Linear `up` → GELU(approximate=gelu) → Linear `down`) whose
    inference forward is two oneDNN calls, the GELU fused into the first."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u, d = getattr(self, up), getattr(self, down)
        if not runs_onednn(x, u.weight, d.weight):
            return cls.forward(self, x)
        return onednn_linear(onednn_linear(x, u.weight, u.bias, gelu), d.weight, d.bias)

    return type(f"OneDNN{cls.__name__}", (cls,), {"forward": forward, "__module__": __name__})


def use_onednn(model: nn.Module, mlps: dict[type, tuple[str, str, str]] = MLPS) -> nn.Module:
    """Swap, in place, every MLP whose class is in `mlps` ({class: (up Linear, down Linear, GELU
    approximation)}) for its fused form and every other nn.Linear for OneDNNLinear: the same modules
    under a subclass, so parameters, hooks and state_dict keys stay as they were. Returns the model."""
    for m in model.modules():
        if type(m) in mlps:
            m.__class__ = fused_mlp(type(m), *mlps[type(m)])
        elif type(m) is nn.Linear:
            m.__class__ = OneDNNLinear
    return model


__all__ = ["onednn_linear", "plain_linear", "onednn_is_faster", "runs_onednn", "OneDNNLinear", "fused_mlp",
           "use_onednn"]
