"""The datasets people have, read as fine-tuning and evaluation examples (docs/datasets.md).

    source.py   DataSource (a path + how to read it), format detection, the flags every script shares
    jsonl.py    nanopali's JSONL: {"image", "prefix", "suffix"} a line
    hf.py       Hugging Face datasets: save_to_disk folders, parquet / arrow / JSON files, hub names
    coco.py     COCO captions → caption en; COCO instances → detect a ; b
    vqa.py      VQAv2, TextVQA, DocVQA → answer en {question}, the most frequent answer
    refcoco.py  referring expressions → detect {expression}, one box
    yolo.py     YOLO images/ + labels/ → detect a ; b
    common.py   file errors, image lookup, boxes → <loc> tokens, the majority answer

Data flows files → records {"image", "prefix", "suffix", "references"} → train.data.load_examples
(checks every row, names the bad ones) → Example → batches.
"""
from .common import DataError
from .source import FORMATS, SOURCE_FLAGS, DataSource, add_arguments, read, source_from_args

__all__ = ["DataError", "DataSource", "FORMATS", "SOURCE_FLAGS", "add_arguments", "read", "source_from_args"]
