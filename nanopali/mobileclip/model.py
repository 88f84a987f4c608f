"""MobileCLIP2 as a two-tower model: image encoder, text encoder, learned temperature (arXiv 2508.20691).

    image → MCi (mci.py) or ViT (vit.py) → x  ┐  logits_ij = exp(t) · x̂_i · ŷ_j   (x̂, ŷ: L2-normalised)
    text  → CLIP text transformer (text.py) → y ┘

The contract is CLIP's (open_clip `CustomTextCLIP`): one scalar temperature, no bias, and a softmax
over the candidates (the contrastive loss, distill.py), unlike SigLIP's per-pair sigmoid; `forward`
and `logits` are the two-tower ones SigLIP has (nanopali/siglip/model.py `TwoTowers`). Tensor names
are open_clip's with its prefixes `visual.trunk.` → `image_tower.` and `text.` → `text_tower.`
(checkpoint.py). Presets: every released MobileCLIP2 (open_clip `MobileCLIP2-{S0,S2,S3,S4,B,L-14}`,
pretrained tag `dfndr2b`) and the MobileCLIP (v1) checkpoints open_clip carries (S1, S2, B); each
names its image preprocessing as open_clip's `pretrained.py` does (`_mccfg`, `_mc2cfg`).
Letters: I images, J texts, E embedding.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn

from ..siglip.model import TwoTowers
from .mci import MCI_PRESETS, MCi, MCiConfig
from .text import TextConfig, TextTransformer
from .vit import VIT_PRESETS, ViT, ViTConfig

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class PreprocessConfig:
    """Resize the shorter side to `image_size` with `interpolation`, centre-crop a square, ×1/255,
    (x - mean) / std (open_clip `image_transform(resize_mode="shortest")`)."""
    image_size: int = 256
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    interpolation: str = "bilinear"   # or "bicubic" (L-14)


@dataclass(frozen=True)
class MobileCLIPConfig:
    image: MCiConfig | ViTConfig = field(default_factory=MCiConfig)
    text: TextConfig = field(default_factory=TextConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)

    def __post_init__(self):
        if self.image.embed_dim != self.text.embed_dim:
            raise ValueError(f"image embed_dim {self.image.embed_dim} != text embed_dim {self.text.embed_dim}")


class MobileCLIP(TwoTowers):
    def __init__(self, cfg: MobileCLIPConfig):
        super().__init__()
        self.cfg = cfg
        self.image_tower = MCi(cfg.image) if isinstance(cfg.image, MCiConfig) else ViT(cfg.image)
        self.text_tower = TextTransformer(cfg.text)
        # t of CLIP §2.5: logits = exp(t) · cos, initialised at t = log(1/0.07) (open_clip's init).
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.logit_bias = None   # CLIP's logits have no bias (SigLIP's do)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(I, 3, S, S) → (I, E) image features, not normalised (open_clip `encode_image`)."""
        return self.image_tower(pixel_values)

    def encode_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(J, L) → (J, E) text features, not normalised (open_clip `encode_text`). Pads are attended,
        as trained (text.py), so there is no attention_mask to give."""
        if attention_mask is not None:
            raise ValueError("MobileCLIP's text tower attends its pads, as it was trained: it takes no attention_mask")
        return self.text_tower(input_ids)

    def label_probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Zero-shot: a softmax over the labels of each image (CLIP's rule: the labels compete)."""
        return logits.softmax(-1)


# ---- presets: every released MobileCLIP2, and the MobileCLIP v1 checkpoints that share its towers ----

def _preset(image: MCiConfig | ViTConfig, width: int, heads: int, causal: bool, mean_std_openai: bool,
            interpolation: str = "bilinear") -> MobileCLIPConfig:
    mean, std = (OPENAI_MEAN, OPENAI_STD) if mean_std_openai else ((0.0,) * 3, (1.0,) * 3)
    return MobileCLIPConfig(image, TextConfig(width=width, num_heads=heads, causal=causal, embed_dim=image.embed_dim),
                            PreprocessConfig(image.image_size, mean, std, interpolation))


MOBILECLIP_PRESETS: dict[str, MobileCLIPConfig] = {
    "mobileclip2-s0": _preset(MCI_PRESETS["mci0"], 512, 8, False, False),
    "mobileclip2-s2": _preset(MCI_PRESETS["mci2"], 512, 8, False, False),
    "mobileclip2-s3": _preset(MCI_PRESETS["mci3"], 768, 12, False, True),
    "mobileclip2-s4": _preset(MCI_PRESETS["mci4"], 768, 12, False, True),
    "mobileclip2-b": _preset(VIT_PRESETS["vit-b-mci"], 512, 8, True, False),
    "mobileclip2-l14": _preset(VIT_PRESETS["vit-l14-clip"], 768, 12, False, True, "bicubic"),
    "mobileclip-s1": _preset(MCI_PRESETS["mci1"], 512, 8, False, False),
    "mobileclip-s2": _preset(MCI_PRESETS["mci2"], 512, 8, False, False),
    "mobileclip-b": _preset(VIT_PRESETS["vit-b-mci"], 512, 8, True, False),
}


def mobileclip_preset(name: str, **image_changes) -> MobileCLIPConfig:
    """A preset by name; keyword arguments replace fields of its image config (e.g. fused=True)."""
    key = name.lower().replace("-l-14", "-l14")
    if key not in MOBILECLIP_PRESETS:
        raise ValueError(f"Unknown MobileCLIP preset {name!r}. Known presets: {', '.join(MOBILECLIP_PRESETS)}")
    cfg = MOBILECLIP_PRESETS[key]
    return replace(cfg, image=replace(cfg.image, **image_changes)) if image_changes else cfg


__all__ = ["PreprocessConfig", "MobileCLIPConfig", "MobileCLIP", "MOBILECLIP_PRESETS", "mobileclip_preset"]
