"""VQA files → `answer en {question}` examples: VQAv2 (questions + annotations), TextVQA, DocVQA.

The released shapes: VQAv2's questions file {"data_subtype": "train2014", "questions": [{"image_id",
"question", "question_id"}]} paired with its annotations file {"annotations": [{"question_id",
"answers": [{"answer", "answer_confidence", "answer_id"}] ×10, "multiple_choice_answer", ...}]}, images
COCO_train2014_{image_id:012d}.jpg; TextVQA's one file {"data": [{"question", "image_id", "answers": [10
strings], "question_id", ...}]}, images {image_id}.jpg; DocVQA's {"data": [{"questionId", "question",
"image": "documents/x.png", "answers": [...]}]}. The suffix is the most frequent answer (ties: the first
given, big_vision's `majority` op); every answer, as given, is kept as `references` (docs/datasets.md#vqa).
"""
from __future__ import annotations

import os

from ..formats.images import InputError
from .common import DataError, answer_list, check_fields, fill, find_image, image_dirs, majority, read_json


def _answered(answers) -> tuple[str, list[str]]:
    refs = answer_list(answers)
    return majority([a.strip() for a in refs if a.strip()]), refs


def _annotations_path(source) -> str:
    """VQAv2's annotations file beside the questions file: v2_OpenEnded_mscoco_train2014_questions.json →
    v2_mscoco_train2014_annotations.json (VQA v1 names the same way)."""
    if source.annotations:
        return source.annotations
    folder, name = os.path.split(source.path)
    guess = os.path.join(folder, name.replace("OpenEnded_", "").replace("_questions", "_annotations"))
    if guess == source.path or not os.path.isfile(guess):
        raise DataError(f"{source.path}: VQAv2 questions need their annotations file (looked for {guess}); pass "
                        "--annotations (test questions have no answers to train on)")
    return guess


def records(source, parsed=None):
    """(where, record or InputError) per question."""
    obj = parsed if parsed is not None else read_json(source.path, "VQA file")
    prompt = source.prompt or "answer en {question}"
    if isinstance(obj, dict) and isinstance(obj.get("questions"), list):
        yield from _vqav2(source, obj, prompt)
    elif isinstance(obj, dict) and isinstance(obj.get("data"), list):
        yield from _rows(source, obj["data"], prompt)
    elif isinstance(obj, dict) and isinstance(obj.get("annotations"), list):
        raise DataError(f"{source.path} holds VQAv2 annotations: pass its questions file "
                        f"(v2_OpenEnded_mscoco_*_questions.json) as the data and this one as --annotations")
    else:
        raise DataError(f"{source.path}: not a VQA file (expected VQAv2's 'questions' or TextVQA / DocVQA's 'data')")


def _vqav2(source, obj, prompt: str):
    ann_path = _annotations_path(source)
    ann = read_json(ann_path, "VQAv2 annotations file")
    if not (isinstance(ann, dict) and isinstance(ann.get("annotations"), list)):
        raise DataError(f"{ann_path}: not a VQAv2 annotations file (expected an object with an 'annotations' list)")
    by_question = {a.get("question_id"): a for a in ann["annotations"] if isinstance(a, dict)}
    subtype = str(obj.get("data_subtype", ""))
    dirs = image_dirs(source.path, source.image_dir, [subtype, os.path.join("images", subtype)] if subtype else [])
    check_fields(prompt, _keys(obj["questions"]), source.path)
    for i, q in enumerate(obj["questions"]):
        qid = q.get("question_id") if isinstance(q, dict) else None
        where = f"{source.path}: question {qid if qid is not None else f'[{i}]'}"
        try:
            if not (isinstance(q, dict) and isinstance(q.get("question"), str) and isinstance(q.get("image_id"), int)):
                raise InputError("expected an object with a 'question' string and an integer 'image_id'")
            if qid not in by_question:
                raise InputError(f"no annotation with this question_id in {ann_path}")
            suffix, refs = _answered(by_question[qid].get("answers"))
            image = find_image(dirs, f"COCO_{subtype}_{q['image_id']:012d}.jpg", f"{q['image_id']:012d}.jpg")
            prefix = fill(prompt, q)
        except InputError as e:
            yield where, e
            continue
        yield where, {"image": image, "prefix": prefix, "suffix": suffix, "references": refs}


def _rows(source, rows: list, prompt: str):
    """TextVQA ("image_id" → {image_id}.jpg) and DocVQA ("image": a path) rows."""
    dirs = image_dirs(source.path, source.image_dir,
                      ["train_images", os.path.join("train_val_images", "train_images"), "test_images",
                       "spdocvqa_images", "images"])
    check_fields(prompt, _keys(rows), source.path)
    for i, row in enumerate(rows):
        qid = (row.get("question_id", row.get("questionId")) if isinstance(row, dict) else None)
        where = f"{source.path}: question {qid if qid is not None else f'data[{i}]'}"
        try:
            if not (isinstance(row, dict) and isinstance(row.get("question"), str)):
                raise InputError("expected an object with a 'question' string")
            if "answers" not in row:
                raise InputError("no 'answers' (a test split has none to train on or score against)")
            suffix, refs = _answered(row["answers"])
            if isinstance(row.get("image"), str):
                image = find_image(dirs, row["image"])
            elif isinstance(row.get("image_id"), (str, int)):
                image = find_image(dirs, f"{row['image_id']}.jpg")
            else:
                raise InputError("no 'image' path (DocVQA) or 'image_id' (TextVQA)")
            prefix = fill(prompt, row)
        except InputError as e:
            yield where, e
            continue
        yield where, {"image": image, "prefix": prefix, "suffix": suffix, "references": refs}


def _keys(rows: list) -> set:
    """The fields a --prompt may name: those of the first row."""
    return set(rows[0]) if rows and isinstance(rows[0], dict) else set()
