"""A LoRA training step, nanopali beside transformers + peft, on the same random PaliGemma 2 weights.

    python bench.py train                            # PaliGemma 2 3B at full depth (26 + 27 layers), ~40 min
    python bench.py train --text-layers 1 --vision-layers 1 --batches 1 --modes bf16 --no-memory   # ~1 min

The recipe of README "Fine-tune PaliGemma 2 on your data" on a CPU: LoRA rank 8, alpha 16 on q, k, v, o,
gate, up, down of the decoder; frozen weights in bf16 under bf16 autocast; fp32 adapters and AdamW state;
gradient checkpointing; clipping at 1.0; a constant learning rate. 224 px, 277 tokens a row (256 image +
BOS "caption en" \\n + 16 suffix words + EOS), the loss on the suffix.
  transformers + peft  `PaliGemmaForConditionalGeneration.from_pretrained(dtype=bf16)` with its default
                       attention (eager in the decoder, which soft-caps; sdpa in SigLIP),
                       `gradient_checkpointing_enable(use_reentrant=False)`, `get_peft_model`
                       with target_modules limited to the decoder (by name alone peft would adapt SigLIP's
                       q/k/v too), fused AdamW; stepped as transformers' Trainer steps.
  nanopali             train.py's own code: `train.build_model` from train.py's flags (--trainable lora
                       --frozen-dtype bf16 --precision bf16 --grad-checkpointing [--quantize-base int4|int8]),
                       `finetune.make_optimizer`, `finetune.train_step`.
Every side starts from the adapters train.py draws (seed 0), copied into peft's, so with a bf16 base the
per-step losses must agree (`losses_agree`); with int4 / int8 their difference is the quantization's.
Timing: in this process, the two sides' steps interleaved round by round (median after a warm-up step),
one nanopali mode and the peer loaded at a time; a pair that does not fit in memory runs one side after
the other, and says so. Peak resident memory cannot be told apart inside one process, so each side also
runs alone in a child process, which measures it (VmHWM) and the load time.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEER, PREFIX, WORDS = "transformers", "caption en", "a green circle and a blue square and a purple triangle".split()
TEXT_TOKENS = 21          # BOS + "caption en" + \n (4 tokens) + 16 suffix words + EOS: 256 + 21 = 277 at 224 px
# A learning rate large enough that the adapters move the loss far past bf16's rounding within a few
# steps: the loss check then covers the LoRA path and the optimizer, not only the frozen forward.
LR, RANK, ALPHA, GRAD_CLIP = 3e-3, 8, 16.0, 1.0
WARMUP = 1                # untimed steps per batch size: the first pays page faults and allocator growth
BF16_EPS = 2.0 ** -8
# An adapter's place on either side: (layer, target, A or B) from nanopali's `layers.3.attn.q.lora_A`
# or peft's `layers.3.self_attn.q_proj.lora_A.default.weight`.
ADAPTER_KEY = re.compile(r"layers\.(\d+)\.\w+\.(q|k|v|o|gate|up|down)(?:_proj)?\.lora_([AB])")


def examples(processor, batch: int, seed: int = 0):
    """`batch` examples of TEXT_TOKENS text tokens, random images, read by train.py's `data.load_examples`."""
    from PIL import Image
    from nanopali.train.data import load_examples

    prompt = len(processor.prefix_ids(PREFIX)) - processor.num_image_tokens
    suffix = " ".join(WORDS[i % len(WORDS)] for i in range(TEXT_TOKENS - prompt - 1))   # - 1: EOS
    rng, size = np.random.default_rng(seed), processor.image_size
    out = load_examples([{"image": Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)),
                          "prefix": PREFIX, "suffix": suffix} for _ in range(batch)], processor).examples
    if out[0].num_tokens != processor.num_image_tokens + TEXT_TOKENS:   # a tokenizer that splits the words
        raise RuntimeError(f"expected {processor.num_image_tokens + TEXT_TOKENS} tokens a row, got {out[0].num_tokens}")
    return out


