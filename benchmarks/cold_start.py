"""Cold start as a user sees it: from the command to the first token, each run in a fresh process.

    python bench.py cold-start [--keep DIR] [--repeats 3] [--threads N]

Rows (full PaliGemma 2 3B, random weights at the released shapes, 224 px, one image + "caption en"):
  transformers bf16        import, `from_pretrained`, `generate(max_new_tokens=1)`
  nanopali bf16            `sample.py --checkpoint DIR --max-new-tokens 1`
  nanopali int4 / int8     the same with `--quantize`: quantized while loading, every time
  nanopali int4 / int8     `sample.py` on a directory saved from the quantized model (`save_checkpoint`,
                           docs/quantization.md): quantize once, load the result
The wall time is the command's, from before the process is started until it exits (python's start-up
and imports included). The page cache is warm: every row runs once untimed first, so each reads the
same files from memory, as a second run on a user's machine would; rows alternate in every round and
the median is reported. A second, separate process per nanopali row runs `nanopali.load` + `generate`
under cProfile for the breakdown (quantizing, packing for the CPU kernel, the speed measurements
cached after a machine's first run, the rest of the load: reading, checking, building) and the first
token; cProfile adds a few percent, so the breakdown is read beside, not instead of, the wall time.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE = os.path.join(ROOT, "nanopali", "assets", "images")

# The transformers row: what a user of transformers runs for one answer, timed in phases. Inputs are built
# directly (256 image tokens + BOS + 4 prompt tokens + "\n", as bench.py's make_batch), since a random
# checkpoint has no processor files; nanopali's rows include their processor, so this favours transformers.
TRANSFORMERS = r"""
import sys, time
t0 = float(sys.argv[1])
import torch
torch.set_num_threads(int(sys.argv[3]))
from transformers import PaliGemmaForConditionalGeneration
from transformers.utils import logging
logging.disable_progress_bar()
t1 = time.time()
model = PaliGemmaForConditionalGeneration.from_pretrained(sys.argv[2], dtype=torch.bfloat16).eval()
t2 = time.time()
ids = torch.cat([torch.full((1, 256), 257152), torch.tensor([[2, 1000, 2000, 3000, 4000, 108]])], 1)
batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), token_type_ids=torch.zeros_like(ids),
             pixel_values=torch.randn(1, 3, 224, 224).to(torch.bfloat16))
with torch.inference_mode():
    model.generate(**batch, max_new_tokens=1, do_sample=False)
t3 = time.time()
import json
print("PHASES", json.dumps({"import": t1 - t0, "load": t2 - t1, "first token": t3 - t2}))
"""

# The breakdown of a nanopali row: the library calls sample.py makes, under cProfile; phases are the
# cumulative times of the functions named (each counted once, at its outermost call).
BREAKDOWN = r"""
import sys, time, os, cProfile, pstats
t0 = float(sys.argv[1])
import torch, nanopali
from PIL import Image
torch.set_num_threads(int(sys.argv[3]))
t1 = time.time()
quantize = None if sys.argv[4] == "none" else sys.argv[4]
profile = cProfile.Profile()
profile.enable()
model, processor = nanopali.load(sys.argv[2], dtype=torch.bfloat16, quantize=quantize)
profile.disable()
t2 = time.time()
image = Image.open(sys.argv[5])
nanopali.generate(model, processor, [image], ["caption en"], max_new_tokens=1)
t3 = time.time()
stats = pstats.Stats(profile).stats
def cumulative(file_end, name):
    return sum(v[3] for (f, _, n), v in stats.items() if f.endswith(file_end) and n == name)
parts = {"quantize": cumulative("quant/weight_only.py", "quantize_weight"),
         "pack": cumulative("quant/cpu_int4.py", "pack"),
         "measure": cumulative("formats/__init__.py", "for_this_cpu")}
