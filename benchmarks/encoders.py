"""MobileCLIP2 and SigLIP encoders beside their references: the same random weights, one process, one table.

    python bench.py encoders                                  # SigLIP So400m/14 beside transformers
    PYTHONPATH=. /tmp/oracle/bin/python bench.py encoders     # + MobileCLIP2 S0, S2, B beside open_clip + timm
    python bench.py encoders --models s0 siglip --batches 1 --dtypes bf16 --repeats 5 --threads 1
    python bench.py encoders --threads 1 --clock cpu          # a core another process shares: CPU time

MobileCLIP2's references, open_clip and timm, import torchvision, whose wheels do not load beside the CPU
build of torch 2.13 (docs/mobileclip.md). Those rows run in the oracle's environment that
tests/mobileclip_reference.py names (torch 2.14.1, torchvision 0.29.1, open_clip_torch 3.3, timm, plus
transformers for the SigLIP rows), with this repository on PYTHONPATH as above; where open_clip does not
import, one line says so and the SigLIP rows are measured alone.

Weights: MobileCLIP2 at its released sizes, `deterministic_state` (tests/mobileclip_reference.py) on
open_clip's own tensor names, the MCi towers reparameterised first (timm `reparameterize_model`: the
inference layout), written as an open_clip checkpoint and read by `load_mobileclip_model`; SigLIP
So400m/14 at 224 px is transformers' `SiglipVisionModel` (pooling head included, its default attention)
with seeded weights, mapped by `siglip_name`, given the swaps load_siglip_model applies and run as
`SigLIPModel.encode_images`. A cell is (model, tower, batch, dtype): both outputs are checked (`check`),
each side warms up, then --repeats interleaved rounds (reference, nanopali, ...) give the median of
each. The MCi towers also time the reference in channels-last, a layout timm supports but does not use
by default, so a reader sees what the layout gives. Results: docs/speed.md#two-tower-encoders.
"""
from __future__ import annotations

import argparse
import copy
import functools
import importlib.util
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MOBILECLIP = {"s0": "MobileCLIP2-S0", "s2": "MobileCLIP2-S2", "b": "MobileCLIP2-B"}   # --models → open_clip name
SIGLIP = dict(hidden_size=1152, intermediate_size=4304, num_attention_heads=16, num_hidden_layers=27,
              patch_size=14, image_size=224)                                         # So400m/14, 224 px
MODELS = (*MOBILECLIP, "siglip")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
HOW_TO_GET_OPEN_CLIP = ("run in the oracle environment of tests/mobileclip_reference.py: "
                        "PYTHONPATH=. /tmp/oracle/bin/python bench.py encoders")


