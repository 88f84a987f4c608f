"""PaliGemma's variants: the dataclass that pairs the two towers' configs, and a named preset for each.

Every released variant has a preset: `pg1-3b-{224,448,896}` and `pg2-{3b,10b,28b}-{224,448,896}`
(numbers: docs/variants.md#decoder-sizes, PaliGemma 2 paper Table 1). The towers' own dataclasses live
with their code (`vit.SigLIPConfig`, `gemma.GemmaConfig`); a checkpoint's config.json is read by
formats/hf_config.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .gemma import GemmaConfig
from .vit import SigLIPConfig


@dataclass(frozen=True)
class PaliGemmaConfig:
    vision: SigLIPConfig = field(default_factory=SigLIPConfig)
    text: GemmaConfig = field(default_factory=GemmaConfig)
    image_token_id: int = 257152   # `<image>`: not in tokenizer.model; = its vocab size (docs/files.md#token-ids)
    pad_token_id: int = 0
    bos_token_id: int = 2
    eos_token_id: int = 1
    position_base: int = 1
    """RoPE index of the first real token. transformers: 1 (its forward and generate add 1);
    big_vision: 0. RoPE is relative, so this only moves rounding (~1e-5 in fp32)."""

    @property
    def num_image_tokens(self) -> int:
        return self.vision.num_patches

    @property
    def generation(self) -> int:
        return 2 if self.text.post_norms else 1


_GEMMA2_COMMON = dict(post_norms=True, attn_softcap=50.0, final_softcap=30.0, sliding_window=4096)


def _gemma2(width, depth, mlp_dim, heads, kv_heads, head_dim, query_pre_attn_scalar):
    return GemmaConfig(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=heads, num_kv_heads=kv_heads,
                       head_dim=head_dim, query_pre_attn_scalar=query_pre_attn_scalar,
                       layer_types=alternating_layers(depth), **_GEMMA2_COMMON)


def alternating_layers(depth: int) -> tuple[str, ...]:
    """Gemma 2: sliding window on layers 0, 2, 4, ... (transformers' Gemma2Config default)."""
    return tuple("sliding_attention" if i % 2 == 0 else "full_attention" for i in range(depth))


_DECODERS = {
    "pg1-3b": GemmaConfig(width=2048, depth=18, mlp_dim=16384, num_heads=8, num_kv_heads=1, head_dim=256),
    "pg2-3b": _gemma2(2304, 26, 9216, 8, 4, 256, 256),
    "pg2-10b": _gemma2(3584, 42, 14336, 16, 8, 256, 256),
    # 28B: head_dim 128 but the scale is (D / N)^-½ = 144^-½
    # (docs/variants.md#decoder-sizes, docs/disagreements.md #8).
    "pg2-28b": _gemma2(4608, 46, 36864, 32, 16, 128, 144),
}

PRESETS: dict[str, PaliGemmaConfig] = {
    f"{name}-{res}": PaliGemmaConfig(vision=SigLIPConfig(image_size=res), text=text)
    for name, text in _DECODERS.items() for res in (224, 448, 896)
}


def preset(name: str) -> PaliGemmaConfig:
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}. Known presets: {', '.join(PRESETS)}")
    return PRESETS[name]


__all__ = ["PaliGemmaConfig", "PRESETS", "preset", "alternating_layers"]
