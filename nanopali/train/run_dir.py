"""A run directory belongs to one training run at a time, and a resumed run is the same run.

    <out>/.lock        held (flock) by the run writing here; the kernel drops it when the process dies,
                       so a crashed or killed run never leaves it stuck
    <out>/run.json     the effective flags (a recipe that reproduces the run) and "history": one entry
                       per start or resume, with the step it started from and the flags it changed

`claim` takes the lock before any data or model is read (a read-only or foreign directory fails at
once), then removes what killed runs left: temp files and half-written step directories (`*.tmp<pid>`,
`*.old<pid>`). Only the lock holder writes here, so every such file is a dead run's.
`check_resume` compares a resume's flags with run.json: flags that define which examples a step sees
or what trains refuse to change; the optimiser's settings change only when named in --allow-changed;
logging, evaluation and checkpoint cadence change freely.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import socket
import time

from ..formats.files import atomic_write
from ..datasets.source import SOURCE_FLAGS


class RunError(RuntimeError):
    """A run that cannot start or continue as asked, with a message naming the file or flag."""


LOCK, RUN_JSON = ".lock", "run.json"
LEFTOVER = re.compile(r".*\.(tmp|old)\d+$")
# Flags whose change would make the continued run a different run: the data order (a step's examples
# are a function of seed, data, batch and accumulation), the parameters and their optimizer state.
FIXED = ("init", "revision", "tokenizer", "data", "seed", "batch_size", "grad_accum", "max_seq_len", "skip_bad", "trainable",
         "lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "trainable_dtype", "frozen_dtype", "precision",
         "loss_normalization", "parallel", "quantize_base", "quantize_group_size",
         # how --data is read (format, split, columns, prompt...): they decide what the examples are
         *(k for k in SOURCE_FLAGS if not k.startswith("eval_")))
# The optimiser's settings: a change is allowed when named (--allow-changed lr,max_steps).
ADJUSTABLE = ("lr", "min_lr", "warmup_steps", "weight_decay", "beta1", "beta2", "grad_clip", "max_steps",
              "skip_nonfinite", "grad_checkpointing", "attn_impl")
# Not in run.json: how this invocation was started, not what the run is.
NOT_RECORDED = ("recipes", "resume", "estimate_memory", "allow_changed", "memory_check")


def claim(out_dir: str):
    """Create out_dir, take its lock (refusing when another live run holds it), clean a dead run's
    leftovers. Returns the open lock file: keep it referenced for the run's lifetime."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        f = open(os.path.join(out_dir, LOCK), "a+")
    except OSError as e:
        raise RunError(f"--out-dir {out_dir} cannot be written ({e.strerror}): choose a directory you can write "
                       "to") from None
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise RunError(f"{out_dir} is in use by another training run ({holder}); wait for it to finish, or pass "
                       "another --out-dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    for folder in (out_dir, os.path.join(out_dir, "checkpoints"), os.path.join(out_dir, "lora")):
        for name in os.listdir(folder) if os.path.isdir(folder) else ():
            if LEFTOVER.fullmatch(name):
                path = os.path.join(folder, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    return f


def read_run(out_dir: str) -> dict | None:
    path = os.path.join(out_dir, RUN_JSON)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            run = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunError(f"{path} is damaged ({e}); it records the run's flags, so resume cannot check them: "
                       "restore it or start a new --out-dir") from None
    if not isinstance(run, dict):
        raise RunError(f"{path} is not a JSON object")
    return run


def check_resume(flags: dict, previous: dict | None, allowed: set[str], path: str) -> dict:
    """The flags that differ from the previous run ({name: (old, new)}), refusing those that may not.
    `previous` is None for a run directory written before run.json existed: nothing to compare."""
    if previous is None:
        return {}
    unknown = allowed - set(ADJUSTABLE)
    if unknown:
        raise RunError(f"--allow-changed {','.join(sorted(unknown))}: only the optimiser's settings may change "
                       f"on resume ({', '.join(ADJUSTABLE)})")
    changed = {k: (previous[k], flags[k]) for k in (*FIXED, *ADJUSTABLE)
               if k in previous and k in flags and previous[k] != flags[k]}
    fixed = [k for k in changed if k in FIXED]
    refused = [k for k in changed if k in ADJUSTABLE and k not in allowed]
    lines = [f"  --{k.replace('_', '-')}: {changed[k][0]!r} then, {changed[k][1]!r} now" for k in fixed + refused]
    if fixed:
        raise RunError(f"--resume: {path} was trained with other settings that fix which examples each step sees "
                       "or what trains; they cannot change on resume (start a new --out-dir instead):\n"
                       + "\n".join(lines))
    if refused:
        names = ",".join(refused)
        raise RunError("--resume with changed settings:\n" + "\n".join(lines) + "\nIf intended, say so: "
                       f"--allow-changed {names} (recorded in {RUN_JSON}); otherwise pass the old values")
    return changed


def write_run(out_dir: str, flags: dict, previous: dict | None, start_step: int, changed: dict) -> None:
    """run.json: the effective flags, and the history of starts with what each changed."""
    history = list(previous.get("history", [])) if previous else []
    history.append({"started": time.strftime("%Y-%m-%d %H:%M:%S"), "from_step": start_step,
                    "changed": {k: {"old": old, "new": new} for k, (old, new) in changed.items()}})
    text = json.dumps({**flags, "history": history}, indent=2)
    atomic_write(os.path.join(out_dir, RUN_JSON), lambda tmp: open(tmp, "w").write(text))


def recorded_flags(args) -> dict:
    return {k: v for k, v in vars(args).items() if k not in NOT_RECORDED}


def available_memory(device) -> int | None:
    """Bytes a new allocation can take now: CUDA's free memory, or Linux's MemAvailable; None if unknown."""
    if device.type == "cuda":
        import torch
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
        return kib * 1024
    except (OSError, StopIteration, ValueError):
        return None
