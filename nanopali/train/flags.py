"""train.py's flags: the parser (every flag with its help and default) and recipe files.

A recipe is a file of `name = value` lines in Python literal syntax (comments allowed; nothing is
executed: each value goes through ast.literal_eval) or a JSON object; names are the flags with '_'
for '-' (booleans True/False, lists for comma-separated flags). Later sources win: recipe files in
order, then the command line. A run's run.json is itself a recipe (its "history" entry, written by
run_dir.py, is not a flag and is skipped).
"""
from __future__ import annotations

import argparse
import ast
import json
import sys

import torch

from ..datasets import add_arguments as add_dataset_arguments
from ..config import PRESETS
from ..quant.weight_only import INT4_GROUP_SIZES
from . import finetune
from .evaluate import EVAL_METRICS
from .lora import TARGETS

class _Help(argparse.RawDescriptionHelpFormatter):
    """The description as written, and each flag's default where it has one."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.option_strings and action.default not in (None, False, "", argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text


def build_parser(description: str = "") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=_Help)
    p.add_argument("recipes", nargs="*", help="recipe files (.py of `name = value` lines, or .json) read before flags")
    g = p.add_argument_group("model and data")
    g.add_argument("--init", help="HF checkpoint directory or hub name (google/paligemma2-3b-pt-224) to fine-tune; "
                   "or, for random weights (training from scratch), a config.json or a preset name "
                   f"({', '.join(list(PRESETS)[:2])}, ...)")
    g.add_argument("--revision", help="branch, tag or commit of a hub --init (default main)")
    g.add_argument("--tokenizer", help="tokenizer.model for a random --init (a checkpoint brings its own; "
                   "--estimate-memory needs none)")
    g.add_argument("--data", help="training data: JSONL of {\"image\", \"prefix\", \"suffix\"} objects (image paths "
                   "relative to the file; \"image\" may be a list), or a Hugging Face / COCO / VQA / RefCOCO / YOLO "
                   "dataset read by the flags below (docs/datasets.md)")
    g.add_argument("--eval-data", help="held-out data, any format, read with the same flags")
    add_dataset_arguments(g, with_eval=True)
    g.add_argument("--out-dir", default="runs/finetune", help="run directory: checkpoints/, run.json, the final model")
    g.add_argument("--max-seq-len", type=int, help="longest sequence (image tokens + prefix + suffix + EOS); longer "
                   "examples are bad lines, named with file and line. None: the model's positions (8192)")
    g.add_argument("--skip-bad", action=argparse.BooleanOptionalAction, default=False,
                   help="drop bad examples (counted) instead of stopping")
    g = p.add_argument_group("what trains")
    g.add_argument("--trainable", default="all", choices=list(finetune.TRAINABLE),
                   help="all; llm (decoder + embeddings; image encoder and projector frozen); attn (decoder "
                   "attention q/k/v/o only: big_vision's 16 GB recipe); projector; lora (adapters only)")
    g.add_argument("--lora-rank", type=int, default=8, help="LoRA rank r")
    g.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA alpha; the update is scaled by alpha / r")
    g.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA input")
    g.add_argument("--lora-targets", default=",".join(TARGETS), help="comma-separated decoder Linear names")
    g.add_argument("--trainable-dtype", default="fp32", choices=["fp32", "bf16"], help="dtype of trainable weights, "
                   "their gradients and AdamW state (bf16: half the memory, as transformers in bf16; small "
                   "updates round away)")
    g.add_argument("--quantize-base", choices=["int8", "int4"], help="QLoRA: hold the frozen base quantized "
                   "(weight-only, dequantized on the fly in forward and backward); needs --trainable lora "
                   "(docs/qlora.md)")
    g.add_argument("--quantize-group-size", type=int, help="int4 group size of the quantized base: 32, 64, 128, "
                   "256 (None: 64)")
    g.add_argument("--frozen-dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="dtype of frozen weights "
                   "(bf16/fp16 need --precision bf16/fp16)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="autocast dtype; fp16 adds a GradScaler; auto = bf16 on CUDA, fp32 on CPU")
    g.add_argument("--batch-size", type=int, default=8, help="examples per micro-batch per process")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--max-steps", type=int, help="optimizer steps (None: one epoch)")
    g.add_argument("--lr", type=float, default=1e-5, help="peak learning rate")
    g.add_argument("--min-lr", type=float, default=0.0, help="learning rate the cosine decays towards")
    g.add_argument("--warmup-steps", type=int, default=0, help="linear warmup steps")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW decoupled weight decay (matrices only)")
    g.add_argument("--beta1", type=float, default=0.9, help="AdamW beta1")
    g.add_argument("--beta2", type=float, default=0.999, help="AdamW beta2")
    g.add_argument("--grad-clip", type=float, default=1.0, help="clip the global gradient norm (0: off)")
    g.add_argument("--loss-normalization", default="tokens", choices=finetune.LOSS_NORMALIZATIONS,
                   help="tokens: mean over supervised tokens of the step (transformers); examples: mean of "
                   "per-example means (big_vision)")
    g.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=False,
                   help="recompute each layer in backward (both towers)")
    g.add_argument("--attn-impl", default="auto", choices=["auto", "reference", "sdpa", "triton"],
                   help="attention implementation")
    g.add_argument("--seed", type=int, default=0, help="seeds data order, LoRA init and dropout, random init "
                   "(0 ≤ seed < 2**63)")
    g.add_argument("--skip-nonfinite", action=argparse.BooleanOptionalAction, default=False,
                   help="skip (and count) steps whose loss is NaN/inf instead of stopping")
    g = p.add_argument_group("logging, evaluation, checkpoints")
    g.add_argument("--log-every", type=int, default=10, help="steps between progress lines (elapsed, ETA, "
                   "loss, tokens/s; flushed, so `| tee log` shows them as they come)")
    g.add_argument("--metrics-file", help="append one JSON object per progress line and evaluation")
    g.add_argument("--peak-tflops", type=float, help="device peak TFLOP/s for MFU (known GPUs are looked up)")
    g.add_argument("--eval-every", type=int, default=0, help="steps between evaluations (0: only at the end)")
    g.add_argument("--eval-batch-size", type=int, default=8, help="examples per evaluation batch")
    g.add_argument("--eval-max-examples", type=int, help="evaluate on the first N held-out examples")
    g.add_argument("--eval-generate", action=argparse.BooleanOptionalAction, default=True,
                   help="also greedy-decode and score exact match / box IoU")
    g.add_argument("--eval-max-new-tokens", type=int, default=32, help="generation length at evaluation")
    g.add_argument("--eval-metric", choices=list(EVAL_METRICS), help="also score the "
                   "greedy answers with the paper's metric, as evaluate.py does (references: each example's "
                   "\"references\", else its suffix; docs/metrics.md)")
    g.add_argument("--save-every", type=int, default=0, help="steps between checkpoints (0: only at the end)")
    g.add_argument("--keep", type=int, default=3, help="step checkpoints to keep")
    g.add_argument("--resume", action=argparse.BooleanOptionalAction, default=False,
                   help="continue from <out-dir>/checkpoints/latest (start fresh if there is none yet); flags "
                   "that differ from run.json are refused unless named in --allow-changed")
    g.add_argument("--allow-changed", default="", help="comma-separated optimiser flags a --resume may change, "
                   "e.g. max_steps,lr (recorded in run.json's history)")
    g = p.add_argument_group("devices")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (torchrun: cuda:LOCAL_RANK)")
    g.add_argument("--parallel", default="ddp", choices=["ddp", "fsdp"], help="under torchrun: DDP (replicas) or "
                   "FSDP2 (fully_shard per layer: weights, grads and AdamW state sharded)")
    g.add_argument("--estimate-memory", action="store_true", help="print the expected peak memory per device and "
                   "exit, allocating nothing (FSDP: under torchrun, or with WORLD_SIZE=N set, weights are divided)")
    g.add_argument("--memory-check", action=argparse.BooleanOptionalAction, default=True,
                   help="before building the model, refuse a run whose estimated peak (longest example) exceeds "
                   "the memory available on the device")
    return p


def parse_args(argv=None, description: str = "") -> argparse.Namespace:
    """The flags of argv (sys.argv by default) after its recipe files, checked."""
    parser = build_parser(description)
    args = parse_with_recipes(parser, list(sys.argv[1:] if argv is None else argv))
    if args.precision == "auto":
        args.precision = "bf16" if torch.cuda.is_available() else "fp32"
    if args.init is None:
        parser.error("--init is required (a checkpoint directory or a preset name)")
    if args.data is None and not args.estimate_memory:
        parser.error("--data is required")
    if args.frozen_dtype != "fp32" and args.precision == "fp32":
        parser.error(f"--frozen-dtype {args.frozen_dtype} needs --precision bf16 or fp16 (mixed weights run under "
                     "autocast)")
    if args.quantize_base and args.trainable != "lora":
        parser.error(f"--quantize-base {args.quantize_base} freezes a quantized base: it goes with --trainable lora")
    if args.quantize_group_size is not None and args.quantize_base != "int4":
        parser.error("--quantize-group-size goes with --quantize-base int4 (int8 keeps one scale per row)")
    if args.quantize_group_size is not None and args.quantize_group_size not in INT4_GROUP_SIZES:
        parser.error(f"--quantize-group-size must be one of {', '.join(map(str, INT4_GROUP_SIZES))} (the tile sizes "
                     f"of torch's int4 kernels), got {args.quantize_group_size}")
    if args.eval_metric and not args.eval_generate:
        parser.error(f"--eval-metric {args.eval_metric} scores generated answers: it cannot go with --no-eval-generate")
    if not 0 <= args.seed < 2 ** 63:
        parser.error(f"--seed must be in [0, 2**63), got {args.seed}")
    for name in ("batch_size", "grad_accum", "max_steps", "max_seq_len", "log_every", "eval_batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be ≥ 1, got {getattr(args, name)}")
    return args


def read_recipe(path: str) -> dict:
    """{flag: value} from a recipe file; values are literals only, so reading it runs no code."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise SystemExit(f"{path}: cannot read the recipe ({e})") from None
    if path.endswith(".json"):
        try:
            out = json.loads(text)
        except json.JSONDecodeError as e:
            raise SystemExit(f"{path}: not valid JSON ({e})") from None
        if not isinstance(out, dict):
            raise SystemExit(f"{path}: a JSON recipe is an object of flags")
        out.pop("history", None)
        return out
    out = {}
    try:
        body = ast.parse(text, path).body
    except SyntaxError as e:
        raise SystemExit(f"{path}:{e.lineno}: not a recipe line ({e.msg})") from None
    for node in body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            raise SystemExit(f"{path}:{node.lineno}: a recipe holds only `name = literal` lines")
        try:
            out[node.targets[0].id] = ast.literal_eval(node.value)
        except ValueError:
            raise SystemExit(f"{path}:{node.lineno}: the value of {node.targets[0].id} is not a literal") from None
    return out


def parse_with_recipes(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse argv whose positional `recipes` name recipe files: their values become flags placed
    before argv, so the command line wins."""
    args = parser.parse_args(argv)
    options = {a.dest: a.option_strings for a in parser._actions if a.option_strings}
    flags = []
    for path in args.recipes:
        for name, value in read_recipe(path).items():
            if name not in options:
                raise SystemExit(f"{path}: unknown flag {name!r}; see python train.py --help")
            flag = options[name][0]
            if isinstance(value, bool):  # True: the flag; False: its --no- form if it has one, else the default
                flags += [flag] if value else [o for o in options[name] if o.startswith("--no-")]
            elif value is not None:
                flags.append(f"{flag}={','.join(value) if isinstance(value, (list, tuple)) else value}")
    return parser.parse_args(flags + argv) if flags else args
