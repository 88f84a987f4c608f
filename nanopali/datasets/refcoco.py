"""RefCOCO-style referring expressions → `detect {expression}` examples answered by one box.

Read from three shapes (docs/datasets.md#refcoco), never from the refer toolkit's pickle (refs(unc).p
would run code when unpickled):
  - refs as JSON: the refer toolkit's list of refs {"ref_id", "ann_id", "image_id", "split",
    "sentences": [{"sent", "raw", ...}]} converted to JSON, with its COCO instances.json (boxes, file
    names) as --annotations (default: instances.json beside it); --split keeps one split (testA, ...);
  - flat rows, a JSON list or JSONL: {"image" | "file_name", "expression" | "sentence" | "sentences",
    "bbox": [x, y, w, h]} in pixels (COCO's convention);
  - a Hugging Face dataset with those columns (renamed with --columns image=...,expression=...,bbox=...).
The suffix is the box as <locY0><locX0><locY1><locX1> then the expression, as tasks/detection.py reads
it; `references` is the pixel box [x0, y0, x1, y1]. The prefix uses "sent" (refer's cleaned text).
"""
from __future__ import annotations

import json
import os

from PIL import Image

from ..formats.images import InputError
from ..tasks.detection import box_to_locs
from .common import (DataError, check_fields, check_label, fill, find_image, image_dirs, image_size,
                     read_json, xywh_box)

# refer's layout: data/refcoco/refs.json beside instances.json, images in data/images/mscoco/images/train2014
COCO_IMAGES = ["train2014", os.path.join("images", "train2014"),
               os.path.join("images", "mscoco", "images", "train2014")]


def records(source, parsed=None):
    """(where, record or InputError) per expression (texts "each") or per referred object ("first")."""
    prompt = source.prompt or "detect {expression}"
    dirs = image_dirs(source.path, source.image_dir, COCO_IMAGES)
    if source.path.endswith(".json"):
        obj = parsed if parsed is not None else read_json(source.path, "RefCOCO file")
        if not (isinstance(obj, list) and obj and all(isinstance(r, dict) for r in obj)):
            raise DataError(f"{source.path}: not RefCOCO refs or rows (expected a non-empty JSON list of objects)")
        if "sentences" in obj[0] and "ann_id" in obj[0]:
            yield from _refs(source, obj, dirs, prompt)
            return
        rows = ((f"{source.path}: [{i}]", r, None) for i, r in enumerate(obj) if _in_split(r, source.split))
        columns = set(obj[0])
    elif source.path.endswith(".jsonl"):
        rows, columns = _jsonl(source)
    else:
        from .hf import rows as hf_rows
        columns, rows = hf_rows(source)
    unknown = set(source.columns) - {"image", "expression", "bbox"}
    if unknown:
        raise DataError(f"--columns: unknown role(s) {', '.join(sorted(unknown))} for RefCOCO rows "
                        "(roles: image, expression, bbox)")
    image_col = source.column("image", "image", "file_name", "image_path", available=columns)
    text_col = source.column("expression", "expression", "sentence", "sentences", "sent", available=columns)
    box_col = source.column("bbox", "bbox", available=columns)
    missing = [c for c in (image_col, text_col, box_col) if c not in columns]
    if missing:
        raise DataError(f"{source.path}: no column {', '.join(map(repr, missing))} (columns: "
                        f"{', '.join(sorted(columns))}); map them with --columns image=...,expression=...,bbox=...")
    check_fields(prompt, {*columns, "expression"}, source.path)
    for where, row, base in rows:
        try:
            if isinstance(row, InputError):
                raise row
            if not isinstance(row, dict):
                raise InputError(f"expected an object, got {type(row).__name__}")
            image = _image(row.get(image_col), dirs if base is None or source.image_dir else None, base)
            if isinstance(image, list):
                raise InputError(f"{image_col!r} holds several images; an expression refers to one")
            w, h = image.size if isinstance(image, Image.Image) else image_size(image)
            box = xywh_box(row.get(box_col), w, h, box_col)
            examples = _examples(where, image, box, w, h, _expressions(row.get(text_col), text_col), row, prompt,
                                 source.texts)
        except InputError as e:
            yield where, e
            continue
        yield from examples