@functools.lru_cache(maxsize=None)
def from_tests(name: str):
    """tests/<name>.py as a module: the MobileCLIP2 oracle and the project's rounding bound live there."""
    spec = importlib.util.spec_from_file_location(f"nanopali_tests_{name}", os.path.join(ROOT, "tests", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class ParityError(AssertionError):
    """nanopali's output is not the reference's: its timing would compare two different computations."""


@dataclass
class Tower:
    """One encoder of one model, on both sides: call(x) → (I, E) features; x is cut from `inputs`."""
    model: str
    tower: str
    reference: object          # x → features
    ours: object
    inputs: torch.Tensor       # the largest batch; a cell takes its first rows (pixels fp32, or token ids)
    terms: int                 # products along the longest chain (tests/tolerance.py `module_terms`)
    modules: tuple             # (reference module, nanopali module): cast to each dtype in place
    channels_last: object = None   # the reference in channels-last, for the conv towers
    note: str = ""                 # how the reference runs, printed under the table


def check(ours: torch.Tensor, theirs: torch.Tensor, dtype, terms: int, anchor: torch.Tensor | None = None,
          what: str = "features") -> dict:
    """{"diff": max |ours - theirs|, ...}, or ParityError. fp32: within the rounding bound the parity tests
    use (tests/tolerance.py). bf16, where each side rounds at its own points (oneDNN's fused GELU rounds
    once, F.linear + F.gelu twice): nanopali's output is no farther from the reference's fp32 output
    (`anchor`, on the first rows) than twice the reference's own bf16 output is from it, plus the fp32
    bound. Two errors of the same size, each a random walk of roundings, land within 2x of each other;
    a wrong weight moves an output by a fraction of its size, well past either."""
    tolerance = from_tests("tolerance")
    a, b = ours.double(), theirs.double()
    out = {"diff": (a - b).abs().max().item()}
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise ParityError(f"{what}: not finite")
    if dtype == torch.float32:
        out["bound"] = tolerance.rounding_bound(torch.float32, max(a.abs().max().item(), b.abs().max().item()), terms)
        if out["diff"] > out["bound"]:
            raise ParityError(f"{what}: nanopali and the reference differ by {out['diff']:.3e} in fp32, more than "
                              f"the rounding bound {out['bound']:.3e}")
        return out
    n, ref = len(anchor), anchor.double()
    out["ours_vs_fp32"] = (a[:n] - ref).abs().max().item()
    out["reference_vs_fp32"] = (b[:n] - ref).abs().max().item()
    out["bound"] = 2 * out["reference_vs_fp32"] + tolerance.rounding_bound(torch.float32, ref.abs().max().item(), terms)
    if out["ours_vs_fp32"] > out["bound"]:
        raise ParityError(f"{what}: nanopali's {dtype} output is {out['ours_vs_fp32']:.3e} from the fp32 reference, "
                          f"more than twice the reference's own {dtype} error ({out['reference_vs_fp32']:.3e}) allows")
    return out


# ---- the pairs: one model built on both sides with the same weights ----

def text_rows(batch: int, context: int, vocab: int) -> torch.Tensor:
    """(J, L) ids as CLIP's tokenizer makes them: SOT, text, EOT (the largest id, where pooling reads), pads."""
    g = torch.Generator().manual_seed(1)
    ids = torch.zeros(batch, context, dtype=torch.long)
    for j, n in enumerate(torch.randint(3, context - 1, (batch,), generator=g).tolist()):
        ids[j, 0], ids[j, n + 1] = vocab - 2, vocab - 1
        ids[j, 1:n + 1] = torch.randint(1, vocab - 2, (n,), generator=g)
    return ids


def mobileclip_towers(name: str, batch: int, trunk_kwargs: dict | None = None,
                      text_layers: int | None = None) -> list[Tower]:
    """open_clip's `name` (depths cut as the cases of tests/mobileclip_reference.py cut them) and nanopali's,
    from one checkpoint in the inference layout: the image tower, then the text tower."""
    from timm.utils.model import reparameterize_model

    from nanopali.mobileclip import load_mobileclip_model
    from nanopali.mobileclip.checkpoint import config_from_open_clip

    ref, tolerance = from_tests("mobileclip_reference"), from_tests("tolerance")
    oracle = reparameterize_model(ref.build_oracle(name, trunk_kwargs, text_layers)).eval()
    state = ref.deterministic_state(ref.layout(oracle), seed=1)
    oracle.load_state_dict(state)
    config = ref.open_clip_config(name)
    cfg = config_from_open_clip(config, name)
    if trunk_kwargs:
        kw = trunk_kwargs
        cfg = replace(cfg, image=replace(cfg.image, **({"depths": tuple(kw["layers"])} if "layers" in kw
                                                      else {"depth": kw["depth"]})))
    if text_layers:
        cfg = replace(cfg, text=replace(cfg.text, depth=text_layers))
    with tempfile.TemporaryDirectory() as d:
        import safetensors.torch
        safetensors.torch.save_file(state, os.path.join(d, "open_clip_model.safetensors"))
        with open(os.path.join(d, "open_clip_config.json"), "w") as f:
            json.dump(config, f)
        ours = load_mobileclip_model(d, cfg=cfg)
    del state
    g = torch.Generator().manual_seed(0)
    size, text = cfg.image.image_size, cfg.text
    pixels = torch.randn(batch, 3, size, size, generator=g)
    mci = hasattr(cfg.image, "depths")
    visual_cl = copy.deepcopy(oracle.visual).to(memory_format=torch.channels_last) if mci else None
    note = ("open_clip + timm run as created (NCHW); their channels-last column is the timm trunk after "
            ".to(memory_format=torch.channels_last), its input converted in the timed call as nanopali's is")
    image = Tower(name, "image", oracle.encode_image, ours.encode_images, pixels,
                  tolerance.module_terms(ours.image_tower), (oracle, ours) + ((visual_cl,) if mci else ()),
                  (lambda x: visual_cl(x.contiguous(memory_format=torch.channels_last))) if mci else None, note)
    ids = text_rows(batch, text.context_length, text.vocab_size)
    texts = Tower(name, "text", oracle.encode_text, ours.encode_texts, ids,
                  tolerance.module_terms(ours.text_tower) + text.context_length, (oracle, ours), note=note)
    return [image, texts]


def siglip_towers(batch: int, vision: dict = SIGLIP, name: str = "SigLIP So400m/14") -> list[Tower]:
    """transformers' SiglipVisionModel (its pooling head: pooler_output) and nanopali's image tower + MAP
    head (`SigLIPModel.encode_images`; its text tower left empty), the same seeded weights."""
    import transformers
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from nanopali.siglip import SigLIPModel, SigLIPModelConfig, TextConfig
    from nanopali.siglip.checkpoint import siglip_name
    from nanopali.siglip.onednn import use_onednn
    from nanopali.vit import SigLIPConfig

    torch.manual_seed(0)
    theirs = SiglipVisionModel(SiglipVisionConfig(**vision)).eval()
    with torch.no_grad():   # LayerNorm weights are 1 and biases 0 at init: give every tensor some signal
        for p in theirs.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    v = SigLIPConfig(vision["hidden_size"], vision["num_hidden_layers"], vision["intermediate_size"],
                     vision["num_attention_heads"], vision["patch_size"], vision["image_size"])
    no_text = TextConfig(vocab_size=2, width=8, depth=0, mlp_dim=8, num_heads=1, max_length=1, projection_dim=v.width)
    ours = SigLIPModel(SigLIPModelConfig(v, no_text)).eval()
    # transformers 5 names the vision model's tensors without the "vision_model." of a SiglipModel checkpoint
    state = {siglip_name(k if k.startswith("vision_model.") else "vision_model." + k): t
             for k, t in theirs.state_dict().items()}
    missing, unexpected = ours.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith(("text_tower.", "logit_")) for k in missing):
        raise RuntimeError(f"nanopali bug: SigLIP names do not map: missing {missing}, unexpected {unexpected}")
    use_onednn(ours)                        # what load_siglip_model applies
    pixels = torch.randn(batch, 3, v.image_size, v.image_size, generator=torch.Generator().manual_seed(0))
    tolerance = from_tests("tolerance")
    terms = tolerance.module_terms(ours.vision_tower) + tolerance.module_terms(ours.vision_head)
    note = (f"transformers {transformers.__version__} runs SiglipVisionModel with its default attention "
            f"({theirs.config._attn_implementation})")
    return [Tower(name, "image", lambda x: theirs(pixel_values=x).pooler_output, ours.encode_images, pixels, terms,
                  (theirs, ours), note=note)]


# ---- timing ----

CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


def timed(f, x, clock=time.perf_counter) -> float:
    t0 = clock()
    f(x)
    return clock() - t0


def measure(towers: list[Tower], dtypes: list[str], batches: list[int], repeats: int, log=print,
            clock: str = "wall") -> list[dict]:
    """One row per (tower, dtype, batch): median ms of each side over interleaved rounds, and the parity check."""
    dtypes = [d for d in DTYPES if d in dtypes]    # fp32 first: the bf16 check reads fp32 outputs
    with torch.inference_mode():
        anchors = {id(t): t.reference(t.inputs[:2]).float() for t in towers} if "bf16" in dtypes else {}
    rows = []
    for name in dtypes:
        dtype = DTYPES[name]
        with torch.no_grad():   # as a user casts a model: under inference_mode the parameters would become
            for t in towers:    # inference tensors, which sent open_clip's bf16 text tower down a 4x slower path
                for m in t.modules:
                    m.to(dtype)
        for t in towers:
            for b in batches:
                with torch.inference_mode():
                    rows.append(_cell(t, name, b, anchors.get(id(t)), repeats, CLOCKS[clock]))
                log(f"  {t.model} {t.tower} batch {b} {name}: " + ", ".join(
                    f"{k} {v:.1f} ms" for k, v in rows[-1]["ms"].items()))
    return rows


def _cell(t: Tower, name: str, b: int, anchor, repeats: int, clock) -> dict:
    dtype = DTYPES[name]
    x = t.inputs[:b].to(dtype) if t.inputs.is_floating_point() else t.inputs[:b]
    sides = {"reference": t.reference, "nanopali": t.ours}
    if t.channels_last is not None:
        sides["reference channels-last"] = t.channels_last
    out = {k: f(x).float() for k, f in sides.items()}        # the first warm-up
    parity = check(out["nanopali"], out["reference"], dtype, t.terms, anchor, f"{t.model} {t.tower} {name} batch {b}")
    for f in sides.values():
        f(x)
    times = {k: [] for k in sides}
    for _ in range(repeats):                                  # interleaved: both see the same load
        for k, f in sides.items():
            times[k].append(timed(f, x, clock))
    return {"model": t.model, "tower": t.tower, "batch": b, "dtype": name, "parity": parity, "note": t.note,
            "ms": {k: 1000 * statistics.median(v) for k, v in times.items()}}


def print_tables(rows: list[dict], clock: str = "wall") -> None:
    from benchmarks.tables import speed

    if not rows:
        print("\nNothing was measured.")
        return
    unit = "ms" if clock == "wall" else "CPU ms"
    print(f"\n| model | tower | batch | dtype | reference {unit} | nanopali {unit} | nanopali vs reference "
          f"| reference channels-last {unit} | nanopali vs it |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ms = r["ms"]
        cl = ms.get("reference channels-last")
        print(f"| {r['model']} | {r['tower']} | {r['batch']} | {r['dtype']} | {ms['reference']:.1f} | "
              f"{ms['nanopali']:.1f} | {speed(ms['reference'] / ms['nanopali'])} | "
              + (f"{cl:.1f} | {speed(cl / ms['nanopali'])} |" if cl else "| |"))
    print("\nParity, max |nanopali - reference| over the batches (bf16: each side's distance from the fp32 "
          "reference, which may be at most twice the reference's own plus the fp32 bound):\n")
    print("| model | tower | dtype | max abs diff | check |")
    print("|---|---|---|---|---|")
    cells = {}
    for r in rows:
        cells.setdefault((r["model"], r["tower"], r["dtype"]), []).append(r["parity"])
    for (model, tower, dtype), ps in cells.items():
        worst = max(ps, key=lambda p: p["diff"])
        how = (f"<= {worst['bound']:.1e} (rounding bound)" if dtype == "fp32" else
               f"nanopali {max(p['ours_vs_fp32'] for p in ps):.2e} / reference "
               f"{max(p['reference_vs_fp32'] for p in ps):.2e} from fp32")
        print(f"| {model} | {tower} | {dtype} | {worst['diff']:.2e} | {how} |")


def oracle_missing() -> str | None:
    """Why open_clip + timm cannot be the reference here, or None when they can."""
    try:
        import open_clip  # noqa: F401
        import timm  # noqa: F401
    except Exception as e:   # torchvision's wheels fail with RuntimeError / OSError, not only ImportError
        return f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    return None


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="bench.py encoders", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.split("\n")[1:]))
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS,
                   help="s0 / s2 / b: MobileCLIP2 image and text towers beside open_clip + timm; siglip: "
                        "So400m/14 224 px image tower beside transformers (default: all)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32], help="batch sizes (default %(default)s)")
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES),
                   help="weights and activations, both sides (default %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved timed rounds per cell; the median is "
                   "reported (default %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the cores this process "
                   "may use; more are cut to them)")
    p.add_argument("--clock", default="wall", choices=list(CLOCKS), help="wall: elapsed time (default); cpu: this "
                   "thread's CPU time, with --threads 1 only: on a core another process shares, the time the "
                   "scheduler gives to it is not counted")
    args = p.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be ≥ 1, got {args.threads}")
    if min(args.batches) < 1 or args.repeats < 1:
        p.error("--batches and --repeats must be ≥ 1")
    if args.clock == "cpu" and args.threads != 1:
        p.error("--clock cpu times the calling thread alone: give --threads 1")
    from bench import set_up_machine

    print(set_up_machine(args.threads), flush=True)
    logger, handler = logging.getLogger("nanopali"), logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("  %(message)s"))      # the forms nanopali chose here (siglip/onednn.py)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        run(args)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def run(args) -> list[dict]:
    import gc

    import transformers

    wanted = [m for m in MODELS if m in args.models]
    missing = oracle_missing() if any(m in MOBILECLIP for m in wanted) else None
    if missing:
        print(f"MobileCLIP2 rows skipped: open_clip / timm do not import here ({missing}); {HOW_TO_GET_OPEN_CLIP}",
              flush=True)
        wanted = [m for m in wanted if m not in MOBILECLIP]
    elif any(m in MOBILECLIP for m in wanted):
        import open_clip
        import timm
        print(f"references: open_clip {open_clip.__version__} + timm {timm.__version__}; "
              f"transformers {transformers.__version__}", flush=True)
    rows = []
    for m in wanted:
        print(f"{MOBILECLIP.get(m, 'SigLIP So400m/14')}: building both sides", flush=True)
        towers = mobileclip_towers(MOBILECLIP[m], max(args.batches)) if m in MOBILECLIP else \
            siglip_towers(max(args.batches))
        rows += measure(towers, args.dtypes, args.batches, args.repeats, lambda s: print(s, flush=True), args.clock)
        del towers
        gc.collect()
    print_tables(rows, args.clock)
    for note in dict.fromkeys(r["note"] for r in rows if r["note"]):
        print(f"- {note}")
    print(f"- load average after the run: {os.getloadavg()[0]:.2f} (1 min)")
    return rows


if __name__ == "__main__":
    main()
