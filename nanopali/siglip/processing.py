"""SigLIP / SigLIP 2 inputs, zero-shot classification and retrieval embeddings.

Text (transformers' SiglipTokenizer / Siglip2Tokenizer with the processors' settings; big_vision `tok`
with eos="sticky"): normalise → SentencePiece → truncate to L-1 ids → EOS → pad on the right with
the pad id to exactly L = 64 (the text tower's positions; the models were trained on full rows and
pool the last position, so the padding is part of the input). SigLIP's tokenizer is spiece.model
(T5's English vocab: pad = EOS = `</s>`), SigLIP 2's is Gemma's tokenizer.model (pad 0, EOS 1).
Images, fixed resolution (transformers `SiglipImageProcessor`, PIL backend): RGB → resize to S×S with
the checkpoint's PIL filter → ×1/255 → (x - mean) / std. NaFlex: the same at the size `naflex.naflex_size`
picks, then `naflex.patchify`. Zero-shot classification is transformers' pipeline: each label in
"This is a photo of {}.", probabilities = sigmoid(logits), not a softmax: labels do not compete.
"""
from __future__ import annotations

import re
import string
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..formats.images import InputError, load_image, to_rgb
from ..processing import load_sentencepiece
from .model import SigLIPModel
from .naflex import naflex_size, patchify

# Letters: I images, J texts, L text length, S image side, P patch slots.

TEXT_NORMALIZATIONS = ("siglip", "lower", "none")
TEMPLATE = "This is a photo of {}."   # transformers' zero-shot-image-classification default
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_text(text: str, how: str) -> str:
    if how == "siglip":  # transformers SiglipTokenizer.canonicalize_text
        return re.sub(r"\s+", " ", text.lower().translate(_PUNCTUATION)).strip()
    return text.lower() if how == "lower" else text


def image_array(image, size_hw: tuple[int, int], resample: int, mean, std, rescale: float = 1 / 255) -> np.ndarray:
    """(H, W, 3) float32: RGB, PIL resize on uint8 with filter `resample`, then transformers' rescale
    (in float64, cast to float32) and normalise (in float32), which this reproduces bit for bit."""
    im = to_rgb(load_image(image)).resize((size_hw[1], size_hw[0]), resample=resample)
    x = (np.asarray(im, dtype=np.uint8).astype(np.float64) * rescale).astype(np.float32)
    return (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)


class TwoTowerProcessor:
    """What the two-tower processors (SigLIP here, MobileCLIP in nanopali/mobileclip) share: the checks on
    a batch of images or texts, and one call for images, texts or both. Subclasses define `images(list)`
    and `texts(list)`."""

    @staticmethod
    def image_list(images) -> list:
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        if not images:
            raise InputError("Got no images")
        return images

    @staticmethod
    def text_list(texts) -> list[str]:
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise InputError("Got no texts")
        for j, t in enumerate(texts):
            if not isinstance(t, str):
                raise InputError(f"Text {j} is a {type(t).__name__}, expected a string")
        return texts

    def __call__(self, images=None, texts=None) -> dict[str, torch.Tensor]:
        if images is None and texts is None:
            raise InputError("Give images, texts or both")
        out = {}
        if images is not None:
            out.update(self.images(images))
        if texts is not None:
            out.update(self.texts(texts))
        return out


