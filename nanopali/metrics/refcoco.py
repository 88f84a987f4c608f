"""Referring expressions (RefCOCO, RefCOCO+, RefCOCOg): box accuracy at IoU >= 0.5, mean IoU, and mask IoUs.

big_vision scores PaliGemma's RefCOCO transfers with `evaluators/proj/paligemma/transfers/segmentation.py`:
one predicted object per expression, `boxacc/0.5` = the fraction whose box IoU with the true box is at
least 0.5, and `miou` = the per-example mask IoU averaged over examples (the paper's "RefCOCO MIoU"), a
prediction without a valid box or mask counting as IoU 0. We report the same for boxes (accuracy,
mean_iou) and, when masks are given, mask_miou and mask_ciou, the cumulative IoU of the referring
segmentation literature (total intersection / total union over the set, which weighs large objects
more). Boxes are (x0, y0, x1, y1); IoU does not change when both boxes are scaled per axis, so pixels
and big_vision's [0, 1] y-first coordinates give the same number.
"""
from __future__ import annotations

import numpy as np


def box_iou(a, b) -> float:
    """IoU of two (x0, y0, x1, y1) boxes; 0 when the union is empty."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1]) + max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def box_scores(predictions: list, references: list, threshold: float = 0.5) -> dict[str, float]:
    """{"accuracy", "mean_iou", "invalid"} of one predicted box (or None: no valid box) per true box."""
    ious = [0.0 if p is None else box_iou(p, r) for p, r in zip(predictions, references)]
    return {"accuracy": sum(iou >= threshold for iou in ious) / len(ious), "mean_iou": sum(ious) / len(ious),
            "invalid": sum(p is None for p in predictions)}


def mask_scores(predictions: list, references: list) -> dict[str, float]:
    """{"mask_miou", "mask_ciou"} of boolean (H, W) masks, one prediction (or None) per true mask."""
    inters, unions = [], []
    for p, r in zip(predictions, references):
        r = np.asarray(r, dtype=bool)
        p = np.zeros_like(r) if p is None else np.asarray(p, dtype=bool)
        if p.shape != r.shape:
            raise ValueError(f"a predicted mask is {p.shape[1]}x{p.shape[0]} pixels, its true mask "
                             f"{r.shape[1]}x{r.shape[0]}: masks are compared on the same image")
        inters.append(int((p & r).sum()))
        unions.append(int((p | r).sum()))
    per_example = [i / u if u else 0.0 for i, u in zip(inters, unions)]
    return {"mask_miou": sum(per_example) / len(per_example),
            "mask_ciou": sum(inters) / sum(unions) if sum(unions) else 0.0}
