"""The fused kernels check themselves on a device before `attn_impl="auto"` makes them the default there.

The kernels are proved against the reference attention in Triton's CPU interpreter
(tests/test_fused_attention.py), but a GPU adds what the interpreter does not have: the compiler, the
register allocator, the target's shared-memory limit. So the first time "auto" would run them for a
(device, dtype, head dim), `passes` runs them once on small random inputs against
attention.reference_attention (fp32, same rounded inputs), forward and backward: the prefix-LM mask
with left pads, grouped K/V heads, Gemma 2's soft-cap, a sliding window, and one decode query (the
split-K kernel). A compile error or a disagreement gives one warning that says why and how to report
it, and "auto" falls back to the exact alternative. The verdict is kept for the process.

NANOPALI_FUSED_ATTENTION (read at each first use): "check" (default), "on" (use the kernels unchecked),
"off" ("auto" never picks them). attn_impl="triton" always runs them, unchecked (docs/gpu.md#the-self-check).
"""
from __future__ import annotations

import os
import warnings

import torch

# Letters: B batch, N query heads, K key/value heads, T queries, S keys, H head dim.

ENV = "NANOPALI_FUSED_ATTENTION"
MODES = ("check", "on", "off")
# Largest error allowed, relative to the largest entry of each reference tensor: low-precision inputs
# stay within ~1 % (the interpreter tests' bound); a wrong kernel is off by tens of percent.
TOLERANCE = {torch.float16: 3e-2, torch.bfloat16: 3e-2, torch.float32: 1e-3}

VERDICTS: dict[tuple, str | None] = {}   # (device type, index, dtype, H) -> None (passed) or why it failed


def mode() -> str:
    m = os.environ.get(ENV, "check")
    if m not in MODES:
        raise ValueError(f"{ENV}={m!r}: expected one of {', '.join(MODES)}")
    return m


def passes(device: torch.device, dtype: torch.dtype, H: int, G: int = 2) -> bool:
    """May "auto" run the fused kernels for this device, dtype and head dim? G: the caller's query heads
    per K/V head, so the check compiles the kernels the caller will run (at least 2, to cover GQA)."""
    if mode() == "on":
        return True
    key = (device.type, device.index, dtype, H)
    if key not in VERDICTS:
        _decide(key, device, dtype, H, G)
    return VERDICTS[key] is None


@torch.compiler.disable   # runs eagerly once; a compiled caller then reads only the cached verdict
def _decide(key, device, dtype, H, G) -> None:
    try:
        VERDICTS[key] = disagreement(device, dtype, H, G)
    except Exception as e:   # whatever the compiler or the launch raises: never crash, fall back
        first = (str(e).strip().splitlines() or [""])[0][:300]
        VERDICTS[key] = f"failed to compile or run ({type(e).__name__}: {first})"
    if VERDICTS[key] is not None:
        warnings.warn(_message(VERDICTS[key], device, dtype, H), RuntimeWarning, stacklevel=4)


def _cases(S: int):
    """(name, T, slot, softcap, window, logit gain) of each check; gain 4 saturates the cap of 5, so
    the soft-cap's derivative matters in the backward."""
    return (("prefix-LM mask with pads, soft-cap, sliding window", S, 0, 5.0, S // 4, 4.0),
            ("prefix-LM mask with pads, no soft-cap", S, 0, None, None, 1.0),
            ("one decode query against a longer cache, soft-cap", 1, S // 2, 50.0, None, 1.0))


def disagreement(device: torch.device, dtype: torch.dtype, H: int, G: int = 2) -> str | None:
    """None when the kernels give the reference's output and gradients on every case, else what differs.

    Inputs come from a CPU generator (the caller's random streams are left alone); the sizes cross a
    few tiles of whichever tiling runs (16 in the interpreter, 64-128 on a GPU)."""
    from . import INTERPRETED

    B, K, S = 2, 2, 24 if INTERPRETED else 200
    start, prefix_end = torch.tensor([0, 5]), torch.tensor([S * 2 // 3, S // 3])   # row 1: 5 pads
    g = torch.Generator().manual_seed(0)
    for name, T, slot, softcap, window, gain in _cases(S):
        errors = relative_errors(device, dtype, B, max(2, G) * K, K, T, S, H, start, prefix_end, slot,
                                 softcap, window, gain, g)
        for what, err in errors.items():
            if not err <= TOLERANCE[dtype]:   # written so that NaN fails too
                return (f"disagrees with reference_attention: {what} max |diff| is {err:.3g} of its largest "
                        f"entry, allowed {TOLERANCE[dtype]:.3g} ({name}, B={B}, N={max(2, G) * K}, K={K}, T={T}, "
                        f"S={S})")
    return None


def relative_errors(device, dtype, B, N, K, T, S, H, start, prefix_end, slot=0, softcap=None, window=None,
                    gain=1.0, g=None) -> dict[str, float]:
    """{"output", "dq", "dk", "dv": max |kernel − reference| / max |reference|} on random inputs drawn from
    the CPU generator g; the reference runs in fp32 on the same (rounded) inputs."""
    from ..attention import reference_attention
    from ..masking import PrefixLMMask
    from . import flash_attention

    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
        q = (torch.randn(B, N, T, H, generator=g) * gain).to(device, dtype).requires_grad_()
        k, v = (torch.randn(B, K, S, H, generator=g).to(device, dtype).requires_grad_() for _ in range(2))
        do = torch.randn(B, N, T, H, generator=g).to(device, dtype)
        o = flash_attention(q, k, v, start, prefix_end, scale=H ** -0.5, softcap=softcap, window=window,
                            slot=slot)
        got = (o, *torch.autograd.grad(o, (q, k, v), do))
        x32 = [x.detach().float().requires_grad_() for x in (q, k, v)]
        allowed = PrefixLMMask(start.to(device), prefix_end.to(device), S).allowed(slot, T, S, window)
        ref = reference_attention(*x32, allowed, H ** -0.5, softcap)
        want = (ref, *torch.autograd.grad(ref, x32, do.float()))
    return {what: ((a.float() - b).abs().max() / b.abs().max()).item()
            for what, a, b in zip(("output", "dq", "dk", "dv"), got, want)}


def _message(reason: str, device: torch.device, dtype: torch.dtype, H: int) -> str:
    import triton

    where = str(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        where += f" ({torch.cuda.get_device_name(device)}, sm_{major}{minor})"
    return (f"nanopali: the fused attention kernel {reason} on {where}, {str(dtype).split('.')[1]}, head dim {H}. "
            f"attn_impl='auto' runs SDPA there instead (the reference attention where Gemma 2's soft-cap "
            f"applies): exact, but slower. Please report this as an issue on nanopali's repository with this "
            f"message and torch {torch.__version__}, triton {triton.__version__}. {ENV}=on uses the kernel "
            f"anyway, {ENV}=off skips this check (docs/gpu.md#the-self-check).")
