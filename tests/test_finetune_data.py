"""Fine-tuning data: JSONL validation by line number, in-memory examples, and the data order.

Also holds the helpers the other test_finetune_* files import: a six-example dataset of coloured
squares, in memory or as JSONL. Checkpoints are conftest's `hf_checkpoint("pg1" / "pg2")`: tiny random
transformers models (tests/hf_reference.py), 28 px, width 64, built once per session.
"""
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nanopali.train.data import DataError, DataOrder, Example, load_examples
from nanopali.train.evaluate import detection_score, generation_metrics
from nanopali.processing import Processor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # train.py lives at the repository root
COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "yellow": (230, 230, 20)}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Width-64 models run several times faster on one thread than on two: syncing threads costs more
    than the matmuls, and far more on a loaded CI machine. Restored afterwards for other tests."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def square(colour) -> Image.Image:
    a = np.full((32, 32, 3), 255, np.uint8)
    a[8:24, 8:24] = colour
    return Image.fromarray(a)


def records() -> list[dict]:
    """Six examples: four captions, one detection, one two-image question (images as PIL)."""
    ims = {name: square(c) for name, c in COLOURS.items()}
    rows = [{"image": ims[name], "prefix": "caption en", "suffix": f"a {name} square"} for name in COLOURS]
    box = "<loc0256><loc0256><loc0767><loc0767>"   # the square spans pixels 8..24 of 32: bins 256..767
    rows.append({"image": ims["red"], "prefix": "detect square", "suffix": f"{box} square"})
    rows.append({"image": [ims["blue"], ims["green"]], "prefix": "answer en which colors?", "suffix": "blue and green"})
    return rows


def write_dataset(directory) -> str:
    """records() as a JSONL file with images saved beside it under relative paths; returns its path."""
    os.makedirs(os.path.join(directory, "img"), exist_ok=True)
    lines = []
    for i, r in enumerate(records()):
        paths = []
        for j, im in enumerate(r["image"] if isinstance(r["image"], list) else [r["image"]]):
            paths.append(f"img/{i}_{j}.png")
            im.save(os.path.join(directory, paths[-1]))
        lines.append(json.dumps({**r, "image": paths if len(paths) > 1 else paths[0]}))
    path = os.path.join(directory, "train.jsonl")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def processor(hf_checkpoint):
    ckpt = hf_checkpoint("pg1")
    return Processor(os.path.join(ckpt, "tokenizer.model"), 28, 4, 1752)


@pytest.fixture
def bad_jsonl(tmp_path):
    square(COLOURS["red"]).save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    lines = [
        {"image": "ok.png", "prefix": "caption en", "suffix": "a red square"},           # 1 good
        {"image": "ok.png", "prefix": "caption en"},                                     # 2 no suffix
        "{not json",                                                                     # 3
        {"image": "missing.png", "prefix": "caption en", "suffix": "x"},                 # 4 no such file
        {"image": "broken.png", "prefix": "caption en", "suffix": "x"},                  # 5 unreadable
        {"image": "ok.png", "prefix": "caption en", "suffix": "red " * 40},              # 6 too long
        "",                                                                              # 7 blank: ignored
        {"image": str(tmp_path / "ok.png"), "prefix": "caption en", "suffix": "red"},    # 8 good, absolute
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return str(path)


def test_bad_jsonl_lines_are_reported_by_line_number(bad_jsonl, processor):
    with pytest.raises(DataError) as e:
        load_examples(bad_jsonl, processor, max_seq_len=32)
    msg = str(e.value)
    assert "5 bad example(s)" in msg
    assert f"{bad_jsonl}:2: missing key(s) 'suffix'" in msg
    assert f"{bad_jsonl}:3: not valid JSON" in msg
    assert f"{bad_jsonl}:4: Image file not found" in msg
    assert f"{bad_jsonl}:5: Cannot read" in msg
    assert f"{bad_jsonl}:6: " in msg and "exceed --max-seq-len 32" in msg
    assert f"{bad_jsonl}:1:" not in msg and f"{bad_jsonl}:8:" not in msg


def test_skip_bad_drops_the_bad_lines_and_counts_them(bad_jsonl, processor):
    ds = load_examples(bad_jsonl, processor, max_seq_len=32, skip_bad=True)
    assert [ex.where.rsplit(":", 1)[1] for ex in ds.examples] == ["1", "8"]
    assert len(ds.skipped) == 5
    # a relative image path is relative to the JSONL file, not to the working directory
    assert ds.examples[0].images == [os.path.join(os.path.dirname(bad_jsonl), "ok.png")]


def test_train_py_stops_before_training_on_bad_data(bad_jsonl, hf_checkpoint, tmp_path, capsys):
    import train
    ckpt = hf_checkpoint("pg1")
    rc = train.main(["--init", ckpt, "--data", bad_jsonl, "--out-dir", str(tmp_path / "run"), "--max-seq-len", "32"])
    assert rc == 2
    assert f"{bad_jsonl}:4: Image file not found" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_in_memory_examples_take_pil_images_and_are_reported_by_index(processor):
    rows = records()
    ds = load_examples(rows, processor)
    assert len(ds) == 6
    assert ds.examples[5].num_tokens == 2 * 4 + len(processor.prefix_ids("answer en which colors?", 0)) + \
        ds.examples[5].num_targets
    rows[2] = {"image": rows[2]["image"], "suffix": "x"}
    with pytest.raises(DataError, match=r"examples\[2\]: missing key\(s\) 'prefix'"):
        load_examples(rows, processor)


def test_every_process_count_reads_the_same_examples_per_step():
    """Step s of 1 process with batch 4 = the union of steps s of 2 processes with batch 2 (or 4 x 1)."""
    order = DataOrder(10, seed=3)
    for step in (1, 2, 3, 7):
        one = order.step(step, batch=4)[0]
        two = [i for r in range(2) for i in order.step(step, batch=2, world=2, rank=r)[0]]
        accum = [i for mb in order.step(step, batch=1, accum=2, world=2, rank=0) for i in mb] + \
                [i for mb in order.step(step, batch=1, accum=2, world=2, rank=1) for i in mb]
        assert sorted(one) == sorted(two) == sorted(accum) == sorted(order.step_all(step, 2, world=2))


def test_each_epoch_reads_every_example_once_in_a_new_order():
    order = DataOrder(6, seed=0)
    epochs = [[i for s in range(3 * e + 1, 3 * e + 4) for i in order.step(s, batch=2)[0]] for e in range(3)]
    assert all(sorted(ep) == list(range(6)) for ep in epochs)
    assert epochs[0] != epochs[1]


def test_eval_scores_exact_match_and_the_best_same_label_box_iou_per_target():
    target = "<loc0000><loc0000><loc0100><loc0100> cat ; <loc0200><loc0200><loc0300><loc0300> dog"
    half_cat = "<loc0000><loc0000><loc0100><loc0050> cat"          # IoU 0.5 with the cat; no dog: 0
    assert detection_score(half_cat, target) == pytest.approx(0.25)
    assert detection_score("<loc0000><loc0000><loc0100><loc0100> dog", target) == 0.0   # labels must match
    examples = [Example([], "detect cat ; dog", target, "a"), Example([], "caption en", "a cat", "b")]
    assert generation_metrics([half_cat, " a cat "], examples) == {"exact_match": 0.5, "box_iou": 0.25}
