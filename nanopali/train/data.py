"""Fine-tuning data: JSONL, other datasets (or in-memory) examples → validated examples → prefix-LM batches.

One example is an image (or a list of images), a prefix (the task prompt: "caption en", "detect cat")
and a suffix (the target text), as big_vision's transfer configs and transformers' processor take them
(PaliGemma paper §3.2: the model sees [image] [BOS prefix \\n] and learns [suffix EOS]). In a JSONL file:

    {"image": "imgs/0001.jpg", "prefix": "detect cat", "suffix": "<loc0100><loc0200><loc0900><loc0800> cat"}

Relative image paths are relative to the JSONL file; "image" may be a list for multi-image prompts; an
optional "references" list (all captions, all answers, the box) is kept for scoring. Other datasets
(Hugging Face, COCO, VQA, RefCOCO, YOLO) arrive as a `nanopali.datasets.DataSource`, whose readers turn
rows into the same records (docs/datasets.md). In a notebook the same dicts may be passed as a list,
with PIL images in place of paths. Every example is checked before training (keys, image readable,
length within max_seq_len) and bad ones are reported with their line number (or row, or id); training
stops there unless skip_bad, which drops them and counts them.

Which examples a step reads is a pure function of (seed, step), so the data order needs no state
of its own to resume exactly: see `DataOrder`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from ..datasets import DataError, DataSource, read
from ..datasets.jsonl import read_jsonl
from ..processing import InputError, Processor, load_image

REQUIRED_KEYS = ("image", "prefix", "suffix")
__all__ = ["DataError", "DataOrder", "DataSource", "Dataset", "Example", "collate", "load_examples"]


@dataclass
class Example:
    images: list                 # paths (absolute) or PIL images
    prefix: str
    suffix: str
    where: str                   # "train.jsonl:12" or "examples[3]", for messages
    num_targets: int = 0         # supervised tokens: suffix + EOS
    num_tokens: int = 0          # sequence length: image tokens + BOS + prefix + \n + suffix + EOS
    references: list | None = None   # what scoring compares with, when more than the suffix (docs/datasets.md)


@dataclass
class Dataset:
    examples: list[Example]
    skipped: list[str] = field(default_factory=list)   # one message per bad line that was dropped

    def __len__(self):
        return len(self.examples)


def _parse(record, where: str, base_dir: str | None) -> Example:
    if not isinstance(record, dict):
        raise InputError(f"expected a JSON object with keys {', '.join(REQUIRED_KEYS)}, got {type(record).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in record]
    if missing:
        raise InputError(f"missing key(s) {', '.join(repr(k) for k in missing)}")
    for k in ("prefix", "suffix"):
        if not isinstance(record[k], str):
            raise InputError(f"{k!r} must be a string, got {type(record[k]).__name__}")
    images = record["image"] if isinstance(record["image"], list) else [record["image"]]
    if not images:
        raise InputError("'image' is an empty list")
    resolved = []
    for im in images:
        if isinstance(im, str) and base_dir is not None and not os.path.isabs(im):
            im = os.path.join(base_dir, im)
        if not isinstance(im, (str, Image.Image)):
            raise InputError(f"'image' must be a path or a PIL image (or a list of them), got {type(im).__name__}")
        resolved.append(im)
    references = record.get("references")
    if references is not None and not isinstance(references, list):
        raise InputError(f"'references' must be a list, got {type(references).__name__}")
    return Example(resolved, record["prefix"], record["suffix"], where, references=references)


def _records(source):
    """(where, record or the exception that stopped its parsing, base_dir) for a JSONL path, a
    DataSource or a list of dicts."""
    if isinstance(source, DataSource):
        try:
            yield from read(source)
        except InputError as e:  # a reader's row error that escaped its row: still one clean message
            raise DataError(f"{source.path}: {e}") from None
    elif isinstance(source, (str, os.PathLike)):
        yield from read_jsonl(source)
    else:
        for i, record in enumerate(source):
            yield f"examples[{i}]", record, None


def load_examples(source, processor: Processor, max_seq_len: int | None = None, skip_bad: bool = False) -> Dataset:
    """Parse and validate every example of a JSONL file (a path), a `DataSource` (any format of
    nanopali.datasets) or a list of dicts (every image is decoded once, so a truncated file is caught
    here and not at step 10,000).

    Bad examples raise one DataError listing them all (up to 20) with their line numbers, or are
    dropped and listed in `Dataset.skipped` when skip_bad."""
    good, bad = [], []
    for where, record, base_dir in _records(source):
        try:
            if isinstance(record, Exception):
                raise record
            ex = _parse(record, where, base_dir)
            for im in ex.images:
                load_image(im)
            prompt = processor.prefix_ids(ex.prefix, len(ex.images))
            ex.num_targets = len(processor.suffix_ids(ex.suffix))
            ex.num_tokens = len(prompt) + ex.num_targets
            if max_seq_len is not None and ex.num_tokens > max_seq_len:
                raise InputError(f"{ex.num_tokens} tokens ({len(ex.images)} image(s) x {processor.num_image_tokens} "
                                 f"+ {len(prompt) - len(ex.images) * processor.num_image_tokens} prefix + "
                                 f"{ex.num_targets} suffix) exceed --max-seq-len {max_seq_len} (default: the "
                                 "model's positions)")
            good.append(ex)
        except InputError as e:
            bad.append(f"{where}: {e}")
    if bad and not skip_bad:
        shown = "\n  ".join(bad[:20]) + (f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else "")
        raise DataError(f"{len(bad)} bad example(s) (fix them, or pass --skip-bad to drop them):\n  {shown}")
    if not good:
        name = source.path if isinstance(source, DataSource) else source if isinstance(source, str) else None
        raise DataError(f"No usable examples in {name or 'the example list'}")
    return Dataset(good, bad)


def collate(examples: list[Example], processor: Processor) -> dict:
    """The processor's batch (input_ids, attention_mask, token_type_ids, pixel_values), left-padded."""
    return processor(images=[ex.images for ex in examples], prompts=[ex.prefix for ex in examples],
                     suffixes=[ex.suffix for ex in examples])


class DataOrder:
    """Which examples each optimizer step reads, as a pure function of (seed, step).

    The examples form an endless stream of epochs, each a fresh permutation seeded by (seed, epoch);
    step s (1-based) reads stream positions [(s-1)·G, s·G) with G = batch · accumulation · world size.
    Within a step, micro-batch k of rank r is slice (k·W + r)·B : (k·W + r + 1)·B, so the union over
    ranks of micro-batch k is exactly what one process with batch W·B would read. Resuming at step s
    therefore needs only s (and the same seed and data): nothing else to save.
    """

    def __init__(self, num_examples: int, seed: int):
        self.n, self.seed = num_examples, seed
        self._epoch, self._perm = None, None

    def _at(self, pos: int) -> int:
        epoch = pos // self.n
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return int(self._perm[pos % self.n])

    def step(self, step: int, batch: int, accum: int = 1, world: int = 1, rank: int = 0) -> list[list[int]]:
        """Example indices of each of this rank's `accum` micro-batches of step `step`."""
        G = batch * accum * world
        start = (step - 1) * G
        return [[self._at(start + (k * world + rank) * batch + j) for j in range(batch)] for k in range(accum)]

    def step_all(self, step: int, batch: int, accum: int = 1, world: int = 1) -> list[int]:
        """Every example index of step `step`, all ranks together."""
        G = batch * accum * world
        return [self._at((step - 1) * G + j) for j in range(G)]
