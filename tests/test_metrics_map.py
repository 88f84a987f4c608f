"""Detection mAP@[.5:.95], mAP@.5 and mAP@.75 equal pycocotools' COCOeval on random and edge-case sets
(docs/metrics.md#detection)."""
import contextlib
import io
import random

import pytest

from nanopali.metrics.mean_ap import detection_map

pytest.importorskip("pycocotools", reason="pycocotools (the test extra) is the reference")
from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402

TOL = 1e-6   # the brief's agreement; measured: <= 1e-15 (numpy means over the same numbers in another order)


def cocoeval(predictions, references, extra_classes=()):
    """COCOeval's stats[0:3] for the same images: image i has id i + 1 (ids sort as the list does), the
    categories are the true labels plus extra_classes; predicted labels outside them get ids COCOeval ignores."""
    labels = sorted({label for refs in references for label, _ in refs} | set(extra_classes))
    cat = {label: k + 1 for k, label in enumerate(labels)}
    xywh = lambda b: [b[0], b[1], b[2] - b[0], b[3] - b[1]]  # noqa: E731
    anns = []
    for i, refs in enumerate(references):
        for label, box in refs:
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": cat[label], "bbox": xywh(box),
                         "area": (box[2] - box[0]) * (box[3] - box[1]), "iscrowd": 0})
    unknown = {label: 1000 + k for k, label in enumerate(sorted({p[0] for ps in predictions for p in ps} - set(cat)))}
    dets = [{"image_id": i + 1, "category_id": cat.get(label, unknown.get(label)), "bbox": xywh(box),
             "score": score} for i, preds in enumerate(predictions) for label, box, score in preds]
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": [{"id": i + 1} for i in range(len(references))], "annotations": anns,
                      "categories": [{"id": k, "name": label} for label, k in cat.items()]}
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {"map": ev.stats[0], "map50": ev.stats[1], "map75": ev.stats[2]}


def assert_same(predictions, references, **kw):
    ours, theirs = detection_map(predictions, references), cocoeval(predictions, references, **kw)
    ours = {k: -1.0 if v is None else v for k, v in ours.items()}    # undefined (no true box): COCOeval prints -1
    assert all(abs(ours[k] - theirs[k]) <= TOL for k in ours), (ours, theirs)


def random_box(rng, size=100.0):
    x0, y0 = rng.uniform(0, size * 0.8), rng.uniform(0, size * 0.8)
    return (x0, y0, x0 + rng.uniform(2, size * 0.5), y0 + rng.uniform(2, size * 0.5))


def jitter(rng, box, amount):
    x0, y0, x1, y1 = (c + rng.uniform(-amount, amount) for c in box)
    return min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)   # a valid box, as parse_detections gives


def random_set(rng, n_images, classes=("cat", "dog", "car")):
    refs, preds = [], []
    for _ in range(n_images):
        truth = [(rng.choice(classes), random_box(rng)) for _ in range(rng.randint(0, 5))]
        guess = [(label, jitter(rng, box, rng.choice([1, 5, 15])), round(rng.random(), 1))   # rounded: ties
                 for label, box in truth if rng.random() < 0.8]
        guess += [(rng.choice(classes), random_box(rng), round(rng.random(), 1)) for _ in range(rng.randint(0, 3))]
        rng.shuffle(guess)
        refs.append(truth)
        preds.append(guess)
    return preds, refs


def test_map_equals_cocoeval_on_random_sets():
    rng = random.Random(0)
    for _ in range(25):
        assert_same(*random_set(rng, rng.randint(1, 8)))


def test_unscored_boxes_rank_in_the_order_written_as_cocoeval_ties_do():
    # PaliGemma writes no scores: every box gets 1.0, and COCOeval's stable sort keeps image order, then answer order.
    rng = random.Random(1)
    for _ in range(10):
        preds, refs = random_set(rng, 6)
        assert_same([[(label, box, 1.0) for label, box, _ in p] for p in preds], refs)


def test_edge_cases_equal_cocoeval():
    rng = random.Random(2)
    box = (10.0, 10.0, 50.0, 50.0)
    half, three_quarters = (10.0, 10.0, 50.0, 30.0), (10.0, 10.0, 50.0, 40.0)   # IoU exactly 0.5 and 0.75
    cases = {
        "images without predictions": ([[("cat", box, 0.9)], [], []], [[("cat", box)], [("cat", box)], [("dog", box)]]),
        "a predicted class with no true box": ([[("cat", box, 0.9), ("zebra", box, 0.95)]], [[("cat", box)]]),
        "duplicate boxes": ([[("cat", box, 0.5), ("cat", box, 0.5), ("cat", box, 0.5)]], [[("cat", box)]]),
        "IoU exactly at thresholds": ([[("cat", half, 0.9), ("cat", three_quarters, 0.8)]],
                                      [[("cat", box), ("cat", box)]]),
        "an image with predictions and no true box": ([[("cat", box, 0.9)], [("cat", box, 0.99)]],
                                                      [[("cat", box)], []]),
        "more than 100 boxes in an image": ([[("cat", jitter(rng, box, 8), rng.random()) for _ in range(130)]],
                                            [[("cat", jitter(rng, box, 8)) for _ in range(20)]]),
    }
    for name, (preds, refs) in cases.items():
        assert_same(preds, refs), name
    assert_same(*cases["images without predictions"], extra_classes=("bus",))   # a class COCO lists, no true box


def test_no_predictions_score_zero_and_no_true_boxes_none():
    # COCOeval cannot take an empty result list (loadRes indexes its first element): by hand instead.
    assert detection_map([[], []], [[("cat", (0, 0, 1, 1))], []]) == {"map": 0.0, "map50": 0.0, "map75": 0.0}
    assert detection_map([[("cat", (0, 0, 1, 1), 1.0)]], [[]]) == {"map": None, "map50": None, "map75": None}
