"""RefCOCO scores: box accuracy at IoU >= 0.5 and mean IoU as big_vision's evaluator computes them (y-first
boxes in [0, 1]), mask mIoU and cIoU by hand, and <loc> answers decoded onto the image (docs/metrics.md#refcoco)."""
import random

import numpy as np
import pytest

from nanopali.metrics.refcoco import box_iou, box_scores, mask_scores
from nanopali.metrics.score import boxes_from_text


def big_vision_box_iou(bb, gtbb):
    """big_vision evaluators/proj/paligemma/transfers/segmentation.py: `_area` and the box IoU of `run`,
    on (y1, x1, y2, x2) boxes in [0, 1]."""
    def area(y1, x1, y2, x2):
        return max(x2 - x1, 0.0) * max(y2 - y1, 0.0)
    y1, x1, y2, x2 = bb
    gty1, gtx1, gty2, gtx2 = gtbb
    ibb = max(y1, gty1), max(x1, gtx1), min(y2, gty2), min(x2, gtx2)
    return area(*ibb) / (area(*bb) + area(*gtbb) - area(*ibb))


def test_box_iou_in_pixels_equals_big_vision_on_normalized_y_first_boxes():
    rng = random.Random(0)
    for _ in range(500):
        w, h = rng.randint(20, 1000), rng.randint(20, 1000)
        a = sorted(rng.uniform(0, w) for _ in range(2)) + sorted(rng.uniform(0, h) for _ in range(2))
        b = sorted(rng.uniform(0, w) for _ in range(2)) + sorted(rng.uniform(0, h) for _ in range(2))
        px_a, px_b = (a[0], a[2], a[1], a[3]), (b[0], b[2], b[1], b[3])        # (x0, y0, x1, y1)
        yx_a = (a[2] / h, a[0] / w, a[3] / h, a[1] / w)
        yx_b = (b[2] / h, b[0] / w, b[3] / h, b[1] / w)
        assert box_iou(px_a, px_b) == pytest.approx(big_vision_box_iou(yx_a, yx_b), abs=1e-9)


def test_box_scores_by_hand():
    truth = [(0, 0, 10, 10)] * 4
    preds = [(0, 0, 10, 10), (0, 0, 10, 5), (5, 0, 15, 10), None]   # IoU 1, 0.5, 1/3, invalid
    out = box_scores(preds, truth)
    assert out["accuracy"] == 0.5                                   # IoU 0.5 itself counts, as big_vision's >=
    assert out["mean_iou"] == pytest.approx((1 + 0.5 + 1 / 3 + 0) / 4)
    assert out["invalid"] == 1


def test_mask_miou_and_ciou_by_hand():
    a = np.zeros((4, 4), bool)
    a[:2, :2] = True                                   # 4 pixels
    full = np.ones((4, 4), bool)                       # 16 pixels
    out = mask_scores([a, full, None], [a, a, a])
    # IoUs 1, 4/16, 0 (no mask): mean 1.25 / 3; cumulative (4 + 4 + 0) / (4 + 16 + 4), large masks weigh more
    assert out["mask_miou"] == pytest.approx(1.25 / 3)
    assert out["mask_ciou"] == pytest.approx(8 / 24)


def test_loc_answers_decode_to_unrounded_pixels_with_either_divisor():
    text = "<loc0256><loc0512><loc0768><loc1023> the dog ; junk <loc9999>"
    assert boxes_from_text(text, 200, 100) == [("the dog", (100.0, 25.0, 1023 / 1024 * 200, 75.0))]
    ((_, box),) = boxes_from_text(text, 200, 100, divisor=1023)
    assert box == pytest.approx((512 / 1023 * 200, 256 / 1023 * 100, 200.0, 768 / 1023 * 100))
    assert boxes_from_text("<loc0500><loc0500><loc0400><loc0600> flipped", 10, 10) == []   # y1 < y0: invalid
