"""nanopali's own JSONL: one {"image", "prefix", "suffix"} object a line, read line by line.

Relative image paths are relative to the file (the third item of each row); "image" may be a list
for several images; an optional "references" list is kept for scoring. `train.data._parse` checks
each object, so a bad line is named with its number (docs/fine-tuning.md#trainpy).
"""
from __future__ import annotations

import json
import os

from ..formats.images import InputError
from .common import DataError


def read_jsonl(path):
    """(where, the parsed object or the InputError that stopped its parsing, base_dir) per non-blank line."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"Data file not found: {path}")
    base_dir = os.path.dirname(os.path.abspath(path))
    with open(path, "rb") as f:  # bytes, decoded line by line: a bad byte is named with its line
        for i, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield f"{path}:{i}", InputError(f"not valid UTF-8 (byte {raw[e.start]:#04x} at column "
                                                f"{e.start + 1})"), None
                continue
            if not line.strip():
                continue
            try:
                yield f"{path}:{i}", json.loads(line), base_dir
            except json.JSONDecodeError as e:
                yield f"{path}:{i}", InputError(f"not valid JSON ({e.msg} at column {e.colno})"), None
