"""nanopali vs transformers, side by side in one process on the same random weights.

    python bench.py                      # CPU defaults: real widths, reduced depth (printed)
    python bench.py --text-layers 26 --vision-layers 27 --dtype bfloat16 --device cuda   # full size
    python bench.py --full               # the released 3B at full depth on CPU: bf16, int8, int4 vs peers
    python bench.py --full --generation 2 1 --modes bf16 int8 int4 fp32 --keep ~/pg-bench   # all of it
    python bench.py attention            # the fused kernel vs SDPA / FlexAttention (benchmarks/attention.py)
    python bench.py gpu [--dry-run]      # everything a lent GPU should measure, in <= 8 min (benchmarks/gpu.py)
    python bench.py compile-report       # kernels compiled for sm_80/89/90, no GPU (benchmarks/compile_report.py)

Builds transformers' PaliGemma (1 or 2) at the released widths with random weights, saves it in the
hub layout, loads the same files into nanopali, and times on the same prompt (224 px = 256 image
tokens + BOS + 4 prompt tokens + "\\n"): time to first token (prefill incl. SigLIP + first token),
decode tokens/s at batch 1 and 4 (every run decodes the same count), peak CUDA memory on a GPU.
transformers runs with its default attention for the model (PaliGemma 1: sdpa, PaliGemma 2: eager)
and its default dynamic cache.

--full: the 3B model at full depth, written to disk as a
random bf16 checkpoint without ever being built in memory (benchmarks/random_checkpoint.py; --keep DIR
caches it). Per mode, a pair is loaded, timed in interleaved rounds (median of --repeats) and freed
before the next: bf16 (transformers vs nanopali), int8 and int4 (torchao's weight-only quantization of
transformers' model vs `nanopali.load(quantize=...)`), fp32 where memory holds two copies. Beside the
results, this machine's own rates (benchmarks/machine.py) and the decode floor they set per mode.
"""
from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch


def build_reference(gen: int, text_layers: int, vision_layers: int, out_dir: str, dtype):
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

    text = dict(model_type="gemma", hidden_size=2048, intermediate_size=16384, num_attention_heads=8,
                num_key_value_heads=1, head_dim=256, vocab_size=257216)
    if gen == 2:
        text = dict(model_type="gemma2", hidden_size=2304, intermediate_size=9216, num_attention_heads=8,
                    num_key_value_heads=4, head_dim=256, vocab_size=257216, query_pre_attn_scalar=256)
    text["num_hidden_layers"] = text_layers
    vision = dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304, num_attention_heads=16,
                  num_hidden_layers=vision_layers, patch_size=14, image_size=224, vision_use_head=False)
    cfg = PaliGemmaConfig(text_config=text, vision_config=vision, image_token_index=257152,
                          projection_dim=text["hidden_size"], hidden_size=text["hidden_size"], vocab_size=257216)
    torch.manual_seed(0)
    model = PaliGemmaForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # RMSNorm weights are 0 at init; give every tensor some signal
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(out_dir)
    return model.to(dtype)


def timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


class PeakMemory:
    """Peak CUDA memory a block allocates on top of what was allocated before it.

    Not measured on CPU: with both implementations in one process, the resident set cannot be
    attributed to either (freed heap is reused, not returned)."""

    def __init__(self, device):
        self.device, self.peak_mib = device, None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak_mib = (torch.cuda.max_memory_allocated() - self._base) / 2**20


def make_batch(batch: int, device):
    g = torch.Generator().manual_seed(0)
    text = torch.randint(300, 250000, (batch, 4), generator=g)
    ids = torch.cat([torch.full((batch, 256), 257152), torch.full((batch, 1), 2), text, torch.full((batch, 1), 108)], 1)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "token_type_ids": torch.zeros_like(ids).to(device),
            "pixel_values": torch.randn(batch, 3, 224, 224, generator=g).to(device)}


