"""Decode-time products in the form that is fastest on this CPU, measured here, not assumed.

Decoding at batch 1 reads every decoder weight once per token, so it runs at the rate one product x · Wᵀ
of a single row streams W. torch has three forms of that product, and which is fastest depends on the CPU
and the weight's shape (bf16, 2 idle threads, torch 2.13, GB/s of weight):

                                 torch.mv   F.linear   x @ W.t()
    AMD EPYC (AVX-512 BF16)
        9216 x 2304 (gate, up)      35         34         29
        2304 x 9216 (down)          21         26         36
        257216 x 2304 (LM head)     23         29         31
    Intel Xeon (AMX)             27-29 where F.linear reached 23, on the first and last shapes

No one form wins everywhere, so the first time a loaded model has a weight shape, each form streams the
model's own weights of that shape (many layers' worth, so no cache holds them), alternating, best of
several rounds, and the fastest is kept for that shape (F.linear, the plain form, unless another beats
it by more than NOISE). A quantized model's crossover from torch's packed decode kernel to dequantize +
GEMM (quant/modules.py) is found the same way. Choices are remembered per machine, torch build, thread
count and dtype in $XDG_CACHE_HOME/nanopali/products.json (or $NANOPALI_CACHE_DIR/products.json), so a
later process measures nothing; delete the file to measure again (say, after one was taken on a busy
machine). NANOPALI_ROW_PRODUCT=mv|linear|matmul forces one form (a benchmark's control).
"""
from __future__ import annotations

import functools
import json
import logging
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import machine

# Letters: N output rows of W, K its inputs; M rows of activations.

log = logging.getLogger("nanopali")

FORMS = {
    "mv": lambda x, w: torch.mv(w, x.reshape(-1)).view(*x.shape[:-1], w.shape[0]),
    "linear": F.linear,
    "matmul": lambda x, w: x @ w.t(),
}
MIN_BYTES = 8 << 20   # smaller weight groups stay in cache and take microseconds: F.linear, not measured
SPAN = 256 << 20      # bytes of distinct weights one timing streams: past any L3
ROUNDS = 3
NOISE = 0.03          # another form must be this much faster than F.linear to replace it
ROW_CANDIDATES = (1, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)   # for the quantized crossover


class RowLinear(nn.Linear):
    """nn.Linear (no bias) whose one-row product runs in the form measured fastest for its shape."""

    form = "linear"
    plain = nn.Linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == x.shape[-1]:
            return FORMS[self.form](x, self.weight)
        return F.linear(x, self.weight)


@functools.lru_cache(maxsize=None)
def _row_head(embed_cls):
    """A subclass of the model's tied embedding whose LM head (`unembed`) uses the measured form."""

    class RowHead(embed_cls):
        form = "linear"
        plain = embed_cls

        def unembed(self, h: torch.Tensor) -> torch.Tensor:
            if h.numel() == h.shape[-1]:
                return FORMS[self.form](h, self.weight)
            return super().unembed(h)

    RowHead.__name__ = RowHead.__qualname__ = f"Row{embed_cls.__name__}"
    return RowHead


# ---- the per-machine memory of choices ----

def _cache_path() -> str:
    root = os.environ.get("NANOPALI_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "nanopali")
    return os.path.join(root, "products.json")


def _machine_key() -> str:
    f = machine.features()
    return (f"{machine.cpu_model()} | {'+'.join(k for k, v in f.items() if v) or 'baseline'} | "
            f"torch {torch.__version__} | {torch.get_num_threads()} threads")


def _read_choices() -> dict:
    try:
        with open(_cache_path()) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):   # absent, unreadable or damaged: measure again and rewrite it
        return {}


def _remember(key: str, value) -> None:
    """Add one choice to the file, atomically; a cache directory that cannot be written only costs a
    measurement in the next process."""
    from ..formats.files import atomic_write

    data = _read_choices()
    data.setdefault(_machine_key(), {})[key] = value
    path = _cache_path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write(path, lambda tmp: open(tmp, "w").write(json.dumps(data, indent=1, sort_keys=True)))
    except OSError as e:
        log.info("nanopali: could not remember a measured choice in %s (%s)", path, e)


def _recalled(key: str):
    return _read_choices().get(_machine_key(), {}).get(key)


# ---- timing ----

