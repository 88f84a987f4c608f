"""One task's records → its metrics: the shape each task's records must have, checked, and the scoring.

A record is {"prediction", "references"} (a line of `evaluate.py score --predictions P.jsonl`, or one
example of evaluate.py / train.py --eval-metric): captions, VQA and ANLS compare a text with a list of
texts; refcoco one box with the true box [x0, y0, x1, y1] in pixels (optional masks as COCO RLE);
detect boxes [{"label", "box"}] with true ones. A box prediction may be the model's text (`<loc>`
tokens, decoded on the record's "width" x "height" image: docs/boxes-and-masks.md#detection) or boxes
already in pixels. Every bad record is named with its place (file:line) in one ScoreError, before
anything is scored.
"""
from __future__ import annotations

import json
import math
import os

import numpy as np

from .anls import anls_scores
from .caption import caption_scores
from .mean_ap import detection_map
from .refcoco import box_scores, mask_scores
from .vqa import vqa_scores

TASKS = {"caption": ("bleu1", "bleu2", "bleu3", "bleu4", "cider"), "vqa": ("vqa_accuracy",), "anls": ("anls",),
         "refcoco": ("accuracy", "mean_iou", "invalid"), "detect": ("map", "map50", "map75")}
MASK_METRICS = ("mask_miou", "mask_ciou")   # refcoco, when every record has both masks


class ScoreError(ValueError):
    """Records that cannot be scored; the message names each bad one (file:line: what is wrong)."""


def boxes_from_text(text: str, width: float, height: float, divisor: int = 1024) -> list[tuple[str, tuple]]:
    """(label, (x0, y0, x1, y1)) of every well-formed object of a `<loc>` answer, in pixels of a
    width x height image, unrounded: bin / divisor x side (1024, our datasets' encoding; 1023, big_vision's)."""
    from ..tasks.detection import parse_detections

    return [(d.label, (d.bins[1] / divisor * width, d.bins[0] / divisor * height, d.bins[3] / divisor * width,
                       d.bins[2] / divisor * height)) for d in parse_detections(text, 1024, 1024, divisor)]


def _box(value, what: str) -> tuple:
    if not (isinstance(value, list) and len(value) == 4 and all(_number(v) for v in value)):
        raise ScoreError(f"{what} must be a box [x0, y0, x1, y1] of 4 numbers (pixels), got {_show(value)}")
    if value[2] < value[0] or value[3] < value[1]:
        raise ScoreError(f"{what} {value} has x1 < x0 or y1 < y0 (a box is [x0, y0, x1, y1])")
    return tuple(float(v) for v in value)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _show(value) -> str:
    text = json.dumps(value, default=repr)
    return text if len(text) <= 60 else text[:57] + "..."


def _texts(value, what: str) -> list[str]:
    if not (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
        raise ScoreError(f"{what} must be a non-empty list of strings, got {_show(value)}")
    return value


def _size(record: dict) -> tuple[float, float]:
    w, h = record.get("width"), record.get("height")
    if not (_number(w) and _number(h) and w > 0 and h > 0):
        raise ScoreError("a text prediction of boxes needs the image's \"width\" and \"height\" (positive numbers, "
                         f"pixels) to place its <loc> tokens, got width {_show(w)}, height {_show(h)}; or give the "
                         "prediction as boxes in pixels")
    return w, h


def _objects(value, what: str, scored: bool) -> list[tuple]:
    """[{"label", "box"[, "score"]}] → [(label, box[, score])]."""
    if not isinstance(value, list):
        raise ScoreError(f"{what} must be a list of {{\"label\", \"box\"}} objects, got {_show(value)}")
    out = []
    for i, obj in enumerate(value):
        if not (isinstance(obj, dict) and isinstance(obj.get("label"), str)):
            raise ScoreError(f"{what}[{i}] must be an object with a string \"label\" and a \"box\", got {_show(obj)}")
        box = _box(obj.get("box"), f"{what}[{i}].box")
        if scored and not _number(score := obj.get("score", 1.0)):
            raise ScoreError(f"{what}[{i}].score must be a number, got {_show(score)}")
        out.append((obj["label"], box, float(obj.get("score", 1.0))) if scored else (obj["label"], box))
    return out


def _mask(value, what: str) -> np.ndarray:
    """COCO's uncompressed RLE {"size": [h, w], "counts": [...]} (column-major runs, 0s first) → (h, w) bool."""
    size, counts = (value.get("size"), value.get("counts")) if isinstance(value, dict) else (None, None)
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)
            and isinstance(counts, list) and all(isinstance(c, int) and c >= 0 for c in counts)):
        raise ScoreError(f"{what} must be COCO's uncompressed RLE {{\"size\": [h, w], \"counts\": [...]}}, "
                         f"got {_show(value)}")
    if sum(counts) != size[0] * size[1]:
        raise ScoreError(f"{what}: the counts add up to {sum(counts)} pixels, its size {size} has {size[0] * size[1]}")
    flat = np.repeat(np.arange(len(counts)) % 2 == 1, counts)
    return flat.reshape(size[1], size[0]).T


