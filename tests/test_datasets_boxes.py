"""The box readers (docs/datasets.md): RefCOCO (refs JSON + instances, flat rows, a HF dataset), COCO instances
and YOLO for `detect a ; b`, and the <loc> round trip through tasks/detection.py's decoder. Datasets are
built in tmp_path in the released files' shapes; helpers come from test_datasets.py.
"""
import os

import numpy as np
import pytest
from PIL import Image

from nanopali.datasets import DataError, DataSource
from nanopali.tasks.detection import box_to_locs
from nanopali.datasets.yolo import parse_yaml
from nanopali.tasks.detection import parse_detections
from nanopali.train.data import load_examples
from test_datasets import png, processor, write  # noqa: F401  (processor: a fixture)


def test_integer_pixel_boxes_come_back_exactly_from_the_decoder():
    rng = np.random.default_rng(0)
    for w, h in ((40, 30), (640, 480), (1024, 77)):
        for _ in range(50):
            x0, x1 = sorted(rng.choice(w, 2, replace=False))    # x1 < w: the far edge is the next test's
            y0, y1 = sorted(rng.choice(h, 2, replace=False))
            [det] = parse_detections(box_to_locs((x0, y0, x1, y1), w, h) + " thing", w, h)
            assert det.box == (x0, y0, x1, y1) and det.label == "thing"


def test_any_box_comes_back_within_one_bin_and_half_a_pixel():
    """Half a bin from binning, a whole one at the far edge (bin 1024 does not exist: 1023), plus the
    decoder's rounding to whole pixels: |error| ≤ side/1024 + 0.5."""
    rng = np.random.default_rng(1)
    for w, h in ((3000, 2000), (333, 101)):
        for _ in range(50):
            x0, x1 = sorted(rng.uniform(0, w, 2))
            y0, y1 = sorted(rng.uniform(0, h, 2))
            box = (x0, y0, w if rng.random() < 0.2 else x1, y1)
            [det] = parse_detections(box_to_locs(box, w, h) + " thing", w, h)
            assert np.all(np.abs(np.subtract(det.box, box)) <= np.array([w, h, w, h]) / 1024 + 0.5)


def refcoco(root, bbox2=(20, 5, 15, 20)) -> str:
    """The refer toolkit's layout: data/refcoco/refs.json (its refs(unc).p as JSON) beside instances.json,
    images in data/images/mscoco/images/train2014."""
    png(root / "images" / "mscoco" / "images" / "train2014" / "COCO_train2014_000000000009.jpg")
    write(root / "refcoco" / "instances.json", {
        "images": [{"license": 1, "file_name": "COCO_train2014_000000000009.jpg", "height": 30, "width": 40,
                    "id": 9}],
        "annotations": [{"segmentation": [[]], "area": 120.0, "iscrowd": 0, "image_id": 9,
                         "bbox": [2.5, 4.0, 10.0, 12.0], "category_id": 1, "id": 100},
                        {"segmentation": [[]], "area": 300.0, "iscrowd": 0, "image_id": 9, "bbox": list(bbox2),
                         "category_id": 1, "id": 101}],
        "categories": [{"supercategory": "shape", "id": 1, "name": "square"}]})
    sentence = lambda i, s: {"tokens": s.split(), "raw": s.capitalize() + ".", "sent_id": i, "sent": s}  # noqa: E731
    return write(root / "refcoco" / "refs.json", [
        {"sent_ids": [0, 1], "file_name": "COCO_train2014_000000000009_100.jpg", "ann_id": 100, "ref_id": 0,
         "image_id": 9, "split": "train", "sentences": [sentence(0, "left square"), sentence(1, "small one")],
         "category_id": 1},
        {"sent_ids": [2], "file_name": "COCO_train2014_000000000009_101.jpg", "ann_id": 101, "ref_id": 1,
         "image_id": 9, "split": "testA", "sentences": [sentence(2, "right square")], "category_id": 1}])


def test_a_refcoco_expression_becomes_detect_and_its_box_y_first(processor, tmp_path):
    ds = load_examples(DataSource(refcoco(tmp_path)), processor)
    assert [(e.prefix, e.suffix) for e in ds.examples][:2] == [
        ("detect left square", "<loc0137><loc0064><loc0546><loc0320> left square"),   # by hand: 4/30·1024 = 136.5
        ("detect small one", "<loc0137><loc0064><loc0546><loc0320> small one")]
    assert ds.examples[0].references == [2.5, 4.0, 12.5, 16.0]
    [det] = parse_detections(ds.examples[2].suffix, 40, 30)
    assert det.label == "right square" and np.allclose(det.box, ds.examples[2].references, atol=40 / 1024 + 0.5)