def best_seconds(fns: dict, rounds: int = ROUNDS) -> dict:
    """The fastest of `rounds` timings of each fn, the fns alternating within a round so that a change
    of clock or load touches them alike; one untimed call of each first (allocations, packing)."""
    for fn in fns.values():
        fn()
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def fastest_form(weights: list[torch.Tensor]) -> tuple[str, dict]:
    """(form, seconds per form) for one row times each of `weights` (same shape and dtype), streaming up
    to SPAN bytes of them per timing."""
    w0 = weights[0]
    take = weights[: max(1, SPAN // (w0.numel() * w0.element_size()))]
    x = torch.randn(1, w0.shape[1], dtype=w0.dtype, generator=torch.Generator().manual_seed(0))

    def sweep(form):
        return lambda: [FORMS[form](x, w) for w in take]

    with torch.no_grad():
        seconds = best_seconds({form: sweep(form) for form in FORMS})
    best = min(seconds, key=seconds.get)
    if seconds[best] > seconds["linear"] * (1 - NOISE):
        best = "linear"
    return best, seconds


def use_fastest_row_products(model: nn.Module) -> dict[str, str]:
    """Swap the decoder's bias-free Linears and its tied LM head for the same modules with the one-row
    form measured fastest per weight shape (module swaps at load: the model's files keep nn.Linear).
    CPU float weights only; returns {shape: form} of what was chosen, for a log line."""
    lm = model.language_model
    groups: dict[tuple, list[tuple[nn.Module, str, nn.Module]]] = {}
    for parent in lm.modules():
        for name, child in parent.named_children():   # parent and name: for the log, and to find the head
            is_linear = type(child) in (nn.Linear, RowLinear) and child.bias is None
            is_head = child is getattr(lm, "embed", None) and hasattr(child, "unembed") \
                and isinstance(child, nn.Embedding)
            if (is_linear or is_head) and child.weight.device.type == "cpu" and child.weight.is_floating_point():
                w = child.weight
                groups.setdefault((tuple(w.shape), w.dtype), []).append((parent, name, child))
    forced = os.environ.get("NANOPALI_ROW_PRODUCT")
    if forced is not None and forced not in FORMS:
        raise ValueError(f"NANOPALI_ROW_PRODUCT={forced!r}: use one of {', '.join(FORMS)}")
    chosen = {}
    for (shape, dtype), members in groups.items():
        label = f"{shape[0]}x{shape[1]} {str(dtype).removeprefix('torch.')}"
        nbytes = sum(m.weight.numel() * m.weight.element_size() for _, _, m in members)
        form = forced or _recalled(f"row {label}")
        if form not in FORMS:
            if nbytes < MIN_BYTES:
                form = "linear"
            else:
                form, seconds = fastest_form([m.weight for _, _, m in members])
                _remember(f"row {label}", form)
                log.info("nanopali: one-row product for %s weights: %s (%s; remembered in %s)", label, form,
                         ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in seconds.items()), _cache_path())
        chosen[label] = form
        for _, _, child in members:
            # the same module under a subclass (or back under its own class, for F.linear): its parameter,
            # hooks and state_dict keys stay as they were
            plain = getattr(child, "plain", type(child))
            if form == "linear":
                child.__class__ = plain
            else:
                child.__class__ = RowLinear if plain is nn.Linear else _row_head(plain)
                child.form = form
    return chosen


def kernel_row_limit(layer, rows=ROW_CANDIDATES) -> int:
    """Most activation rows for which a quantized layer's packed decode kernel (layer._fast) beats
    dequantize + GEMM (layer._dense) on this CPU, by bisection over `rows` (the kernels' cost grows with
    rows, the dense path's is mostly the fixed dequantization)."""
    dtype = layer.dtype
    g = torch.Generator().manual_seed(0)

    def kernel_wins(m: int) -> bool:
        x = torch.randn(m, layer.in_features, generator=g).to(dtype)
        if layer._fast(x) is None:        # no kernel in this build: the dense path always
            return False
        s = best_seconds({"kernel": lambda: layer._fast(x), "dense": lambda: layer._dense(x)}, rounds=2)
        return s["kernel"] <= s["dense"]

    lo, hi = -1, len(rows)            # rows[lo] known to win (-1: none yet), rows[hi] known to lose
    with torch.no_grad():
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if kernel_wins(rows[mid]):
                lo = mid
            else:
                hi = mid
    return rows[lo] if lo >= 0 else 0


def use_measured_kernel_rows(model: nn.Module) -> dict[str, int]:
    """Set every quantized layer's kernel/dense crossover (`kernel_rows`) to the one measured on this CPU
    for its scheme, on the model's largest quantized Linear (the crossover is in rows, and moves little
    with the shape: within ~20 % between PaliGemma's 9216x2304 and 2304x9216). {scheme: rows}."""
    if getattr(model, "quantization", None) is None:   # a float model: quant/ stays unimported
        return {}
    from ..quant.modules import QuantizedLinear, QuantizedWeight

    layers = [m for m in model.modules() if isinstance(m, QuantizedWeight) and m.scale.device.type == "cpu"]
    chosen = {}
    for scheme in sorted({m.scheme for m in layers}):
        mine = [m for m in layers if m.scheme == scheme]
        probe = max((m for m in mine if isinstance(m, QuantizedLinear)), default=None,
                    key=lambda m: m.in_features * m.out_features)
        if probe is None:
            continue
        # "dense v2": the dense path unpacks in place since 2026-12 (quant/modules.py); older figures measured the slower one
        label = f"kernel rows dense v2 {scheme} {probe.out_features}x{probe.in_features} " \
                f"{str(probe.dtype).removeprefix('torch.')}" + (f" g{probe.group_size}" if scheme == "int4" else "")
        rows = _recalled(label)
        if not isinstance(rows, int):
            if probe.in_features * probe.out_features * 2 < MIN_BYTES:
                continue                  # a tiny model: nothing worth measuring, the defaults stand
            rows = kernel_row_limit(probe)
            _remember(label, rows)
            log.info("nanopali: %s decode kernel up to %d rows, dequantize + GEMM past them", scheme, rows)
        for m in mine:
            m.kernel_rows = rows
        chosen[scheme] = rows
    return chosen
