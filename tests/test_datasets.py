"""The dataset readers (docs/datasets.md): format detection, COCO captions, VQAv2 / TextVQA / DocVQA, Hugging
Face datasets, the shared flags, and train.py on them. Boxes (RefCOCO, COCO instances, YOLO) are in
test_datasets_boxes.py. Every dataset is built here in tmp_path in the released files' shapes; the
processor is the bundled tiny model's (no model is loaded but in the train.py test).
"""
import json
import os
import sys
from pathlib import Path

import pytest
from PIL import Image

from nanopali.datasets import DataError, DataSource, add_arguments, source_from_args
from nanopali.datasets.common import majority
from nanopali.datasets.source import detect
from nanopali.formats.hf_config import read_paligemma_config
from nanopali.processing import Processor
from nanopali.train.data import load_examples

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "nanopali" / "assets" / "tiny-shapes"
sys.path.insert(0, str(ROOT))  # train.py lives at the repository root


@pytest.fixture(scope="module")
def processor():
    return Processor.for_model(str(BUNDLED / "tokenizer.model"), read_paligemma_config(str(BUNDLED)))


def png(path, size=(40, 30), colour=(200, 30, 30)) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return str(path)


def write(path, obj) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Path(path).write_text(json.dumps(obj))
    return str(path)


def test_jsonl_read_as_a_data_source_gives_what_the_plain_path_gives_plus_references(processor, tmp_path):
    png(tmp_path / "a.png")
    (tmp_path / "t.jsonl").write_text('{"image": "a.png", "prefix": "caption en", "suffix": "red", "references": '
                                      '["red", "a red square"]}\n{"image": "a.png", "prefix": "caption en", "suffix": '
                                      '"red", "references": "red"}\n')
    plain = load_examples(str(tmp_path / "t.jsonl"), processor, skip_bad=True)
    auto = load_examples(DataSource(str(tmp_path / "t.jsonl")), processor, skip_bad=True)
    assert plain == auto and plain.examples[0].references == ["red", "a red square"]
    assert plain.skipped == [f"{tmp_path / 't.jsonl'}:2: 'references' must be a list, got str"]


def coco_captions(root, missing_image=False) -> str:
    """annotations/captions_train2017.json beside train2017/, as COCO ships them; image 2 has 2 captions."""
    png(root / "train2017" / "000000000001.jpg")
    if not missing_image:
        png(root / "train2017" / "000000000002.jpg", colour=(30, 30, 200))
    return write(root / "annotations" / "captions_train2017.json", {
        "info": {}, "licenses": [],
        "images": [{"license": 1, "file_name": f"00000000000{i}.jpg", "coco_url": "", "height": 30, "width": 40,
                    "date_captured": "", "flickr_url": "", "id": i} for i in (1, 2)],
        "annotations": [{"image_id": 1, "id": 10, "caption": "A red square. "},
                        {"image_id": 2, "id": 11, "caption": "a blue square"},
                        {"image_id": 2, "id": 12, "caption": "blue"}]})


def test_each_caption_is_an_example_and_all_captions_of_the_image_are_its_references(processor, tmp_path):
    ds = load_examples(DataSource(coco_captions(tmp_path)), processor)
    assert [(e.prefix, e.suffix, e.references) for e in ds.examples] == [
        ("caption en", "A red square.", ["A red square."]),
        ("caption en", "a blue square", ["a blue square", "blue"]),
        ("caption en", "blue", ["a blue square", "blue"])]
    assert ds.examples[1].images == [str(tmp_path / "train2017" / "000000000002.jpg")]


def test_held_out_captions_give_one_example_per_image(processor, tmp_path):
    path = coco_captions(tmp_path)
    assert [e.suffix for e in load_examples(DataSource(path, evaluation=True), processor).examples] == \
        ["A red square.", "a blue square"]
    assert len(load_examples(DataSource(path, texts="first"), processor)) == 2


def test_a_missing_coco_image_is_reported_with_the_file_and_image_id(processor, tmp_path):
    path = coco_captions(tmp_path, missing_image=True)
    with pytest.raises(DataError, match=rf"{path}: image 2: image '000000000002.jpg' not found in .*train2017"):
        load_examples(DataSource(path), processor)
    assert len(load_examples(DataSource(path), processor, skip_bad=True).skipped) == 1


