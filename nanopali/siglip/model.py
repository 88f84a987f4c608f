"""SigLIP and SigLIP 2 as models of their own: two towers and the sigmoid loss (arXiv 2303.15343, 2502.14786).

    image → ViT (vit.py, the tower PaliGemma uses) → MAP head → x  ┐  logits z_ij = exp(t') · x̂_i · ŷ_j + b
    text  → embed + positions → pre-LN blocks → LN → last token → y ┘  (x̂, ŷ: L2-normalised)

The image tower is PaliGemma's encoder plus the attention-pooling head PaliGemma drops: one learned
probe attends over the patch tokens (big_vision `vit.MAPHead`). The text tower is the same block
stack over tokens (no causal mask), pooled at the *last* position, padding or not, then a linear
head. SigLIP 2 fixed-resolution checkpoints have exactly this architecture (only the vocab and the
tokenizer change); its NaFlex variant swaps the image embedding (naflex.py).
References: transformers `modeling_siglip.SiglipModel`, `modeling_siglip2.Siglip2Model`; big_vision
`models/proj/image_text/two_towers.py`, `text_transformer.py`, `naflex_vit.py`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..attention import IMPLS, attention
from ..vit import MLP, EncoderBlock, SigLIPConfig, SigLIPEncoder
from .naflex import NaFlexViT

# Letters: I images, J texts, P patches, T text tokens, W width, N heads, H head dim, E embedding dim.


@dataclass(frozen=True)
class TextConfig:
    """SigLIP's text tower: the image tower's pre-LN block, bidirectional, pooled at the last position.
    (MobileCLIP's `TextConfig`, nanopali/mobileclip/text.py, is another tower: CLIP's, pooled at EOT.)"""
    vocab_size: int = 32000
    width: int = 768
    depth: int = 12
    mlp_dim: int = 3072
    num_heads: int = 12
    max_length: int = 64            # learned positions; texts are padded to exactly this many tokens
    projection_dim: int = 768       # E; = width except SigLIP 2 g-opt (So400m text tower, E = 1536)
    layer_norm_eps: float = 1e-6

    def as_block_config(self) -> SigLIPConfig:
        """The text blocks are vit.EncoderBlock: the same pre-LN layer, read only for these five numbers."""
        return SigLIPConfig(width=self.width, depth=self.depth, mlp_dim=self.mlp_dim, num_heads=self.num_heads,
                            layer_norm_eps=self.layer_norm_eps)


@dataclass(frozen=True)
class SigLIPModelConfig:
    vision: SigLIPConfig = field(default_factory=lambda: SigLIPConfig(768, 12, 3072, 12, 16, 224))
    text: TextConfig = field(default_factory=TextConfig)
    naflex: bool = False
    """SigLIP 2 NaFlex: patches of any aspect ratio, positions resized per image (naflex.py). Its
    learned table is a square grid; vision.image_size = patch_size · side says which."""


class TextTower(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos_embed = nn.Parameter(torch.empty(cfg.max_length, cfg.width))
        self.blocks = nn.ModuleList(EncoderBlock(cfg.as_block_config()) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.head = nn.Linear(cfg.width, cfg.projection_dim)
        self.attn_impl = "auto"

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (J, T ≤ max_length) → pooled text features (J, E), not normalised.

        attention_mask (J, T), 1 = real: hide pads as keys, as transformers does when the tokenizer
        returns a mask. The released checkpoints were trained without one (their tokenizer_config says
        model_input_names ["input_ids"]): pads are attended, and the pooled last position is a pad."""
        T = input_ids.shape[1]
        if T > self.cfg.max_length:
            raise ValueError(f"Text of {T} tokens; the text tower has {self.cfg.max_length} positions")
        x = self.embed(input_ids) + self.pos_embed[:T]                                  # (J, T, W)
        for block in self.blocks:
            x = block(x, self.attn_impl, attention_mask)
        return self.head(self.norm(x)[:, -1])                                          # (J, E)


