"""YOLO boxes → `detect a ; b` examples: images/ + labels/*.txt lines "class cx cy w h" (normalized).

The layout Ultralytics reads (docs.ultralytics.com/datasets/detect): a data.yaml with `path` (the root;
relative to the yaml's folder here), `train` / `val` / `test` (an image folder, a list of them, or a
.txt list of image paths) and `names` (a list, or a map 0: name); each image's labels at the same path
with /images/ → /labels/ and the extension → .txt (Ultralytics' img2label_paths); no label file means
no objects. Without a data.yaml: a folder with images/ (or images/<split>/) and labels/, and the names in
--class-names or classes.txt. The small YAML subset data.yaml files use is parsed here (no dependency).
"""
from __future__ import annotations

import os

from ..formats.images import InputError
from .coco import check_classes, detection_record
from ..tasks.detection import box_to_locs
from .common import DataError, check_fields, check_label, image_size, pixel_box

IMAGE_EXTENSIONS = (".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")


def records(source, parsed=None):
    """(where, record or InputError) per image with at least one box of a named class."""
    split = source.split or ("val" if source.evaluation else "train")
    yaml_path = source.path if source.path.endswith((".yaml", ".yml")) else next(
        (os.path.join(source.path, n) for n in ("data.yaml", "dataset.yaml")
         if os.path.isfile(os.path.join(source.path, n))), None)
    if yaml_path is not None:
        names, images = _from_yaml(yaml_path, split, source)
    else:
        names, images = _from_folder(source, split)
    named = check_classes(source.classes, names, source.path)
    check_fields(source.prompt or "detect {classes}", ("classes",), source.path)
    for image in images:
        label = os.path.splitext(f"{os.sep}labels{os.sep}".join(image.rsplit(f"{os.sep}images{os.sep}", 1)))[0] + ".txt"
        where = label if os.path.isfile(label) else image
        try:
            w, h = image_size(image)
            objects = []
            for label_name, box in _boxes(label, names, w, h):
                objects.append((label_name, box, box_to_locs(box, w, h)))
        except InputError as e:
            yield where, e
            continue
        record = detection_record(image, objects, names, named, source.prompt)
        if record is not None:
            yield where, record


