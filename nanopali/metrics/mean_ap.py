"""Detection mAP@[.5:.95] and mAP@.5 as pycocotools' COCOeval computes them for boxes.

A re-implementation of the part of `pycocotools.cocoeval.COCOeval` (`evaluateImg`, `accumulate`,
`summarize`) behind the first two numbers it prints: area "all", at most 100 detections per image
and class. Per class and IoU threshold (0.50:0.05:0.95), detections sorted by score (a stable sort:
ties keep their order, image by image) are matched greedily to the unmatched true box of highest
IoU; precision is made monotone and read at 101 recall points; the mean runs over thresholds,
recall points and the classes that have a true box. Classes are the labels of the true boxes; a
predicted label that no true box has is ignored, as COCOeval ignores categories outside its list.
Written here rather than imported so that scoring needs no compiled extension; tests/test_metrics_map.py
holds it to COCOeval on random and edge-case sets. PaliGemma writes no scores: docs/metrics.md#detection
says how its boxes are ranked.
"""
from __future__ import annotations

import numpy as np

# COCOeval's Params.setDetParams, expression for expression: the thresholds' float values decide ties.
IOU_THRESHOLDS = np.linspace(.5, 0.95, int(np.round((0.95 - .5) / .05)) + 1)
RECALL_THRESHOLDS = np.linspace(.0, 1.00, int(np.round((1.00 - .0) / .01)) + 1)
MAX_DETECTIONS = 100


def _xywh(box) -> list[float]:
    """(x0, y0, x1, y1) → COCO's [x, y, w, h], the form COCOeval does its arithmetic in."""
    return [box[0], box[1], box[2] - box[0], box[3] - box[1]]


def _iou(d, g) -> float:
    """maskApi.c's bbIou for one non-crowd pair of [x, y, w, h] boxes."""
    w = min(d[0] + d[2], g[0] + g[2]) - max(d[0], g[0])
    h = min(d[1] + d[3], g[1] + g[3]) - max(d[1], g[1])
    if w <= 0 or h <= 0:
        return 0.0
    return w * h / (d[2] * d[3] + g[2] * g[3] - w * h)


def _match(dets: list, gts: list) -> np.ndarray:
    """(T, D) bool: detection d (in score order) matched a true box at threshold t (COCOeval.evaluateImg)."""
    matched = np.zeros((len(IOU_THRESHOLDS), len(dets)), dtype=bool)
    ious = [[_iou(d, g) for g in gts] for d in dets]
    for t, threshold in enumerate(IOU_THRESHOLDS):
        taken = [False] * len(gts)
        for i in range(len(dets)):
            best, m = min(threshold, 1 - 1e-10), -1
            for j in range(len(gts)):
                if taken[j] or ious[i][j] < best:
                    continue
                best, m = ious[i][j], j       # >=: among equal IoUs the last true box wins, as in COCOeval
            if m >= 0:
                taken[m], matched[t, i] = True, True
    return matched


def _precision(scores: np.ndarray, matched: np.ndarray, num_true: int) -> np.ndarray:
    """(T, R) interpolated precision at the recall thresholds (COCOeval.accumulate, one class)."""
    order = np.argsort(-scores, kind="mergesort")
    tps = np.cumsum(matched[:, order], axis=1).astype(float)
    fps = np.cumsum(~matched[:, order], axis=1).astype(float)
    out = np.zeros((len(IOU_THRESHOLDS), len(RECALL_THRESHOLDS)))
    for t, (tp, fp) in enumerate(zip(tps, fps)):
        recall = tp / num_true
        precision = (tp / (fp + tp + np.spacing(1))).tolist()
        for i in range(len(tp) - 1, 0, -1):        # the precision envelope, from the right
            precision[i - 1] = max(precision[i - 1], precision[i])
        idx = np.searchsorted(recall, RECALL_THRESHOLDS, side="left")
        out[t] = [precision[i] if i < len(precision) else 0.0 for i in idx]
    return out


def detection_map(predictions: list[list[tuple]], references: list[list[tuple]]) -> dict[str, float | None]:
    """{"map", "map50", "map75"} of one image per entry: predictions (label, (x0, y0, x1, y1), score),
    references (label, (x0, y0, x1, y1)). None where no image has a true box (COCOeval prints -1)."""
    classes = sorted({label for refs in references for label, _ in refs})
    per_class = []
    for c in classes:
        scores, matched, num_true = [], [], 0
        for preds, refs in zip(predictions, references):
            gts = [_xywh(b) for label, b in refs if label == c]
            dets = [(s, _xywh(b)) for label, b, s in preds if label == c]
            order = np.argsort([-s for s, _ in dets], kind="mergesort")[:MAX_DETECTIONS]
            dets = [dets[i] for i in order]
            num_true += len(gts)
            scores += [s for s, _ in dets]
            matched.append(_match([d for _, d in dets], gts))
        per_class.append(_precision(np.asarray(scores, dtype=float), np.concatenate(matched, axis=1), num_true))
    if not per_class:
        return {"map": None, "map50": None, "map75": None}
    p = np.stack(per_class)                                  # (K, T, R)
    return {"map": float(p.mean()), "map50": float(p[:, 0].mean()), "map75": float(p[:, 5].mean())}