def test_a_coco_file_of_the_wrong_kind_is_refused_naming_the_right_format(processor, tmp_path):
    captions = coco_captions(tmp_path)
    with pytest.raises(DataError, match="is a COCO captions file, not instances.*--data-format coco-captions"):
        load_examples(DataSource(captions, "coco-instances"), processor)
    instances = write(tmp_path / "instances.json", {"images": [], "annotations": [
        {"id": 1, "image_id": 1, "bbox": [0, 0, 1, 1], "category_id": 1}], "categories": []})
    with pytest.raises(DataError, match="is a COCO instances file, not captions.*--data-format coco-instances"):
        load_examples(DataSource(instances, "coco-captions"), processor)


def test_the_majority_answer_breaks_ties_by_first_appearance_as_big_vision():
    assert majority(["two", "2", "2", "two", "3"]) == "two"      # 2 each: "two" came first
    assert majority(["1", "2", "2"]) == "2"


def vqav2(root, answers=None) -> str:
    """v2_OpenEnded_mscoco_train2014_questions.json + v2_mscoco_train2014_annotations.json, images in train2014/."""
    png(root / "train2014" / "COCO_train2014_000000000009.jpg")
    answers = answers if answers is not None else ["2", "two", "two", "2", "2", "3", "two", "2", "two", "two"]
    write(root / "v2_mscoco_train2014_annotations.json", {
        "info": {}, "license": {}, "data_type": "mscoco", "data_subtype": "train2014", "annotations": [
            {"question_type": "how many", "multiple_choice_answer": "two", "image_id": 9, "answer_type": "number",
             "question_id": 9000, "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                                              for i, a in enumerate(answers)]}]})
    return write(root / "v2_OpenEnded_mscoco_train2014_questions.json", {
        "info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "license": {}, "data_subtype": "train2014",
        "questions": [{"image_id": 9, "question": "How many squares?", "question_id": 9000}]})


def test_vqav2_pairs_questions_with_their_annotations_and_keeps_all_ten_answers(processor, tmp_path):
    [ex] = load_examples(DataSource(vqav2(tmp_path)), processor).examples
    assert (ex.prefix, ex.suffix) == ("answer en How many squares?", "two")    # 5 "two", 4 "2", 1 "3"
    assert ex.references == ["2", "two", "two", "2", "2", "3", "two", "2", "two", "two"]
    assert ex.images == [str(tmp_path / "train2014" / "COCO_train2014_000000000009.jpg")]


def test_vqa_rows_without_answers_or_annotations_are_named(processor, tmp_path):
    questions = vqav2(tmp_path, answers=[])
    with pytest.raises(DataError, match=rf"{questions}: question 9000: 'answers' is empty"):
        load_examples(DataSource(questions), processor)
    with pytest.raises(DataError, match="holds VQAv2 annotations: pass its questions file .* as --annotations"):
        load_examples(DataSource(str(tmp_path / "v2_mscoco_train2014_annotations.json")), processor)
    os.remove(tmp_path / "v2_mscoco_train2014_annotations.json")
    with pytest.raises(DataError, match="need their annotations file .*pass --annotations"):
        load_examples(DataSource(questions), processor)


def test_textvqa_and_docvqa_rows_find_their_images(processor, tmp_path):
    png(tmp_path / "train_images" / "0054c91397f2fe05.jpg")
    textvqa = write(tmp_path / "TextVQA_0.5.1_train.json", {"dataset_type": "train", "dataset_name": "textvqa",
                    "dataset_version": "0.5.1", "data": [{"question": "what brand?", "image_id": "0054c91397f2fe05",
                    "image_classes": [], "image_width": 40, "image_height": 30,
                    "answers": ["nokia"] * 7 + ["nokla"] * 3,
                    "question_tokens": ["what", "brand"], "question_id": 34602, "set_name": "train"}]})
    png(tmp_path / "docvqa" / "documents" / "xnbl0037_1.png")
    docvqa = write(tmp_path / "docvqa" / "train_v1.0_withQT.json", {"dataset_name": "SP-DocVQA", "dataset_split":
                   "train", "dataset_version": "1.0", "data": [
                       {"questionId": 337, "question": "what is the date?", "question_types": ["form"], "image":
                        "documents/xnbl0037_1.png", "docId": 279, "answers": ["1/8/93", "1/8/1993"]},
                       {"questionId": 338, "question": "who signed?", "image": "documents/xnbl0037_1.png"}]})
    [ex] = load_examples(DataSource(textvqa), processor).examples
    assert (ex.prefix, ex.suffix, len(ex.references)) == ("answer en what brand?", "nokia", 10)
    with pytest.raises(DataError, match=rf"{docvqa}: question 338: no 'answers'"):
        load_examples(DataSource(docvqa), processor)
    [ex] = load_examples(DataSource(docvqa, prompt="{question}"), processor, skip_bad=True).examples  # big_vision's
    assert (ex.prefix, ex.suffix, ex.images) == ("what is the date?", "1/8/93",
                                                 [str(tmp_path / "docvqa" / "documents" / "xnbl0037_1.png")])


def test_a_prompt_naming_a_missing_field_is_refused(processor, tmp_path):
    with pytest.raises(DataError, match=r"--prompt 'answer en \{query\}' names 'query'.*question"):
        load_examples(DataSource(vqav2(tmp_path), prompt="answer en {query}"), processor)


def hf_dataset(root, splits=("train",)) -> str:
    """A DatasetDict written by save_to_disk: an Image column `img`, a question, a list of answers."""
    datasets = pytest.importorskip("datasets")
    rows = {"img": [Image.new("RGB", (40, 30), (200, 30, 30)), Image.new("RGB", (20, 50), (30, 30, 200))],
            "question": ["what colour?", "what shape?"], "answers": [["red", "red", "pink"], ["square"]]}
    features = datasets.Features({"img": datasets.Image(), "question": datasets.Value("string"),
                                  "answers": datasets.Sequence(datasets.Value("string"))})
    ds = datasets.DatasetDict({s: datasets.Dataset.from_dict(rows, features=features) for s in splits})
    ds.save_to_disk(str(root / "hf"))
    return str(root / "hf")


def test_hf_columns_and_a_prompt_template_map_rows_to_examples(processor, tmp_path):
    src = DataSource(hf_dataset(tmp_path), columns={"image": "img", "suffix": "answers"},
                     prompt="answer en {question}")
    ds = load_examples(src, processor)
    assert [(e.prefix, e.suffix, e.references) for e in ds.examples] == [
        ("answer en what colour?", "red", ["red", "red", "pink"]), ("answer en what shape?", "square", ["square"])]
    assert [e.images[0].size for e in ds.examples] == [(40, 30), (20, 50)]
    assert ds.examples[1].where == f"{src.path}[train] row 1"


def test_hf_a_column_that_does_not_exist_is_named_with_the_columns_there(processor, tmp_path):
    with pytest.raises(DataError, match=r"no column 'caption' \(columns: img, question, answers\)"):
        load_examples(DataSource(hf_dataset(tmp_path), columns={"image": "img", "suffix": "caption"},
                                 prompt="caption en"), processor)


def test_hf_held_out_data_reads_the_validation_split_and_a_missing_split_is_named(processor, tmp_path):
    path = hf_dataset(tmp_path, splits=("train", "validation"))
    src = dict(columns={"image": "img", "suffix": "answers"}, prompt="{question}")
    assert load_examples(DataSource(path, evaluation=True, **src), processor).examples[0].where.startswith(
        f"{path}[validation]")
    with pytest.raises(DataError, match=r"no split 'test' \(splits: train, validation\).*--split"):
        load_examples(DataSource(path, split="test", **src), processor)


def test_hf_image_bytes_past_the_size_limit_are_bad_rows_before_decoding(processor, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    png(tmp_path / "a.png")
    table = datasets.Dataset.from_dict({"image": [{"bytes": open(tmp_path / "a.png", "rb").read(), "path": None}],
                                        "prefix": ["caption en"], "suffix": ["red"]},
                                       features=datasets.Features({"image": datasets.Image(decode=False),
                                                                   "prefix": datasets.Value("string"),
                                                                   "suffix": datasets.Value("string")}))
    table.to_parquet(str(tmp_path / "train.parquet"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    [ex] = load_examples(DataSource(str(tmp_path / "train.parquet")), processor).examples   # auto: parquet → hf
    assert (ex.suffix, ex.images[0].size) == ("red", (40, 30))
    monkeypatch.setattr("nanopali.formats.images.MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(DataError, match=r"train.parquet\[train\] row 0: image is 40x30 = 1,200 pixels; the limit is "
                                        r"1,000"):
        load_examples(DataSource(str(tmp_path / "train.parquet")), processor)


def test_without_the_datasets_package_the_error_says_how_to_install_it(processor, tmp_path, monkeypatch):
    path = hf_dataset(tmp_path)
    monkeypatch.setitem(sys.modules, "datasets", None)     # import datasets → ImportError
    with pytest.raises(DataError, match=r"needs the `datasets` package: pip install 'nanopali\[datasets\]'"):
        load_examples(DataSource(path), processor)


def test_a_hub_dataset_name_that_cannot_be_read_offline_is_one_clear_error(processor, monkeypatch):
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)          # no network here: fail at once
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="someone/some-dataset: no such file or folder here, and no Hugging Face hub "
                                        "dataset of that name could be read"):
        load_examples(DataSource("someone/some-dataset"), processor)


@pytest.mark.parametrize("name,expected", [
    ("train.jsonl", "jsonl"), ("captions_train2017.json", "coco-captions"), ("instances.json", "coco-instances"),
    ("v2_OpenEnded_mscoco_train2014_questions.json", "vqa"), ("TextVQA_0.5.1_train.json", "vqa"),
    ("refs.json", "refcoco"), ("data.yaml", "yolo"), ("train.parquet", "hf")])
def test_the_format_is_detected_from_the_path_and_the_keys_the_released_files_carry(tmp_path, name, expected):
    contents = {"captions_train2017.json": {"images": [], "annotations": [{"image_id": 1, "id": 1, "caption": "x"}]},
                "instances.json": {"images": [], "annotations": [{"image_id": 1, "bbox": [0, 0, 1, 1]}]},
                "v2_OpenEnded_mscoco_train2014_questions.json": {"questions": []},
                "TextVQA_0.5.1_train.json": {"data": [{"question": "q", "image_id": "a", "answers": []}]},
                "refs.json": [{"ref_id": 0, "ann_id": 1, "image_id": 1, "sentences": []}]}
    assert detect(write(tmp_path / name, contents.get(name, {})))[0] == expected


def test_a_hub_name_is_told_from_a_mistyped_local_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    assert detect("google/some-dataset") == ("hf", None)
    for typo in ("data/train", "google/train.json"):
        with pytest.raises(DataError, match=f"Data file not found: {typo}"):
            detect(typo)


def test_an_unknown_json_is_refused_asking_for_the_format(tmp_path):
    with pytest.raises(DataError, match=r"cannot tell what dataset this JSON holds \(rows\): pass --data-format"):
        detect(write(tmp_path / "x.json", {"rows": []}))


def test_the_shared_flags_build_the_same_source_for_any_script(tmp_path):
    import argparse
    parser = argparse.ArgumentParser()
    add_arguments(parser, with_eval=True)
    args = parser.parse_args(["--data-format", "hf", "--columns", "image=img, suffix=answers", "--prompt",
                              "{question}", "--split", "train", "--eval-split", "dev", "--classes", "a,b"])
    train, held_out = source_from_args(args, "x"), source_from_args(args, "y", evaluation=True)
    assert (train.columns, train.split, train.classes) == ({"image": "img", "suffix": "answers"}, "train", ["a", "b"])
    assert (held_out.split, held_out.evaluation, held_out.prompt) == ("dev", True, "{question}")
    with pytest.raises(DataError, match=r"--columns 'image': expected role=column pairs"):
        source_from_args(parser.parse_args(["--columns", "image"]), "x")


def test_train_py_fine_tunes_on_a_saved_hf_dataset_and_evaluates_on_coco_captions(tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    import train
    images = [Image.new("RGB", (40, 30), c) for c in ((200, 30, 30), (30, 30, 200), (30, 200, 30))]
    datasets.Dataset.from_dict({"image": images, "prefix": ["caption en"] * 3, "suffix": ["red", "blue", "green"]},
                               features=datasets.Features({"image": datasets.Image(),
                                                           "prefix": datasets.Value("string"),
                                                           "suffix": datasets.Value("string")})
                               ).save_to_disk(str(tmp_path / "hf"))
    assert train.main(["--init", str(BUNDLED), "--data", str(tmp_path / "hf"), "--eval-data", coco_captions(tmp_path),
                       "--out-dir", str(tmp_path / "run"), "--batch-size", "2", "--max-steps", "2",
                       "--no-eval-generate", "--log-every", "1", "--no-memory-check"]) == 0
    out = capsys.readouterr().out
    assert "3 examples, 2 steps" in out and "eval step 2" in out


def test_train_py_stops_on_a_bad_dataset_before_loading_the_model(tmp_path, capsys):
    import train
    path = coco_captions(tmp_path, missing_image=True)
    assert train.main(["--init", str(BUNDLED), "--data", path, "--out-dir", str(tmp_path / "run")]) == 2
    captured = capsys.readouterr()
    assert f"{path}: image 2: image '000000000002.jpg' not found" in captured.err
    assert "loading the model" not in captured.out
