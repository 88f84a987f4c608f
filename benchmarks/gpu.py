"""Everything a lent GPU should tell us, in one run of at most ~8 minutes: `python bench.py gpu`.

    python bench.py gpu [--out DIR] [--budget-s 470] [--parts NAME ...]    # on one CUDA GPU
    python bench.py gpu --dry-run                                          # CPU, tiny sizes, interpreter

Parts (benchmarks/gpu_parts.py), in this order: the device and its copy bandwidth; the fused kernels'
self-check and its cost at first use; kernel vs reference (forward, backward, every mask kind, every
head dim); attention TF/s at S = 4128 against SDPA and FlexAttention; full-size PaliGemma 2 3B decode
(batch 1 and 16, time to first token); one full fine-tuning step (tokens/s, MFU, peak memory against
train.cost.estimate_memory); int8 / int4 decode; last, decode compiled with CUDA graphs.

Each part is guarded and timed: on a GPU it runs in a process of its own with a time limit (a kernel
that faults poisons its CUDA context, a hung compile would eat the budget), and whatever it measured
is kept when a later part fails. DIR/gpu.json (every part: status, seconds, results, error) and
DIR/gpu.md (one table) are rewritten after each part, so an interrupted run still leaves a report.
The dry run does the same work in-process on CPU with tiny sizes, so CI keeps the script from rotting.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback

# name → (seconds allowed on a GPU, what it measures)
PARTS = {
    "device": (60, "GPU, versions, copy bandwidth and the decode floor it sets"),
    "selfcheck": (150, "the fused kernels' self-check per head dim: verdict and cost at first use"),
    "kernel": (150, "kernel vs reference on hardware: fwd + bwd, every mask kind and head dim"),
    "attention": (150, "attention TF/s at S = 4128: kernel, SDPA, FlexAttention, reference"),
    "decode": (90, "PaliGemma 2 3B bf16, eager: time to first token, decode tok/s at batch 1 and 16"),
    "train": (120, "one full fine-tuning step: tokens/s, MFU, peak memory vs the estimate"),
    "quant": (120, "int8 / int4 weight-only decode tok/s at batch 1"),
    # last: the longest compile, and the part the budget cuts first
    "decode_compiled": (180, "decode through torch.compile with CUDA graphs (compile time included)"),
}
RESERVE_S = 10   # kept back from the budget for writing the report


def run_in_process(name: str, dry_run: bool) -> dict:
    """Run one part here: {"status", "seconds", "results" | "error"}."""
    from benchmarks import gpu_parts

    t0 = time.perf_counter()
    try:
        results = getattr(gpu_parts, name)(dry_run)
        status, extra = "ok", {"results": results}
    except Exception:   # the part's failure is the result; the other parts still run
        status, extra = "failed", {"error": traceback.format_exc(limit=8)[-4000:]}
    return {"status": status, "seconds": round(time.perf_counter() - t0, 1), **extra}


def run_isolated(name: str, timeout: float) -> dict:
    """Run one part in a child process with a time limit; its JSON comes back through a file."""
    out = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"nanopali-gpu-{os.getpid()}-{name}.json")
    t0, proc = time.perf_counter(), None
    cmd = [sys.executable, "-m", "benchmarks.gpu", "--one-part", name, "--part-json", out]
    try:
        proc = subprocess.run(cmd, timeout=timeout, capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        with open(out) as f:
            return json.load(f)
    except subprocess.TimeoutExpired:
        return {"status": "failed", "seconds": round(time.perf_counter() - t0, 1),
                "error": f"timed out after {timeout:.0f} s"}
    except (OSError, ValueError):
        return {"status": "failed", "seconds": round(time.perf_counter() - t0, 1),
                "error": "the part's process died"
                         + (f" (exit {proc.returncode}): {proc.stderr[-3000:]}" if proc else "")}
    finally:
        if os.path.exists(out):
            os.remove(out)


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"
    return "" if v is None else str(v)


def markdown(report: dict) -> str:
    """One table: a row per measurement, grouped by part; a failed or skipped part gets one row saying why."""
    dry = "dry run (CPU, tiny sizes, interpreter): no figure here is a GPU measurement. " if report["dry_run"] else ""
    lines = [f"# bench.py gpu: {report['device']}", "", f"{dry}Total {report['seconds']:.0f} s.", "",
             "| part | what | value | unit | note |", "|---|---|---|---|---|"]
    for name, part in report["parts"].items():
        if part["status"] != "ok":
            why = part.get("error", "").strip().splitlines()[-1:] or [part["status"]]
            lines.append(f"| {name} | {part['status']} after {part['seconds']} s | | | {why[0][:200]} |")
            continue
        for row in part["results"]:
            lines.append(f"| {name} | {row['what']} | {_cell(row.get('value'))} | {row.get('unit', '')} | "
                         f"{row.get('note', '')} |")
    return "\n".join(lines) + "\n"


def write(report: dict, out_dir: str) -> None:
    from nanopali.formats.files import atomic_write

    os.makedirs(out_dir, exist_ok=True)
    text = json.dumps(report, indent=1)
    atomic_write(os.path.join(out_dir, "gpu.json"), lambda tmp: open(tmp, "w").write(text))
    table = markdown(report)
    atomic_write(os.path.join(out_dir, "gpu.md"), lambda tmp: open(tmp, "w").write(table))


def run(parts, out_dir: str, budget_s: float, dry_run: bool, isolate: bool, log=print) -> dict:
    t0 = time.perf_counter()
    report = {"device": "CPU (dry run)" if dry_run else "CUDA", "dry_run": dry_run, "budget_s": budget_s,
              "seconds": 0.0, "parts": {}}
    for name in parts:
        left = budget_s - RESERVE_S - (time.perf_counter() - t0)
        limit = min(PARTS[name][0], left)
        if limit < 20 and not dry_run:
            part = {"status": "skipped", "seconds": 0.0, "error": f"{left:.0f} s of the budget left"}
        else:
            log(f"[{time.perf_counter() - t0:5.0f} s] {name}: {PARTS[name][1]} (limit {limit:.0f} s)", flush=True)
            part = run_isolated(name, limit) if isolate else run_in_process(name, dry_run)
        report["parts"][name] = part
        if name == "device" and part["status"] == "ok":
            report["device"] = next((r["value"] for r in part["results"] if r["what"] == "device"),
                                    report["device"])
        report["seconds"] = round(time.perf_counter() - t0, 1)
        log(f"        {part['status']} in {part['seconds']} s", flush=True)
        write(report, out_dir)
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="bench.py gpu", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="gpu-results", help="directory for gpu.json and gpu.md (default %(default)s)")
    ap.add_argument("--budget-s", type=float, default=470, help="stop starting parts after this many seconds "
                    "(default %(default)s: the whole run stays under 8 minutes)")
    ap.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS), help="run only these parts")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, Triton's interpreter, in one "
                    "process: checks that every part runs (CI), measures nothing")
    ap.add_argument("--one-part", default=None, help=argparse.SUPPRESS)    # the child process of run_isolated
    ap.add_argument("--part-json", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one_part:
        part = run_in_process(args.one_part, dry_run=False)
        with open(args.part_json, "w") as f:
            json.dump(part, f)
        return 0
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"   # before nanopali.kernels imports triton's jit
    else:
        import torch
        if not torch.cuda.is_available():
            print("bench.py gpu needs a CUDA device; --dry-run runs it on CPU at tiny sizes")
            return 2
    report = run(args.parts, args.out, args.budget_s, args.dry_run, isolate=not args.dry_run)
    print(markdown(report))
    print(f"written: {os.path.join(args.out, 'gpu.json')}, {os.path.join(args.out, 'gpu.md')}")
    return 0 if all(p["status"] == "ok" for p in report["parts"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