def _refs(source, refs: list, dirs, prompt: str):
    ann_path = source.annotations or os.path.join(os.path.dirname(os.path.abspath(source.path)), "instances.json")
    inst = read_json(ann_path, "COCO instances file for the refs (--annotations)")
    if not (isinstance(inst, dict) and isinstance(inst.get("images"), list)
            and isinstance(inst.get("annotations"), list)):
        raise DataError(f"{ann_path}: not a COCO instances file (expected 'images' and 'annotations' lists)")
    images = {im.get("id"): im for im in inst["images"] if isinstance(im, dict)}
    boxes = {a.get("id"): a for a in inst["annotations"] if isinstance(a, dict)}
    chosen = [r for r in refs if _in_split(r, source.split)]
    if not chosen:
        splits = sorted({str(r.get("split")) for r in refs})
        raise DataError(f"{source.path}: no refs in split {source.split!r} (splits: {', '.join(splits)})")
    check_fields(prompt, {*refs[0], "expression"}, source.path)
    for ref in chosen:
        where = f"{source.path}: ref {ref.get('ref_id')}"
        try:
            im, ann = images.get(ref.get("image_id")), boxes.get(ref.get("ann_id"))
            if im is None or ann is None:
                raise InputError(f"image_id {ref.get('image_id')} / ann_id {ref.get('ann_id')} not in {ann_path}")
            image = find_image(dirs, str(im.get("file_name")))
            w, h = im.get("width"), im.get("height")
            if (w, h) != image_size(image):
                raise InputError(f"{ann_path} says {w}x{h}, {image} is {'x'.join(map(str, image_size(image)))}")
            box = xywh_box(ann.get("bbox"), w, h, f"annotation {ann.get('id')} bbox")
            examples = _examples(where, image, box, w, h, _expressions(ref.get("sentences"), "sentences"), ref,
                                 prompt, source.texts)
        except InputError as e:
            yield where, e
            continue
        yield from examples


def _examples(where, image, box, w, h, texts, row, prompt, which) -> list:
    """(where, record) per expression of one referred object ("first": the first expression only)."""
    locs, each = box_to_locs(box, w, h), which != "first" and len(texts) > 1
    return [(f"{where} expression {k + 1}" if each else where, {
        "image": image, "prefix": fill(prompt, {**row, "expression": text}), "suffix": f"{locs} {text}",
        "references": list(box)}) for k, text in enumerate(texts if which != "first" else texts[:1])]


def _expressions(value, name: str) -> list[str]:
    """A row's expressions: a string, a list of strings, or refer's [{"sent": ..., "raw": ...}]."""
    items = value if isinstance(value, list) else [value]
    texts = [v.get("sent", v.get("raw")) if isinstance(v, dict) else v for v in items]
    if not texts:
        raise InputError(f"{name!r} is empty: no expression")
    return [check_label(t, f"{name!r}") for t in texts]


def _image(value, dirs, base):
    """A file found in the image folders, or (rows of a Hugging Face dataset) bytes / a path / a PIL image."""
    if dirs is not None and isinstance(value, str):
        return find_image(dirs, value)
    from .hf import image_value
    return image_value(value, base)


def _in_split(row, split) -> bool:
    return split is None or not isinstance(row, dict) or row.get("split") == split


def _jsonl(source):
    """(rows, the keys of the first row) of a JSONL file of flat rows; a line that is not JSON is a bad row."""
    if not os.path.isfile(source.path):
        raise DataError(f"Data file not found: {source.path}")
    rows = []
    with open(source.path, encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    row = InputError(f"not valid JSON ({e.msg} at column {e.colno})")
                if isinstance(row, InputError) or _in_split(row, source.split):
                    rows.append((f"{source.path}:{i}", row, None))
    first = next((r for _, r, _ in rows if isinstance(r, dict)), {})
    return rows, set(first)
