"""The model's input (PaliGemma paper §3.2): images and text laid out as one sequence per row,

    [<pad> …]  [<image>]×P·n  [BOS] sp(prompt + "\\n")  sp(suffix) [EOS]
    left pads  └────── prefix: full attention ───────┘  └─ suffix: causal┘

P image tokens for each of the row's n images. Rows are padded on the left (as transformers'
tokenizer pads), so every row ends at the same index (docs/sequence.md#token-layout). `prefix_ids`
and `suffix_ids` build the two parts; token_type_ids is 1 on the suffix and EOS, which is what the
prefix-LM mask (masking.py) reads.
Images: any PIL mode → RGB (formats/images.py) → squash to S×S with PIL bicubic on uint8 → ×1/255
(float64, then float32) → (x-0.5)/0.5 (docs/files.md#image-preprocessing, transformers
`SiglipImageProcessorPil`). The tokenizer is the checkpoint's own `tokenizer.model`, read with
sentencepiece (no transformers). Two of big_vision's differences are switches, defaulting to
transformers: `Processor.separator` ("\\n" tokenized on its own) and `Processor.image_resize`
(bilinear, re-quantized to uint8).
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from .formats.images import InputError, load_image, to_rgb


class Processor:
    """Turns images and prompts into the tensors `PaliGemma.forward` takes, and ids back into text."""

    separator: str = "joint"
    """How the "\\n" ending the prefix is tokenized (docs/sequence.md#separator, docs/disagreements.md #4).
    "joint" (default): transformers, sp.encode(prompt + "\\n").
    "separate": big_vision, sp.encode(prompt) + sp.encode("\\n").
    They differ only where SentencePiece merges the "\\n" into the prompt's tail, e.g. a prompt that already
    ends in "\\n" with Gemma's "\\n\\n" piece."""

    image_resize: str = "bicubic"
    """How an image is squashed to S×S (docs/files.md#image-preprocessing, docs/disagreements.md #3).
    "bicubic" (default): transformers (PIL bicubic on uint8, its PIL backend bit for bit).
    "bilinear": big_vision's pp `resize(S)` (bilinear, antialias=False, the pp default), clipped and cast back
      to uint8 (a truncation), then `value_range(-1, 1)`. Emulated with torch's bilinear interpolate, whose
      half-pixel centres are TF2's; equal up to float rounding at the truncation.
    "bilinear_antialias": the same with antialias=True (big_vision's forkme config), via torch's antialiased
      bilinear (a triangle filter widened by the scale, as TF's); not compared bit for bit with TensorFlow.
    Colour conversion is transformers' in every mode (alpha over white; big_vision's decoder drops alpha)."""

    allow_text_only: bool = False
    """Whether a row may have no image. The released models were never trained that way, so by default
    it is refused; a row's images may otherwise number one or more (each image its own <image> block)."""

    def __init__(self, tokenizer_path: str, image_size: int, num_image_tokens: int, image_token_id: int,
                 bos_id: int = 2, eos_id: int = 1, pad_id: int = 0, image_resize: str = "bicubic",
                 separator: str = "joint"):
        if image_resize not in IMAGE_RESIZES:
            raise InputError(f"image_resize must be one of {IMAGE_RESIZES}, got {image_resize!r}")
        if separator not in ("joint", "separate"):
            raise InputError(f"separator must be 'joint' (transformers) or 'separate' (big_vision), got {separator!r}")
        self.image_resize, self.separator = image_resize, separator
        self.sp = load_sentencepiece(tokenizer_path)
        self.image_size, self.num_image_tokens = image_size, num_image_tokens
        self.image_token_id, self.bos_id, self.eos_id, self.pad_id = image_token_id, bos_id, eos_id, pad_id
        self.loc0 = self._first_id("<loc{:04d}>", 1024)
        self.seg0 = self._first_id("<seg{:03d}>", 128)

    @classmethod
    def for_model(cls, tokenizer_path: str, cfg, **switches) -> "Processor":
        """The processor of a model config (a PaliGemmaConfig): its image size, image token count and ids,
        refusing a tokenizer that does not fit the model's embedding (`check_fits`)."""
        processor = cls(tokenizer_path, cfg.vision.image_size, cfg.num_image_tokens, cfg.image_token_id,
                        cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id, **switches)
        processor.check_fits(cfg.text.vocab_size, tokenizer_path)
        return processor

    def prefix_ids(self, prompt: str, num_images: int = 1) -> list[int]:
        """The prefix: an <image> block per image, BOS, then the prompt and the "\\n" that ends it
        (docs/sequence.md#separator). Every prefix token sees every other one."""
        if self.separator == "joint":
            text = self.sp.encode(prompt + "\n")
        else:
            text = self.sp.encode(prompt) + self.sp.encode("\n")
        return [self.image_token_id] * (self.num_image_tokens * num_images) + [self.bos_id] + text

    def suffix_ids(self, suffix: str) -> list[int]:
        """The suffix: no BOS, no dummy-prefix space, not glued to the "\\n", then EOS
        (docs/sequence.md#token-layout: "beach" → 54901). Each suffix token sees the prefix and those before it."""
        return self.sp.encode(suffix) + [self.eos_id]

    def __call__(self, images: Sequence, prompts: Sequence[str], suffixes: Sequence[str] | None = None,
                 max_length: int | None = None) -> dict[str, torch.Tensor]:
        """images: one image (path or PIL) per prompt, or a list of images per prompt (several images,
        or video frames: their <image> blocks follow one another before BOS, as transformers lays out
        repeated <image> tokens; they all belong to the one bidirectional prefix)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(images, (list, tuple)):
            images = [images]
        if not prompts:
            raise InputError("Got no prompts: pass at least one image and one prompt")
        if len(images) != len(prompts):
            raise InputError(f"Got {len(images)} images (or image lists) for {len(prompts)} prompts")
        if suffixes is not None and len(suffixes) != len(prompts):
            raise InputError(f"Got {len(suffixes)} suffixes for {len(prompts)} prompts")
        rows, types, pixels = [], [], []
        for i, (imgs, prompt) in enumerate(zip(images, prompts)):
            imgs = list(imgs) if isinstance(imgs, (list, tuple)) else [imgs]
            if not imgs and not self.allow_text_only:
                raise InputError(f"Prompt {i} has no image; PaliGemma answers about images (set "
                                 "processor.allow_text_only = True to run the decoder on text alone)")
            if not isinstance(prompt, str):
                raise InputError(f"Prompt {i} is a {type(prompt).__name__}, expected a string")
            pixels += [preprocess_image(im, self.image_size, self.image_resize) for im in imgs]
            ids = self.prefix_ids(prompt, len(imgs))
            suffix = self.suffix_ids(suffixes[i]) if suffixes is not None else []
            if max_length is not None and len(ids) + len(suffix) > max_length:
                raise InputError(f"Prompt {i} is {len(ids) + len(suffix)} tokens ({len(imgs)} image(s) × "
                                 f"{self.num_image_tokens} + text); the limit is {max_length}")
            rows.append(ids + suffix)
            types.append([0] * len(ids) + [1] * len(suffix))
        T = max(len(r) for r in rows)
        pad = [T - len(r) for r in rows]
        return {
            "input_ids": torch.tensor([[self.pad_id] * p + r for p, r in zip(pad, rows)]),
            "attention_mask": torch.tensor([[0] * p + [1] * len(r) for p, r in zip(pad, rows)]),
            "token_type_ids": torch.tensor([[0] * p + t for p, t in zip(pad, types)]),
            "pixel_values": torch.stack(pixels) if pixels else torch.zeros(0, 3, self.image_size, self.image_size),
        }

    def decode(self, ids) -> str:
        """Text of generated ids, dropping <pad>/<bos>/<eos>/<image> (keeps <loc>/<seg>, as transformers).

        Ids past the tokenizer (`<image>` and the 64 padding rows of the 257216-row embedding,
        docs/variants.md#vocabulary-size) have no text and are dropped too; a sampled answer can contain
        them."""
        special = (self.pad_id, self.bos_id, self.eos_id, self.image_token_id)
        n = self.sp.get_piece_size()
        ids = [int(i) for i in ids if int(i) not in special and 0 <= int(i) < n]
        return self.sp.decode(ids)

    # ---- the vocabulary: a tokenizer that fits the model, and the ids of <loc> / <seg> ----

    def check_fits(self, vocab_size: int, name: str) -> None:
        """A tokenizer of another model loads fine and answers in the wrong words: refuse one whose pieces
        outnumber the embedding's rows, whose <loc>/<seg> ids fall past them, or whose own `<image>` piece
        (PaliGemma's tokenizer.model has none: docs/files.md#token-ids) is not the model's image id."""
        n, problems = self.sp.get_piece_size(), []
        if n > vocab_size:
            problems.append(f"it has {n} pieces, the model's embedding {vocab_size} rows")
        for what, first, count in (("<loc0000>..<loc1023>", self.loc0, 1024), ("<seg000>..<seg127>", self.seg0, 128)):
            if first is not None and first + count > vocab_size:
                problems.append(f"its {what} ids {first}..{first + count - 1} pass the {vocab_size} embedding rows")
        image = self.sp.piece_to_id("<image>")
        if image != self.sp.unk_id() and image != self.image_token_id:
            problems.append(f"its <image> piece is id {image}, the model's image token id {self.image_token_id}")
        elif image == self.sp.unk_id() and self.image_token_id < n:
            problems.append(f"the model's image token id {self.image_token_id} is its text piece "
                            f"{self.sp.id_to_piece(self.image_token_id)!r}")
        if problems:
            raise InputError(f"{name} does not fit this model: " + "; ".join(problems))

    def _first_id(self, fmt: str, count: int) -> int | None:
        """Id of <loc0000> / <seg000>; None if the tokenizer lacks them. The rest must follow
        consecutively (docs/files.md#token-ids), which is what lets `loc_token_id` be an addition."""
        first = self.sp.piece_to_id(fmt.format(0))
        if first == self.sp.unk_id():
            return None
        if any(self.sp.piece_to_id(fmt.format(k)) != first + k for k in range(count)):
            raise InputError(f"Tokenizer pieces {fmt.format(0)}..{fmt.format(count - 1)} are not consecutive ids")
        return first

    def loc_token_id(self, k: int) -> int:
        return self.loc0 + k

    def seg_token_id(self, k: int) -> int:
        return self.seg0 + k


# ---- images and the tokenizer file ----

IMAGE_RESIZES = ("bicubic", "bilinear", "bilinear_antialias")  # see Processor.image_resize


def preprocess_image(image, size: int, resize: str = "bicubic") -> torch.Tensor:
    """(3, size, size) float32 in [-1, 1]. resize "bicubic": bit-identical to transformers' PIL backend;
    "bilinear" / "bilinear_antialias": big_vision's pp ops (see `Processor.image_resize`)."""
    if resize not in IMAGE_RESIZES:
        raise InputError(f"image_resize must be one of {IMAGE_RESIZES}, got {resize!r}")
    im = to_rgb(load_image(image))
    if resize == "bicubic":
        im = im.resize((size, size), resample=Image.Resampling.BICUBIC)
        x = (np.asarray(im, dtype=np.uint8).astype(np.float64) * (1 / 255)).astype(np.float32)  # (S, S, 3)
        x = (x - np.float32(0.5)) / np.float32(0.5)
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))
    # big_vision `resize`: tf.image.resize (bilinear, half-pixel centres = torch's align_corners=False),
    # then clip and tf.cast back to uint8, which truncates; then `value_range(-1, 1)`: x/255·2 − 1 in fp32.
    x = torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1)[None].float()      # (1, 3, h, w)
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                                        antialias=resize == "bilinear_antialias")
    x = x.clamp(0, 255).trunc()[0]                                                           # (3, S, S) uint8 values
    return -1.0 + (x / 255.0) * 2.0


def load_sentencepiece(path: str):
    """A SentencePiece model from its file, with one clear error for a missing or foreign file."""
    import sentencepiece as spm

    if not os.path.isfile(path):
        raise InputError(f"Tokenizer file not found: {path}")
    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(path)
    except (OSError, RuntimeError) as e:
        raise InputError(f"{path} is not a SentencePiece model ({e})") from None
    return sp
