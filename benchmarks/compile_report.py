"""The fused attention kernels compiled for real GPUs on a machine without one: registers, spills, shared memory.

    python bench.py compile-report [--archs 80 89 90] [--dtypes bf16 fp16] [--json F] [--markdown F]

Triton compiles for any target it has a backend for: the PTX comes from Triton's own LLVM, the cubin
from the `ptxas` that ships in Triton's wheel (triton/backends/nvidia/bin), neither needs a driver or
a device. What needs a device is asking which one is present, so a stand-in driver answers "sm_XX" and
every kernel launch is turned into a compile only (`warmup=True`, the path of `kernel.warmup`). The
launchers in nanopali/kernels run as they are, on small CPU tensors, so each compiled kernel is the one
the dispatch would launch for that configuration: same tile sizes, warps, stages and specialization.
Per kernel it records ptxas' own report (registers, spill stores/loads, stack) and Triton's shared
memory, against the target's limit per block. Needs TRITON_INTERPRET unset (the interpreter compiles
nothing); `bench.py compile-report` runs it in a process of its own.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import tempfile
import time

import torch

# Letters: B batch, N query heads, K key/value heads, G = N // K, T queries, S keys, H head dim.

# What the dispatch chooses for the released models (nanopali/config.py presets): the encoder and the
# MAP pooling head of SigLIP So400m (H 72, no soft-cap; the pooling head's one query takes the split-K
# kernel), PaliGemma 1's Gemma 2B (MQA 8/1, no soft-cap), PaliGemma 2 3B/10B (GQA 8/4 and 16/8, soft-cap)
# and 28B (H 128, GQA 32/16, soft-cap). (name, H, N, K, soft-cap, kernels)
MODELS = (
    ("SigLIP", 72, 16, 16, None, ("fwd", "bwd", "decode")),
    ("PaliGemma 1 decoder", 256, 8, 1, None, ("fwd", "bwd", "decode")),
    ("PaliGemma 2 3B/10B decoder", 256, 8, 4, 50.0, ("fwd", "bwd", "decode")),
    ("PaliGemma 2 28B decoder", 128, 32, 16, 50.0, ("fwd", "bwd", "decode")),
)
ARCHS = (80, 89, 90)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_USED = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


class _TargetDriver:
    """The part of Triton's driver a compile asks: which target is present. The device index is the arch,
    so Triton's per-device caches of compiled kernels never mix two targets."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget
        self.arch, self.target = arch, GPUTarget("cuda", arch, 32)

    def get_current_device(self):
        return self.arch

    def get_current_stream(self, device):
        return 0

    def get_current_target(self):
        return self.target


@contextlib.contextmanager
def compiling_for(arch: int, compiled: list):
    """Within: every Triton launch compiles for sm_`arch` instead, and appends (kernel name, CompiledKernel,
    ptxas log, seconds) to `compiled`. ptxas only runs on a cache miss, so the cache is a fresh directory."""
    from triton import knobs
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    run, active = JITFunction.run, driver._active   # None until first asked: reset_active() would ask the GPU

    def compile_only(self, *args, grid, warmup, **kwargs):
        log, t0 = io.StringIO(), time.perf_counter()
        with contextlib.redirect_stdout(log):      # Triton prints ptxas' -v report with dump_ptxas_log
            kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append((self.fn.__name__, kernel, log.getvalue(), time.perf_counter() - t0))
        return kernel

    with tempfile.TemporaryDirectory() as cache, knobs.cache.scope(), knobs.nvidia.scope():
        knobs.cache.dir, knobs.nvidia.dump_ptxas_log = cache, True
        JITFunction.run, _ = compile_only, driver.set_active(_TargetDriver(arch))
        try:
            yield
        finally:
            JITFunction.run = run
            driver.set_active(active)


def launch_all(H: int, N: int, K: int, softcap, dtype, kernels=("fwd", "bwd", "decode")) -> None:
    """Call the launchers the way flash_attention does for one configuration (only the specialization
    matters: which ints are 1 or multiples of 16, and the constexprs; sizes are small)."""
    from nanopali.kernels.decode import decode_forward
    from nanopali.kernels.flash import flash_backward, flash_forward

    B, T, scale = 1, 288, H ** -0.5                  # 224 px: 256 image tokens + 32 text tokens
    q, k = torch.zeros(B, N, T, H, dtype=dtype), torch.zeros(B, K, T, H, dtype=dtype)
    start, prefix_end = torch.zeros(B, dtype=torch.int64), torch.full((B,), 256, dtype=torch.int64)
    o, lse = torch.zeros_like(q), torch.zeros(B, N, T)
    if "fwd" in kernels:
        flash_forward(q, k, k, start, prefix_end, scale, softcap, None, 0)
    if "bwd" in kernels:
        flash_backward(q, q, k, k, o, lse, start, prefix_end, scale, softcap, None, 0)
    if "decode" in kernels:                          # one new token against the cache: T = 1
        decode_forward(q[:, :, :1], k, k, start, prefix_end, scale, softcap, None, torch.tensor(T - 1))


