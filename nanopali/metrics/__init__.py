"""The papers' transfer metrics, each as its reference implementation computes it (docs/metrics.md).

    ptb.py       the COCO caption toolkit's PTB tokenization, without Java
    caption.py   BLEU-1..4 and CIDEr-D (pycocoevalcap)
    vqa.py       VQA accuracy with the official answer normalization (GT-Vision-Lab/VQA)
    anls.py      ANLS for DocVQA / InfographicVQA / ST-VQA (the RRC evaluation)
    refcoco.py   referring expressions: box accuracy at IoU 0.5, mean IoU, mask mIoU and cIoU (big_vision)
    mean_ap.py   detection mAP@[.5:.95], mAP@.5 (pycocotools' COCOeval)
    score.py     records {"prediction", "references"} of a task → checked → its metrics

Data flows predictions + references → score.check_records (bad ones named) → score.score → {metric: value}.
evaluate.py and train.py --eval-metric score through score.py; nothing here imports torch.
"""
from .score import MASK_METRICS, TASKS, ScoreError, check_records, read_predictions, score

__all__ = ["MASK_METRICS", "TASKS", "ScoreError", "check_records", "read_predictions", "score"]
