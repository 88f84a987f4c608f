"""`<seg>` answers → masks: the VQ-VAE mask decoder and pasting into boxes (paper §3.2; docs/boxes-and-masks.md).

A "segment cat" answer is objects joined by " ; ", each `<locY1><locX1><locY2><locX2>` (the box, as in
detection.py), 16 `<segNNN>` codes, then the label. The codes index the 128-entry codebook of a VQ-VAE
(Ning et al. 2023, trained on OpenImages, big_vision's `vae-oid.npz`); its decoder turns the 4×4 grid of
code vectors into a 64×64 mask of the box's contents, values roughly in [-1, 1], inside where > 0. That
mask is resized into the box on the full image. No JAX needed: the decoder is a small torch network.

vae-oid.npz holds the original PyTorch arrays (big_vision `_get_params` transposes them for flax), so
`MaskDecoder.decoder` is rebuilt as that torch `nn.Sequential`, with the same indices, and loads them
as they are: `decoder.4.weight` is `self.decoder[4].weight`. Reference: big_vision
`evaluators/proj/paligemma/transfers/segmentation.py` (`Decoder`, `get_reconstruct_masks`, the evaluator).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from ..formats.bigvision import NpzArrays, to_tensor
from ..formats.strict import SKIP, Source, load_strict
from .detection import PALETTE, Detection, bins_to_box, draw_detections

# Letters: B masks, C code dim, h/w spatial size.

NUM_CODES, CODEBOOK_SIZE, MASK_SIZE = 16, 128, 64
CODEBOOK_KEY = "_vq_vae._embedding"
# Parts of the VQ-VAE the decoder does not use (the encoder only makes training targets); their shapes
# are not published, so they are accepted unchecked. Anything else in the file is unexpected.
_UNUSED_PREFIXES = ("encoder.", "_vq_vae.")


class ResBlock(nn.Module):
    """x + conv1×1(relu(conv3×3(relu(conv3×3(x))))); no ReLU after the sum."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1), nn.ReLU(), nn.Conv2d(dim, dim, 3, padding=1),
                                 nn.ReLU(), nn.Conv2d(dim, dim, 1))

    def forward(self, x):
        return x + self.net(x)


def _up(c_in: int, c_out: int):
    # = flax ConvTranspose(4, strides 2, padding=2, transpose_kernel=True) on big_vision's transposed
    # kernel: doubles h and w (docs/boxes-and-masks.md#mask-decoder, checked to 1.2e-6).
    return [nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1), nn.ReLU()]


