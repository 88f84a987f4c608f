"""Loading Hugging Face SigLIP / SigLIP 2 checkpoints strictly, and SigLIP 2 as PaliGemma's image tower.

A checkpoint directory holds config.json (model_type "siglip": SigLIP, and SigLIP 2 at a fixed
resolution; "siglip2": SigLIP 2 NaFlex), safetensors weights (`text_model.*`, `vision_model.*`,
`logit_scale`, `logit_bias`), the tokenizer (spiece.model for SigLIP, Gemma's tokenizer.model for
SigLIP 2) and optionally tokenizer_config.json and preprocessor_config.json. `_RENAMES` is the one
place that says which HF tensor is which of ours; loading goes through the one strict loader
(formats/strict.py: meta-device model, each tensor read straight into its parameter, one error listing
every missing, unexpected and mis-shaped tensor).

SigLIP 2's fixed-resolution image tower is vit.py's, tensor for tensor, so `paligemma_with_siglip`
puts one into a PaliGemma (as the SigLIP 2 paper's VLM experiments do) that train.py can fine-tune.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import replace

import torch
import torch.nn as nn
from PIL import Image

from ..config import PaliGemmaConfig, preset as paligemma_preset
from ..formats import hf
from ..formats.files import CheckpointError, resolve_device, resolve_dtype, weight_files
from ..formats.hub import local_path
from ..formats.strict import load_strict, safetensors_sources
from ..model import PaliGemma
from ..vit import SigLIPConfig
from .model import SigLIPModel, SigLIPModelConfig, TextConfig, siglip_preset
from .onednn import use_onednn
from .processing import SigLIPProcessor

_LAYER = r"(vision|text)_model\.encoder\.layers\.(\d+)\."
_RENAMES = [  # HF name → nanopali name
    (r"logit_(scale|bias)", r"logit_\1"),
    (r"vision_model\.embeddings\.patch_embedding\.", "vision_tower.patch_embed."),
    (r"vision_model\.embeddings\.position_embedding\.weight", "vision_tower.pos_embed"),
    (r"vision_model\.post_layernorm\.", "vision_tower.norm."),
    (r"vision_model\.head\.probe", "vision_head.probe"),
    (r"vision_model\.head\.attention\.in_proj_(weight|bias)", r"vision_head.qkv.\1"),
    (r"vision_model\.head\.attention\.out_proj\.", "vision_head.o."),
    (r"vision_model\.head\.layernorm\.", "vision_head.norm."),
    (r"vision_model\.head\.mlp\.", "vision_head.mlp."),
    (r"text_model\.embeddings\.token_embedding\.", "text_tower.embed."),
    (r"text_model\.embeddings\.position_embedding\.weight", "text_tower.pos_embed"),
    (r"text_model\.final_layer_norm\.", "text_tower.norm."),
    (r"text_model\.head\.", "text_tower.head."),
    (_LAYER + r"layer_norm([12])\.", r"\1_tower.blocks.\2.norm\3."),
    (_LAYER + r"self_attn\.([qkv])_proj\.", r"\1_tower.blocks.\2.attn.\3."),
    (_LAYER + r"self_attn\.out_proj\.", r"\1_tower.blocks.\2.attn.o."),
    (_LAYER + r"mlp\.(fc[12])\.", r"\1_tower.blocks.\2.mlp.\3."),
]


def siglip_name(key: str) -> str | None:
    for pattern, repl in _RENAMES:
        m = re.fullmatch(pattern + r"(.*)", key)
        if m:
            return m.expand(repl + r"\g<%d>" % m.re.groups)
    return None


def _int(d: dict, name: str, default: int) -> int:
    v = d.get(name, default)
    if not isinstance(v, int):
        raise ValueError(f"{name} = {v!r}: nanopali takes square images and patches given as one integer")
    return v


def siglip_config_from_hf(cfg: dict) -> SigLIPModelConfig:
    """A SigLIPModelConfig from config.json, with transformers' defaults for omitted fields."""
    kind = cfg.get("model_type")
    if kind not in ("siglip", "siglip2"):
        raise ValueError(f"config.json has model_type {kind!r}; nanopali.siglip loads 'siglip' and 'siglip2' "
                         "(for PaliGemma checkpoints use nanopali.load)")
    t, v = dict(cfg.get("text_config") or {}), dict(cfg.get("vision_config") or {})
    for name, sub in (("text_config", t), ("vision_config", v)):
        if sub.get("hidden_act", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
            raise ValueError(f"{name}.hidden_act {sub['hidden_act']!r} is not SigLIP's gelu_pytorch_tanh")
    if not v.get("vision_use_head", True):
        raise ValueError("vision_config.vision_use_head is false: without the pooling head there is no image embedding")
    if v.get("num_channels", 3) != 3:
        raise ValueError(f"vision_config.num_channels is {v['num_channels']}; SigLIP takes RGB images")
    patch = _int(v, "patch_size", 16)
    if kind == "siglip2":  # NaFlex: a g×g position table, read as the table of a g·p pixel image
        n = _int(v, "num_patches", 256)
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"vision_config.num_patches = {n} is not a square grid")
        image_size = side * patch
    else:
        image_size = _int(v, "image_size", 224)
    vision = SigLIPConfig(width=v.get("hidden_size", 768), depth=v.get("num_hidden_layers", 12),
                          mlp_dim=v.get("intermediate_size", 3072), num_heads=v.get("num_attention_heads", 12),
                          patch_size=patch, image_size=image_size, layer_norm_eps=v.get("layer_norm_eps", 1e-6))
    width = t.get("hidden_size", 768)
    text = TextConfig(vocab_size=t.get("vocab_size", 32000), width=width, depth=t.get("num_hidden_layers", 12),
                      mlp_dim=t.get("intermediate_size", 3072), num_heads=t.get("num_attention_heads", 12),
                      max_length=t.get("max_position_embeddings", 64),
                      projection_dim=t.get("projection_size") or width, layer_norm_eps=t.get("layer_norm_eps", 1e-6))
    return SigLIPModelConfig(vision, text, naflex=kind == "siglip2")


