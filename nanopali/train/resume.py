"""Training checkpoints that survive `kill -9` and resume bit for bit.

    <out>/checkpoints/step_000120/      one directory per saved step
        config.json, model.safetensors, tokenizer.model   the whole model, HF layout (nanopali.load reads it)
        or adapter_config.json, adapter_model.safetensors  LoRA runs: the adapters only (lora.py)
        train_state.pt                  optimizer (keyed by parameter name), GradScaler, step, every
                                        rank's RNG state, seed, data size, preset, non-finite count
    <out>/checkpoints/latest            one line: the name of the newest complete step directory

A save writes everything into `step_000120.tmp<pid>/`, fsyncs each file and the directory, renames
it to `step_000120` (os.replace of a directory is atomic) and only then rewrites `latest` with
`atomic_write`. A kill at any moment leaves `latest` naming a complete directory; a half-written
`.tmp` directory is removed by the next save (or by run_dir.claim at the next start). A save that
cannot finish (disk full) removes its partial directory and says how much space it needs; a damaged
`latest` or train_state.pt is named, with the step directories that remain. The learning-rate schedule and the data order are pure
functions of the step (finetune.lr_at, data.DataOrder), so the step is their whole state.
train_state.pt is our own file but is still read with torch.load(weights_only=True): tensors,
numbers, strings and containers only, no code.
"""
from __future__ import annotations

import errno
import os
import pickle
import re
import shutil

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from ..config import PaliGemmaConfig
from ..formats.files import atomic_write, file_mode, printable, weights_only_refusal
from ..formats.hf import save_checkpoint
from .lora import apply_lora, merge_lora, save_adapters
from .run_dir import LEFTOVER, RunError
from ..model import PaliGemma

STATE_FILE, LATEST = "train_state.pt", "latest"
_STEP_DIR = re.compile(r"step_(\d+)")


def _distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def full_state(objective: nn.Module, optimizer) -> tuple[dict, dict]:
    """(model state, optimizer state) of the whole model on rank 0's CPU, keyed by nanopali parameter
    names, whether the objective is plain, DDP or FSDP-sharded (PyTorch's distributed state-dict API;
    other ranks get empty dicts)."""
    msd, osd = get_state_dict(objective, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k.removeprefix("model."): v for k, v in msd.items()}, osd


def model_from_state(cfg: PaliGemmaConfig, state: dict, lora=None, quantization: dict | None = None) -> PaliGemma:
    """A PaliGemma holding the tensors of `state` without copying them (built on the meta device);
    quantization ({"scheme", "group_size"}): the state of a QLoRA run, whose base is quantized."""
    if quantization is not None:
        from .qlora import model_from_state as quantized_model_from_state
        return quantized_model_from_state(cfg, state, quantization, lora)
    with torch.device("meta"):
        model = PaliGemma(cfg)
        if lora is not None:
            apply_lora(model, lora)
    model.load_state_dict(state, strict=True, assign=True)
    return model


def export(model_state: dict, cfg: PaliGemmaConfig, out_dir: str, tokenizer_path: str, lora=None,
           quantization: dict | None = None) -> None:
    """The trained model in HF layout (LoRA merged in), so `nanopali.load(out_dir)` runs it. A QLoRA
    run's is its quantized base dequantized with the adapters merged, in bf16 (qlora.export_merged)."""
    model = model_from_state(cfg, model_state, lora, quantization)
    if quantization is not None:
        from .qlora import export_merged
        return export_merged(model, out_dir, tokenizer_path)
    save_checkpoint(merge_lora(model) if lora is not None else model, out_dir, tokenizer_path)