import json
print("PHASES", json.dumps({"import": t1 - t0, "load": t2 - t1, **parts, "first token": t3 - t2}))
"""


def image_path() -> str:
    return os.path.join(IMAGE, sorted(os.listdir(IMAGE))[0])


def run(cmd: list[str], env: dict) -> tuple[float, dict]:
    """(wall seconds from before the start to the exit, the phases it printed)."""
    t0 = time.time()
    out = subprocess.run([*cmd[:3], repr(t0), *cmd[3:]] if cmd[1] == "-c" else cmd, capture_output=True,
                         text=True, env=env, cwd=ROOT)
    wall = time.time() - t0
    if out.returncode:
        raise SystemExit(f"{' '.join(cmd[:4])}... failed ({out.returncode}):\n{out.stderr[-3000:]}")
    phases = {}
    for line in out.stdout.splitlines():
        if line.startswith("PHASES "):
            phases = json.loads(line[7:])
    return wall, phases


def sample_cmd(path: str, threads: int, quantize: str | None) -> list[str]:
    cmd = [sys.executable, os.path.join(ROOT, "sample.py"), "--checkpoint", path, "--image", image_path(),
           "--prompt", "caption en", "--max-new-tokens", "1", "--dtype", "bfloat16", "--threads", str(threads)]
    return cmd + (["--quantize", quantize] if quantize else [])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--keep", default=None, help="directory caching the random checkpoints (bf16, and the saved "
                    "quantized ones); default a temporary one, removed at the end")
    ap.add_argument("--modes", nargs="+", default=["int4", "int8"], choices=["int4", "int8"])
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds (median; default %(default)s)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads in every process "
                    "(default: the cores this process may use)")
    ap.add_argument("--text-layers", type=int, default=None, help="decoder layers (default: the released 26)")
    ap.add_argument("--vision-layers", type=int, default=None, help="SigLIP layers (default: the released 27)")
    args = ap.parse_args(argv)

    sys.path.insert(0, ROOT)
    import shutil

    import torch

    import nanopali
    from benchmarks import machine
    from benchmarks.random_checkpoint import bench_config, write_random_checkpoint
    from nanopali.cpu.machine import set_threads

    threads, note = set_threads(args.threads)
    if note:
        print(f"--threads: {note}", file=sys.stderr)
    print(machine.describe(threads), flush=True)
    keep = args.keep or tempfile.mkdtemp(prefix="nanopali-cold-")
    try:
        cfg = bench_config(2, args.text_layers, args.vision_layers)
        bf16 = write_random_checkpoint(cfg, os.path.join(keep, f"pg2-3b-224-text{cfg.text.depth}-vision{cfg.vision.depth}"))
        saved = {}
        for mode in args.modes:   # quantize once and save, as docs/quantization.md shows
            saved[mode] = os.path.join(keep, f"pg2-3b-224-text{cfg.text.depth}-vision{cfg.vision.depth}-{mode}")
            if not os.path.isfile(os.path.join(saved[mode], "model.safetensors")):
                print(f"saving the {mode} directory (once) ...", flush=True)
                model, _ = nanopali.load(bf16, dtype=torch.bfloat16, quantize=mode)
                nanopali.save_checkpoint(model, saved[mode], os.path.join(bf16, "tokenizer.model"))
                del model
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        rows = {"transformers bf16 (from_pretrained + generate)":
                ([sys.executable, "-c", TRANSFORMERS, bf16, str(threads)], None),
                "nanopali bf16 (sample.py)": (sample_cmd(bf16, threads, None), (bf16, "none"))}
        for mode in args.modes:
            rows[f"nanopali {mode}, quantized while loading (sample.py --quantize {mode})"] = (
                sample_cmd(bf16, threads, mode), (bf16, mode))
            rows[f"nanopali {mode}, saved {mode} directory (sample.py)"] = (
                sample_cmd(saved[mode], threads, None), (saved[mode], "none"))
        for name, (cmd, _) in rows.items():   # warm the page cache and the per-machine measurements
            print(f"warm-up: {name}", flush=True)
            run(cmd, env)
        walls = {name: [] for name in rows}
        phases = {}
        for r in range(args.repeats):
            for name, (cmd, _) in rows.items():
                wall, ph = run(cmd, env)
                walls[name].append(wall)
                if ph:
                    phases[name] = ph
        for name, (_, target) in rows.items():
            if target is not None:
                _, phases[name] = run([sys.executable, "-c", BREAKDOWN, target[0], str(threads), target[1],
                                       image_path()], env)
    finally:
        if not args.keep:
            shutil.rmtree(keep, ignore_errors=True)

    ref = statistics.median(walls[next(iter(rows))])
    print(f"\ncommand to first token, {threads} threads, page cache warm, median of {args.repeats} "
          f"(min-max); phases from a separate profiled process for nanopali's rows\n")
    print("| | command to first token | vs transformers | import | load | of which quantize / pack / "
          "measure | first token |")
    print("|---|---|---|---|---|---|---|")
    for name in rows:
        w = walls[name]
        ph = phases.get(name, {})
        split = " / ".join(f"{ph[k]:.1f}" for k in ("quantize", "pack", "measure")) if "pack" in ph else ""
        print(f"| {name} | {statistics.median(w):.1f} s ({min(w):.1f}-{max(w):.1f}) | "
              f"{ref / statistics.median(w):.2f}x | " + " | ".join(
                  f"{ph[k]:.1f} s" if k in ph else "" for k in ("import", "load")) + f" | {split} | "
              + (f"{ph['first token']:.1f} s" if "first token" in ph else "") + " |")
    print(f"\nload average after the run: {os.getloadavg()[0]:.2f} (1 min)")
    print(json.dumps({"walls": walls, "phases": phases}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