def _json(path: str, default=None):
    if not os.path.isfile(path):
        return default
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None


def _check_dir(path) -> str:
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"Checkpoint path does not exist or is not a directory: {path}")
    return path


def read_siglip_config(ckpt_dir: str) -> SigLIPModelConfig:
    path = os.path.join(_check_dir(ckpt_dir), "config.json")
    cfg = _json(path)
    if cfg is None:
        raise CheckpointError(f"No config.json in {ckpt_dir}: not a Hugging Face checkpoint directory")
    try:
        return siglip_config_from_hf(cfg)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None


def load_state(model: nn.Module, files: list[str], dtype: torch.dtype, device, prefix: str = "",
               rename=siglip_name) -> None:
    """Fill `model`'s parameters from safetensors files through the strict loader; `rename` maps a
    file's names to the model's. With a `prefix`, only that part is filled and every tensor of the files
    that lands elsewhere is skipped (a PaliGemma takes just the image tower of a SigLIP checkpoint)."""
    load_strict(model, safetensors_sources(files), rename, dtype=dtype, device=device, only=prefix,
                where=f"Checkpoint {', '.join(files)} does not match its config.json")


def load_siglip_model(path, dtype=torch.float32, device="cpu", attn_impl: str = "auto") -> SigLIPModel:
    """The two-tower model alone from a Hugging Face SigLIP / SigLIP 2 checkpoint directory."""
    dtype, device = resolve_dtype(dtype), resolve_device(device)
    cfg = read_siglip_config(path)
    with torch.device("meta"):
        model = SigLIPModel(cfg)
    load_state(model, weight_files(os.fspath(path)), dtype, device)
    model.eval()
    model.attn_impl = attn_impl
    return use_onednn(model)   # CPU inference through oneDNN (onednn.py)