def run_tf(model, batch, n):
    # min_new_tokens: transformers falls back to the config's EOS when given None, and a random model
    # may emit it at once; every run must decode exactly n tokens.
    out = model.generate(**batch, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    assert out.shape[1] == batch["input_ids"].shape[1] + n


def run_ours(model, batch, n):
    from nanopali.generate import generate_ids
    assert all(len(r) == n for r in generate_ids(model, batch, max_new_tokens=n, stop_at_eos=False))


# ---- --full: the 3B model at full depth on CPU, per mode, beside this machine's floors ----

def rss_gb() -> float:
    """This process's resident set (VmRSS), GB. Approximate per model: freed heap is not always returned."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1e6


def release_memory() -> None:
    gc.collect()
    try:  # hand glibc's freed heap back to the OS, so the next RSS increase is the next model's own
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def pairs(mode: str, path: str, model_bytes: int, notes: list, skip_torchao: bool = False):
    """[(implementation, load, run)] to time against each other for `mode`: a peer, then nanopali."""
    import nanopali
    from benchmarks import peers
    from nanopali.quant.convert import DEFAULT_GROUP_SIZE

    dtype, quantize = (torch.float32, None) if mode == "fp32" else (torch.bfloat16, mode if mode != "bf16" else None)
    ours = [("nanopali", lambda: nanopali.load(path, dtype=dtype, quantize=quantize)[0], run_ours)]
    if mode in ("bf16", "fp32"):
        peer = [("transformers", lambda: peers.load_transformers(path, dtype), run_tf)]
        with open("/proc/meminfo") as f:  # fp32: two copies of the model must fit beside each other
            avail = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable")) * 1024
        need = 2 * 2 * model_bytes + (2 << 30)   # two fp32 copies of a bf16 file, and headroom
        if mode == "fp32" and need > avail:
            notes.append(f"fp32 skipped: two fp32 copies need ~{need / 1e9:.0f} GB, this machine has "
                         f"{avail / 1e9:.0f} GB available")
            return []
        return peer + ours
    if skip_torchao:
        notes.append("torchao skipped (--skip-torchao)")
        return ours
    make, label, reasons = peers.torchao_config(mode, DEFAULT_GROUP_SIZE)
    notes += reasons
    if make is None:
        return ours
    group = DEFAULT_GROUP_SIZE if mode == "int4" else None
    if group:
        notes.append(f"torchao int4 leaves SigLIP's fc2 (4304 inputs, not a multiple of {group}) in bf16; "
                     "nanopali stores it as int8")
    return [(f"torchao {label}", lambda: peers.load_torchao(path, make, group, dtype), run_tf)] + ours


def time_pair(impls, args) -> dict:
    """{implementation: {load_s, resident_gb, batch: (time to first token s, decode tok/s)}}, one model
    loaded after the other, then interleaved rounds (median of --repeats) so both see the same load."""
    res, models = {}, []
    for name, load, fn in impls:
        release_memory()
        base, t0 = rss_gb(), time.perf_counter()
        model = load()
        load_s = time.perf_counter() - t0
        with torch.inference_mode():
            fn(model, make_batch(1, "cpu"), 2)       # warm-up: pages touched, int4 packed, caches built
        res[name] = {"load_s": load_s, "resident_gb": rss_gb() - base}
        models.append((name, model, fn))
        print(f"  {name}: loaded in {load_s:.1f} s, ~{res[name]['resident_gb']:.1f} GB resident", flush=True)
    with torch.inference_mode():
        for b in args.batches:
            batch = make_batch(b, "cpu")
            for _, model, fn in models:
                fn(model, batch, 2)
            t = {name: ([], []) for name, _, _ in models}
            for _ in range(args.repeats):
                for name, model, fn in models:
                    t[name][0].append(timed(lambda: fn(model, batch, 1)))
                    t[name][1].append(timed(lambda: fn(model, batch, args.new_tokens)))
            for name in t:
                t1, tn = statistics.median(t[name][0]), statistics.median(t[name][1])
                # nan where noise makes the n-token run no slower than the 1-token one (tiny --new-tokens)
                res[name][b] = (t1, b * (args.new_tokens - 1) / (tn - t1) if tn > t1 else float("nan"))
    return res   # the models go with this frame; the next load's release_memory() collects them


def full(args):
    from benchmarks import machine
    from benchmarks.random_checkpoint import bench_config, write_random_checkpoint

    bandwidth, rates = machine.read_bandwidth(), machine.gemv_rates()
    print(f"memory read (fp32 sum of 512 MiB): {bandwidth:.1f} GB/s; GEMV, GB/s of weights, "
          f"{machine.N_ROWS}x{machine.K_COLS}: " + ", ".join(
              f"{m} {r:.1f}" if isinstance(r, float) else f"{m} {r}" for m, r in rates.items()), flush=True)
    keep = args.keep or tempfile.mkdtemp(prefix="nanopali-bench-")
    rows, notes = [], []
    try:
        for gen in args.generation or [2]:
            cfg = bench_config(gen, args.text_layers, args.vision_layers)
            title = f"PaliGemma {gen} 3B ({cfg.text.depth}+{cfg.vision.depth})"
            path = write_random_checkpoint(cfg, os.path.join(
                keep, f"pg{gen}-3b-224-text{cfg.text.depth}-vision{cfg.vision.depth}"))
            floors = {m: rates[m] * 1e9 / machine.decode_bytes(cfg.text, m) for m in args.modes
                      if isinstance(rates[m], float)}
            memory = {m: bandwidth * 1e9 / machine.decode_bytes(cfg.text, m) for m in args.modes}
            print(f"{title}: decode floors at batch 1, weights read per token / this machine's rate: " + ", ".join(
                f"{m} {machine.decode_bytes(cfg.text, m) / 1e9:.2f} GB -> {memory[m]:.2f} tok/s at the memory "
                f"read rate, {floors[m]:.2f} at the mode's GEMV rate" for m in floors), flush=True)
            size = os.path.getsize(os.path.join(path, "model.safetensors"))
            for mode in args.modes:
                impls = pairs(mode, path, size, notes, args.skip_torchao)
                if impls:
                    print(f"{title}, {mode}:", flush=True)
                    rows.append((title, mode, time_pair(impls, args), (floors.get(mode), memory[mode])))
    finally:
        if not args.keep:
            shutil.rmtree(keep, ignore_errors=True)
    from benchmarks.tables import print_full_table

    print_full_table(rows, args.batches)
    for note in dict.fromkeys(notes):   # once each, whatever the number of generations
        print(f"- {note}")
    print(f"load average after the run: {os.getloadavg()[0]:.2f} (1 min)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="subcommands (each has its own --help):\n"
               "  attention        the fused attention kernel vs SDPA, FlexAttention, reference (benchmarks/attention.py)\n"
               "  gpu              everything a lent GPU should measure, one JSON + one Markdown table, <= 8 min;\n"
               "                   --dry-run runs it on CPU at tiny sizes (benchmarks/gpu.py)\n"
               "  compile-report   the fused kernels compiled for sm_80 / sm_89 / sm_90 without a GPU: registers,\n"
               "                   spills, shared memory (benchmarks/compile_report.py)\n"
               "  train            a LoRA step beside transformers + peft: s/step, peak memory, the same losses\n"
               "                   (benchmarks/train.py)\n"
               "  encoders         MobileCLIP2 S0 / S2 / B and SigLIP So400m towers beside open_clip + timm and\n"
               "                   transformers, same weights, ms per call (benchmarks/encoders.py)\n"
               "  cold-start       command to first token in fresh processes: transformers vs sample.py bf16,\n"
               "                   int4 / int8 quantized while loading and saved (benchmarks/cold_start.py)\n\n"
               "ratio rows give nanopali's speed relative to the peer (time to first token and decode alike):\n"
               "'1.25x faster' or '1.12x slower'.")
    ap.add_argument("--generation", type=int, nargs="+", default=None, choices=[1, 2],
                    help="PaliGemma generations to build (default 1 2; with --full, 2)")
    ap.add_argument("--text-layers", type=int, default=None, help="decoder layers (default 2; with --full, the "
                    "released depth)")
    ap.add_argument("--vision-layers", type=int, default=None, help="SigLIP layers (default 4; with --full, the "
                    "released depth)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights and activations "
                    "(default %(default)s; --full picks per --modes)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="where both models run (default %(default)s; --full runs on CPU)")
    ap.add_argument("--new-tokens", type=int, default=16, help="tokens decoded per timed run (default %(default)s)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4], help="batch sizes to time "
                    "(default %(default)s)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved timed rounds per batch size; best "
                    "(--full: median) is reported (default %(default)s)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the cores this process "
                    "may use; more are cut to them)")
    ap.add_argument("--full", action="store_true", help="the 3B model at full depth on CPU, per mode, beside "
                    "this machine's floors (generation default 2)")
    ap.add_argument("--modes", nargs="+", default=["bf16", "int8", "int4"], choices=["bf16", "int8", "int4", "fp32"],
                    help="--full: weight formats to time, each against its peer (default %(default)s)")
    ap.add_argument("--skip-torchao", action="store_true", help="--full: nanopali alone in int8/int4 (torchao's "
                    "CPU paths dequantize at every call: minutes per token at full depth)")
    ap.add_argument("--keep", default=None, help="--full: directory that caches the random checkpoints")
    return ap


def set_up_machine(threads: int | None) -> str:
    """Set torch's threads (the usable cores by default; a request past them is cut, and said on stderr)
    and return the line naming this machine that heads every result: a number means little without it."""
    from benchmarks import machine
    from nanopali.cpu.machine import set_threads
    n, note = set_threads(threads)
    if note:
        print(f"--threads: {note}", file=sys.stderr, flush=True)
    return machine.describe(n)


def main():
    parser = build_parser()
    args = parser.parse_args()
    import nanopali

    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be ≥ 1, got {args.threads}")
    print(set_up_machine(args.threads), flush=True)
    if args.full:
        return full(args)
    args.text_layers = 2 if args.text_layers is None else args.text_layers
    args.vision_layers = 4 if args.vision_layers is None else args.vision_layers
    dtype, device = getattr(torch, args.dtype), torch.device(args.device)
    print(f"device {device}, {args.dtype}; real widths, {args.text_layers} text / {args.vision_layers} vision layers")
    rows = []
    for gen in args.generation or [1, 2]:
        with tempfile.TemporaryDirectory() as d:
            tf = build_reference(gen, args.text_layers, args.vision_layers, d, dtype).to(device)
            ours = nanopali.formats.hf.load_paligemma_model(d, dtype=dtype, device=device)
        impls = (("transformers", tf, run_tf), ("nanopali", ours, run_ours))
        res = {name: {} for name, _, _ in impls}
        mem = {name: None for name, _, _ in impls}
        with torch.inference_mode():
            for b in args.batches:
                batch = make_batch(b, device)
                best = {name: [float("inf"), float("inf")] for name, _, _ in impls}
                for name, model, fn in impls:
                    with PeakMemory(device) as pm:
                        fn(model, batch, 2)                                          # warm-up
                    if pm.peak_mib is not None:
                        mem[name] = max(mem[name] or 0.0, pm.peak_mib)
                # interleaved repeats, best of each: both see the same machine load
                for _ in range(args.repeats):
                    for name, model, fn in impls:
                        best[name][0] = min(best[name][0], timed(lambda: fn(model, batch, 1)))
                        best[name][1] = min(best[name][1], timed(lambda: fn(model, batch, args.new_tokens)))
                for name in best:
                    t1, tn = best[name]
                    res[name][b] = (t1, b * (args.new_tokens - 1) / (tn - t1))
        rows += [(f"PaliGemma {gen}", name, res[name], mem[name]) for name, _, _ in impls]
        del tf, ours, impls
        gc.collect()
    from benchmarks.tables import speed_row

    b0 = args.batches[0]
    print(f"\n| model | implementation | time to first token (batch {b0}) | "
          + " | ".join(f"decode tok/s batch {b}" for b in args.batches) + " | peak memory added |")
    print("|---|---|---|" + "---|" * len(args.batches) + "---|")
    # peak memory = what one generate call adds on top of the loaded weights (activations, cache, logits)
    for i, (model, name, res, mem) in enumerate(rows):
        line = f"| {model} | {name} | {res[b0][0] * 1000:.0f} ms | " + " | ".join(f"{res[b][1]:.1f}" for b in args.batches)
        print(line + (f" | {mem:.0f} MiB |" if mem is not None else " | n/a on CPU |"))
        if name == "nanopali":
            print(f"| {model} | nanopali vs transformers | " + " | ".join(speed_row(res, rows[i - 1][2], args.batches))
                  + " | |")


SUBCOMMANDS = {  # name → module with main(); imported on use, so `bench.py --help` stays fast
    "attention": "benchmarks.attention", "gpu": "benchmarks.gpu", "compile-report": "benchmarks.compile_report",
    "train": "benchmarks.train", "encoders": "benchmarks.encoders", "cold-start": "benchmarks.cold_start"}


if __name__ == "__main__":
    import importlib
    import sys

    if sys.argv[1:2] and sys.argv[1] in SUBCOMMANDS:
        name = sys.argv.pop(1)
        if name == "compile-report":
            os.environ["TRITON_INTERPRET"] = "0"   # it compiles for real GPUs: before nanopali.kernels loads
        raise SystemExit(importlib.import_module(SUBCOMMANDS[name]).main())
    main()
