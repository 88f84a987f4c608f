"""Fine-tune PaliGemma / PaliGemma 2 on (image, prefix, suffix) JSONL: one process, or many with torchrun.

    python train.py --init CKPT_DIR --data train.jsonl --out-dir runs/x [flags]
    python train.py recipes/detect_lora_pg2_3b.py --init=CKPT_DIR --data=train.jsonl --lr=3e-4
    torchrun --nproc_per_node 8 train.py recipes/caption_full_pg2_3b.py --init=... --parallel=fsdp
    python train.py recipes/vqa_attn_16gb_pg1.py --init=CKPT_DIR --estimate-memory   # allocates nothing

A recipe is a file of flags (`name = value` lines, read without running code: nanopali/train/flags.py);
the command line wins over it. The effective flags go to <out-dir>/run.json, itself a recipe, with the
history of resumes. One run at a time writes into an <out-dir> (a lock); Ctrl-C stops after the step,
saves a checkpoint and says how to continue. The result, <out-dir>, is a HF-layout
checkpoint that nanopali.load(out_dir) reads (LoRA merged in; the adapters alone in <out-dir>/lora).
The pieces (presets, loss, step, checkpoints, the run directory) live in nanopali/train/.
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time

import torch
import torch.distributed as dist

import nanopali
from nanopali.train import finetune, flags, parallel, resume, run_dir
from nanopali.formats.files import CheckpointError, printable, resolve_dtype
from nanopali.formats.hf import read_quantization
from nanopali.formats.hub import local_path
from nanopali.formats.hf_config import from_hf_config, read_paligemma_config
from nanopali.config import PRESETS, preset
from nanopali.train.data import DataError, DataOrder, collate, load_examples
from nanopali.datasets import source_from_args
from nanopali.train.cost import estimate_memory, peak_flops
from nanopali.train.progress import Progress
from nanopali.train.run_dir import RunError
from nanopali.train.evaluate import check_metric_references, evaluate_held_out
from nanopali.train.lora import LoRAConfig, apply_lora, load_adapters, save_adapters
from nanopali.model import PaliGemma
from nanopali.processing import Processor

build_parser, read_recipe = flags.build_parser, flags.read_recipe  # the flags, as train.build_parser(), etc.


def parse_args(argv=None):
    return flags.parse_args(argv, __doc__)


def model_config(args):
    """(config, tokenizer path) of --init: a checkpoint directory or hub name, a config.json or a preset name."""
    init = local_path(args.init, "paligemma-config", args.revision)  # a hub name: no weights fetched yet
    if os.path.isdir(init):
        if os.path.isfile(os.path.join(init, "config.json")) and (quant := read_quantization(init)):
            raise SystemExit(f"--init {args.init} holds a model quantized as {quant['scheme']}: "
                             "fine-tune its full-precision checkpoint")
        return read_paligemma_config(init), os.path.join(init, "tokenizer.model")
    if not (os.path.isfile(args.init) or args.init in PRESETS):
        raise SystemExit(f"--init {args.init!r} is neither a checkpoint directory, a config.json nor a preset "
                         f"({', '.join(PRESETS)})")
    if not args.tokenizer and not args.estimate_memory:  # an estimate reads no text
        raise SystemExit(f"--init {args.init} means random weights: pass --tokenizer PATH/tokenizer.model")
    if args.init in PRESETS:
        return preset(args.init), args.tokenizer
    try:
        with open(args.init, encoding="utf-8") as f:
            return from_hf_config(json.load(f)), args.tokenizer
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise SystemExit(f"--init {args.init}: {e}") from None


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
    elif os.path.isdir(init := local_path(args.init, "paligemma", args.revision)):  # the commit model_config read
        # Under LoRA every base weight is frozen: read it straight into the frozen dtype (the full 3B maps in
        # seconds at 6 GB in bf16, where fp32 first held 12 GB and took a minute to cast). With a quantized
        # base, the frozen dtype is the scales'. Otherwise fp32, the trainable weights' master copy.
        dtype = resolve_dtype(args.frozen_dtype) if args.quantize_base or args.trainable == "lora" else torch.float32
        model, _ = nanopali.load(init, dtype, device, quantize=args.quantize_base,  # quantized while reading
                                 group_size=args.quantize_group_size)
    else:
        model = finetune.init_random(PaliGemma(cfg), args.seed).to(device)
        if args.quantize_base:
            from nanopali.train.qlora import quantize_base
            quantize_base(model, args.quantize_base, args.quantize_group_size, resolve_dtype(args.frozen_dtype))
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


def estimate(args, cfg, seq: int):
    return estimate_memory(cfg, args.trainable, batch=args.batch_size, seq_len=seq, precision=args.precision,
                           trainable_dtype=args.trainable_dtype, frozen_dtype=args.frozen_dtype, lora=lora_config(args),
                           grad_checkpointing=args.grad_checkpointing, fused_attention=args.attn_impl == "triton",
                           shards=int(os.environ.get("WORLD_SIZE", 1)) if args.parallel == "fsdp" else 1,
                           **({"quantize_base": args.quantize_base, "group_size": args.quantize_group_size}
                              if args.quantize_base else {}))


def check_memory(args, cfg, examples, device) -> None:
    """Refuse, before the model is built, a run whose estimated peak for its longest example exceeds
    what the device has free (a 64 GB random init on a 24 GB machine fails here, not in the allocator)."""
    longest = max(ex.num_tokens for ex in examples)
    est, free = estimate(args, cfg, longest), run_dir.available_memory(device)
    if args.memory_check and free is not None and est.total > free:
        raise RunError(f"This run needs ~{est.total / 2**30:.1f} GiB on {device} (batch {args.batch_size}, longest "
                       f"example {longest} tokens), {free / 2**30:.1f} GiB are available. Lower --batch-size or "
                       "--max-seq-len, or add --grad-checkpointing or --trainable lora; --no-memory-check tries "
                       f"anyway.\n{est.table()}")


def memory_report(args) -> str:
    cfg, _ = model_config(args)
    seq = args.max_seq_len or cfg.num_image_tokens + 32
    est = estimate(args, cfg, seq)
    return (f"{args.init}: {cfg.vision.image_size} px, seq {seq}, batch {args.batch_size}, trainable {args.trainable}, "
            f"precision {args.precision}, weights {args.trainable_dtype} (trainable) / {args.frozen_dtype} (frozen)"
            f"{', grad checkpointing' if args.grad_checkpointing else ''}\n{est.table()}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.estimate_memory:
        try:
            print(memory_report(args))
        except CheckpointError as e:   # a hub name not cached, a bad config.json: one line, as for a run
            print(f"error: {printable(str(e))}", file=sys.stderr, flush=True)
            return 2
        return 0
    rank, world, device = parallel.setup(args.device)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main_thread else None
    try:
        return train(args, rank, world, device)
    except (DataError, RunError, CheckpointError) as e:  # they quote paths and file content: shown escaped
        print(f"error: {printable(str(e))}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:  # before the loop, or a second Ctrl-C: no save (a step may be half done)
        last = resume.latest(os.path.join(args.out_dir, "checkpoints")) if os.path.isdir(args.out_dir) else None
        print(f"\ninterrupted; {'the last checkpoint, ' + last + ', is intact: continue with --resume' if last else 'no checkpoint was saved'}",
              file=sys.stderr, flush=True)
        return 130
    finally:
        if main_thread:  # a caller in this process (a notebook) gets its own Ctrl-C back
            signal.signal(signal.SIGINT, previous)
        if dist.is_initialized():
            dist.destroy_process_group()


def train(args, rank: int, world: int, device: torch.device) -> int:
    say = (lambda *a, **k: print(*a, **k, flush=True)) if rank == 0 else (lambda *a, **k: None)
    fsdp = world > 1 and args.parallel == "fsdp"
    if fsdp and args.quantize_base:
        raise RunError("--quantize-base runs on one GPU or under DDP; FSDP shards float parameters only")
    lock = run_dir.claim(args.out_dir) if rank == 0 else None  # before any work: a second run or a read-only dir fails now
    ckpt_root = os.path.join(args.out_dir, "checkpoints")
    resume_dir = resume.latest(ckpt_root)
    if resume_dir is not None and not args.resume:
        raise RunError(f"{ckpt_root} already holds checkpoints: pass --resume to continue, or another --out-dir")
    previous, flags = run_dir.read_run(args.out_dir), run_dir.recorded_flags(args)
    allowed = {a for a in args.allow_changed.replace("-", "_").split(",") if a}
    changed = run_dir.check_resume(flags, previous, allowed, args.out_dir) if resume_dir else {}
    cfg, tok = model_config(args)
    processor = Processor.for_model(tok, cfg)
    max_seq_len = args.max_seq_len or cfg.text.max_positions
    data = load_examples(source_from_args(args, args.data), processor, max_seq_len, args.skip_bad)  # before the model
    evals = load_examples(source_from_args(args, args.eval_data, evaluation=True), processor, max_seq_len,
                          args.skip_bad) if args.eval_data else None
    for name, ds in (("train", data), ("eval", evals)):
        if ds is not None and ds.skipped:
            say(f"skipped {len(ds.skipped)} bad {name} example(s):\n  " + "\n  ".join(ds.skipped[:10]))
    examples, evals = data.examples, evals and evals.examples[:args.eval_max_examples]
    if evals and args.eval_metric:
        check_metric_references(args.eval_metric, evals)   # references the metric cannot score fail here
    check_memory(args, cfg, examples, device)
    t_load = time.perf_counter()
    say(f"loading the model ({args.init}) ...")  # a 3B checkpoint takes a while: say so first
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
    say(f"model ready in {time.perf_counter() - t_load:.1f} s")

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
        for group, fresh in zip(optimizer.param_groups, finetune.param_groups(objective, args.weight_decay)):
            group.update(weight_decay=fresh["weight_decay"], betas=(args.beta1, args.beta2))  # allowed changes apply
        say(f"resumed from {resume_dir} at step {start}" + "".join(
            f"; {k} {old!r} -> {new!r}" for k, (old, new) in changed.items()))
    elif args.resume:
        say(f"--resume: no checkpoint in {ckpt_root} yet, starting fresh")
    if rank == 0:
        run_dir.write_run(args.out_dir, flags, previous if resume_dir else None, start, changed)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(device, args.precision)
    progress = Progress(cfg, device, world, peak, args.metrics_file if rank == 0 else None, start)
    say(f"{len(examples)} examples, {max_steps} steps of {B} x {A} (accumulation) x {world} (processes); "
        f"{sum(p.numel() for p in objective.parameters() if p.requires_grad):,} trainable parameters "
        f"({args.trainable}); precision {args.precision}; {device}")
    lora, quantization = lora_config(args), getattr(model, "quantization", None)

    def save(step):
        model_state, optim_state = resume.full_state(objective, optimizer)
        state = resume.train_state(step, optim_state, scaler, run_key, skipped)  # every rank: gathers RNG states
        if rank == 0:
            say(f"saved {resume.save(ckpt_root, step, model_state, state, cfg, tok, lora, args.keep, quantization)}")
        return model_state

    def run_eval(step):
        result = evaluate_held_out(objective, model, processor, evals, batch_size=args.eval_batch_size,
                                   precision=args.precision, generate=args.eval_generate,
                                   max_new_tokens=args.eval_max_new_tokens, sharded_params=fsdp, report=say,
                                   metric=args.eval_metric)
        say(f"eval step {step} | " + " | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                for k, v in result.items() if v is not None))
        progress.write({"step": step, **{f"eval_{k}": v for k, v in result.items()}})

    if evals and args.eval_every and start == 0:
        run_eval(0)  # the starting point: what the fine-tune is measured against
    stop = StopRequest(say) if world == 1 else None
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
        if result.finite and (step % args.log_every == 0 or step == max_steps or step == start + 1):
            say(progress.report(step, max_steps, loss=result.loss, lr=lr, grad_norm=result.grad_norm,
                                **({"nonfinite_skipped": skipped} if skipped else {})))
        if stop is not None and stop.asked:
            save(step)
            say(f"stopped at step {step} of {max_steps}. Continue with the same command and --resume")
            return 130
        if evals and args.eval_every and step % args.eval_every == 0:
            run_eval(step)
        if args.save_every and step % args.save_every == 0 and step != max_steps:
            save(step)
    if evals and not (args.eval_every and max_steps % args.eval_every == 0):
        run_eval(max_steps)
    model_state = save(max_steps) if start < max_steps else resume.full_state(objective, optimizer)[0]
    if rank == 0:
        resume.export(model_state, cfg, args.out_dir, tok, lora, quantization)
        if lora is not None:
            save_adapters(resume.model_from_state(cfg, model_state, lora, quantization),
                          os.path.join(args.out_dir, "lora"))
        say(f"wrote {args.out_dir} (nanopali.load reads it)")
    if world > 1:
        dist.barrier()  # leave together: a rank that exits while rank 0 still writes can abort the group
    del lock
    return 0


class StopRequest:
    """Ctrl-C asks the loop to stop after the current step and save (a step cut in half would leave
    the weights and the optimizer out of step); a second Ctrl-C quits at once without saving."""

    def __init__(self, say):
        self.asked, self.say = False, say
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self)

    def __call__(self, signum, frame):
        if self.asked:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.asked = True
        self.say("\nCtrl-C: stopping after this step and saving a checkpoint (Ctrl-C again quits without saving)")


if __name__ == "__main__":
    sys.exit(main())