class Nanopali:
    """nanopali as train.py runs it: its flags, `build_model`, `make_optimizer`, `train_step`."""

    def __init__(self, path: str, mode: str):
        import train as script   # train.py at the repository root
        from nanopali.train import finetune

        self.name, self.finetune = mode, finetune
        self.args = script.parse_args(
            ["--init", path, "--data", "-", "--trainable", "lora", "--lora-rank", str(RANK), "--lora-alpha",
             str(ALPHA), "--frozen-dtype", "bf16", "--precision", "bf16", "--grad-checkpointing", "--lr", str(LR),
             "--grad-clip", str(GRAD_CLIP), "--seed", "0"] + (["--quantize-base", mode] if mode != "bf16" else []))
        cfg, tok = script.model_config(self.args)
        self.model = script.build_model(self.args, cfg, None, torch.device("cpu"), materialize=True)
        self.objective = finetune.Objective(self.model, self.args.loss_normalization)
        self.processor = script.Processor.for_model(tok, cfg)
        self.new_optimizer()

    def new_optimizer(self):
        a = self.args
        self.optimizer = self.finetune.make_optimizer(self.objective, a.lr, a.weight_decay, (a.beta1, a.beta2))

    def batch(self, exs):
        from nanopali.train.data import collate
        return [collate(exs, self.processor)], sum(ex.num_targets for ex in exs)

    def step(self, batch) -> float:
        micro, count = batch
        return self.finetune.train_step(self.objective, self.optimizer, micro, count, precision=self.args.precision,
                                        grad_clip=self.args.grad_clip).loss


class TransformersPeft:
    """transformers' PaliGemma with peft's LoRA: autocast forward with labels, backward, clip, fused AdamW."""

    def __init__(self, path: str):
        from peft import LoraConfig, get_peft_model
        from transformers import PaliGemmaForConditionalGeneration
        from transformers.utils import logging

        from nanopali.formats.hf_config import read_paligemma_config
        from nanopali.processing import Processor

        self.name = PEER
        shown = logging.is_progress_bar_enabled()
        logging.disable_progress_bar()   # for this load only: the switch is process-wide (the hub's bars too)
        try:
            model = PaliGemmaForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16)
        finally:
            if shown:
                logging.enable_progress_bar()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        lora = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                          target_modules=r".*language_model.*\.(q|k|v|o|gate|up|down)_proj")
        self.model = get_peft_model(model, lora).train()      # adapters in fp32 (peft's autocast_adapter_dtype)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.processor = Processor.for_model(os.path.join(path, "tokenizer.model"), read_paligemma_config(path))
        self.new_optimizer()

    def new_optimizer(self):
        self.optimizer = torch.optim.AdamW(self.params, lr=LR, weight_decay=0.0, fused=True)

    def batch(self, exs):
        from nanopali.train.data import collate

        b = collate(exs, self.processor)
        target = (b["token_type_ids"] == 1) & (b["attention_mask"] == 1)     # suffix + EOS, as nanopali's loss
        return {**b, "labels": b["input_ids"].masked_fill(~target, -100)}

    def step(self, batch) -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = self.model(**batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, GRAD_CLIP)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


def import_side(side: str) -> None:
    """The libraries a side's process would import anyway; imported before `load` starts its clock."""
    if side == PEER:
        import peft  # noqa: F401
        from transformers import PaliGemmaForConditionalGeneration  # noqa: F401
    else:
        import train  # noqa: F401


def load(side: str, path: str):
    """(the side ready to train, seconds it took: weights read, adapters added, optimizer built)."""
    import_side(side)
    t0 = time.perf_counter()
    model = TransformersPeft(path) if side == PEER else Nanopali(path, side)
    return model, time.perf_counter() - t0


def adapters(side) -> dict[tuple, torch.nn.Parameter]:
    """{(layer, target, "A" | "B"): parameter} of a side's LoRA adapters."""
    out = {}
    for name, p in side.model.named_parameters():
        if p.requires_grad:
            m = ADAPTER_KEY.search(name)
            if m is None:
                raise RuntimeError(f"{side.name}: trainable parameter {name} is not a decoder LoRA adapter")
            out[(int(m[1]), m[2], m[3])] = p
    return out