def test_refcoco_split_and_first_expression_choose_the_examples(processor, tmp_path):
    path = refcoco(tmp_path)
    assert [e.prefix for e in load_examples(DataSource(path, split="testA"), processor).examples] == \
        ["detect right square"]
    assert len(load_examples(DataSource(path, texts="first"), processor)) == 2
    with pytest.raises(DataError, match=r"no refs in split 'val' \(splits: testA, train\)"):
        load_examples(DataSource(path, split="val"), processor)


def test_a_box_outside_the_image_is_a_bad_row_and_a_pixel_over_is_clipped(processor, tmp_path):
    with pytest.raises(DataError, match=r"refs.json: ref 1: annotation 101 bbox \[30, 5, 15, 20\] \(\[x, y, w, h\]\) "
                                        r"is outside the 40x30 image"):
        load_examples(DataSource(refcoco(tmp_path, bbox2=(30, 5, 15, 20))), processor)
    ds = load_examples(DataSource(refcoco(tmp_path, bbox2=(30, 5, 10.5, 20))), processor)
    assert ds.examples[2].references == [30.0, 5.0, 40.0, 25.0]


def test_refcoco_pickles_are_never_opened(processor, tmp_path):
    (tmp_path / "refs(unc).p").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(DataError, match=r"a pickle, which nanopali never opens .*docs/datasets.md#refcoco"):
        load_examples(DataSource(str(tmp_path / "refs(unc).p")), processor)


def test_flat_refcoco_rows_from_jsonl_and_from_a_hf_dataset_with_renamed_columns(processor, tmp_path):
    png(tmp_path / "img" / "a.png")
    (tmp_path / "rows.jsonl").write_text('{"image": "img/a.png", "expression": "the square", "bbox": [0, 0, 20, 15]}\n'
                                         '{"image": "img/a.png", "expression": "gone", "bbox": [0, 0, 50, 15]}\n')
    with pytest.raises(DataError, match=r"rows.jsonl:2: bbox \[0, 0, 50, 15\] .* is outside the 40x30 image"):
        load_examples(DataSource(str(tmp_path / "rows.jsonl"), "refcoco"), processor)
    [ex] = load_examples(DataSource(str(tmp_path / "rows.jsonl"), "refcoco"), processor, skip_bad=True).examples
    assert (ex.prefix, ex.suffix, ex.references) == ("detect the square", "<loc0000><loc0000><loc0512><loc0512> the "
                                                     "square", [0.0, 0.0, 20.0, 15.0])
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"image": [Image.new("RGB", (40, 30))], "answer": [["the square", "top left"]],
                                "bbox": [[0.0, 0.0, 20.0, 15.0]]}).save_to_disk(str(tmp_path / "hf"))
    ds = load_examples(DataSource(str(tmp_path / "hf"), "refcoco", columns={"expression": "answer"}), processor)
    assert [(e.prefix, e.suffix.split("> ")[1]) for e in ds.examples] == [("detect the square", "the square"),
                                                                          ("detect top left", "top left")]


def coco_instances(root, classes_bbox=None) -> str:
    png(root / "val2017" / "000000000001.jpg")
    png(root / "val2017" / "000000000002.jpg")
    ann = lambda i, image, cat, bbox, crowd=0: {"segmentation": [], "area": 1.0, "iscrowd": crowd,  # noqa: E731
                                                "image_id": image, "bbox": bbox, "category_id": cat, "id": i}
    return write(root / "annotations" / "instances_val2017.json", {
        "info": {}, "licenses": [],
        "images": [{"file_name": f"00000000000{i}.jpg", "height": 30, "width": 40, "id": i} for i in (1, 2)],
        "annotations": [ann(1, 1, 18, [20, 10, 10, 10]), ann(2, 1, 17, [20, 0, 5, 5]), ann(3, 1, 17, [0, 0, 10, 10]),
                        ann(4, 1, 17, [0, 0, 40, 30], crowd=1), ann(5, 2, 18, classes_bbox or [5, 5, 10, 10])],
        "categories": [{"supercategory": "animal", "id": 18, "name": "dog"},
                       {"supercategory": "animal", "id": 17, "name": "cat"}]})


def test_coco_instances_name_classes_in_category_order_and_list_boxes_top_to_bottom(processor, tmp_path):
    ds = load_examples(DataSource(coco_instances(tmp_path)), processor)
    first, second = ds.examples
    assert first.prefix == "detect cat ; dog" and second.prefix == "detect dog"
    assert [d.label for d in parse_detections(first.suffix, 40, 30)] == ["cat", "cat", "dog"]  # the crowd is left out
    assert first.references == [{"label": "cat", "box": [0.0, 0.0, 10.0, 10.0]},
                                {"label": "cat", "box": [20.0, 0.0, 25.0, 5.0]},
                                {"label": "dog", "box": [20.0, 10.0, 30.0, 20.0]}]
    assert [d.box for d in parse_detections(first.suffix, 40, 30)] == [tuple(r["box"]) for r in first.references]