class MaskDecoder(nn.Module):
    def __init__(self, code_dim: int = 512):
        super().__init__()
        self.codebook = nn.Parameter(torch.zeros(CODEBOOK_SIZE, code_dim))                  # `_vq_vae._embedding`
        self.decoder = nn.Sequential(
            nn.Conv2d(code_dim, 128, 1), nn.ReLU(),                                           # 0, 1
            ResBlock(128), ResBlock(128),                                                     # 2, 3
            *_up(128, 128), *_up(128, 64), *_up(64, 32), *_up(32, 16),                        # 4..11: 4 → 64 px
            nn.Conv2d(16, 1, 1))                                                              # 12

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, 16) in 0..127 → masks (B, 64, 64), float, > 0 inside."""
        B = codes.shape[0]
        x = self.codebook[codes.to(self.codebook.device)]                                    # (B, 16, C)
        x = x.view(B, 4, 4, -1).permute(0, 3, 1, 2)        # (B, C, 4, 4): code k at row k // 4, column k % 4
        return self.decoder(x)[:, 0]                                                          # (B, 64, 64)

    @classmethod
    def from_npz(cls, path: str, device="cpu") -> "MaskDecoder":
        """The decoder of big_vision's `vae-oid.npz`, strictly: every decoder array must be there with its
        published shape (the code dim is read from the codebook), and nothing but the VQ-VAE's unused
        encoder / quantizer arrays may be left over. No pickle."""
        with NpzArrays(path) as npz:
            shapes = npz.shapes()
            code_dim = shapes[CODEBOOK_KEY][1] if len(shapes.get(CODEBOOK_KEY, ())) == 2 else 512
            with torch.device("meta"):
                model = cls(code_dim)

            def rename(key: str):
                if key == CODEBOOK_KEY:
                    return "codebook"
                return SKIP if key.startswith(_UNUSED_PREFIXES) else key

            sources = (Source(k, shape, lambda dtype, device, k=k: to_tensor(npz.read(k), dtype, device))
                       for k, shape in shapes.items())
            load_strict(model, sources, rename, dtype=torch.float32, device=device, unexpected=npz.others,
                        noun="array", where=f"{path} is not a PaliGemma VQ-VAE (vae-oid.npz)",
                        file_name=lambda n: CODEBOOK_KEY if n == "codebook" else n)
        return model.eval()


@dataclass
class SegmentTokens:
    """One object of a "segment" answer as the model wrote it."""
    label: str
    bins: tuple[int, int, int, int]   # (y0, x0, y1, x1), 0..1023
    codes: tuple[int, ...]            # 16 codebook indices, 0..127, row-major over the 4×4 grid


_OBJECT = re.compile(r"((?:<loc\d{4}>){4})\s*((?:<seg\d{3}>){16})(?!<seg)\s*([^;<]*)")


def parse_segments(text: str) -> list[SegmentTokens]:
    """The well-formed objects of a "segment" answer; truncated or malformed ones are skipped.

    Kept, as big_vision's evaluator keeps them: 4 loc bins in 0..1023 with y1 > y0 and x1 > x0, then
    exactly 16 seg codes in 0..127 (a 17th code makes the object malformed)."""
    out = []
    for m in _OBJECT.finditer(text):
        bins = tuple(int(b) for b in re.findall(r"<loc(\d{4})>", m.group(1)))
        codes = tuple(int(c) for c in re.findall(r"<seg(\d{3})>", m.group(2)))
        y0, x0, y1, x1 = bins
        if max(bins) > 1023 or max(codes) >= CODEBOOK_SIZE or y1 <= y0 or x1 <= x0:
            continue
        out.append(SegmentTokens(m.group(3).strip(), bins, codes))
    return out


def paste_mask(mask64: np.ndarray, bins, width: int, height: int, divisor: int = 1023) -> np.ndarray:
    """A (height, width) bool mask: the 64×64 float mask resized into the box, as big_vision's evaluator
    does (docs/boxes-and-masks.md#pasting-a-mask): box pixels int(bin / 1023 · side), PIL bilinear on
    the float mask, then > 0.

    The image was squashed to a square, not cropped, so the box maps onto any aspect ratio as it is."""
    x0, y0, x1, y1 = bins_to_box(bins, width, height, divisor)
    full = np.zeros((height, width), dtype=bool)
    if x1 > x0 and y1 > y0:  # int() can still collapse a thin box on a small image
        m = Image.fromarray(np.asarray(mask64, dtype=np.float32)).resize((x1 - x0, y1 - y0), Image.Resampling.BILINEAR)
        full[y0:y1, x0:x1] = np.asarray(m) > 0.0
    return full


@dataclass
class Segmentation:
    label: str
    box: tuple[int, int, int, int]      # (x0, y0, x1, y1) in pixels of the original image
    bins: tuple[int, int, int, int]     # (y0, x0, y1, x1) as the model wrote them
    codes: tuple[int, ...]
    mask: np.ndarray                    # (height, width) bool, on the original image

    def to_dict(self) -> dict:
        return {"label": self.label, "box": list(self.box), "bins": list(self.bins), "codes": list(self.codes),
                "rle": mask_to_rle(self.mask)}


@torch.no_grad()
def segment(text: str, decoder: MaskDecoder, width: int, height: int, divisor: int = 1023) -> list[Segmentation]:
    """Every well-formed object of a "segment" answer with its mask on a width × height image."""
    objects = parse_segments(text)
    if not objects:
        return []
    masks = decoder(torch.tensor([o.codes for o in objects])).float().cpu().numpy()         # (B, 64, 64)
    return [Segmentation(o.label, bins_to_box(o.bins, width, height, divisor), o.bins, o.codes,
                         paste_mask(m, o.bins, width, height, divisor)) for o, m in zip(objects, masks)]


def mask_to_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE: run lengths over the column-major pixels, starting with a run of 0s."""
    flat = np.asarray(mask, dtype=bool).T.ravel()
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.r_[0, edges, flat.size]).tolist()
    return {"size": list(mask.shape), "counts": ([0] + counts) if flat.size and flat[0] else counts}


def draw_segmentations(image: Image.Image, segmentations: list[Segmentation], alpha: float = 0.5) -> Image.Image:
    """A copy of the image with each mask tinted in its colour (alpha of the colour) and its box and label
    drawn as detection.py draws them, in the same colour."""
    a = np.asarray(image.convert("RGB"), dtype=np.float32).copy()
    for i, s in enumerate(segmentations):
        a[s.mask] = (1 - alpha) * a[s.mask] + alpha * np.asarray(PALETTE[i % len(PALETTE)], np.float32)
    tinted = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))
    return draw_detections(tinted, [Detection(s.label, s.box, s.bins) for s in segmentations])