@torch.no_grad()
def reset(side, initial: dict) -> None:
    """Adapters set to `initial`, a fresh optimizer: every side and batch size starts from the same state."""
    mine = adapters(side)
    if mine.keys() != initial.keys():
        raise RuntimeError(f"{side.name} adapts {len(mine)} tensors where nanopali adapts {len(initial)}")
    for k, p in mine.items():
        p.copy_(initial[k])
    side.new_optimizer()


def interleaved(sides, initial, batches, steps: int) -> dict:
    """{side: {batch: (step seconds after the warm-up, every step's loss)}}: per round every side steps
    once on the same batch, the side going first alternating."""
    res = {s.name: {} for s in sides}
    for b in batches:
        exs = examples(sides[0].processor, b)
        data = [(s, s.batch(exs)) for s in sides]
        for s in sides:
            reset(s, initial)
            res[s.name][b] = ([], [])
        for r in range(WARMUP + steps):
            for s, batch in (data if r % 2 == 0 else data[::-1]):
                t0 = time.perf_counter()
                loss = s.step(batch)
                if r >= WARMUP:
                    res[s.name][b][0].append(time.perf_counter() - t0)
                res[s.name][b][1].append(loss)
    return res


def loss_tolerance(peer: list[float]) -> list[float]:
    """How far nanopali's loss may be from the peer's at each step, from the peer's losses.

    Step 1 runs the frozen bf16 model alone (B = 0), the same bf16 operations on both sides: the losses
    agree to float32 rounding (~1e-7 relative measured); a 32nd of a bf16 step of the loss is allowed, for
    GEMMs blocked differently on another CPU. After it the two sides' gradients agree to bf16 rounding
    (~5e-3 relative), but AdamW's first steps are close to lr * sign(gradient): an element whose gradient
    is smaller than that rounding can step +lr on one side and -lr on the other, and at random weights the
    loss is steep enough for such flips to move it by ~1e-3 of itself. Allowed from step 2: a quarter of a
    bf16 step of the loss plus one bf16 step of how far it has moved since step 1. Measured: real widths,
    2 + 2 layers, batch 1, up to 0.6 of this; the bundled model's widths (tests/test_bench_train.py)
    under 0.05, while A drawn with another seed (1-6) exceeds it 2 to 5 times at batch 1, 2 or 4."""
    return [BF16_EPS * (peer[0] / 32 + (x / 4 if i else 0) + abs(x - peer[0])) for i, x in enumerate(peer)]


def losses_agree(peer: list[float], ours: list[float]) -> bool:
    return all(abs(x - y) <= t for x, y, t in zip(peer, ours, loss_tolerance(peer)))


# ---- peak resident memory and load time: each side alone in a child process ----