def check_record(task: str, record, divisor: int = 1024) -> tuple:
    """(prediction, references[, masks]) ready to score, or a ScoreError saying what is wrong."""
    if task not in TASKS:
        raise ScoreError(f"unknown task {task!r}; the tasks are {', '.join(TASKS)}")
    if not isinstance(record, dict):
        raise ScoreError(f"expected a JSON object with \"prediction\" and \"references\", got {_show(record)}")
    missing = [k for k in ("prediction", "references") if k not in record]
    if missing:
        raise ScoreError(f"missing {' and '.join(repr(k) for k in missing)} (each line needs \"prediction\" and "
                         "\"references\")")
    pred, refs = record["prediction"], record["references"]
    if task in ("caption", "vqa", "anls"):
        if not isinstance(pred, str):
            raise ScoreError(f"'prediction' must be a string, got {_show(pred)}")
        return pred, _texts(refs, "'references'")
    if task == "detect":
        truth = _objects(refs, "'references'", scored=False)
        if isinstance(pred, str):
            return [(label, box, 1.0) for label, box in boxes_from_text(pred, *_size(record), divisor)], truth
        return _objects(pred, "'prediction'", scored=True), truth
    truth = _box(refs, "'references' (the true box)")
    if isinstance(pred, str):
        found = boxes_from_text(pred, *_size(record), divisor)
        box = found[0][1] if found else None           # big_vision reads one object per expression
    else:
        box = None if pred in (None, []) else _box(pred, "'prediction'")
    masks = [record.get(k) for k in ("prediction_mask", "reference_mask")]
    if all(m is None for m in masks):
        return box, truth, None
    pm = None if masks[0] is None else _mask(masks[0], "'prediction_mask'")
    if masks[1] is None:
        raise ScoreError("a 'prediction_mask' without a 'reference_mask' (the true mask) cannot be scored")
    rm = _mask(masks[1], "'reference_mask'")
    if pm is not None and pm.shape != rm.shape:
        raise ScoreError(f"'prediction_mask' is {pm.shape[1]}x{pm.shape[0]} pixels, 'reference_mask' "
                         f"{rm.shape[1]}x{rm.shape[0]}")
    return box, truth, (pm, rm)


def check_records(task: str, records, divisor: int = 1024) -> list[tuple]:
    """check_record for each (where, record or the ScoreError that stopped its reading); one ScoreError
    listing every bad one (up to 20)."""
    if task not in TASKS:
        raise ScoreError(f"unknown task {task!r}; the tasks are {', '.join(TASKS)}")
    good, bad = [], []
    for where, record in records:
        try:
            if isinstance(record, ScoreError):
                raise record
            good.append(check_record(task, record, divisor))
        except ScoreError as e:
            bad.append(f"{where}: {e}")
    if bad:
        shown = "\n  ".join(bad[:20]) + (f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else "")
        raise ScoreError(f"{len(bad)} record(s) cannot be scored as {task}:\n  {shown}" if len(bad) > 1 else bad[0])
    if not good:
        raise ScoreError("no records to score")
    if task == "refcoco" and any(c[2] is None for c in good) and not all(c[2] is None for c in good):
        raise ScoreError("some refcoco records have masks and some do not: give masks on every line or on none")
    return good


def score(task: str, checked: list[tuple]) -> dict:
    """The task's metrics of check_records' output: {name: value} (None where undefined)."""
    preds, refs = [c[0] for c in checked], [c[1] for c in checked]
    if task == "caption":
        return caption_scores(preds, refs)
    if task == "vqa":
        return vqa_scores(preds, refs)
    if task == "anls":
        return anls_scores(preds, refs)
    if task == "detect":
        return detection_map(preds, refs)
    out = box_scores(preds, refs)
    if checked[0][2] is not None:
        out.update(mask_scores([c[2][0] for c in checked], [c[2][1] for c in checked]))
    return out


def read_predictions(path: str, task: str, divisor: int = 1024) -> list[tuple]:
    """check_records of a predictions JSONL file, every bad line named as path:line."""
    if not os.path.isfile(path):
        raise ScoreError(f"predictions file not found: {path}")
    records = []
    with open(path, "rb") as f:   # bytes, decoded line by line: a bad byte is named with its line
        for i, raw in enumerate(f, 1):
            if raw.strip():
                try:
                    records.append((f"{path}:{i}", json.loads(raw.decode("utf-8"))))
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    records.append((f"{path}:{i}", ScoreError(f"not a line of JSON ({e})")))
    if not records:
        raise ScoreError(f"{path}: no predictions (one JSON object a line)")
    return check_records(task, records, divisor)