def report(archs=ARCHS, dtypes=tuple(DTYPES), models=MODELS, kernels=("fwd", "bwd", "decode"), log=print) -> list[dict]:
    """One row per compiled kernel: model, kernel, target, dtype, registers, spills, stack, shared memory."""
    from nanopali.kernels import INTERPRETED
    from nanopali.kernels.tuning import SHARED_MEMORY_PER_BLOCK

    if INTERPRETED:
        raise RuntimeError("compile-report compiles for real GPUs: run it without TRITON_INTERPRET=1")
    rows = []
    for arch in archs:
        for dtype in dtypes:
            for name, H, N, K, softcap, used in models:
                compiled = []
                with compiling_for(arch, compiled):
                    launch_all(H, N, K, softcap, DTYPES[dtype], [k for k in used if k in kernels])
                for kernel_name, kernel, ptxas, seconds in compiled:
                    used, spill = _USED.search(ptxas), _SPILL.search(ptxas)
                    md = kernel.metadata
                    rows.append(dict(
                        model=name, kernel=kernel_name.strip("_").replace("_kernel", ""), arch=f"sm_{arch}",
                        dtype=dtype, H=H, G=N // K, softcap=softcap is not None, warps=md.num_warps,
                        stages=md.num_stages, registers=int(used.group(1)) if used else None,
                        stack=int(spill.group(1)) if spill else None,
                        spill_stores=int(spill.group(2)) if spill else None,
                        spill_loads=int(spill.group(3)) if spill else None,
                        shared=md.shared, shared_limit=SHARED_MEMORY_PER_BLOCK[arch],
                        compile_s=round(seconds, 2)))
                    r = rows[-1]
                    log(f"sm_{arch} {dtype} {name:27s} {r['kernel']:8s} regs {r['registers']} spills "
                        f"{r['spill_stores']}/{r['spill_loads']} B shared {md.shared} B ({seconds:.1f} s)")
    return rows


def markdown(rows: list[dict]) -> str:
    """The report as one Markdown table; shared memory over the target's limit is marked."""
    lines = ["| target | dtype | model | kernel | H | G | soft-cap | warps | stages | registers | "
             "spill stores / loads B | shared KiB (limit) |", "|" + "---|" * 12]
    for r in rows:
        over = " **over**" if r["shared"] > r["shared_limit"] else ""
        lines.append(f"| {r['arch']} | {r['dtype']} | {r['model']} | {r['kernel']} | {r['H']} | {r['G']} | "
                     f"{'yes' if r['softcap'] else 'no'} | {r['warps']} | {r['stages']} | {r['registers']} | "
                     f"{r['spill_stores']} / {r['spill_loads']} | {r['shared'] / 1024:.0f} "
                     f"({r['shared_limit'] / 1024:.0f}){over} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    import argparse
    import json

    from nanopali.formats.files import atomic_write
    from nanopali.kernels.tuning import SHARED_MEMORY_PER_BLOCK

    ap = argparse.ArgumentParser(prog="bench.py compile-report", description=__doc__.split("\n")[0])
    ap.add_argument("--archs", type=int, nargs="+", default=list(ARCHS), choices=sorted(SHARED_MEMORY_PER_BLOCK),
                    help="compute capabilities "
                    "to compile for, as 80 (A100), 89 (L4, L40S, RTX 4090), 90 (H100, H200)")
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES), help="input dtypes")
    ap.add_argument("--models", nargs="+", default=None, help="a subset of the model names, as printed")
    ap.add_argument("--kernels", nargs="+", default=["fwd", "bwd", "decode"], choices=["fwd", "bwd", "decode"],
                    help="which launchers to compile (bwd: dK/dV and dQ; decode: split-K and its combine)")
    ap.add_argument("--json", default=None, help="write the rows here as JSON")
    ap.add_argument("--markdown", default=None, help="write the table here (default: print it)")
    args = ap.parse_args(argv)
    models = [m for m in MODELS if args.models is None or m[0] in args.models]
    t0 = time.perf_counter()
    rows = report(args.archs, args.dtypes, models, args.kernels)
    table = markdown(rows)
    if args.json:
        atomic_write(args.json, lambda tmp: open(tmp, "w").write(json.dumps(rows, indent=1)))
    if args.markdown:
        atomic_write(args.markdown, lambda tmp: open(tmp, "w").write(table))
    print(table + f"\n{len(rows)} kernels compiled in {time.perf_counter() - t0:.0f} s")
    over = [r for r in rows if r["shared"] > r["shared_limit"]]
    for r in over:
        print(f"over the shared memory limit: {r['kernel']} {r['model']} {r['dtype']} on {r['arch']}: "
              f"{r['shared']} > {r['shared_limit']} bytes")
    return 1 if over else 0


if __name__ == "__main__":
    os.environ["TRITON_INTERPRET"] = "0"   # before nanopali.kernels imports triton's jit
    raise SystemExit(main())