def _boxes(label: str, names: list[str], w: int, h: int):
    """(class name, (x0, y0, x1, y1) pixels) per line of a label file (none when it does not exist)."""
    if not os.path.isfile(label):
        return
    with open(label, encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    for n, line in enumerate(lines, 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 5:
            raise InputError(f"line {n}: expected 'class cx cy w h' (5 numbers), got {len(parts)} (polygon labels of "
                             "YOLO segmentation are not boxes)")
        try:
            cls, (cx, cy, bw, bh) = int(parts[0]), (float(p) for p in parts[1:])
        except ValueError:
            raise InputError(f"line {n}: {line.strip()!r} is not an integer class and 4 numbers") from None
        if not 0 <= cls < len(names):
            raise InputError(f"line {n}: class {cls} is not among the {len(names)} names")
        if not all(0.0 <= v <= 1.0 for v in (cx, cy, bw, bh)):
            raise InputError(f"line {n}: {line.strip()!r}: coordinates must be normalized to 0..1 (box outside the "
                             "image)")
        box = ((cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h)
        yield names[cls], pixel_box(box, w, h, f"line {n}: box {[cx, cy, bw, bh]} (cx cy w h)")


def _from_yaml(path: str, split: str, source):
    if not os.path.isfile(path):
        raise DataError(f"Data file not found: {path}")
    with open(path, encoding="utf-8", errors="replace") as f:
        cfg = parse_yaml(f.read(), path)
    names = cfg.get("names")
    if isinstance(names, dict):
        if sorted(names) != list(range(len(names))):
            raise DataError(f"{path}: names must be numbered 0..{len(names) - 1}, got {sorted(names)}")
        names = [names[i] for i in range(len(names))]
    if source.class_names:
        names = _names_file(source.class_names)
    if not isinstance(names, list) or not names:
        raise DataError(f"{path}: no 'names' list of classes (or pass --class-names FILE)")
    names = _checked(names, path)
    here = os.path.dirname(os.path.abspath(path))
    root = os.path.join(here, cfg["path"]) if isinstance(cfg.get("path"), str) else here
    root = root if os.path.isdir(root) else here
    entry = cfg.get(split)
    if entry is None:
        present = ", ".join(k for k in ("train", "val", "test") if k in cfg)
        flag = "--eval-split" if source.evaluation else "--split"
        raise DataError(f"{path}: no {split!r} entry (splits: {present}); choose one with {flag}")
    images = []
    for item in entry if isinstance(entry, list) else [entry]:
        images += _images(os.path.join(root, str(item)), path)
    return names, images


def _from_folder(source, split: str):
    root = source.path
    if not os.path.isdir(os.path.join(root, "images")):
        raise DataError(f"{root}: not a YOLO dataset (no data.yaml, no images/ folder)")
    names_file = source.class_names or os.path.join(root, "classes.txt")
    if not os.path.isfile(names_file):
        raise DataError(f"{root}: no data.yaml and no classes.txt: pass --class-names FILE (one class a line)")
    folder = os.path.join(root, "images", split)
    return _checked(_names_file(names_file), names_file), _images(folder if os.path.isdir(folder) else
                                                                   os.path.join(root, "images"), root)


def _images(where: str, origin: str) -> list[str]:
    """Image files under a folder (sorted), or listed one a line in a .txt file (relative to it)."""
    if where.endswith(".txt") and os.path.isfile(where):
        with open(where, encoding="utf-8") as f:
            base = os.path.dirname(where)
            return [os.path.normpath(os.path.join(base, line.strip())) for line in f if line.strip()]
    if not os.path.isdir(where):
        raise DataError(f"{origin}: image folder {where} does not exist")
    return sorted(os.path.join(d, f) for d, _, files in os.walk(where) for f in files
                  if f.lower().endswith(IMAGE_EXTENSIONS))


def _names_file(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise DataError(f"--class-names {path}: file not found")
    with open(path, encoding="utf-8", errors="replace") as f:
        return [line.strip() for line in f if line.strip()]


def _checked(names: list, path: str) -> list[str]:
    try:
        return [check_label(n, f"class {i} name") for i, n in enumerate(names)]
    except InputError as e:
        raise DataError(f"{path}: {e}") from None


def parse_yaml(text: str, path: str) -> dict:
    """The top-level `key: value` pairs of a data.yaml: scalars, flow lists [a, b], and blocks of
    `- item` or `0: item` lines under a key with no value. Other blocks (`download: |`) are skipped."""
    out, key = {}, None
    for n, raw in enumerate(text.splitlines(), 1):
        line = _uncomment(raw).rstrip()
        if not line.strip():
            continue
        if not line[0].isspace():
            key, sep, value = (part.strip() for part in line.partition(":"))
            if not sep:
                raise DataError(f"{path}:{n}: expected `key: value`, got {raw.strip()!r}")
            out[key] = _value(value, path, n) if value not in ("|", ">", "|-", ">-") else None
            key = key if value == "" else None                # a block of items follows
        elif key is not None:
            item = line.strip()
            if item.startswith("- ") or item == "-":
                out[key] = (out[key] if isinstance(out[key], list) else []) + [_scalar(item[1:].strip())]
            elif ":" in item:
                k, _, v = (part.strip() for part in item.partition(":"))
                k = int(k) if k.isdigit() else _scalar(k)
                out[key] = {**(out[key] if isinstance(out[key], dict) else {}), k: _scalar(v)}
            else:
                raise DataError(f"{path}:{n}: expected '- item' or 'key: item' under {key!r}, got {item!r}")
    return out


def _value(text: str, path: str, n: int):
    if text == "":
        return None
    if text.startswith("["):
        if not text.endswith("]"):
            raise DataError(f"{path}:{n}: a [list] must close on its line")
        return [_scalar(t) for t in _split_commas(text[1:-1]) if t.strip()]
    return _scalar(text)


def _scalar(text: str):
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return int(text) if text.lstrip("-").isdigit() else text


def _split_commas(text: str) -> list[str]:
    parts, quote, start = [], None, 0
    for i, c in enumerate(text):
        if c in "'\"" and quote in (None, c):
            quote = None if quote else c
        elif c == "," and quote is None:
            parts.append(text[start:i])
            start = i + 1
    return parts + [text[start:]]


def _uncomment(line: str) -> str:
    """The line up to a '#' that starts a comment (at the start or after a space, outside quotes)."""
    quote = None
    for i, c in enumerate(line):
        if c in "'\"" and quote in (None, c):
            quote = None if quote else c
        elif c == "#" and quote is None and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line
