"""Held-out evaluation during fine-tuning: loss, and greedy generation scored by exact match, or by
box IoU for detection prompts, and with --eval-metric by the paper's metric (nanopali/metrics).

Loss is the same prefix-LM loss as training (finetune.loss_terms), summed over the whole held-out
set and divided once. Generation uses nanopali.generate (greedy); exact match compares stripped
strings. Detection (`detect ...` prompts, docs/boxes-and-masks.md#detection) is scored per target box:
the best IoU among predicted boxes with the same label, 0 if none; averaged over target boxes. Boxes
are parsed by detection.parse_detections (invalid ones dropped, as big_vision's evaluator does) and
compared in <loc> bins: IoU does not depend on the scale. A paper metric (CIDEr, BLEU, VQA accuracy,
ANLS, RefCOCO, mAP: docs/metrics.md) scores each example's record, its prediction and references
(the example's own, else its suffix), built by `task_record`, which evaluate.py shares.
"""
from __future__ import annotations

import time
from typing import Callable

import torch
import torch.distributed as dist

from ..datasets import DataError
from ..metrics import ScoreError, check_records, score
from ..metrics.score import boxes_from_text
from ..processing import load_image
from ..tasks.detection import parse_detections
from .data import Example, collate
from .finetune import autocast, evaluate_loss

# train.py --eval-metric → (the task it scores, the metrics reported; None: all of the task's)
EVAL_METRICS = {"cider": ("caption", ("cider",)), "bleu": ("caption", ("bleu1", "bleu2", "bleu3", "bleu4")),
                "vqa": ("vqa", None), "anls": ("anls", None), "refcoco": ("refcoco", None), "map": ("detect", None)}


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


def task_record(task: str, example: Example, prediction: str = "", divisor: int = 1024) -> dict:
    """The record metrics.score checks and scores for one example: prefix, prediction, references
    (the example's "references", else its suffix: [suffix] for texts, its <loc> boxes in pixels for
    refcoco / detect), and for box tasks the image's width and height, which place the <loc> tokens."""
    out, refs = {"prefix": example.prefix, "prediction": prediction}, example.references
    if task in ("refcoco", "detect"):
        out["width"], out["height"] = load_image(example.images[0]).size
        if refs is None:
            boxes = boxes_from_text(example.suffix, out["width"], out["height"], divisor)
            refs = [{"label": label, "box": list(box)} for label, box in boxes] if task == "detect" else \
                (list(boxes[0][1]) if boxes else example.suffix)
    elif refs is None:
        refs = [example.suffix]
    out["references"] = refs
    return out


def check_metric_references(metric: str, examples: list[Example], divisor: int = 1024) -> None:
    """Refuse, before any model is built, held-out examples the metric cannot score (a DataError naming each)."""
    task = EVAL_METRICS[metric][0]
    try:
        check_records(task, [(ex.where, task_record(task, ex, "", divisor)) for ex in examples], divisor)
    except ScoreError as e:
        raise DataError(f"--eval-metric {metric}: {e}") from None


def metric_scores(metric: str, predictions: list[str], examples: list[Example], divisor: int = 1024) -> dict:
    """The --eval-metric numbers of greedy predictions, e.g. {"cider": 1.21}."""
    task, names = EVAL_METRICS[metric]
    records = [(ex.where, task_record(task, ex, p, divisor)) for p, ex in zip(predictions, examples)]
    result = score(task, check_records(task, records, divisor))
    return {k: v for k, v in result.items() if names is None or k in names}


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
                      report: Callable[[str], None] | None = None, metric: str | None = None) -> dict:
    """{"loss", and with generate: "exact_match", "box_iou" and the `metric`'s numbers (EVAL_METRICS)}
    over `examples`, all ranks together.

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
                                         rank, report, metric))
    if world > 1:
        dist.barrier()
    objective.train(was_training)
    return out


def _generate_metrics(model, processor, examples, batch_size, max_new_tokens, sharded_params, rank,
                      report=None, metric=None) -> dict:
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
    out = generation_metrics(preds, examples)
    return out | metric_scores(metric, preds, examples) if metric else out
