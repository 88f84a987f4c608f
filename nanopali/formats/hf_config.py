"""A Hugging Face config.json ↔ PaliGemmaConfig (docs/checkpoints.md): which field is which of ours, the
defaults transformers fills for a field a file omits (2024-era hub files omit every default), and the
checks that refuse a file no PaliGemma could come from (a wrong type, a size past LIMITS) before
anything is built. `to_hf_config` writes what transformers 5 `save_pretrained` writes.
"""
from __future__ import annotations

import json
import os
from dataclasses import replace

from ..config import PaliGemmaConfig, alternating_layers, preset
from ..gemma import GemmaConfig
from ..vit import SigLIPConfig
from .files import CheckpointError


def _get(d: dict, *names, default=None):
    for n in names:
        if n in d:
            return d[n]
    return default


# Generous bounds on every size field: ~10x the largest released model (PaliGemma 2 28B: 46 layers,
# width 4608, 257k vocabulary; 896 px). A config.json past them is a typo or a hostile file, refused
# before anything is built (building 100,000 layers on the meta device takes minutes and gigabytes).
LIMITS = {"depth": 512, "width": 65_536, "mlp_dim": 262_144, "num_heads": 1024, "head_dim": 2048,
          "vocab_size": 4_194_304, "image_size": 8192, "patch_size": 1024, "max_positions": 1_048_576}


def _typed(d: dict, where: str, *names, default, kind=int, limit: str | None = None):
    """_get, checking the type (bool is not an int) and that sizes are within LIMITS."""
    value = _get(d, *names, default=default)
    ok = isinstance(value, kind) or (kind is float and isinstance(value, int))
    if not ok or isinstance(value, bool):
        raise ValueError(f"{where}{names[0]} is {value!r} ({type(value).__name__}); expected {kind.__name__}")
    if limit is not None and not 0 < value <= LIMITS[limit]:
        raise ValueError(f"{where}{names[0]} = {value} is outside (0, {LIMITS[limit]:,}]: not a PaliGemma "
                         "config (the largest released model is ~10x smaller)")
    return value