def _piece(value, default: str) -> str:
    """A token from tokenizer_config.json: a string, or an AddedToken dict with "content"."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else default


def load_siglip_processor(path, cfg: SigLIPModelConfig) -> SigLIPProcessor:
    """The processor a checkpoint directory describes (tokenizer file, tokenizer_config.json,
    preprocessor_config.json, or the image processor inside processor_config.json)."""
    path = _check_dir(path)
    spiece, gemma = os.path.join(path, "spiece.model"), os.path.join(path, "tokenizer.model")
    if not (os.path.isfile(spiece) or os.path.isfile(gemma)):
        raise CheckpointError(f"No spiece.model (SigLIP) or tokenizer.model (SigLIP 2) in {path}")
    is_gemma = not os.path.isfile(spiece)
    tc = _json(os.path.join(path, "tokenizer_config.json"), {})
    ip = _json(os.path.join(path, "preprocessor_config.json"))
    if ip is None:
        ip = (_json(os.path.join(path, "processor_config.json"), {}) or {}).get("image_processor", {})
    for flag in ("do_resize", "do_rescale", "do_normalize"):
        if ip.get(flag) is False:
            raise CheckpointError(f"{path}: image processor has {flag} = false, which nanopali does not support")
    common = dict(pad_token=_piece(tc.get("pad_token"), "<pad>" if is_gemma else "</s>"),
                  eos_token=_piece(tc.get("eos_token"), "<eos>" if is_gemma else "</s>"),
                  max_length=cfg.text.max_length, text_normalization="lower" if is_gemma else "siglip",
                  return_attention_mask="attention_mask" in tc.get("model_input_names", ["input_ids"]),
                  mean=ip.get("image_mean", [0.5] * 3), std=ip.get("image_std", [0.5] * 3),
                  rescale=ip.get("rescale_factor", 1 / 255), naflex=cfg.naflex)
    if cfg.naflex:
        patch = ip.get("patch_size", cfg.vision.patch_size)
        if patch != cfg.vision.patch_size:
            raise CheckpointError(f"{path}: the image processor's patch_size {patch} is not the model's "
                                  f"{cfg.vision.patch_size}")
        return SigLIPProcessor(gemma if is_gemma else spiece, **common, patch_size=patch,
                               max_num_patches=ip.get("max_num_patches", 256),
                               resample=ip.get("resample", Image.Resampling.BILINEAR))
    size = ip.get("size") or {}
    hw = (size.get("height", cfg.vision.image_size), size.get("width", cfg.vision.image_size))
    return SigLIPProcessor(gemma if is_gemma else spiece, **common, image_size=hw,
                           resample=ip.get("resample", Image.Resampling.BICUBIC))


def load_siglip(path, dtype=torch.float32, device="cpu", attn_impl: str = "auto",
                revision: str | None = None) -> tuple[SigLIPModel, SigLIPProcessor]:
    """(model, processor) from a Hugging Face SigLIP / SigLIP 2 checkpoint directory or hub name
    (`google/siglip2-base-patch16-224`, at `revision`: formats/hub.py)."""
    path = local_path(path, "siglip", revision)
    model = load_siglip_model(path, dtype, device, attn_impl)
    return model, load_siglip_processor(path, model.cfg)


def paligemma_config(siglip: SigLIPModelConfig | str, base: PaliGemmaConfig | str = "pg2-3b-224") -> PaliGemmaConfig:
    """`base` (a PaliGemma preset or config) with the image tower of `siglip` (a SigLIP preset or config)
    in place of So400m/14: e.g. SigLIP 2 So400m/16 at 256 px gives 16×16 = 256 image tokens."""
    s = siglip_preset(siglip) if isinstance(siglip, str) else siglip
    if s.naflex:
        raise ValueError("A NaFlex tower gives a different number of patches per image, but PaliGemma's "
                         "prefix holds a fixed number of image tokens: use a fixed-resolution SigLIP 2")
    return replace(paligemma_preset(base) if isinstance(base, str) else base, vision=s.vision)


def paligemma_with_siglip(siglip_dir, base: PaliGemmaConfig | str = "pg2-3b-224", *,
                          language_model_from=None, seed: int = 0) -> PaliGemma:
    """A PaliGemma (fp32, CPU) whose image tower holds a SigLIP / SigLIP 2 checkpoint's image encoder
    (its pooling head, text tower and temperature are not used). The decoder is read from the PaliGemma
    checkpoint `language_model_from` (a directory or hub name) when given (its decoder config must be
    base's; its image tower and projector are not read); the projector, and the decoder otherwise, start
    from `finetune.init_random`. Save it with `nanopali.save_checkpoint` and fine-tune it with train.py."""
    from ..train.finetune import init_random

    siglip_dir = local_path(siglip_dir, "siglip")  # a hub name: its snapshot directory
    cfg = paligemma_config(read_siglip_config(siglip_dir), base)
    model = init_random(PaliGemma(cfg), seed)
    load_state(model, weight_files(os.fspath(siglip_dir)), torch.float32, "cpu", prefix="vision_tower.")
    if language_model_from is not None:
        language_model_from = local_path(language_model_from)
        text = hf.read_paligemma_config(language_model_from).text
        if text != cfg.text:
            raise CheckpointError(f"{language_model_from}: its decoder is not base's: {text} vs {cfg.text}")
        load_state(model, weight_files(os.fspath(language_model_from)), torch.float32, "cpu",
                   prefix="language_model.", rename=lambda key: hf.paligemma_name(key, cfg.generation))
    return model.eval()