class SigLIPProcessor(TwoTowerProcessor):
    """Images and texts → the tensors `SigLIPModel.forward` takes."""

    text_normalization: str = "siglip"
    """What happens to a text before SentencePiece.
    "siglip": lowercase, ASCII punctuation removed, whitespace runs collapsed and stripped (transformers'
      SiglipTokenizer, the default for spiece.model checkpoints).
    "lower": lowercase only (SigLIP 2: big_vision's `lower` op in its demo and training, and transformers'
      Siglip2Tokenizer for NaFlex checkpoints; the default for Gemma tokenizer.model checkpoints).
    "none": the text as given (transformers' GemmaTokenizer, which SigLIP 2 fixed-resolution checkpoints
      load through, keeps case; big_vision's SigLIP 1 configs tokenize raw text)."""
    return_attention_mask: bool = False
    """False (the released tokenizer_config.json files: model_input_names ["input_ids"]; big_vision):
    pads are attended like tokens. True: also return a mask that hides them (transformers' tokenizers
    when a tokenizer_config asks for "attention_mask")."""

    def __init__(self, tokenizer_path: str, *, pad_token: str, eos_token: str, max_length: int = 64,
                 text_normalization: str = "siglip", return_attention_mask: bool = False,
                 image_size: tuple[int, int] = (224, 224), resample: int = Image.Resampling.BICUBIC,
                 mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), rescale: float = 1 / 255,
                 naflex: bool = False, patch_size: int = 16, max_num_patches: int = 256):
        if text_normalization not in TEXT_NORMALIZATIONS:
            raise InputError(f"text_normalization must be one of {TEXT_NORMALIZATIONS}, got {text_normalization!r}")
        self.sp = load_sentencepiece(tokenizer_path)
        self.pad_id, self.eos_id = (self._id(tokenizer_path, t) for t in (pad_token, eos_token))
        self.max_length = max_length
        self.text_normalization, self.return_attention_mask = text_normalization, return_attention_mask
        self.image_size, self.resample, self.mean, self.std, self.rescale = image_size, resample, mean, std, rescale
        self.naflex, self.patch_size, self.max_num_patches = naflex, patch_size, max_num_patches

    def _id(self, tokenizer_path: str, piece: str) -> int:
        i = self.sp.piece_to_id(piece)
        if self.sp.id_to_piece(i) != piece:
            raise InputError(f"{tokenizer_path} has no piece {piece!r} (the pad / EOS token)")
        return i

    def text_ids(self, text: str) -> list[int]:
        """The ids of one text, EOS included (kept when the text is truncated), before padding."""
        return self.sp.encode(normalize_text(text, self.text_normalization))[: self.max_length - 1] + [self.eos_id]

    def texts(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """input_ids (J, L) padded on the right, and attention_mask (J, L) if `return_attention_mask`."""
        rows = [self.text_ids(t) for t in self.text_list(texts)]
        pad = [self.max_length - len(r) for r in rows]
        out = {"input_ids": torch.tensor([r + [self.pad_id] * n for r, n in zip(rows, pad)])}
        if self.return_attention_mask:
            out["attention_mask"] = torch.tensor([[1] * len(r) + [0] * n for r, n in zip(rows, pad)])
        return out

    def images(self, images) -> dict[str, torch.Tensor]:
        images = self.image_list(images)
        if not self.naflex:
            x = [image_array(im, self.image_size, self.resample, self.mean, self.std, self.rescale) for im in images]
            return {"pixel_values": torch.from_numpy(np.stack(x).transpose(0, 3, 1, 2).copy())}  # (I, 3, S, S)
        patches, masks, grids = [], [], []
        for im in images:
            im = to_rgb(load_image(im))
            hw = naflex_size(im.height, im.width, self.patch_size, self.max_num_patches)
            x = image_array(im, hw, self.resample, self.mean, self.std, self.rescale)
            p, m, g = patchify(x, self.patch_size, self.max_num_patches)
            patches.append(p), masks.append(m), grids.append(g)
        return {"pixel_values": torch.from_numpy(np.stack(patches)),                # (I, P, p·p·3)
                "patch_mask": torch.from_numpy(np.stack(masks)),                      # (I, P)
                "grid_hw": torch.tensor(grids)}                                        # (I, 2)


def check_template(template: str, name: str = "template") -> None:
    """A zero-shot template holds exactly one `{}` where the label goes; other braces are doubled (`{{`)."""
    expected = f"{name} must hold exactly one '{{}}' where the label goes (a literal brace is written '{{{{' or '}}}}')"
    if not isinstance(template, str):
        raise InputError(f"{expected}, got a {type(template).__name__}")
    try:
        fields = [f[1:] for f in string.Formatter().parse(template) if f[1] is not None]
    except ValueError as e:   # a single brace: str.format would raise the same at the first label
        raise InputError(f"{expected}, got {template!r} ({e})") from None
    if fields != [("", "", None)]:       # (field name, format spec, conversion) of a bare {}
        raise InputError(f"{expected}, got {template!r}")


def _to(batch: dict, model: SigLIPModel) -> dict:
    dev = model.logit_scale.device
    return {k: v.to(dev) for k, v in batch.items()}


@torch.no_grad()
def embed_images(model: SigLIPModel, processor: SigLIPProcessor, images) -> torch.Tensor:
    """L2-normalised image embeddings (I, E) for retrieval: similarity = embed_images @ embed_texts.T."""
    return F.normalize(model.encode_images(**_to(processor.images(images), model)).float(), dim=-1)


@torch.no_grad()
def embed_texts(model: SigLIPModel, processor: SigLIPProcessor, texts) -> torch.Tensor:
    """L2-normalised text embeddings (J, E)."""
    return F.normalize(model.encode_texts(**_to(processor.texts(texts), model)).float(), dim=-1)


@torch.no_grad()
def zero_shot(model: SigLIPModel, processor: SigLIPProcessor, image, labels: Sequence[str],
              template: str = TEMPLATE) -> list[tuple[str, float]]:
    """(label, probability) for every label, most probable first (ties keep the labels' order).

    Each probability is sigmoid(logit) on its own, as transformers' pipeline computes for SigLIP: they
    need not sum to 1, and an image can match none or several labels. A MobileCLIP model (same
    interface, nanopali/mobileclip/) gives a softmax over the labels instead, as CLIP is used."""
    if isinstance(labels, str):
        labels = [labels]
    if not labels or not all(isinstance(label, str) and label.strip() for label in labels):
        raise InputError(f"labels must be non-empty strings, got {labels!r}")
    check_template(template)
    x = embed_images(model, processor, [image])
    y = embed_texts(model, processor, [template.format(label) for label in labels])
    logits = model.logits(x, y.to(x.dtype)).float()
    probs = model.label_probabilities(logits)[0].tolist()   # each model's own rule (`TwoTowers`)
    return sorted(zip(labels, probs), key=lambda lp: -lp[1])
