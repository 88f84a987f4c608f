"""Which file is which dataset: the `DataSource` a script builds from its flags, format detection, dispatch.

`add_arguments(group)` adds the flags every script shares (train.py --data / --eval-data, evaluate.py
--data), `source_from_args(args, path)` turns them into a `DataSource`, and `read(source)` yields the
records of whichever reader the format names: (where, record or InputError, base_dir). The formats,
their flags and the rule each follows are in docs/datasets.md.
"""
from __future__ import annotations

import argparse
import json
import os
import re
from dataclasses import dataclass, field

from .common import DataError

FORMATS = ("auto", "jsonl", "hf", "coco-captions", "coco-instances", "vqa", "refcoco", "yolo")
HF_FILES = (".parquet", ".arrow", ".csv")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# The flags that decide which examples a run reads (run_dir.FIXED should hold them: a resume may not change them).
SOURCE_FLAGS = ("data_format", "split", "image_dir", "annotations", "columns", "prompt", "texts", "classes",
                "class_names", "eval_split", "eval_image_dir", "eval_annotations")


@dataclass
class DataSource:
    """A dataset on disk (or a hub dataset name) and how to read it; every field but `path` is optional."""
    path: str
    format: str = "auto"              # one of FORMATS; auto: from the path (docs/datasets.md#formats)
    split: str | None = None          # HF split, YOLO data.yaml key, RefCOCO refs' "split"
    image_dir: str | None = None      # where COCO / VQA / RefCOCO images are (None: guessed beside the file)
    annotations: str | None = None    # VQAv2 annotations for a questions file; COCO instances for RefCOCO refs
    columns: dict[str, str] = field(default_factory=dict)   # role → column name, for rows (HF, flat RefCOCO)
    prompt: str | None = None         # prefix template, "{field}" filled from the row (None: the format's)
    texts: str | None = None          # "each" or "first" caption / expression (None: the format's default)
    classes: list[str] | None = None  # detection: the classes the prefix names (None: those in the image)
    class_names: str | None = None    # YOLO: a names file, one class a line
    evaluation: bool = False          # held-out data: picks eval defaults (first caption, validation split)

    def __post_init__(self):
        if self.format not in FORMATS:
            raise DataError(f"--data-format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.texts not in (None, "each", "first"):
            raise DataError(f"--texts must be 'each' or 'first', got {self.texts!r}")

    def column(self, role: str, *defaults: str, available=()) -> str:
        """The column playing `role`: --columns' choice, else the first default present in `available`."""
        if role in self.columns:
            return self.columns[role]
        return next((d for d in defaults if d in available), defaults[0])


def detect(path: str):
    """(format, the parsed JSON when the format was read from it) of a path, or a DataError that says
    why it is ambiguous (pass --data-format)."""
    if not os.path.exists(path):
        local = os.path.isdir(path.split("/")[0]) or path.endswith((".json", ".jsonl", ".yaml", *HF_FILES))
        if _HUB_NAME.match(path) and not local:               # data/train.json missing is a typo, not a hub name
            return "hf", None
        raise DataError(f"Data file not found: {path}")
    if os.path.isdir(path):
        names = set(os.listdir(path))
        if {"dataset_info.json", "state.json"} <= names or "dataset_dict.json" in names:
            return "hf", None                                 # datasets' save_to_disk
        if names & {"data.yaml", "dataset.yaml"} or "images" in names:
            return "yolo", None
        if any(f.endswith(HF_FILES) for _, _, files in os.walk(path) for f in files):
            return "hf", None                                 # a folder of parquet / arrow files
        raise DataError(f"{path}: cannot tell what dataset this directory holds (not a datasets save_to_disk, "
                        "no data.yaml or images/, no parquet/arrow files): pass --data-format")
    if path.endswith((".yaml", ".yml")):
        return "yolo", None
    if path.endswith(HF_FILES):
        return "hf", None
    if not path.endswith(".json"):
        return "jsonl", None                                  # train.py's JSONL, whatever its extension
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":                             # several JSON values: JSON lines
            return "jsonl", None
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return classify(obj, path), obj


def classify(obj, path: str) -> str:
    """The format of a parsed JSON file, from the keys its releases carry (docs/datasets.md#formats)."""
    first = lambda rows: rows[0] if isinstance(rows, list) and rows and isinstance(rows[0], dict) else {}  # noqa: E731
    if isinstance(obj, dict):
        if "images" in obj and "annotations" in obj:
            from .coco import coco_kind
            return {"captions": "coco-captions", "instances": "coco-instances"}[coco_kind(obj, path)]
        if "questions" in obj or "answers" in first(obj.get("annotations")) or "question" in first(obj.get("data")):
            return "vqa"
        if "prefix" in obj and "suffix" in obj:
            return "jsonl"                                    # a one-line JSONL file
    row = first(obj)
    if "bbox" in row or ("sentences" in row and "ann_id" in row):
        return "refcoco"
    keys = ", ".join(sorted(obj)[:8]) if isinstance(obj, dict) else f"a list of {type(row).__name__}"
    raise DataError(f"{path}: cannot tell what dataset this JSON holds ({keys}): pass --data-format")


def read(source: DataSource):
    """(where, record or InputError, base_dir) for each row of the source."""
    if source.path.endswith((".p", ".pkl", ".pickle")):
        raise DataError(f"{source.path}: a pickle, which nanopali never opens (unpickling runs code); convert the "
                        "refer toolkit's refs to JSON, as docs/datasets.md#refcoco shows")
    fmt, parsed = (source.format, None) if source.format != "auto" else detect(source.path)
    if fmt == "jsonl":
        from .jsonl import read_jsonl
        return read_jsonl(source.path)
    from . import coco, hf, refcoco, vqa, yolo
    reader = {"hf": hf.records, "coco-captions": coco.caption_records, "coco-instances": coco.instance_records,
              "vqa": vqa.records, "refcoco": refcoco.records, "yolo": yolo.records}[fmt]
    return ((where, record, None) for where, record in reader(source, parsed))


def add_arguments(group, with_eval: bool = False) -> None:
    """The dataset flags, identical in every script; with_eval adds --eval-split / --eval-image-dir /
    --eval-annotations for a second, held-out source read with the same mapping."""
    group.add_argument("--data-format", default="auto", choices=FORMATS, help="how to read --data"
                       f"{' and --eval-data' if with_eval else ''}: our JSONL, a Hugging Face dataset, COCO captions "
                       "or instances, VQAv2 / TextVQA / DocVQA, RefCOCO, YOLO (docs/datasets.md); auto: from the path")
    group.add_argument("--split", help="HF dataset split, YOLO data.yaml key, or RefCOCO refs split (None: train; "
                       "RefCOCO: every ref)")
    group.add_argument("--image-dir", help="image folder of COCO / VQA / RefCOCO files (None: looked for beside the "
                       "annotation file, e.g. ../train2017)")
    group.add_argument("--annotations", help="the second file: VQAv2 annotations of a questions file, COCO instances "
                       "of RefCOCO refs (None: guessed from the file name)")
    group.add_argument("--columns", default="", help="role=column pairs for row datasets, e.g. image=img,suffix=answer "
                       "(roles: image, prefix, suffix, references; RefCOCO: image, expression, bbox)")
    group.add_argument("--prompt", help="prefix template; {name} is a row field, e.g. 'answer en {question}' (None: "
                       "the format's: caption en, answer en {question}, detect {expression}, detect {classes})")
    group.add_argument("--texts", choices=["each", "first"], help="COCO captions / RefCOCO expressions: an example for "
                       "each, or for the first only (None: each; first for held-out captions)")
    group.add_argument("--classes", help="detection: comma-separated classes the prefix names, in order (None: the "
                       "classes present in each image)")
    group.add_argument("--class-names", help="YOLO: a file of class names, one a line (None: data.yaml's names)")
    if with_eval:
        group.add_argument("--eval-split", help="split of --eval-data (None: validation / val)")
        group.add_argument("--eval-image-dir", help="--image-dir of --eval-data (None: guessed)")
        group.add_argument("--eval-annotations", help="--annotations of --eval-data (None: guessed)")


def source_from_args(args: argparse.Namespace, path: str, evaluation: bool = False) -> DataSource:
    """The DataSource of `path` under the flags of add_arguments (the eval-* ones when evaluation)."""
    columns = {}
    for pair in filter(None, (p.strip() for p in (getattr(args, "columns", "") or "").split(","))):
        role, eq, column = pair.partition("=")
        if not eq or not role.strip() or not column.strip():
            raise DataError(f"--columns {args.columns!r}: expected role=column pairs, got {pair!r}")
        columns[role.strip()] = column.strip()
    def pick(name):  # train.py's --eval-* flags for its held-out source; evaluate.py has only the plain ones
        eval_name = f"eval_{name}"
        return getattr(args, eval_name) if evaluation and hasattr(args, eval_name) else getattr(args, name, None)
    classes = [c.strip() for c in args.classes.split(",") if c.strip()] if getattr(args, "classes", None) else None
    return DataSource(path, getattr(args, "data_format", "auto"), pick("split"), pick("image_dir"),
                      pick("annotations"), columns, getattr(args, "prompt", None), getattr(args, "texts", None),
                      classes, getattr(args, "class_names", None), evaluation)
