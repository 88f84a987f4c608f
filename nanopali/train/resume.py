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
`.tmp` directory is removed by the next save. The learning-rate schedule and the data order are pure
functions of the step (finetune.lr_at, data.DataOrder), so the step is their whole state.
train_state.pt is our own file but is still read with torch.load(weights_only=True): tensors,
numbers, strings and containers only, no code.
"""
from __future__ import annotations

import os
import re
import shutil

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from ..config import PaliGemmaConfig
from ..formats.files import atomic_write
from ..formats.hf import save_checkpoint
from .lora import apply_lora, merge_lora, save_adapters
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


def model_from_state(cfg: PaliGemmaConfig, state: dict, lora=None) -> PaliGemma:
    """A PaliGemma holding the tensors of `state` without copying them (built on the meta device)."""
    with torch.device("meta"):
        model = PaliGemma(cfg)
        if lora is not None:
            apply_lora(model, lora)
    model.load_state_dict(state, strict=True, assign=True)
    return model


def export(model_state: dict, cfg: PaliGemmaConfig, out_dir: str, tokenizer_path: str, lora=None) -> None:
    """The trained model in HF layout (LoRA merged in), so `nanopali.load(out_dir)` runs it."""
    model = model_from_state(cfg, model_state, lora)
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


def save(root: str, step: int, model_state: dict, train_state: dict, cfg: PaliGemmaConfig, tokenizer_path: str,
         lora=None, keep: int = 3) -> str:
    """Write step directory `step` atomically, point `latest` at it, keep the newest `keep`. Rank 0 only."""
    os.makedirs(root, exist_ok=True)
    for name in os.listdir(root):                  # leftovers of saves that were killed
        if ".tmp" in name or ".old" in name:
            path = os.path.join(root, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    name = f"step_{step:06d}"
    final, tmp = os.path.join(root, name), os.path.join(root, f"{name}.tmp{os.getpid()}")
    os.makedirs(tmp)
    if lora is not None:
        save_adapters(model_from_state(cfg, model_state, lora), tmp)
    else:
        save_checkpoint(model_from_state(cfg, model_state), tmp, tokenizer_path)
    torch.save(train_state, os.path.join(tmp, STATE_FILE))
    _fsync_dir(tmp, files=True)
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
        if ".old" in n:
            shutil.rmtree(os.path.join(root, n), ignore_errors=True)
    return final


def latest(root: str) -> str | None:
    """The newest complete step directory under root, or None when there is none yet."""
    path = os.path.join(root, LATEST)
    if not os.path.isfile(path):
        return None
    step_dir = os.path.join(root, open(path).read().strip())
    if not os.path.isfile(os.path.join(step_dir, STATE_FILE)):
        raise RuntimeError(f"{path} names {step_dir}, which has no {STATE_FILE}: the checkpoint directory was "
                           "altered by hand; point `latest` at a complete step directory")
    return step_dir


def read_train_state(step_dir: str) -> dict:
    return torch.load(os.path.join(step_dir, STATE_FILE), map_location="cpu", weights_only=True)


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
