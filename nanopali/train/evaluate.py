"""Held-out evaluation during fine-tuning: loss, and greedy generation scored by exact match, or by
box IoU for detection prompts (the papers report transfer with task metrics of this kind).

Loss is the same prefix-LM loss as training (finetune.loss_terms), summed over the whole held-out
set and divided once. Generation uses nanopali.generate (greedy); exact match compares stripped
strings. Detection (`detect ...` prompts, docs/boxes-and-masks.md#detection) is scored per target box:
the best IoU among predicted boxes with the same label, 0 if none; averaged over target boxes. Boxes
are parsed by detection.parse_detections (invalid ones dropped, as big_vision's evaluator does) and
compared in <loc> bins: IoU does not depend on the scale.
"""
from __future__ import annotations

import time
from typing import Callable

import torch
import torch.distributed as dist

from .data import Example, collate
from ..tasks.detection import parse_detections
from .finetune import autocast, evaluate_loss


def box_iou(a, b) -> float:
    """IoU of two (y0, x0, y1, x1) boxes."""
    iy = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ix = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iy * ix
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def detection_score(prediction: str, target: str) -> float | None:
    """Mean over target boxes of the best same-label IoU in the prediction; None if the target has none."""
    want, got = parse_detections(target, 1024, 1024), parse_detections(prediction, 1024, 1024)
    if not want:
        return None
    return sum(max((box_iou(w.bins, g.bins) for g in got if g.label == w.label), default=0.0) for w in want) / len(want)


def generation_metrics(predictions: list[str], examples: list[Example]) -> dict:
    exact = sum(p.strip() == ex.suffix.strip() for p, ex in zip(predictions, examples)) / max(len(examples), 1)
    ious = [s for p, ex in zip(predictions, examples)
            if ex.prefix.startswith("detect") and (s := detection_score(p, ex.suffix)) is not None]
    return {"exact_match": exact, "box_iou": sum(ious) / len(ious) if ious else None}


def _shard(n: int, batch: int, world: int, rank: int) -> list[tuple[list[int], float]]:
    """This rank's eval batches: batch j of rank r holds rows (j·W + r)·B ...; every rank runs the same
    number of batches (FSDP needs all ranks in every forward), padding with row 0 at weight 0."""
    steps = -(-n // (batch * world))
    out = []
    for j in range(steps):
        lo = (j * world + rank) * batch
        rows = list(range(lo, min(lo + batch, n)))
        out.append((rows, 1.0) if rows else ([0], 0.0))
    return out


def evaluate_held_out(objective, model, processor, examples: list[Example], *, batch_size: int, precision: str,
                      generate: bool = True, max_new_tokens: int = 32, sharded_params: bool = False,
                      report: Callable[[str], None] | None = None) -> dict:
    """{"loss", and with generate: "exact_match", "box_iou"} over `examples`, all ranks together.

    Generation runs on rank 0 with the unwrapped model; it is skipped when the parameters are
    sharded (FSDP) or nanopali.generate is not available, and the result says why. report(line), if
    given, hears how far generation is, every ~10 s (200 examples take ~20 s on a small CPU)."""
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    was_training = objective.training
    objective.eval()
    batches = ((collate([examples[i] for i in rows], processor), w) for rows, w in _shard(len(examples), batch_size,
                                                                                          world, rank))
    out = {"loss": evaluate_loss(objective, batches, precision)}
    if generate:
        with autocast(precision, next(model.parameters()).device):  # frozen weights may be held in bf16
            out.update(_generate_metrics(model, processor, examples, batch_size, max_new_tokens, sharded_params,
                                         rank, report))
    if world > 1:
        dist.barrier()
    objective.train(was_training)
    return out


def _generate_metrics(model, processor, examples, batch_size, max_new_tokens, sharded_params, rank,
                      report=None) -> dict:
    if sharded_params:
        return {"generation": "skipped: parameters are sharded (FSDP)"}
    try:
        from ..generate import generate
    except ImportError:
        return {"generation": "skipped: nanopali.generate is not available"}
    if rank != 0:
        return {}
    preds, t0 = [], time.perf_counter()
    last = t0
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            chunk = examples[i:i + batch_size]
            preds += generate(model, processor, [ex.images for ex in chunk], [ex.prefix for ex in chunk],
                              max_new_tokens=max_new_tokens, temperature=0.0)
            if report is not None and time.perf_counter() - last > 10 and len(preds) < len(examples):
                last = time.perf_counter()
                report(f"eval: generated {len(preds)}/{len(examples)} answers ({last - t0:.0f} s)")
    return generation_metrics(preds, examples)
