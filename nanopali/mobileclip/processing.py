"""MobileCLIP inputs: images and texts → the tensors `MobileCLIP` takes (open_clip's preprocess and tokenizer).

Images (open_clip `image_transform(is_train=False, resize_mode="shortest")`, torchvision on PIL):
resize the shorter side to S with PIL's bilinear (bicubic for L-14), the longer to int(S · long /
short) → centre crop S×S (offsets rounded as torchvision's `center_crop`) → PIL `convert("RGB")` →
×1/255 → (x - mean) / std. The conversion comes after the resize and drops alpha, as open_clip's
`MaybeConvertMode` does: an RGBA image is resized with PIL's premultiplied alpha, a palette image with
nearest neighbours, and 16-bit greyscale is clipped at 255 (nanopali's PaliGemma processor converts
first, compositing alpha over white, as transformers does; this one follows its own reference).
Texts: tokenizer.py, [SOT] text [EOT] padded with 0 to 77 ids.
The same interface as `SigLIPProcessor` (`images`, `texts`, `__call__`), so siglip's `embed_images`,
`embed_texts` and `zero_shot` serve MobileCLIP too.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ..formats.files import CheckpointError
from ..formats.images import InputError, load_image
from ..siglip.processing import TwoTowerProcessor
from .model import MobileCLIPConfig
from .tokenizer import BPETokenizer

# Letters: I images, J texts, L context length, S image side.
_FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def shortest_side_crop(im: Image.Image, size: int, resample: int) -> Image.Image:
    """torchvision `Resize(size)` then `CenterCrop(size)` on a PIL image."""
    w, h = im.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    nw, nh = (size, new_long) if w <= h else (new_long, size)
    im = im.resize((nw, nh), resample=resample)
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    return im.crop((left, top, left + size, top + size))


class MobileCLIPProcessor(TwoTowerProcessor):
    """Images and texts → pixel_values (I, 3, S, S) and input_ids (J, L)."""

    def __init__(self, bpe_path: str, cfg: MobileCLIPConfig,
                 embedding: str = "the text tower's token embedding (text vocab_size)"):
        """`embedding` says where the rows the tokenizer must fit come from, for the error that says they don't."""
        pp = cfg.preprocess
        if pp.interpolation not in _FILTERS:
            raise InputError(f"interpolation must be one of {', '.join(_FILTERS)}, got {pp.interpolation!r}")
        self.tokenizer = BPETokenizer(bpe_path, cfg.text.context_length)
        n, rows = self.tokenizer.vocab_size, cfg.text.vocab_size
        # The start / end ids are the last two a merges file gives: fewer ids than rows would not fail but
        # read other rows for them, so the counts must be equal, not merely in range.
        if n != rows:
            raise CheckpointError(f"{bpe_path} gives {n} token ids (<end_of_text> = {self.tokenizer.eot_id}) and "
                                  f"{embedding} has {rows} rows; expected the merges file these weights were "
                                  f"trained with ({rows - 2 * 256 - 2} merges)")
        self.image_size, self.resample = pp.image_size, _FILTERS[pp.interpolation]
        self.mean, self.std = np.asarray(pp.mean, np.float32), np.asarray(pp.std, np.float32)

    def image_array(self, image) -> np.ndarray:
        """(S, S, 3) float32, normalised."""
        im = shortest_side_crop(load_image(image), self.image_size, self.resample).convert("RGB")
        return (np.asarray(im, dtype=np.float32) / 255 - self.mean) / self.std

    def images(self, images) -> dict[str, torch.Tensor]:
        x = np.stack([self.image_array(im) for im in self.image_list(images)]).transpose(0, 3, 1, 2)
        return {"pixel_values": torch.from_numpy(np.ascontiguousarray(x))}                 # (I, 3, S, S)

    def texts(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokenizer(self.text_list(texts))}                         # (J, L)


__all__ = ["MobileCLIPProcessor", "shortest_side_crop"]
