"""The progress line of a training run: elapsed time, ETA, tokens/s, MFU and peak memory, flushed as
it is written, and the optional metrics JSONL."""
from __future__ import annotations

import json
import os
import resource
import time

import torch

from ..config import PaliGemmaConfig
from .cost import GiB, train_flops


def peak_memory_gib(device: torch.device) -> float:
    """CUDA: the allocator's peak; CPU: the process's peak resident set (Linux reports KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


class Progress:
    """Throughput between progress lines, and the optional metrics JSONL.

    tokens/s counts real (non-pad) positions, image tokens included, of all processes; MFU is
    train_flops of every example of the window / time / (peak FLOP/s · processes). On resume the
    metrics file keeps only lines up to the resumed step (later ones are a killed run's)."""

    def __init__(self, cfg: PaliGemmaConfig, device: torch.device, world: int, peak: float | None,
                 metrics_path: str | None, resumed_step: int = 0):
        self.cfg, self.device, self.world, self.peak, self.path = cfg, device, world, peak, metrics_path
        if metrics_path and os.path.isfile(metrics_path):
            keep = [ln for ln in open(metrics_path) if ln.strip() and json.loads(ln)["step"] <= resumed_step]
            with open(metrics_path, "w") as f:
                f.writelines(keep)
        self._reset()
        self.started, self.start_step = time.perf_counter(), resumed_step

    def _reset(self):
        self.seconds, self.tokens, self.flops = 0.0, 0, 0.0

    def add(self, seconds: float, tokens: int, examples) -> None:
        self.seconds += seconds
        self.tokens += tokens
        self.flops += sum(train_flops(self.cfg, ex.num_tokens, len(ex.images), ex.num_targets) for ex in examples)

    def report(self, step: int, max_steps: int, **values) -> str:
        """The progress line (and a metrics record) for the window since the last report."""
        tps = self.tokens / max(self.seconds, 1e-9)
        mfu = self.flops / max(self.seconds, 1e-9) / (self.peak * self.world) if self.peak else None
        peak = peak_memory_gib(self.device)
        self.write({"step": step, **values, "tokens_per_s": tps, "mfu": mfu, "peak_mem_gib": peak,
                    "elapsed_s": round(time.perf_counter() - self.started, 3)})
        self._reset()
        elapsed = time.perf_counter() - self.started
        eta = elapsed / max(step - self.start_step, 1) * (max_steps - step)  # this run's mean step time
        parts = [f"step {step}/{max_steps}", f"{clock(elapsed)} elapsed, {clock(eta)} left"]
        parts += [f"{k.replace('_', ' ')} {v:.4g}" for k, v in values.items()]
        parts += [f"{tps:,.0f} tok/s", f"mfu {f'{100 * mfu:.1f}%' if mfu is not None else '-'}",
                  f"peak {'mem' if self.device.type == 'cuda' else 'rss'} {peak:.2f} GiB"]
        return " | ".join(parts)

    def write(self, record: dict) -> None:
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def clock(seconds: float) -> str:
    """12s, 3m05s, 2h07m."""
    s = int(round(seconds))
    return f"{s}s" if s < 60 else f"{s // 60}m{s % 60:02d}s" if s < 3600 else f"{s // 3600}h{s % 3600 // 60:02d}m"
