"""Fine-tune PaliGemma / PaliGemma 2 on (image, prefix, suffix) JSONL: one process, or many with torchrun.

    python train.py --init CKPT_DIR --data train.jsonl --out-dir runs/x [flags]
    python train.py recipes/detect_lora_pg2_3b.py --init=CKPT_DIR --data=train.jsonl --lr=3e-4
    torchrun --nproc_per_node 8 train.py recipes/caption_full_pg2_3b.py --init=... --parallel=fsdp
    python train.py recipes/vqa_attn_16gb_pg1.py --init=CKPT_DIR --estimate-memory   # allocates nothing

A recipe is a file of `name = value` lines in Python literal syntax (comments allowed; nothing is
executed: each value goes through ast.literal_eval) or a JSON object; names are the flags with '_'
for '-' (booleans True/False, lists for comma-separated flags). Later sources win: recipe files in
order, then command-line flags. The effective flags are written to <out-dir>/run.json, itself a
recipe. The result, <out-dir>, is a HF-layout checkpoint that nanopali.load(out_dir) reads (LoRA
merged in; the adapters alone in <out-dir>/lora). The pieces (presets, loss, step, checkpoints) live in nanopali/train/.
"""
from __future__ import annotations

import argparse
import ast
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist

import nanopali
from nanopali.train import finetune, parallel, resume
from nanopali.formats.files import resolve_dtype
from nanopali.formats.hf import read_paligemma_config, read_quantization
from nanopali.config import PRESETS, from_hf_config, preset
from nanopali.train.data import DataError, DataOrder, collate, load_examples
from nanopali.train.cost import estimate_memory, peak_flops
from nanopali.train.progress import Progress
from nanopali.train.evaluate import evaluate_held_out
from nanopali.train.lora import TARGETS, LoRAConfig, apply_lora, load_adapters, save_adapters
from nanopali.model import PaliGemma
from nanopali.processing import Processor

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipes", nargs="*", help="recipe files (.py of `name = value` lines, or .json) read before flags")
    g = p.add_argument_group("model and data")
    g.add_argument("--init", help="HF checkpoint directory to fine-tune; or, for random weights (training from "
                   f"scratch), a config.json or a preset name ({', '.join(list(PRESETS)[:2])}, ...)")
    g.add_argument("--tokenizer", help="tokenizer.model for a random --init (a checkpoint brings its own)")
    g.add_argument("--data", help="training JSONL: one {\"image\", \"prefix\", \"suffix\"} object a line; image "
                   "paths relative to the file; \"image\" may be a list")
    g.add_argument("--eval-data", help="held-out JSONL, same format")
    g.add_argument("--out-dir", default="runs/finetune", help="run directory: checkpoints/, run.json, the final model")
    g.add_argument("--max-seq-len", type=int, help="longest sequence (image tokens + prefix + suffix + EOS); longer "
                   "examples are bad lines (default: no limit)")
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
    g.add_argument("--frozen-dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="dtype of frozen weights "
                   "(bf16/fp16 need --precision bf16/fp16)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="autocast dtype; fp16 adds a GradScaler; auto = bf16 on CUDA, fp32 on CPU")
    g.add_argument("--batch-size", type=int, default=8, help="examples per micro-batch per process")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--max-steps", type=int, help="optimizer steps (default: one epoch)")
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
    g.add_argument("--seed", type=int, default=0, help="seeds data order, LoRA init and dropout, random init")
    g.add_argument("--skip-nonfinite", action=argparse.BooleanOptionalAction, default=False,
                   help="skip (and count) steps whose loss is NaN/inf instead of stopping")
    g = p.add_argument_group("logging, evaluation, checkpoints")
    g.add_argument("--log-every", type=int, default=10, help="steps between progress lines")
    g.add_argument("--metrics-file", help="append one JSON object per progress line and evaluation")
    g.add_argument("--peak-tflops", type=float, help="device peak TFLOP/s for MFU (known GPUs are looked up)")
    g.add_argument("--eval-every", type=int, default=0, help="steps between evaluations (0: only at the end)")
    g.add_argument("--eval-batch-size", type=int, default=8, help="examples per evaluation batch")
    g.add_argument("--eval-max-examples", type=int, help="evaluate on the first N held-out examples")
    g.add_argument("--eval-generate", action=argparse.BooleanOptionalAction, default=True,
                   help="also greedy-decode and score exact match / box IoU")
    g.add_argument("--eval-max-new-tokens", type=int, default=32, help="generation length at evaluation")
    g.add_argument("--save-every", type=int, default=0, help="steps between checkpoints (0: only at the end)")
    g.add_argument("--keep", type=int, default=3, help="step checkpoints to keep")
    g.add_argument("--resume", action=argparse.BooleanOptionalAction, default=False,
                   help="continue from <out-dir>/checkpoints/latest (start fresh if there is none yet)")
    g = p.add_argument_group("devices")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (torchrun: cuda:LOCAL_RANK)")
    g.add_argument("--parallel", default="ddp", choices=["ddp", "fsdp"], help="under torchrun: DDP (replicas) or "
                   "FSDP2 (fully_shard per layer: weights, grads and AdamW state sharded)")
    g.add_argument("--estimate-memory", action="store_true", help="print the expected peak memory per device and "
                   "exit, allocating nothing (FSDP: under torchrun, or with WORLD_SIZE=N set, weights are divided)")
    return p


def read_recipe(path: str) -> dict:
    """{flag: value} from a recipe file; values are literals only, so reading it runs no code."""
    text = open(path).read()
    if path.endswith(".json"):
        return json.loads(text)
    out = {}
    for node in ast.parse(text, path).body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            raise SystemExit(f"{path}:{node.lineno}: a recipe holds only `name = literal` lines")
        try:
            out[node.targets[0].id] = ast.literal_eval(node.value)
        except ValueError:
            raise SystemExit(f"{path}:{node.lineno}: the value of {node.targets[0].id} is not a literal") from None
    return out


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
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
    if flags:  # recipe values first, then the command line, so the command line wins
        args = parser.parse_args(flags + argv)
    if args.precision == "auto":
        args.precision = "bf16" if torch.cuda.is_available() else "fp32"
    if args.init is None:
        parser.error("--init is required (a checkpoint directory or a preset name)")
    if args.data is None and not args.estimate_memory:
        parser.error("--data is required")
    if args.frozen_dtype != "fp32" and args.precision == "fp32":
        parser.error(f"--frozen-dtype {args.frozen_dtype} needs --precision bf16 or fp16 (mixed weights run under "
                     "autocast)")
    return args


def model_config(args):
    """(config, tokenizer path) of --init: a checkpoint directory, a config.json or a preset name."""
    if os.path.isdir(args.init):
        if os.path.isfile(os.path.join(args.init, "config.json")) and (quant := read_quantization(args.init)):
            raise SystemExit(f"--init {args.init} holds a model quantized as {quant['scheme']}: "
                             "fine-tune its full-precision checkpoint")
        return read_paligemma_config(args.init), os.path.join(args.init, "tokenizer.model")
    if not (os.path.isfile(args.init) or args.init in PRESETS):
        raise SystemExit(f"--init {args.init!r} is neither a checkpoint directory, a config.json nor a preset "
                         f"({', '.join(PRESETS)})")
    if not args.tokenizer:
        raise SystemExit(f"--init {args.init} means random weights: pass --tokenizer PATH/tokenizer.model")
    if args.init in PRESETS:
        return preset(args.init), args.tokenizer
    with open(args.init) as f:
        return from_hf_config(json.load(f)), args.tokenizer


def lora_config(args) -> LoRAConfig | None:
    return LoRAConfig(args.lora_rank, args.lora_alpha, args.lora_dropout, tuple(args.lora_targets.split(","))) \
        if args.trainable == "lora" else None


def build_model(args, cfg, resume_dir, device, materialize: bool) -> PaliGemma:
    """The model with its weights (or, when not materialize, its structure on the meta device for FSDP
    ranks that receive rank 0's weights), adapters, trainable flags and dtypes."""
    if not materialize:
        with torch.device("meta"):
            model = PaliGemma(cfg)
    elif resume_dir is not None and args.trainable != "lora":
        model, _ = nanopali.load(resume_dir, torch.float32, device)
    elif os.path.isdir(args.init):
        model, _ = nanopali.load(args.init, torch.float32, device)
    else:
        model = finetune.init_random(PaliGemma(cfg), args.seed).to(device)
    lora = lora_config(args)
    if lora is not None:
        torch.manual_seed(args.seed)  # LoRA A init: the same on every rank and in every run
        apply_lora(model, lora)
        if resume_dir is not None and materialize:
            load_adapters(model, resume_dir)
    finetune.set_trainable(model, args.trainable)
    finetune.cast_params(model, resolve_dtype(args.trainable_dtype), resolve_dtype(args.frozen_dtype))
    model.attn_impl = args.attn_impl
    model.set_gradient_checkpointing(args.grad_checkpointing)
    return model.train()


def memory_report(args) -> str:
    cfg, _ = model_config(args)
    seq = args.max_seq_len or cfg.num_image_tokens + 32
    est = estimate_memory(cfg, args.trainable, batch=args.batch_size, seq_len=seq, precision=args.precision,
                          trainable_dtype=args.trainable_dtype, frozen_dtype=args.frozen_dtype, lora=lora_config(args),
                          grad_checkpointing=args.grad_checkpointing, fused_attention=args.attn_impl == "triton",
                          shards=int(os.environ.get("WORLD_SIZE", 1)) if args.parallel == "fsdp" else 1)
    return (f"{args.init}: {cfg.vision.image_size} px, seq {seq}, batch {args.batch_size}, trainable {args.trainable}, "
            f"precision {args.precision}, weights {args.trainable_dtype} (trainable) / {args.frozen_dtype} (frozen)"
            f"{', grad checkpointing' if args.grad_checkpointing else ''}\n{est.table()}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.estimate_memory:
        print(memory_report(args))
        return 0
    rank, world, device = parallel.setup(args.device)
    try:
        return train(args, rank, world, device)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def train(args, rank: int, world: int, device: torch.device) -> int:
    say = print if rank == 0 else (lambda *a, **k: None)
    fsdp = world > 1 and args.parallel == "fsdp"
    ckpt_root = os.path.join(args.out_dir, "checkpoints")
    resume_dir = resume.latest(ckpt_root)
    if resume_dir is not None and not args.resume:
        raise SystemExit(f"{ckpt_root} already holds checkpoints: pass --resume to continue, or another --out-dir")
    cfg, tok = model_config(args)
    processor = Processor.for_model(tok, cfg)
    data = load_examples(args.data, processor, args.max_seq_len, args.skip_bad)   # before the model: fail fast
    evals = load_examples(args.eval_data, processor, args.max_seq_len, args.skip_bad) if args.eval_data else None
    for name, ds in (("train", data), ("eval", evals)):
        if ds is not None and ds.skipped:
            say(f"skipped {len(ds.skipped)} bad {name} example(s):\n  " + "\n  ".join(ds.skipped[:10]))
    examples, evals = data.examples, evals and evals.examples[:args.eval_max_examples]
    if fsdp:  # rank 0 reads (or draws) the weights; every rank shards a meta copy and receives them
        full = build_model(args, cfg, resume_dir, "cpu", materialize=True).state_dict() if rank == 0 else {}
        model = build_model(args, cfg, resume_dir, device, materialize=False)
        objective = parallel.wrap(finetune.Objective(model, args.loss_normalization), "fsdp", args.precision, device)
        objective.to_empty(device=device)
        resume.load_model_state(objective, full)
        del full
    else:
        model = build_model(args, cfg, resume_dir, device, materialize=True)
        objective = finetune.Objective(model, args.loss_normalization)
        if world > 1:
            objective = parallel.wrap(objective, args.parallel, args.precision, device)
    torch.manual_seed(args.seed + rank)  # LoRA dropout: its own draws on each rank

    B, A = args.batch_size, args.grad_accum
    max_steps = args.max_steps or math.ceil(len(examples) / (B * A * world))
    optimizer = finetune.make_optimizer(objective, args.lr, args.weight_decay, (args.beta1, args.beta2))
    scaler = None
    if args.precision == "fp16":
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
        scaler = ShardedGradScaler(device.type) if fsdp else torch.amp.GradScaler(device.type)
    run_key = {"seed": args.seed, "num_examples": len(examples), "trainable": args.trainable}
    start, skipped = 0, 0
    if resume_dir is not None:
        state = resume.restore(resume_dir, objective, optimizer, scaler, run_key)
        start, skipped = state["step"], state["nonfinite_skipped"]
        say(f"resumed from {resume_dir} at step {start}")
    elif args.resume:
        say(f"--resume: no checkpoint in {ckpt_root} yet, starting fresh")
    if rank == 0:
        os.makedirs(args.out_dir, exist_ok=True)
        with open(os.path.join(args.out_dir, "run.json"), "w") as f:  # a recipe that reproduces the run
            json.dump({k: v for k, v in vars(args).items() if k not in ("recipes", "resume", "estimate_memory")}, f,
                      indent=2)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(device, args.precision)
    progress = Progress(cfg, device, world, peak, args.metrics_file if rank == 0 else None, start)
    say(f"{len(examples)} examples, {max_steps} steps of {B} x {A} (accumulation) x {world} (processes); "
        f"{sum(p.numel() for p in objective.parameters() if p.requires_grad):,} trainable parameters "
        f"({args.trainable}); precision {args.precision}; {device}")
    lora = lora_config(args)

    def save(step):
        model_state, optim_state = resume.full_state(objective, optimizer)
        state = resume.train_state(step, optim_state, scaler, run_key, skipped)  # every rank: gathers RNG states
        if rank == 0:
            say(f"saved {resume.save(ckpt_root, step, model_state, state, cfg, tok, lora, args.keep)}")
        return model_state

    def run_eval(step):
        result = evaluate_held_out(objective, model, processor, evals, batch_size=args.eval_batch_size,
                          precision=args.precision, generate=args.eval_generate,
                          max_new_tokens=args.eval_max_new_tokens, sharded_params=fsdp)
        say(f"eval step {step} | " + " | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                for k, v in result.items()))
        progress.write({"step": step, **{f"eval_{k}": v for k, v in result.items()}})

    order = DataOrder(len(examples), args.seed)
    for step in range(start + 1, max_steps + 1):
        t0 = time.perf_counter()
        lr = finetune.lr_at(step, args.lr, max_steps, args.warmup_steps, args.min_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro = [collate([examples[i] for i in ids], processor) for ids in order.step(step, B, A, world, rank)]
        everyone = [examples[i] for i in order.step_all(step, B, A, world)]
        count = sum(ex.num_targets for ex in everyone) if args.loss_normalization == "tokens" else len(everyone)
        result = finetune.train_step(objective, optimizer, micro, count, precision=args.precision, scaler=scaler,
                                     grad_clip=args.grad_clip)
        if not result.finite and not args.skip_nonfinite:
            last = resume.latest(ckpt_root)
            say(f"step {step}: loss {result.loss} is not finite. Stopped before updating the weights; last good "
                f"checkpoint: {last + ' (continue with --resume)' if last else 'none (no step was saved yet)'}. "
                "Lower --lr, or pass --skip-nonfinite to skip such steps.", file=sys.stderr)
            return 3
        if not result.finite:
            skipped += 1
            say(f"step {step}: loss {result.loss} is not finite; skipped without an update ({skipped} so far)")
        else:
            progress.add(time.perf_counter() - t0, result.tokens, everyone)
        if result.finite and (step % args.log_every == 0 or step == max_steps):
            say(progress.report(step, max_steps, loss=result.loss, lr=lr, grad_norm=result.grad_norm,
                                **({"nonfinite_skipped": skipped} if skipped else {})))
        if evals and args.eval_every and step % args.eval_every == 0:
            run_eval(step)
        if args.save_every and step % args.save_every == 0 and step != max_steps:
            save(step)
    if evals and not (args.eval_every and max_steps % args.eval_every == 0):
        run_eval(max_steps)
    model_state = save(max_steps) if start < max_steps else resume.full_state(objective, optimizer)[0]
    if rank == 0:
        resume.export(model_state, cfg, args.out_dir, tok, lora)
        if lora is not None:
            save_adapters(resume.model_from_state(cfg, model_state, lora), os.path.join(args.out_dir, "lora"))
        say(f"wrote {args.out_dir} (nanopali.load reads it)")
    if world > 1:
        dist.barrier()  # leave together: a rank that exits while rank 0 still writes can abort the group
    return 0


if __name__ == "__main__":
    sys.exit(main())