def test_named_classes_fix_the_prefix_and_an_image_without_them_answers_nothing(processor, tmp_path):
    path = coco_instances(tmp_path)
    ds = load_examples(DataSource(path, classes=["cat"]), processor)
    assert [(e.prefix, len(parse_detections(e.suffix, 40, 30))) for e in ds.examples] == [("detect cat", 2),
                                                                                         ("detect cat", 0)]
    with pytest.raises(DataError, match=r"--classes bird: not among the classes of .* \(cat, dog\)"):
        load_examples(DataSource(path, classes=["bird"]), processor)


def test_a_coco_box_with_no_area_is_named_with_its_image_and_annotation(processor, tmp_path):
    with pytest.raises(DataError, match=r"instances_val2017.json: image 2: annotation 5 bbox .* has no area"):
        load_examples(DataSource(coco_instances(tmp_path, classes_bbox=[5, 5, 0, 10])), processor)


DATA_YAML = """# a toy set, in the shape of Ultralytics' coco8.yaml
path: .  # the root
train: images/train
val: images/val
names:
  0: square
  1: "circle, filled"
download: |
  import os  # never read
"""


def test_yolo_labels_become_detect_examples_named_by_data_yaml(processor, tmp_path):
    (tmp_path / "data.yaml").write_text(DATA_YAML)
    png(tmp_path / "images" / "train" / "a.png")
    png(tmp_path / "images" / "train" / "b.png")                    # no label file: no objects, no example
    os.makedirs(tmp_path / "labels" / "train")
    (tmp_path / "labels" / "train" / "a.txt").write_text("1 0.5 0.5 0.25 0.5\n0 0.125 0.25 0.25 0.5\n")
    [ex] = load_examples(DataSource(str(tmp_path)), processor).examples
    assert ex.prefix == "detect square ; circle, filled"
    assert ex.references == [{"label": "square", "box": [0.0, 0.0, 10.0, 15.0]},
                             {"label": "circle, filled", "box": [15.0, 7.5, 25.0, 22.5]}]
    with pytest.raises(DataError, match=r"data.yaml: no 'test' entry \(splits: train, val\)"):
        load_examples(DataSource(str(tmp_path / "data.yaml"), split="test"), processor)


def test_bad_yolo_lines_are_named_with_their_file_and_line(processor, tmp_path):
    (tmp_path / "classes.txt").write_text("square\n")
    os.makedirs(tmp_path / "labels")
    for name, line in (("a", "0 0.5 0.5 0.2"), ("b", "0 0.5 0.5 1.2 0.2"), ("c", "3 0.5 0.5 0.2 0.2"),
                       ("d", "0 0.5 0.5 0.2 0.2 0.3 0.3")):
        png(tmp_path / "images" / f"{name}.png")
        (tmp_path / "labels" / f"{name}.txt").write_text(f"0 0.5 0.5 0.1 0.1\n{line}\n")
    with pytest.raises(DataError) as e:
        load_examples(DataSource(str(tmp_path)), processor)
    labels = str(tmp_path / "labels")
    assert "4 bad example(s)" in str(e.value)
    assert f"{labels}/a.txt: line 2: expected 'class cx cy w h' (5 numbers), got 4" in str(e.value)
    assert f"{labels}/b.txt: line 2: '0 0.5 0.5 1.2 0.2': coordinates must be normalized to 0..1" in str(e.value)
    assert f"{labels}/c.txt: line 2: class 3 is not among the 1 names" in str(e.value)
    assert f"{labels}/d.txt: line 2: expected 'class cx cy w h' (5 numbers), got 7 (polygon" in str(e.value)


def test_the_data_yaml_subset_reads_flow_lists_quotes_and_comments():
    text = "nc: 3\nnames: ['a', \"b, c\", d]  # three\ntrain: [images/x, images/y]\nval: images/v # comment\n"
    assert parse_yaml(text, "data.yaml") == {"nc": 3, "names": ["a", "b, c", "d"], "train": ["images/x", "images/y"],
                                             "val": "images/v"}
    assert parse_yaml("names:\n  - cat\n  - 'dog'\n", "data.yaml") == {"names": ["cat", "dog"]}
    with pytest.raises(DataError, match=r"data.yaml:2: expected `key: value`"):
        parse_yaml("names:\nnot yaml\n", "data.yaml")
