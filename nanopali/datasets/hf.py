"""Hugging Face `datasets` → records: a save_to_disk folder, parquet / arrow / JSON / CSV files, or a hub name.

`--columns` maps roles to columns (image, prefix, suffix, references; default: the role's own name), or
`--prompt` builds the prefix from columns ("answer en {question}"). A suffix column holding a list (a
VQA dataset's answers) gives the most frequent answer as the suffix and the list as `references`, as the
VQA reader does. Images arrive as {"bytes", "path"} (the Image feature read with decode=False, so the
size limit of formats/images.py applies before any pixel is decoded), a path, or a PIL image. The
`datasets` package is imported here only, when such a source is read (pip install 'nanopali[datasets]').
"""
from __future__ import annotations

import io
import os

from PIL import Image, UnidentifiedImageError

from ..formats.images import InputError, load_image
from .common import DataError, answer_list, check_fields, fill, majority

SAVED = ("dataset_info.json", "dataset_dict.json")
BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".json": "json", ".jsonl": "json", ".csv": "csv"}
EVAL_SPLITS = ("validation", "val", "test")


def _datasets():
    try:
        import datasets
    except ImportError:
        raise DataError("reading a Hugging Face dataset needs the `datasets` package: "
                        "pip install 'nanopali[datasets]'") from None
    return datasets


def open_split(source):
    """(the datasets.Dataset of the chosen split, its name for messages, the folder relative paths start from)."""
    datasets, path = _datasets(), source.path
    base = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    try:
        if os.path.isdir(path) and any(os.path.isfile(os.path.join(path, f)) for f in SAVED):
            ds = datasets.load_from_disk(path)
        elif os.path.isfile(path) and path.endswith(".arrow"):
            ds = datasets.Dataset.from_file(path)                    # memory-mapped where it lies
        elif os.path.isfile(path):
            builder = BUILDERS.get(os.path.splitext(path)[1])
            if builder is None:
                raise DataError(f"{path}: not a file `datasets` reads ({', '.join(BUILDERS)})")
            ds = datasets.load_dataset(builder, data_files=path)
        else:                                                        # a folder of data files, or a hub name
            split = source.split or (None if os.path.isdir(path) else "validation" if source.evaluation else "train")
            ds = datasets.load_dataset(path, split=split)
    except DataError:
        raise
    except Exception as e:  # datasets raises many kinds (FileNotFoundError, DatasetNotFoundError, ConnectionError...)
        what = "no such file or folder here, and no Hugging Face hub dataset of that name could be read" \
            if not os.path.exists(path) else "cannot be read as a Hugging Face dataset"
        raise DataError(f"{path}: {what} ({type(e).__name__}: {(str(e).splitlines() or [''])[0]})") from None
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds)
        split = source.split or (splits[0] if len(splits) == 1 else
                                 next((s for s in EVAL_SPLITS if s in ds), None) if source.evaluation else "train")
        if split not in ds:
            raise DataError(f"{path}: no split {split!r} (splits: {', '.join(splits)}); choose one with "
                            f"{'--eval-split' if source.evaluation else '--split'}")
        return ds[split], f"{path}[{split}]", base
    return ds, path, base


def rows(source):
    """(the dataset's columns, (where, row, base) for every row), image columns left undecoded."""
    datasets = _datasets()
    ds, name, base = open_split(source)
    for column, feature in ds.features.items():
        if isinstance(feature, datasets.Image) and feature.decode:
            ds = ds.cast_column(column, datasets.Image(decode=False))  # bytes: checked before decoding
    return ds.column_names, ((f"{name} row {i}", row, base) for i, row in enumerate(ds))


def image_value(value, base: str):
    """A path (absolute) or a PIL image from an image cell; a list of cells for several images."""
    if isinstance(value, list):
        return [image_value(v, base) for v in value]
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict) and value.get("bytes"):
        return _from_bytes(value["bytes"], value.get("path"))
    path = value.get("path") if isinstance(value, dict) else value
    if isinstance(path, str) and path:
        full = path if os.path.isabs(path) else os.path.join(base, path)
        if not os.path.isfile(full):
            raise InputError(f"image file not found: {full}")
        return full
    raise InputError(f"image cell holds neither bytes, a path nor a PIL image: {value!r:.80}")


def _from_bytes(data: bytes, name) -> Image.Image:
    """A decoded PIL image, its size checked (formats/images.py's limit) before its pixels are decoded."""
    name = name or "image bytes"
    try:
        im = Image.open(io.BytesIO(data))
        load_image(im)       # the size limit, from the header
        im.load()
    except Image.DecompressionBombError as e:
        raise InputError(f"{name} is too large: {e}") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise InputError(f"cannot read {name} as an image ({type(e).__name__}: {e})") from None
    return im


def records(source, parsed=None):
    """(where, record or InputError) per row, mapped by --columns / --prompt."""
    columns, it = rows(source)
    role = lambda name, *defaults: source.column(name, *(defaults or (name,)), available=columns)  # noqa: E731
    unknown = set(source.columns) - {"image", "prefix", "suffix", "references"}
    if unknown:
        raise DataError(f"--columns: unknown role(s) {', '.join(sorted(unknown))} for a Hugging Face dataset "
                        "(roles: image, prefix, suffix, references)")
    image_col, suffix_col, refs_col = role("image"), role("suffix"), role("references")
    needed = [image_col, suffix_col] + ([] if source.prompt else [role("prefix")])
    missing = [c for c in needed if c not in columns]
    if missing:
        raise DataError(f"{source.path}: no column {', '.join(map(repr, missing))} (columns: {', '.join(columns)}); "
                        "map them with --columns role=column, or give --prompt")
    if source.prompt:
        check_fields(source.prompt, columns, source.path)
    for where, row, base in it:
        try:
            image = image_value(row[image_col], base)
            prefix = fill(source.prompt, row) if source.prompt else row[role("prefix")]
            if not isinstance(prefix, str):
                raise InputError(f"prefix column {role('prefix')!r} holds {type(prefix).__name__}, expected a string")
            suffix, refs = row[suffix_col], row.get(refs_col) if refs_col in columns else None
            if isinstance(suffix, list):
                refs = answer_list(suffix, suffix_col) if refs is None else refs
                suffix = majority([a.strip() for a in answer_list(suffix, suffix_col) if a.strip()])
            if not isinstance(suffix, str):
                raise InputError(f"suffix column {suffix_col!r} holds {type(suffix).__name__}, expected a string "
                                 "or a list of answers")
            if refs is not None and not isinstance(refs, list):
                refs = [refs]
        except InputError as e:
            yield where, e
            continue
        yield where, {"image": image, "prefix": prefix, "suffix": suffix, "references": refs}