def from_hf_config(cfg: dict) -> PaliGemmaConfig:
    """A PaliGemmaConfig from a Hugging Face config.json dict (any writer: 2024 hub, transformers 4/5)."""
    if not isinstance(cfg, dict):
        raise ValueError(f"config.json holds a JSON {type(cfg).__name__}, expected an object")
    if cfg.get("model_type") != "paligemma":
        raise ValueError(f"config.json has model_type {cfg.get('model_type')!r}; nanopali loads 'paligemma' "
                         "(PaliGemma 1 and 2) checkpoints")
    for name in ("text_config", "vision_config"):
        if cfg.get(name) is not None and not isinstance(cfg[name], dict):
            raise ValueError(f"{name} is {type(cfg[name]).__name__}, expected a JSON object")
    t = dict(cfg.get("text_config") or {})
    v = dict(cfg.get("vision_config") or {})
    kind = t.get("model_type", "gemma")
    if kind not in ("gemma", "gemma2"):
        raise ValueError(f"text_config.model_type {kind!r} is not supported (expected 'gemma' or 'gemma2')")
    g2 = kind == "gemma2"
    # transformers' defaults when a field is absent: GemmaConfig/Gemma2Config, or PaliGemmaConfig's
    # own text defaults (the PaliGemma 1 3B decoder) when there is no text_config at all.
    if g2:
        base = replace(preset("pg2-3b-224").text, vocab_size=256000)      # Gemma2Config()
    elif t:
        base = GemmaConfig(vocab_size=256000, width=3072, depth=28, mlp_dim=24576,  # GemmaConfig()
                           num_heads=16, num_kv_heads=16)
    else:
        base = replace(preset("pg1-3b-224").text, vocab_size=_get(cfg, "vocab_size", default=257152))
    rope = t.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise ValueError(f"text_config.rope_parameters is {rope!r}, expected a JSON object")
    tw = "text_config."

    def opt(*names, default, kind=float):  # Gemma 2 switches: null turns them off
        return None if _get(t, *names, default=default) is None else _typed(t, tw, *names, default=default, kind=kind)

    depth = _typed(t, tw, "num_hidden_layers", default=base.depth, limit="depth")
    layer_types = t.get("layer_types") or (alternating_layers(depth) if g2 else ())
    if not (isinstance(layer_types, (list, tuple)) and all(isinstance(x, str) for x in layer_types)
            and len(layer_types) in (0, depth)):
        raise ValueError(f"text_config.layer_types must be a list of {depth} strings, got {layer_types!r}")
    text = GemmaConfig(
        vocab_size=_typed(t, tw, "vocab_size", default=base.vocab_size, limit="vocab_size"),
        width=_typed(t, tw, "hidden_size", default=base.width, limit="width"),
        depth=depth,
        mlp_dim=_typed(t, tw, "intermediate_size", default=base.mlp_dim, limit="mlp_dim"),
        num_heads=_typed(t, tw, "num_attention_heads", default=base.num_heads, limit="num_heads"),
        num_kv_heads=_typed(t, tw, "num_key_value_heads", default=base.num_kv_heads, limit="num_heads"),
        head_dim=_typed(t, tw, "head_dim", default=256, limit="head_dim"),
        rms_norm_eps=_typed(t, tw, "rms_norm_eps", default=1e-6, kind=float),
        rope_theta=float(_typed(rope, tw + "rope_parameters.", "rope_theta",
                                default=_typed(t, tw, "rope_theta", default=10_000.0, kind=float), kind=float)),
        max_positions=_typed(t, tw, "max_position_embeddings", default=8192, limit="max_positions"),
        post_norms=g2,
        query_pre_attn_scalar=opt("query_pre_attn_scalar", default=256) if g2 else None,
        attn_softcap=opt("attn_logit_softcapping", default=50.0) if g2 else None,
        final_softcap=opt("final_logit_softcapping", default=30.0) if g2 else None,
        sliding_window=opt("sliding_window", default=4096, kind=int) if g2 else None,
        layer_types=tuple(layer_types),
    )
    if text.num_heads % text.num_kv_heads:
        raise ValueError(f"text_config: {text.num_heads} attention heads do not split into "
                         f"{text.num_kv_heads} key/value heads")
    act = _get(t, "hidden_activation", "hidden_act", default="gelu_pytorch_tanh")
    if act not in ("gelu_pytorch_tanh", "gelu"):  # transformers maps legacy "gelu" to the tanh form for Gemma
        raise ValueError(f"text_config activation {act!r} is not Gemma's gelu_pytorch_tanh")
    vw = "vision_config."
    vision = SigLIPConfig(
        width=_typed(v, vw, "hidden_size", default=1152, limit="width"),
        depth=_typed(v, vw, "num_hidden_layers", default=27, limit="depth"),
        mlp_dim=_typed(v, vw, "intermediate_size", default=4304, limit="mlp_dim"),
        num_heads=_typed(v, vw, "num_attention_heads", default=16, limit="num_heads"),
        patch_size=_typed(v, vw, "patch_size", default=14, limit="patch_size"),
        image_size=_typed(v, vw, "image_size", default=224, limit="image_size"),
        layer_norm_eps=_typed(v, vw, "layer_norm_eps", default=1e-6, kind=float),
    )
    if vision.width % vision.num_heads or vision.image_size % vision.patch_size:
        raise ValueError(f"vision_config: width {vision.width} over {vision.num_heads} heads, or image size "
                         f"{vision.image_size} over patch size {vision.patch_size}, does not divide")
    pad = {"pad_token_id": _get(cfg, "pad_token_id", default=_get(t, "pad_token_id")) or 0}  # null in old files
    ids = dict(image_token_id=_typed(cfg, "", "image_token_index", "image_token_id", default=257152),
               pad_token_id=_typed(pad, "", "pad_token_id", default=0),
               bos_token_id=_typed(t, tw, "bos_token_id", default=2),
               eos_token_id=_typed(t, tw, "eos_token_id", default=1))
    for name, value in ids.items():
        # <image> may be the id just past the embedding, as in a big_vision checkpoint saved by nanopali (its
        # embedding has the tokenizer's rows and no <image> row): its row is never looked up, here as in
        # transformers' PaliGemmaModel.forward, which embeds an image token id >= vocab_size as id 0.
        past = int(name == "image_token_id")
        if not 0 <= value < text.vocab_size + past:
            raise ValueError(f"{name} {value} is not a row of the {text.vocab_size}-row embedding"
                             + (f" nor the id {text.vocab_size} just past it" if past else ""))
    return PaliGemmaConfig(vision=vision, text=text, **ids)


def to_hf_config(c: PaliGemmaConfig) -> dict:
    """The config.json transformers 5 writes for this model (used when nanopali saves a checkpoint)."""
    t = c.text
    text = dict(model_type="gemma2" if c.generation == 2 else "gemma", vocab_size=t.vocab_size,
                hidden_size=t.width, num_hidden_layers=t.depth, intermediate_size=t.mlp_dim,
                num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads, head_dim=t.head_dim,
                rms_norm_eps=t.rms_norm_eps, max_position_embeddings=t.max_positions,
                rope_parameters={"rope_theta": t.rope_theta, "rope_type": "default"},
                pad_token_id=c.pad_token_id, bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id)
    if c.generation == 2:
        text.update(hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=t.query_pre_attn_scalar,
                    attn_logit_softcapping=t.attn_softcap, final_logit_softcapping=t.final_softcap,
                    sliding_window=t.sliding_window, layer_types=list(t.layer_types))
    else:
        text.update(hidden_act="gelu_pytorch_tanh")
    v = c.vision
    vision = dict(model_type="siglip_vision_model", hidden_size=v.width, num_hidden_layers=v.depth,
                  intermediate_size=v.mlp_dim, num_attention_heads=v.num_heads, patch_size=v.patch_size,
                  image_size=v.image_size, layer_norm_eps=v.layer_norm_eps, vision_use_head=False)
    return dict(model_type="paligemma", architectures=["PaliGemmaForConditionalGeneration"],
                text_config=text, vision_config=vision, image_token_index=c.image_token_id,
                projection_dim=t.width, hidden_size=t.width, vocab_size=t.vocab_size,
                pad_token_id=c.pad_token_id, bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id)


def read_paligemma_config(ckpt_dir: str) -> PaliGemmaConfig:
    path = os.path.join(ckpt_dir, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"No config.json in {ckpt_dir}: not a Hugging Face checkpoint directory")
    try:
        with open(path) as f:
            return from_hf_config(json.load(f))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
