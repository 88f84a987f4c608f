"""COCO annotation files: captions → `caption en` examples, instances → `detect a ; b` examples.

Both are the released JSON (cocodataset.org/#format-data): "images" [{"id", "file_name", "width",
"height"}] and "annotations" [{"id", "image_id", ...}], with "caption" in a captions file and "bbox"
[x, y, w, h] + "category_id" (and "categories" [{"id", "name"}]) in an instances file. Captions follow
big_vision's cococap transfer (prefix "caption en", a caption as the suffix: it draws one at random per
epoch, we make one example per caption or take the first); every caption of the image is kept as
`references` for CIDEr. Instances become multi-object detection (docs/datasets.md#detection).
"""
from __future__ import annotations

import os
import re
from collections import defaultdict

from ..formats.images import InputError
from ..tasks.detection import box_to_locs
from .common import (DataError, check_fields, check_label, detection_suffix, fill, find_image, image_dirs,
                     image_size, read_json, xywh_box)


def coco_kind(obj, path: str) -> str:
    """"captions" or "instances", from what the annotations carry; a DataError for anything else."""
    if not (isinstance(obj, dict) and isinstance(obj.get("images"), list) and isinstance(obj.get("annotations"), list)):
        raise DataError(f"{path}: not a COCO annotation file (expected an object with 'images' and 'annotations' "
                        "lists)")
    first = next((a for a in obj["annotations"] if isinstance(a, dict)), {})
    if "caption" in first:
        return "captions"
    if "bbox" in first or ("categories" in obj and not obj["annotations"]):
        return "instances"
    raise DataError(f"{path}: COCO annotations with neither 'caption' nor 'bbox' (keys: {', '.join(sorted(first))})")


def _subset(path: str) -> list[str]:
    """The image folder a COCO file names: captions_train2017.json → train2017 (also under images/)."""
    m = re.search(r"_([A-Za-z]+\d{4})\.json$", path)
    return [m.group(1), os.path.join("images", m.group(1))] if m else []


def _open(source, parsed, want: str):
    obj = parsed if parsed is not None else read_json(source.path, "COCO file")
    kind = coco_kind(obj, source.path)
    if kind != want:
        other = {"captions": "coco-captions", "instances": "coco-instances"}[kind]
        raise DataError(f"{source.path} is a COCO {kind} file, not {want} (its annotations have "
                        f"{'a caption' if kind == 'captions' else 'boxes'}): read it with --data-format {other}")
    images = {im.get("id"): im for im in obj["images"] if isinstance(im, dict)}
    return obj, images, image_dirs(source.path, source.image_dir, _subset(source.path))


def _by_image(obj, path: str):
    """{image_id: [annotation, ...]} in file order, and (where, error) for annotations that are not objects."""
    groups, bad = defaultdict(list), []
    for i, a in enumerate(obj["annotations"]):
        if isinstance(a, dict) and "image_id" in a:
            groups[a["image_id"]].append(a)
        else:
            bad.append((f"{path}: annotations[{i}]", InputError("not an object with an 'image_id'")))
    return groups, bad


def _image(images: dict, image_id, dirs) -> tuple[str, dict]:
    im = images.get(image_id)
    if im is None:
        raise InputError(f"image_id {image_id!r} has no entry in 'images'")
    if not isinstance(im.get("file_name"), str):
        raise InputError("its 'images' entry has no 'file_name'")
    return find_image(dirs, im["file_name"]), im


def caption_records(source, parsed=None):
    """(where, record or InputError) per caption (texts "each") or per image (texts "first")."""
    obj, images, dirs = _open(source, parsed, "captions")
    groups, bad = _by_image(obj, source.path)
    yield from bad
    each = (source.texts or ("first" if source.evaluation else "each")) == "each"
    check_fields(source.prompt or "caption en", (), source.path)
    prefix = fill(source.prompt or "caption en", {})
    for image_id, anns in groups.items():
        where = f"{source.path}: image {image_id}"
        try:
            file, _ = _image(images, image_id, dirs)
            captions = [a.get("caption") for a in anns]
            if any(not isinstance(c, str) for c in captions):
                raise InputError(f"a caption is not a string (annotation {anns[0].get('id')})")
            captions = [c.strip() for c in captions if c.strip()]
            if not captions:
                raise InputError("every caption is empty")
        except InputError as e:
            yield where, e
            continue
        for k, caption in enumerate(captions if each else captions[:1]):
            yield (f"{where} caption {k + 1}" if each else where), {
                "image": file, "prefix": prefix, "suffix": caption, "references": captions}


def instance_records(source, parsed=None):
    """(where, record or InputError) per image with at least one box of a named class."""
    obj, images, dirs = _open(source, parsed, "instances")
    categories = {}
    for c in obj.get("categories", []):
        try:
            categories[c["id"]] = check_label(c.get("name"), f"category {c.get('id')} name")
        except (InputError, TypeError, KeyError, AttributeError) as e:
            raise DataError(f"{source.path}: 'categories' entry {c!r:.80}: {e}") from None
    order = [categories[k] for k in sorted(categories)]                  # category id order
    named = check_classes(source.classes, order, source.path)
    check_fields(source.prompt or "detect {classes}", ("classes",), source.path)
    groups, bad = _by_image(obj, source.path)
    yield from bad
    for image_id, im in images.items():
        where = f"{source.path}: image {image_id}"
        try:
            file, im = _image(images, image_id, dirs)
            w, h = im.get("width"), im.get("height")
            if (w, h) != image_size(file):
                raise InputError(f"'images' says {w}x{h}, {file} is {'x'.join(map(str, image_size(file)))}")
            objects = []
            for a in groups.get(image_id, []):
                if a.get("iscrowd"):                 # a crowd region, not one object: COCOeval ignores it too
                    continue
                label = categories.get(a.get("category_id"))
                if label is None:
                    raise InputError(f"annotation {a.get('id')}: category_id {a.get('category_id')!r} is not in "
                                     "'categories'")
                box = xywh_box(a.get("bbox"), w, h, f"annotation {a.get('id')} bbox")
                objects.append((label, box, box_to_locs(box, w, h)))
        except InputError as e:
            yield where, e
            continue
        record = detection_record(file, objects, order, named, source.prompt)
        if record is not None:
            yield where, record


def check_classes(classes, order: list[str], path: str):
    """--classes, checked against the dataset's class names (a typo would silently train on nothing)."""
    if classes is None:
        return None
    unknown = [c for c in classes if c not in order]
    if unknown:
        raise DataError(f"--classes {', '.join(unknown)}: not among the classes of {path} ({', '.join(order)})")
    return list(classes)


def detection_record(image, objects, order: list[str], named, prompt: str | None):
    """The `detect a ; b` record of one image, or None when the prefix would name no class.
    objects: (label, (x0, y0, x1, y1), locs); named: --classes, or None for the classes present."""
    classes = named or [c for c in order if any(o[0] == c for o in objects)]
    if not classes:
        return None
    suffix, kept = detection_suffix(objects, classes)
    return {"image": image, "prefix": fill(prompt or "detect {classes}", {"classes": " ; ".join(classes)}),
            "suffix": suffix, "references": [{"label": label, "box": list(box)} for label, box, _ in kept]}