class MAPHead(nn.Module):
    """Multihead attention pooling: a learned probe query reads all patch tokens, then LN + MLP with a
    residual (big_vision `MAPHead`, transformers `SiglipMultiheadAttentionPoolingHead`). q/k/v live in
    one (3W, W) matrix, as torch's nn.MultiheadAttention stores them (the checkpoints' layout)."""

    def __init__(self, cfg: SigLIPConfig):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.probe = nn.Parameter(torch.empty(1, 1, cfg.width))
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.o = nn.Linear(cfg.width, cfg.width)
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None, attn_impl: str = "auto") -> torch.Tensor:
        """x (I, P, W) patch tokens, key_mask (I, P) 1 = real patch → pooled (I, W)."""
        I, P, W = x.shape
        wq, wk, wv = self.qkv.weight.chunk(3)
        bq, bk, bv = self.qkv.bias.chunk(3)
        q = F.linear(self.probe.expand(I, 1, W), wq, bq).view(I, 1, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = (F.linear(x, w, b).view(I, P, self.num_heads, self.head_dim).transpose(1, 2)   # (I, N, P, H)
                for w, b in ((wk, bk), (wv, bv)))
        o = attention(q, k, v, key_mask=key_mask, scale=self.head_dim ** -0.5, impl=attn_impl)  # (I, N, 1, H)
        h = self.o(o.transpose(1, 2).reshape(I, 1, W))
        return (h + self.mlp(self.norm(h)))[:, 0]


class TwoTowers(nn.Module):
    """What SigLIP and MobileCLIP (nanopali/mobileclip) share: two towers, each pooled to one vector,
    L2-normalised, compared by a scaled cosine: logits = exp(t) · x̂ · ŷ (+ b where the model has one).

    A subclass builds the towers and `logit_scale` (t), sets `logit_bias` (b, a parameter, or None:
    CLIP has none), and defines `encode_images(pixel_values, **image_inputs)`, `encode_texts(input_ids,
    attention_mask)` and `label_probabilities`, how zero-shot reads one image's logits. The attention
    layers of both towers keep an `attn_impl`, which `attn_impl` below sets."""

    def logits(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """(I, E), (J, E) L2-normalised embeddings → logits (I, J) = exp(t) · cos (+ b)."""
        z = image_embeds @ text_embeds.T * self.logit_scale.exp()
        return z if self.logit_bias is None else z + self.logit_bias

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask=None,
                **image_inputs) -> torch.Tensor:
        """Logits (I, J) of every image against every text (transformers' `logits_per_image`, open_clip
        `get_logits`): `model(**processor(images=..., texts=...))`. image_inputs: NaFlex's patch_mask, grid_hw."""
        x = F.normalize(self.encode_images(pixel_values, **image_inputs), dim=-1)
        y = F.normalize(self.encode_texts(input_ids, attention_mask), dim=-1)
        return self.logits(x, y)

    @property
    def attn_impl(self) -> str:
        """Which attention the towers run (nanopali/attention.py `attention`'s impl); "auto" by default."""
        return next(m.attn_impl for m in self.modules() if m is not self and hasattr(m, "attn_impl"))

    @attn_impl.setter
    def attn_impl(self, impl: str) -> None:
        if impl not in IMPLS:
            raise ValueError(f"attn_impl must be one of {IMPLS}, got {impl!r}")
        for m in self.modules():
            if m is not self and hasattr(m, "attn_impl"):
                m.attn_impl = impl


class SigLIPModel(TwoTowers):
    def __init__(self, cfg: SigLIPModelConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_tower = NaFlexViT(cfg.vision) if cfg.naflex else SigLIPEncoder(cfg.vision)
        self.vision_head = MAPHead(cfg.vision)
        self.text_tower = TextTower(cfg.text)
        # t' and b of the paper (§3.2): logits = exp(t') · cos + b, initialised as there, t' = log 10 and
        # b = -10, so training starts near the prior that almost every pair of a batch is negative.
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(10.0)))
        self.logit_bias = nn.Parameter(torch.full((1,), -10.0))

    def encode_images(self, pixel_values: torch.Tensor, patch_mask: torch.Tensor | None = None,
                      grid_hw: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled image features (I, E), not normalised (transformers' `get_image_features`).

        Fixed resolution: pixel_values (I, 3, S, S). NaFlex: patches (I, P, 3·p·p), patch_mask (I, P)
        and grid_hw (I, 2), as `SigLIPProcessor` makes them (`naflex.patchify`)."""
        if self.cfg.naflex != (patch_mask is not None and grid_hw is not None):
            raise ValueError("patch_mask and grid_hw go with the patches of a NaFlex model, and only there "
                             f"(this model {'is' if self.cfg.naflex else 'is not'} NaFlex)")
        x = self.vision_tower(pixel_values, patch_mask, grid_hw) if self.cfg.naflex else self.vision_tower(pixel_values)
        return self.vision_head(x, patch_mask, self.vision_tower.attn_impl)

    def encode_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled text features (J, E), not normalised (transformers' `get_text_features`)."""
        return self.text_tower(input_ids, attention_mask)

    def label_probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Zero-shot: each label's own sigmoid (the loss below: labels do not compete)."""
        return torch.sigmoid(logits)


def sigmoid_loss(logits: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """The SigLIP loss (paper §3.2): every image-text pair is its own binary classification,

        L = -1/|B| Σ_i Σ_j log σ(z_ij · logits_ij),   z_ij = +1 for a matching pair, -1 otherwise.

    logits (I, J); labels (I, J) of 0/1, by default the identity (pair i matches text i). No softmax
    over the batch, so no batch-wide normalisation (big_vision `trainers/proj/image_text/siglip.py`)."""
    if labels is None:
        if logits.shape[0] != logits.shape[1]:
            raise ValueError(f"logits are {tuple(logits.shape)}: give labels, or a square batch of matching pairs")
        labels = torch.eye(logits.shape[0], device=logits.device)
    z = 2 * labels.to(logits.dtype) - 1
    return -F.logsigmoid(z * logits).sum() / logits.shape[0]


# ---- presets: every released checkpoint (transformers hub name in the comment) ----

_TOWERS = {  # width, depth, mlp_dim, heads (big_vision vit.decode_variant)
    "b": (768, 12, 3072, 12), "l": (1024, 24, 4096, 16), "so400m": (1152, 27, 4304, 16), "g": (1536, 40, 6144, 16),
}


def _preset(size: str, patch: int, res, vocab: int, text_len: int = 64) -> SigLIPModelConfig:
    w, d, m, n = _TOWERS[size]
    tw, td, tm, tn = _TOWERS["so400m" if size == "g" else size]   # g-opt pairs a So400m text tower
    naflex = res == "naflex"
    vision = SigLIPConfig(w, d, m, n, patch, patch * 16 if naflex else res)  # NaFlex: a 16×16 table
    return SigLIPModelConfig(vision, TextConfig(vocab, tw, td, tm, tn, text_len, w), naflex)


SIGLIP_PRESETS: dict[str, SigLIPModelConfig] = {
    # SigLIP (google/siglip-{base-patch16-224,...}): English T5 vocab (32k), or multilingual (250k).
    **{f"siglip-b16-{r}": _preset("b", 16, r, 32000) for r in (224, 256, 384, 512)},
    "siglip-b16-256-i18n": _preset("b", 16, 256, 250000),
    **{f"siglip-l16-{r}": _preset("l", 16, r, 32000) for r in (256, 384)},
    "siglip-so400m14-224": _preset("so400m", 14, 224, 32000, text_len=16),
    "siglip-so400m14-384": _preset("so400m", 14, 384, 32000),
    "siglip-so400m16-256-i18n": _preset("so400m", 16, 256, 250000),
    # SigLIP 2 (google/siglip2-*): Gemma tokenizer (256k); g = giant-opt; naflex = Siglip2Model.
    **{f"siglip2-b16-{r}": _preset("b", 16, r, 256000) for r in (224, 256, 384, 512)},
    "siglip2-b32-256": _preset("b", 32, 256, 256000),
    **{f"siglip2-l16-{r}": _preset("l", 16, r, 256000) for r in (256, 384, 512)},
    **{f"siglip2-so400m14-{r}": _preset("so400m", 14, r, 256000) for r in (224, 384)},
    **{f"siglip2-so400m16-{r}": _preset("so400m", 16, r, 256000) for r in (256, 384, 512)},
    **{f"siglip2-g16-{r}": _preset("g", 16, r, 256000) for r in (256, 384)},
    "siglip2-b16-naflex": _preset("b", 16, "naflex", 256000),
    "siglip2-so400m16-naflex": _preset("so400m", 16, "naflex", 256000),
}


def siglip_preset(name: str) -> SigLIPModelConfig:
    if name not in SIGLIP_PRESETS:
        raise ValueError(f"Unknown SigLIP preset {name!r}. Known presets: {', '.join(SIGLIP_PRESETS)}")
    return SIGLIP_PRESETS[name]


__all__ = ["TextConfig", "SigLIPModelConfig", "TwoTowers", "SigLIPModel", "TextTower", "MAPHead", "sigmoid_loss",
           "SIGLIP_PRESETS", "siglip_preset"]
