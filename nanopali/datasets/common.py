"""What every dataset reader shares: file errors, image lookup, boxes → `<loc>` tokens, answers → one suffix.

A reader turns a file into records {"image", "prefix", "suffix", "references"} (docs/datasets.md). A
problem with the whole file (missing, not JSON, the wrong kind) is a `DataError` raised at once; a
problem with one row (missing image, box outside the image, no answers) is an `InputError` handed on
with the row's name, so `train.data.load_examples` lists every bad row together, as it does for JSONL.
Boxes are encoded by `tasks/detection.py`'s `box_to_locs`, the inverse of its default decoding round(bin / 1024 · side) (docs/boxes-and-masks.md#detection).
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter

from PIL import Image, UnidentifiedImageError

from ..formats import images
from ..formats.images import InputError

BOX_SLACK = 1.0   # pixels a box may pass the image edge (float rounding in COCO files) before the row is bad
_FIELD = re.compile(r"\{(\w+)\}")


class DataError(ValueError):
    """Bad training data; the message names the file and every bad row (file:row: what is wrong)."""


def read_json(path: str, what: str = "file"):
    """The parsed JSON of `path`, or one DataError naming the file and where it stops being JSON."""
    if not os.path.isfile(path):
        raise DataError(f"{what} not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None


def image_dirs(anchor: str, image_dir: str | None, subfolders=()) -> list[str]:
    """Where a reader looks for images: --image-dir alone when given, else beside the annotation file
    `anchor`, its parent, and their `subfolders` (COCO keeps annotations/ beside train2017/)."""
    if image_dir is not None:
        if not os.path.isdir(image_dir):
            raise DataError(f"--image-dir {image_dir} is not a directory")
        return [image_dir]
    here = os.path.dirname(os.path.abspath(anchor))
    bases = [here, os.path.dirname(here)]
    return [os.path.join(b, s) for s in subfolders for b in bases] + bases


def find_image(dirs: list[str], *names: str) -> str:
    """The first of dirs × names that is a file (absolute), or an InputError naming what was tried."""
    for name in names:
        if os.path.isabs(name) and os.path.isfile(name):
            return name
    for d in dirs:
        for name in names:
            for candidate in (os.path.join(d, name), os.path.join(d, os.path.basename(name))):
                if os.path.isfile(candidate):
                    return os.path.abspath(candidate)
    raise InputError(f"image {names[0]!r} not found in {' or '.join(dirs)} (set --image-dir)")


def image_size(path: str) -> tuple[int, int]:
    """(width, height) as nanopali shows the file (EXIF orientation applied, formats/images.py), from
    the header alone: the pixels are decoded later, once, by load_examples."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            turned = im.getexif().get(0x0112) in (5, 6, 7, 8)   # orientations that swap the axes
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise InputError(f"cannot read {path} as an image ({type(e).__name__}: {e})") from None
    if w * h > images.MAX_IMAGE_PIXELS:   # read at call time, as load_image does
        raise InputError(f"{path} is {w}x{h} = {w * h:,} pixels; the limit is {images.MAX_IMAGE_PIXELS:,}")
    return (h, w) if turned else (w, h)


def xywh_box(box, width: int, height: int, name: str = "bbox") -> tuple[float, float, float, float]:
    """A COCO [x, y, w, h] pixel box as (x0, y0, x1, y1) inside the image, or an InputError: a box may
    pass an edge by BOX_SLACK pixels (then it is clipped), no more, and must have an area."""
    if not (isinstance(box, (list, tuple)) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
        raise InputError(f"{name} must be 4 numbers [x, y, width, height], got {box!r}")
    x, y, w, h = (float(v) for v in box)
    return pixel_box((x, y, x + w, y + h), width, height, f"{name} {list(box)} ([x, y, w, h])")


def pixel_box(box, width: int, height: int, name: str) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = box
    if not (x1 > x0 and y1 > y0):
        raise InputError(f"{name} has no area")
    if x0 < -BOX_SLACK or y0 < -BOX_SLACK or x1 > width + BOX_SLACK or y1 > height + BOX_SLACK:
        raise InputError(f"{name} is outside the {width}x{height} image")
    return max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height))


def detection_suffix(objects, classes: list[str]):
    """(answer, the objects in it): every object whose label is in `classes`, as "<loc>×4 label" joined
    by " ; ", in the order of `classes` (the prefix), then top to bottom, left to right, as the bundled
    shapes task writes them (`nanopali.shapes.task.detect`). objects: (label, (x0, y0, x1, y1), locs)."""
    kept = sorted((o for o in objects if o[0] in classes), key=lambda o: (classes.index(o[0]), o[1][1], o[1][0]))
    return " ; ".join(f"{locs} {label}" for label, _, locs in kept), kept


def check_label(name: str, where: str) -> str:
    """A class name or expression that can stand in a detection answer: detection.py reads a label up
    to the next ';' or '<', so one containing them would come back cut."""
    if not isinstance(name, str) or not name.strip():
        raise InputError(f"{where} must be a non-empty string, got {name!r}")
    if ";" in name or "<" in name:
        raise InputError(f"{where} {name!r} contains ';' or '<', which end a label in a detection answer")
    return name.strip()


def majority(answers: list[str]) -> str:
    """The most frequent answer; a tie goes to the one that comes first in the list, as big_vision's
    `majority` pp op (tf.unique_with_counts keeps first-seen order, argmax takes the first maximum)."""
    counts = Counter(answers)
    return max(counts, key=lambda a: (counts[a], -answers.index(a)))


def answer_list(value, name: str = "answers") -> list[str]:
    """Answers as strings (VQAv2 keeps them as {"answer": ...} objects), or an InputError when there are none."""
    if not isinstance(value, list):
        raise InputError(f"{name!r} must be a list, got {type(value).__name__}")
    out = [a.get("answer") if isinstance(a, dict) else a for a in value]
    if any(not isinstance(a, str) for a in out):
        raise InputError(f"{name!r} must hold strings (or {{'answer': str}} objects), got {value!r:.80}")
    out = [a.strip() for a in out]
    if not any(out):
        raise InputError(f"{name!r} is empty: no answer to train on or score against")
    return [a for a in out if a]


def template_fields(template: str) -> list[str]:
    return _FIELD.findall(template)


def fill(template: str, row: dict) -> str:
    """`template` with each {field} replaced by the row's value ("answer en {question}")."""
    try:
        return _FIELD.sub(lambda m: str(row[m.group(1)]).strip(), template)
    except KeyError as e:
        raise InputError(f"no field {e.args[0]!r}, which --prompt {template!r} names") from None


def check_fields(template: str, available, where: str) -> None:
    """A DataError when --prompt names a field the rows do not have (a column that does not exist)."""
    missing = [f for f in template_fields(template) if f not in available]
    if missing:
        raise DataError(f"{where}: --prompt {template!r} names {', '.join(map(repr, missing))}, which the rows "
                        f"do not have (they have: {', '.join(sorted(available))})")
