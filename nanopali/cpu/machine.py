"""What this CPU can do for torch, read once: its model, the instruction sets torch may use, its cores.

Sessions, CI and users land on Intel Xeons with AMX, AMD EPYCs with AVX-512 BF16 but no AMX, and laptops
with neither, so a choice that depends on the CPU (bf16 or fp32, threads, a product's form) is made here
from what the machine reports, never from the machine it was written on. A feature counts only where both
the CPU has it and torch is allowed to use it: ATEN_CPU_CAPABILITY caps torch's own vector kernels and
ONEDNN_MAX_CPU_ISA caps oneDNN's GEMMs (how CI emulates a laptop: `avx2` / `AVX2`).
"""
from __future__ import annotations

import functools
import os

import torch

# oneDNN's ISA caps from least to most capable (its docs, "CPU ISA hints"), and the first that multiplies
# bf16 natively / with AMX tiles. Older names are kept: oneDNN accepts both.
_ONEDNN_ISAS = ["SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI",
                "AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX10_1_512", "AVX512_CORE_AMX", "AVX10_1_512_AMX",
                "AVX512_CORE_AMX_FP16", "AVX10_1_512_AMX_FP16", "AVX10_2_512", "AVX10_2_512_AMX_2", "ALL"]
_FIRST_BF16, _FIRST_AMX = _ONEDNN_ISAS.index("AVX512_CORE_BF16"), _ONEDNN_ISAS.index("AVX512_CORE_AMX")


@functools.lru_cache(maxsize=None)
def _cpuinfo() -> tuple[str, frozenset[str]]:
    """(model name, flags) of the first processor in /proc/cpuinfo; ("unknown", {}) where it cannot be read."""
    model, flags = "unknown", frozenset()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model == "unknown":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = frozenset(value.split())
                    break
    except OSError:
        pass
    return model, flags


def cpu_model() -> str:
    return _cpuinfo()[0]


def _onednn_cap() -> int:
    """Index in _ONEDNN_ISAS of the cap ONEDNN_MAX_CPU_ISA sets (unset or unknown: no cap)."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "ALL")).strip().upper()
    return _ONEDNN_ISAS.index(cap) if cap in _ONEDNN_ISAS else len(_ONEDNN_ISAS) - 1


def features() -> dict[str, bool]:
    """The features that decide speed choices, as torch may use them in this process: avx512 (torch's
    own kernels run their AVX-512 versions), avx512_bf16 and amx (oneDNN multiplies bf16 natively / on
    AMX tiles). A CPU flag that an environment cap hides counts as absent."""
    _, flags = _cpuinfo()
    aten_avx512 = torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    cap = _onednn_cap()
    return {
        "avx512": "avx512f" in flags and aten_avx512,
        "avx512_bf16": "avx512_bf16" in flags and aten_avx512 and cap >= _FIRST_BF16,
        "amx": "amx_bf16" in flags and "amx_tile" in flags and cap >= _FIRST_AMX,
    }


def native_bf16() -> bool:
    """Does this process multiply bf16 natively (AVX-512 BF16 or AMX, not capped away)? Where it does,
    bf16 streams weights 2x faster than fp32 and its GEMMs run ~2.7x faster; where it does not, torch
    emulates bf16 through fp32 and is slower than fp32 itself."""
    f = features()
    return f["avx512_bf16"] or f["amx"]


def usable_cpus() -> set[int]:
    """The logical CPUs this process may run on (its affinity mask: a container's or taskset's share)."""
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):   # not Linux
        return set(range(os.cpu_count() or 1))


def usable_cores() -> int:
    """Physical cores among the CPUs this process may use: two hyperthreads of one core share its
    vector units, so a thread per hyperthread only makes GEMMs wait for each other (torch's own default
    is one thread per physical core, but it ignores the affinity mask). Where the topology cannot be
    read, every usable CPU counts as a core."""
    cores = set()
    for cpu in usable_cpus():
        try:
            with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/core_id") as f:
                core = f.read().strip()
            with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/physical_package_id") as f:
                cores.add((f.read().strip(), core))
        except OSError:
            cores.add(("cpu", cpu))
    return max(1, len(cores))


def _omp_threads() -> int | None:
    """OMP_NUM_THREADS when it names a positive count (torchrun sets 1 per process; a user may set it)."""
    try:
        n = int(os.environ.get("OMP_NUM_THREADS", ""))
    except ValueError:
        return None
    return n if n >= 1 else None


def set_threads(requested: int | None = None) -> tuple[int, str | None]:
    """Set torch's CPU threads: `requested`, else OMP_NUM_THREADS, else the usable cores. More than the
    usable cores is clamped to them (each thread would get a slice of a core, and 10,000 threads cost
    seconds to start and memory per stack). Returns (threads set, a message for the user when the
    request was changed)."""
    cores = usable_cores()
    if requested is not None and (isinstance(requested, bool) or not isinstance(requested, int) or requested < 1):
        raise ValueError(f"threads must be an integer ≥ 1, got {requested!r}")
    wanted = requested if requested is not None else _omp_threads()
    if wanted is None:
        n, note = cores, None
    elif wanted > cores:
        source = f"{wanted} threads requested" if requested is not None else f"OMP_NUM_THREADS={wanted}"
        n, note = cores, f"{source}; this process may use {cores} core(s), so {cores} are used"
    else:
        n, note = wanted, None
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n, note


def describe(threads: int | None = None) -> str:
    """One line for a log or a benchmark: the CPU, its features as torch may use them, torch's build, threads."""
    f = features()
    caps = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in f.items())
    env = [f"{k}={os.environ[k]}" for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if k in os.environ]
    threads = torch.get_num_threads() if threads is None else threads
    return (f"CPU: {cpu_model()} ({usable_cores()} usable cores, {len(usable_cpus())} of {os.cpu_count()} CPUs; {caps}"
            f"{'; ' + ' '.join(env) if env else ''}), torch {torch.__version__}, {threads} threads")
