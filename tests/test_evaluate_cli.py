"""evaluate.py: score mode on a predictions file for each task, generation on the bundled model, and every
bad input stopped with one message naming the file and line, exit code 2, before a model is loaded."""
import importlib.util
import json
import os
import shutil

import numpy as np
import pytest

from nanopali.shapes import task as shapes
from nanopali.tasks.segmentation import mask_to_rle

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGES = os.path.join(ROOT, "nanopali", "assets", "images")
_spec = importlib.util.spec_from_file_location("evaluate_script", os.path.join(ROOT, "evaluate.py"))
evaluate = importlib.util.module_from_spec(_spec)   # by path: "evaluate" is also a PyPI package's name
_spec.loader.exec_module(evaluate)


def write_lines(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def score(capsys, tmp_path, task, records):
    code = evaluate.main(["score", "--task", task, "--predictions", write_lines(tmp_path / "p.jsonl", records)])
    out = capsys.readouterr()
    assert code == 0, out.err
    return json.loads(out.out.strip().splitlines()[-1])


def test_score_caption_equals_pycocoevalcap(capsys, tmp_path):
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    refs = [["a red circle", "one red circle"], ["two blue squares", "a pair of blue squares"], ["a green triangle"]]
    preds = ["a red circle", "two squares", "a triangle that is green"]   # lower case, no punctuation: as written
    out = score(capsys, tmp_path, "caption", [{"prediction": p, "references": r} for p, r in zip(preds, refs)])
    gts, res = dict(enumerate(refs)), {i: [p] for i, p in enumerate(preds)}
    assert out["bleu4"] == pytest.approx(Bleu(4).compute_score(gts, res, verbose=0)[0][3], abs=1e-9)
    assert out["cider"] == pytest.approx(Cider().compute_score(gts, res)[0], abs=1e-9)


def test_score_vqa_and_anls_by_hand(capsys, tmp_path):
    lines = [{"prediction": "cat", "references": ["cat"] * 3 + ["dog"] * 7},    # 0.9
             {"prediction": "Dog", "references": ["dog"] * 10}]                  # all agree: not normalized, 0
    assert score(capsys, tmp_path, "vqa", lines) == {"vqa_accuracy": pytest.approx(0.45)}
    lines = [{"prediction": "kitten", "references": ["sitting"]}, {"prediction": "ABC", "references": ["x", "abc"]}]
    assert score(capsys, tmp_path, "anls", lines) == {"anls": pytest.approx((1 - 3 / 7 + 1) / 2)}


def test_score_refcoco_from_text_and_pixel_boxes(capsys, tmp_path):
    lines = [{"prediction": "<loc0000><loc0000><loc0512><loc0512> dog", "references": [0, 0, 50, 100],
              "width": 50, "height": 200},                                      # decodes to [0, 0, 25, 100]: 0.5
             {"prediction": [0, 0, 50, 50], "references": [0, 0, 50, 50]},     # 1
             {"prediction": "no box here", "references": [0, 0, 5, 5], "width": 9, "height": 9}]   # invalid: 0
    assert score(capsys, tmp_path, "refcoco", lines) == {"accuracy": pytest.approx(2 / 3),
                                                         "mean_iou": pytest.approx(0.5), "invalid": 1}


def test_score_refcoco_masks_as_rle(capsys, tmp_path):
    a, b = np.zeros((3, 4), bool), np.zeros((3, 4), bool)
    a[:, :2], b[:, 1:3] = True, True                                             # IoU 3 / 9
    lines = [{"prediction": [0, 0, 2, 3], "references": [0, 0, 2, 3], "prediction_mask": mask_to_rle(a),
              "reference_mask": mask_to_rle(b)}]
    out = score(capsys, tmp_path, "refcoco", lines)
    assert out["mask_miou"] == pytest.approx(1 / 3) and out["mask_ciou"] == pytest.approx(1 / 3)


def test_score_detect_perfect_boxes_give_map_1(capsys, tmp_path):
    lines = [{"prediction": "<loc0000><loc0000><loc0512><loc0512> cat ; <loc0512><loc0512><loc1023><loc1023> dog",
              "width": 1024, "height": 1024,
              "references": [{"label": "cat", "box": [0, 0, 512, 512]},
                             {"label": "dog", "box": [512, 512, 1023, 1023]}]},
             {"prediction": [{"label": "cat", "box": [1, 2, 30, 40], "score": 0.3}],
              "references": [{"label": "cat", "box": [1, 2, 30, 40]}]}]
    assert score(capsys, tmp_path, "detect", lines) == pytest.approx({"map": 1.0, "map50": 1.0, "map75": 1.0})


@pytest.fixture(scope="module")
def bundled_run(tmp_path_factory):
    """evaluate.py on the bundled model: the three bundled scenes, captions (with references) and detection
    (references from the suffix's boxes)."""
    d = tmp_path_factory.mktemp("eval")
    scenes = [shapes.make_scene(s) for s in shapes.BUNDLED_SEEDS]
    images = [os.path.join(IMAGES, f"shapes_{i}.png") for i in (1, 2, 3)]
    write_lines(d / "caption.jsonl", [{"image": im, "prefix": "caption en", "suffix": shapes.caption(sc),
                                       "references": [shapes.caption(sc)]} for im, sc in zip(images, scenes)])
    write_lines(d / "detect.jsonl", [{"image": im, "prefix": shapes.detect_prompt(), "suffix": shapes.detect(sc)}
                                     for im, sc in zip(images, scenes)])
    ckpt = shapes.BUNDLED_MODEL
    return d, scenes, ckpt


@pytest.mark.parametrize("task", ["caption", "detect"])
def test_generation_on_the_bundled_model_writes_predictions_scores_and_a_markdown_row(bundled_run, task, capsys):
    d, scenes, ckpt = bundled_run
    out = d / f"out-{task}"
    code = evaluate.main(["--checkpoint", ckpt, "--data", str(d / f"{task}.jsonl"), "--task", task, "--out", str(out),
                          "--batch-size", "2", "--max-new-tokens", "40"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "generated 3/3" in printed.err and "left" in printed.err                     # progress with ETA
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["prefix"] for r in records] == [("caption en" if task == "caption" else shapes.detect_prompt())] * 3
    summary = json.loads((out / "scores.json").read_text())
    # The bundled model answers its three bundled scenes right (nanopali/shapes/task.py, BUNDLED_SEEDS).
    if task == "caption":
        assert [r["prediction"] for r in records] == [shapes.caption(sc) for sc in scenes]
        assert summary["scores"]["bleu4"] == pytest.approx(1.0, abs=1e-8)
    else:
        assert [r["prediction"] for r in records] == [shapes.detect(sc) for sc in scenes]
        assert records[0]["width"] == 224 and {r["label"] for r in records[0]["references"]} == set(shapes.KINDS)
        assert summary["scores"] == pytest.approx({"map": 1.0, "map50": 1.0, "map75": 1.0})
    row = printed.out.strip().splitlines()[-1]
    assert row.startswith(f"| {ckpt} | {task} | 3 | ") and row.endswith(" |")
    assert evaluate.main(["score", "--task", task, "--predictions", str(out / "predictions.jsonl")]) == 0
    assert json.loads(capsys.readouterr().out) == pytest.approx(summary["scores"])       # the file scores back alike


GOOD = {"caption": {"prediction": "a", "references": ["a"]}, "vqa": {"prediction": "a", "references": ["a"]},
        "anls": {"prediction": "a", "references": ["a"]}, "refcoco": {"prediction": None, "references": [0, 0, 1, 1]},
        "detect": {"prediction": [], "references": []}}


@pytest.mark.parametrize("task, line, message", [
    ("caption", {"prediction": "a"}, "p.jsonl:2: missing 'references'"),
    ("caption", {"references": ["a"]}, "p.jsonl:2: missing 'prediction'"),
    ("caption", "{not json", "p.jsonl:2: not a line of JSON"),
    ("caption", {"prediction": "a", "references": "a cat"}, "p.jsonl:2: 'references' must be a non-empty list"),
    ("vqa", {"prediction": "a", "references": []}, "p.jsonl:2: 'references' must be a non-empty list"),
    ("anls", {"prediction": 3, "references": ["a"]}, "p.jsonl:2: 'prediction' must be a string"),
    ("refcoco", {"prediction": [0, 0, 1, 1], "references": ["a"]}, "p.jsonl:2: 'references' (the true box) must be"),
    ("refcoco", {"prediction": [0, 0, 1, 1], "references": [5, 0, 1, 1]}, "has x1 < x0"),
    ("refcoco", {"prediction": "<loc0001><loc0001><loc0002><loc0002>", "references": [0, 0, 1, 1]},
     "p.jsonl:2: a text prediction of boxes needs the image's \"width\" and \"height\""),
    ("refcoco", {"prediction": [0, 0, 1, 1], "references": [0, 0, 1, 1], "prediction_mask": {"size": [2, 2],
                 "counts": [1, 2]}, "reference_mask": {"size": [2, 2], "counts": [4]}}, "counts add up to 3 pixels"),
    ("detect", {"prediction": [], "references": [[0, 0, 1, 1]]}, "p.jsonl:2: 'references'[0] must be an object"),
    ("detect", {"prediction": [{"label": "a", "box": [0, 0, 1]}], "references": []}, "'prediction'[0].box must be"),
])
def test_bad_prediction_lines_are_named_with_file_and_line(capsys, tmp_path, task, line, message):
    path = write_lines(tmp_path / "p.jsonl", [GOOD[task], line])    # the bad line is line 2
    assert evaluate.main(["score", "--task", task, "--predictions", path]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err, err


def test_a_missing_predictions_file_and_an_unknown_task_are_refused(capsys, tmp_path):
    assert evaluate.main(["score", "--task", "vqa", "--predictions", str(tmp_path / "none.jsonl")]) == 2
    assert "predictions file not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        evaluate.main(["score", "--task", "bleu", "--predictions", str(tmp_path / "none.jsonl")])
    assert e.value.code == 2 and "invalid choice: 'bleu'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--checkpoint", "x", "--data", "y", "--task", "vqa", "--batch-size", "0"])
    assert e.value.code == 2 and "--batch-size must be ≥ 1" in capsys.readouterr().err


def test_bad_references_in_the_data_stop_before_the_weights_are_read(capsys, tmp_path):
    ckpt = tmp_path / "no-weights"            # config and tokenizer only: reading weights would fail otherwise
    ckpt.mkdir()
    for name in ("config.json", "tokenizer.model"):
        shutil.copy(os.path.join(shapes.BUNDLED_MODEL, name), ckpt / name)
    data = write_lines(tmp_path / "val.jsonl", [
        {"image": os.path.join(IMAGES, "shapes_1.png"), "prefix": "detect circle", "suffix": "x",
         "references": [1, 2]}])
    code = evaluate.main(["--checkpoint", str(ckpt), "--data", data, "--task", "refcoco", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith(f"error: {data}:1: 'references' (the true box) must be a box"), err
    assert not os.path.exists(tmp_path / "o" / "predictions.jsonl")


def test_train_eval_metric_reports_what_evaluate_py_score_reports(capsys, tmp_path):
    from nanopali.train.data import Example
    from nanopali.train.evaluate import metric_scores

    image = os.path.join(IMAGES, "shapes_1.png")                    # 224 x 224
    det = [Example([image], "detect circle", "<loc0000><loc0000><loc0512><loc0512> circle", "val.jsonl:1"),
           Example([image], "detect circle", "<loc0100><loc0100><loc0600><loc0600> circle", "val.jsonl:2")]
    preds = ["<loc0000><loc0000><loc0512><loc0512> circle", "<loc0100><loc0100><loc0400><loc0600> circle"]
    lines = [{"prediction": p, "references": [{"label": "circle", "box": list(b)}], "width": 224, "height": 224}
             for p, b in zip(preds, [(0, 0, 112, 112), (100 / 1024 * 224, 100 / 1024 * 224, 600 / 1024 * 224,
                                                        600 / 1024 * 224)])]
    assert metric_scores("map", preds, det) == pytest.approx(score(capsys, tmp_path, "detect", lines))
    cap = [Example([image], "caption en", "a red circle", "val.jsonl:1", references=["a red circle", "one circle"]),
           Example([image], "caption en", "two squares", "val.jsonl:2")]     # no references: the suffix
    lines = [{"prediction": "a red circle", "references": ["a red circle", "one circle"]},
             {"prediction": "two blue squares", "references": ["two squares"]}]
    expected = score(capsys, tmp_path, "caption", lines)
    assert metric_scores("cider", ["a red circle", "two blue squares"], cap) == {"cider": expected["cider"]}


def test_train_refuses_eval_references_the_metric_cannot_score_and_unknown_metrics():
    from nanopali.datasets import DataError
    from nanopali.train import flags
    from nanopali.train.data import Example
    from nanopali.train.evaluate import check_metric_references

    bad = [Example([os.path.join(IMAGES, "shapes_1.png")], "answer en what?", "red", "val.jsonl:7", references=[])]
    with pytest.raises(DataError, match=r"--eval-metric vqa: val.jsonl:7: 'references' must be a non-empty list"):
        check_metric_references("vqa", bad)
    assert flags.parse_args(["--init", "x", "--data", "y", "--eval-metric", "map"]).eval_metric == "map"
    for argv in (["--eval-metric", "rouge"], ["--eval-metric", "cider", "--no-eval-generate"]):
        with pytest.raises(SystemExit) as e:
            flags.parse_args(["--init", "x", "--data", "y", *argv])
        assert e.value.code == 2