def _fsync_dir(path: str, files: bool = False) -> None:
    """fsync a directory (its entries), and with files=True every file in it (their contents)."""
    for name in os.listdir(path) if files else []:
        with open(os.path.join(path, name), "rb") as f:
            os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _bytes(obj) -> int:
    """Bytes of every tensor in a nested state (what a save writes, give or take headers)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_bytes(v) for v in obj.values())
    return sum(_bytes(v) for v in obj) if isinstance(obj, (list, tuple)) else 0


def _disk_full(e: BaseException) -> bool:
    # torch.save reports a full disk as a RuntimeError from its zip writer ("unexpected pos")
    return getattr(e, "errno", None) == errno.ENOSPC or "unexpected pos" in str(e) or "No space left" in str(e)


def save(root: str, step: int, model_state: dict, train_state: dict, cfg: PaliGemmaConfig, tokenizer_path: str,
         lora=None, keep: int = 3, quantization: dict | None = None) -> str:
    """Write step directory `step` atomically, point `latest` at it, keep the newest `keep`. Rank 0 only."""
    os.makedirs(root, exist_ok=True)
    for name in os.listdir(root):                  # leftovers of this run's saves that were killed
        if LEFTOVER.fullmatch(name):
            path = os.path.join(root, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    name = f"step_{step:06d}"
    final, tmp = os.path.join(root, name), os.path.join(root, f"{name}.tmp{os.getpid()}")
    weights = {k: v for k, v in model_state.items() if ".lora_" in k} if lora is not None else model_state
    need, free = _bytes(weights) + _bytes(train_state), shutil.disk_usage(root).free
    try:
        last = latest(root)
    except RunError:
        last = None
    kept = f"the last checkpoint ({last}) is intact" if last else "no earlier step was saved"
    if need > free:
        raise RunError(f"Not enough disk space to save step {step} in {root}: it needs ~{need / 1e9:.2f} GB, "
                       f"{free / 1e9:.2f} GB are free; {kept}. Free space, then continue with --resume")
    try:
        os.makedirs(tmp)
        if lora is not None:
            save_adapters(model_from_state(cfg, model_state, lora, quantization), tmp)
        else:
            save_checkpoint(model_from_state(cfg, model_state), tmp, tokenizer_path)
        torch.save(train_state, os.path.join(tmp, STATE_FILE))
        for f in os.listdir(tmp):
            os.chmod(os.path.join(tmp, f), file_mode())
        _fsync_dir(tmp, files=True)
    except (OSError, RuntimeError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        why = (f"the disk is full (the save needs ~{need / 1e9:.2f} GB; {shutil.disk_usage(root).free / 1e9:.2f} GB "
               "free now)" if _disk_full(e) else f"{type(e).__name__}: {e}")
        raise RunError(f"Saving step {step} in {root} failed: {why}. The partial save was removed; {kept}. "
                       "Fix the cause, then continue with --resume") from None
    if os.path.exists(final):                      # the same step saved by an earlier, interrupted run
        os.replace(final, f"{final}.old{os.getpid()}")
    os.replace(tmp, final)
    _fsync_dir(root)
    atomic_write(os.path.join(root, LATEST), lambda t: open(t, "w").write(name + "\n"))
    steps = sorted((int(m.group(1)), n) for n in os.listdir(root) if (m := _STEP_DIR.fullmatch(n)))
    for _, old in steps[:-keep] if keep > 0 else []:
        if old != name:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    for n in os.listdir(root):
        if LEFTOVER.fullmatch(n) and ".old" in n:
            shutil.rmtree(os.path.join(root, n), ignore_errors=True)
    return final


def _steps(root: str) -> str:
    names = sorted(n for n in os.listdir(root) if _STEP_DIR.fullmatch(n)) if os.path.isdir(root) else []
    return ", ".join(names) or "none"


def latest(root: str) -> str | None:
    """The newest complete step directory under root, or None when there is none yet. `latest` must
    name a step directory of this root: never a path elsewhere (another run's checkpoint)."""
    path = os.path.join(root, LATEST)
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        raw = f.read(256)
    try:
        name = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        name = None
    fix = f"write the name of a complete step directory into it (here: {_steps(root)})"
    if name is None or not _STEP_DIR.fullmatch(name):
        shown = raw[:40].decode("utf-8", "replace")
        raise RunError(f"{path} is damaged: it should hold a step directory's name, it holds {shown!r}; {fix}")
    step_dir = os.path.join(root, name)
    if not os.path.isfile(os.path.join(step_dir, STATE_FILE)):
        raise RunError(f"{path} names {step_dir}, which has no {STATE_FILE}: the checkpoint directory was "
                       f"altered by hand; {fix}")
    return step_dir


def read_train_state(step_dir: str) -> dict:
    path = os.path.join(step_dir, STATE_FILE)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as e:  # "PytorchStreamReader ..."
        why = weights_only_refusal(e) if isinstance(e, pickle.UnpicklingError) else printable(str(e).splitlines()[0])
        raise RunError(f"{path} is damaged or truncated ({why[:120]}). Resume from another "
                       f"step: point {os.path.join(os.path.dirname(step_dir), LATEST)} at one of "
                       f"{_steps(os.path.dirname(step_dir))}") from None


def rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def all_rng_states() -> list[dict]:
    """Every rank's RNG state (LoRA dropout draws differ per rank), gathered on every rank."""
    if not _distributed():
        return [rng_state()]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, rng_state())
    return out


def set_rng_state(states: list[dict]) -> None:
    rank = dist.get_rank() if _distributed() else 0
    if len(states) != (dist.get_world_size() if _distributed() else 1):
        raise RuntimeError(f"the checkpoint was written by {len(states)} process(es); resume it with the same "
                           "number to continue bit for bit")
    torch.set_rng_state(states[rank]["cpu"])
    if "cuda" in states[rank]:
        torch.cuda.set_rng_state(states[rank]["cuda"])


def load_model_state(objective: nn.Module, model_state: dict) -> None:
    """Rank 0's full model state into every rank's (possibly sharded) model."""
    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=_distributed(), strict=True)
    set_model_state_dict(objective, {"model." + k: v for k, v in model_state.items()}, options=opts)


def load_optimizer_state(objective: nn.Module, optimizer, optim_state: dict) -> None:
    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=_distributed())
    set_optimizer_state_dict(objective, optimizer, optim_state, options=opts)


def train_state(step: int, optimizer_state: dict, scaler, run: dict, nonfinite_skipped: int) -> dict:
    """What train_state.pt holds besides the weights (see the module docstring). Call on every rank:
    it gathers their RNG states."""
    return {"step": step, "optimizer": optimizer_state, "scaler": scaler.state_dict() if scaler else None,
            "rng": all_rng_states(), "run": run, "nonfinite_skipped": nonfinite_skipped}


def restore(step_dir: str, objective: nn.Module, optimizer, scaler, run: dict) -> dict:
    """Optimizer, GradScaler and RNG state from a step directory (the weights were loaded with the
    model); returns its train state. `run` (seed, data size, trainable preset) must match the saved
    one: otherwise the data order or the optimizer's parameters would differ."""
    state = read_train_state(step_dir)
    if state["run"] != run:
        raise SystemExit(f"{step_dir} was trained with {state['run']}, this run has {run}: resume with the same "
                         "--data, --seed and --trainable")
    load_optimizer_state(objective, optimizer, state["optimizer"])
    if scaler is not None and state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    return state