def _status_gb(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1e6


@torch.no_grad()
def _touch(model) -> None:
    """Read a value per page of every weight: a memory-mapped checkpoint's pages become resident, so
    "loaded" holds the weights and "training" only what training adds."""
    for t in list(model.parameters()) + list(model.buffers()):
        if t.numel():
            t.detach().reshape(-1)[:: max(1, 4096 // t.element_size())].float().sum()


def child(side: str, path: str, batches, steps: int = 1) -> dict:
    """One side alone: load seconds, resident GB after the imports ("base") and with the model loaded,
    and per batch size the peak (VmHWM) over WARMUP + steps steps. Writing 5 to clear_refs restarts
    VmHWM from the current resident set (Linux >= 4.0); where refused, the peak includes earlier batches."""
    import_side(side)
    base = _status_gb("VmRSS")
    model, load_s = load(side, path)
    _touch(model.model)
    out = {"load_s": load_s, "base_gb": base, "loaded_gb": _status_gb("VmRSS"), "peak_gb": {}}
    for b in sorted(batches):
        batch = model.batch(examples(model.processor, b))
        model.new_optimizer()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
        for _ in range(WARMUP + steps):
            model.step(batch)
        out["peak_gb"][b] = _status_gb("VmHWM")
    return out


def memory_in_child(side: str, path: str, batches, threads: int) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.train", "--child", side, "--checkpoint", path, "--threads", str(threads),
           "--batches", *map(str, batches)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"the {side} child process failed ({' '.join(cmd)}):\n{r.stderr[-3000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    return {**res, "peak_gb": {int(b): v for b, v in res["peak_gb"].items()}}


def fits(mem: dict, sides) -> bool:
    """Whether the sides' training, each measured alone, fits in the memory available now (1 GB spare)."""
    with open("/proc/meminfo") as f:
        avail = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable")) / 1e6
    return not mem or sum(max(mem[s]["peak_gb"].values()) - mem[s]["base_gb"] for s in sides) + 1 < avail


def compare(path: str, modes, batches, steps: int, threads: int, memory: bool = True, say=print):
    """({mode: ({side: {batch: (seconds, losses)}}, interleaved?)}, {side: child's memory} or {})."""
    from bench import release_memory

    mem = {}
    for side in [PEER, *modes] if memory else []:
        say(f"  {side}: alone in a child process (peak resident memory, load time) ...")
        mem[side] = memory_in_child(side, path, batches, threads)
    timing, initial, peer_alone = {}, None, None
    for mode in modes:
        release_memory()
        together = fits(mem, [PEER, mode])
        ours = load(mode, path)[0]
        initial = initial or {k: p.detach().clone() for k, p in adapters(ours).items()}   # train.py's draw
        say(f"  {mode}: {WARMUP} + {steps} steps per batch size, nanopali and {PEER} " +
            ("interleaved ..." if together else "one after the other (the pair does not fit in memory) ..."))
        if together:
            timing[mode] = (interleaved([load(PEER, path)[0], ours], initial, batches, steps), True)
        else:
            res = interleaved([ours], initial, batches, steps)
            del ours
            release_memory()
            peer_alone = peer_alone or interleaved([load(PEER, path)[0]], initial, batches, steps)
            timing[mode] = ({**peer_alone, **res}, False)
        ours = None   # freed (with the peer) before the next mode loads
    return timing, mem


def print_results(timing: dict, mem: dict, batches, tokens: int, say=print) -> None:
    import peft
    import transformers
    from benchmarks.tables import footprint, speed

    nan = float("nan")
    for mode, (res, _) in timing.items():
        for b in batches:
            p, o = res[PEER][b][1], res[mode][b][1]
            say(f"losses, {mode} base, batch {b} (step: {PEER} / nanopali / |diff| / allowed): " + "; ".join(
                f"{i + 1}: {x:.4f} / {y:.4f} / {abs(x - y):.1e} / {t:.1e}"
                for i, (x, y, t) in enumerate(zip(p, o, loss_tolerance(p)))))
    say("\n| base | implementation | batch | s/step | tokens/s | peak resident GB | of which training GB | load s "
        "| max loss diff |\n|---|---|---|---|---|---|---|---|---|")
    for mode, (res, together) in timing.items():
        for b in batches:
            cells = {}
            for side in (PEER, mode):
                t, m = statistics.median(res[side][b][0]), mem.get(side)
                cells[side] = (t, b * tokens / t) + ((m["peak_gb"][b], m["peak_gb"][b] - m["loaded_gb"], m["load_s"])
                                                     if m else (nan, nan, nan))
            for side, name in ((PEER, f"transformers {transformers.__version__} + peft {peft.__version__}"),
                               (mode, "nanopali (train.py)")):
                say(f"| {mode} | {name} | {b} | " + " | ".join("n/a" if v != v else f"{v:.2f}" for v in cells[side])
                    + " | |")
            (t0, r0, m0, g0, l0), (t1, r1, m1, g1, l1) = cells[PEER], cells[mode]
            diff = max(abs(x - y) for x, y in zip(res[PEER][b][1], res[mode][b][1]))
            verdict = ("agree" if losses_agree(res[PEER][b][1], res[mode][b][1]) else "DIFFER") if mode == "bf16" \
                else "quantized base"
            say(f"| {mode} | nanopali vs {PEER}{'' if together else ' (not interleaved)'} | {b} | {speed(t0 / t1)} | "
                f"{speed(r1 / r0)} | {footprint(m1 / m0)} | {footprint(g1 / g0)} | {speed(l0 / l1)} | "
                f"{diff:.1e} ({verdict}) |")
    say("\ns/step: median of the timed steps, in this process, the two sides interleaved step by step. tokens/s: "
        "batch x tokens a row / s/step. Peak resident, training and load: each side alone in a child process; "
        "peak = VmHWM over that batch size's steps, training = peak - resident with the model loaded and its "
        "pages read. Loss diff: max over the steps of |nanopali - transformers| from the same weights, batch "
        "and initial adapters.")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="bench.py train", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 1)[1])
    ap.add_argument("--text-layers", type=int, default=26, help="decoder layers (default: the 3B's %(default)s)")
    ap.add_argument("--vision-layers", type=int, default=27, help="SigLIP layers (default: the 3B's %(default)s)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4], help="batch sizes (default %(default)s)")
    ap.add_argument("--steps", type=int, default=3, help=f"timed steps per batch size after {WARMUP} warm-up step; "
                    "their median is reported (default %(default)s)")
    ap.add_argument("--modes", nargs="+", default=["bf16", "int4", "int8"], choices=["bf16", "int4", "int8"],
                    help="nanopali's frozen base: bf16, or train.py's --quantize-base int4 / int8 (default %(default)s)")
    ap.add_argument("--keep", default=None, help="directory that keeps the random checkpoint for the next run")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the cores this process "
                    "may use)")
    ap.add_argument("--no-memory", dest="memory", action="store_false", help="skip the child processes that "
                    "measure peak resident memory and load time")
    ap.add_argument("--child", default=None, help="internal: run one side (transformers, bf16, int4, int8) of "
                    "--checkpoint alone and print its memory and load time as JSON")
    ap.add_argument("--checkpoint", default=None, help="internal, with --child: the checkpoint directory")
    return ap


def main(argv=None) -> int:
    from benchmarks import machine
    from benchmarks.random_checkpoint import bench_config, write_random_checkpoint
    from nanopali.cpu.machine import set_threads

    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("text_layers", "vision_layers", "steps", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if min(args.batches) < 1:
        parser.error(f"--batches must be >= 1, got {min(args.batches)}")
    threads, note = set_threads(args.threads)
    if args.child:
        print(json.dumps(child(args.child, args.checkpoint, args.batches)))
        return 0
    if note:
        print(f"--threads: {note}", file=sys.stderr, flush=True)
    print(machine.describe(threads), flush=True)
    cfg = bench_config(2, args.text_layers, args.vision_layers)
    keep = args.keep or tempfile.mkdtemp(prefix="nanopali-bench-train-")
    try:
        path = write_random_checkpoint(cfg, os.path.join(keep, f"pg2-3b-224-text{cfg.text.depth}-vision{cfg.vision.depth}"))
        print(f"PaliGemma 2 3B, 224 px, {cfg.text.depth} text + {cfg.vision.depth} vision layers, random weights; "
              f"LoRA r={RANK} alpha={ALPHA:g}, lr {LR:g} (constant), torch {torch.__version__}", flush=True)
        timing, mem = compare(path, args.modes, args.batches, args.steps, threads, args.memory,
                              say=lambda s: print(s, flush=True))
    finally:
        if not args.keep:
            shutil.rmtree(keep, ignore_errors=True)
    print_results(timing, mem, args.batches, cfg.num_image_tokens + TEXT_TOKENS)
    print(f"load average after the run: {os.getloadavg()[0]:.2f} (1 min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
