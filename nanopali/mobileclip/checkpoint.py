"""Loading MobileCLIP / MobileCLIP2 checkpoints strictly, in either block layout.

A checkpoint is what open_clip saves and the hub's `timm/MobileCLIP2-*-OpenCLIP` repositories hold: a
directory with open_clip_config.json ({"model_cfg": …, "preprocess_cfg": …}) and the weights as
open_clip_model.safetensors (or any *.safetensors), or Apple's `.pt` files (a state dict; read with
torch.load(weights_only=True), which runs no code; anything else is refused with how to convert).
A bare weights file loads with a preset name instead of the config. Tensor names are open_clip's; the
one rename is its prefixes (`visual.trunk.` → `image_tower.`, `text.` → `text_tower.`), because our
modules are named as timm's and open_clip's. The MCi blocks come train-time (multi-branch) or
reparameterised (`reparam_conv`): the file's names say which, and the model is built to match.
Everything goes through formats/strict.py, which names every missing, unexpected and mis-shaped tensor.
"""
from __future__ import annotations

import glob
import json
import math
import os
import pickle
import zipfile
from dataclasses import replace

import torch

from ..formats.files import (CheckpointError, read_safetensors_header, resolve_device, resolve_dtype,
                             printable, weights_only_refusal)
from ..formats.hub import local_path
from ..formats.strict import SKIP, Source, load_strict, safetensors_sources
from ..formats.images import MAX_IMAGE_PIXELS
from .cpu_inference import use_cpu_inference
from .mci import MCI_PRESETS, MCiConfig
from .model import OPENAI_MEAN, OPENAI_STD, MobileCLIP, MobileCLIPConfig, PreprocessConfig, mobileclip_preset
from .text import TextConfig
from .vit import VIT_PRESETS

CONFIG_FILE = "open_clip_config.json"
_TIMM_TOWERS = {"fastvit_mci0": MCI_PRESETS["mci0"], "fastvit_mci1": MCI_PRESETS["mci1"],
                "fastvit_mci2": MCI_PRESETS["mci2"], "fastvit_mci3": MCI_PRESETS["mci3"],
                "fastvit_mci4": MCI_PRESETS["mci4"], "vit_base_mci_224": VIT_PRESETS["vit-b-mci"],
                "vit_large_patch14_clip_224": VIT_PRESETS["vit-l14-clip"]}
_PREFIXES = (("visual.trunk.", "image_tower."), ("text.", "text_tower."))
_MAX_SIDE = math.isqrt(MAX_IMAGE_PIXELS)     # the largest square image nanopali's processors accept


def nanopali_name(key: str) -> str | None:
    """open_clip name → ours; None for a tensor of no MobileCLIP (the strict loader reports it)."""
    key = key.removeprefix("module.")                       # saved from DistributedDataParallel
    if key == "logit_scale":
        return key
    if key.endswith(".id_tensor"):                          # a cached identity kernel some exports keep
        return SKIP
    for theirs, ours in _PREFIXES:
        if key.startswith(theirs):
            return ours + key[len(theirs):]
    return None


def is_mobileclip_dir(path) -> bool:
    return os.path.isfile(os.path.join(os.fspath(path), CONFIG_FILE))


def config_from_open_clip(cfg: dict, where: str) -> MobileCLIPConfig:
    """A MobileCLIPConfig from open_clip_config.json (or a bare open_clip model config)."""
    model, pp = cfg.get("model_cfg", cfg), cfg.get("preprocess_cfg") or {}
    vision, text = model.get("vision_cfg") or {}, model.get("text_cfg") or {}
    tower = vision.get("timm_model_name")
    if tower not in _TIMM_TOWERS:
        raise CheckpointError(f"{where}: vision_cfg.timm_model_name is {tower!r}; MobileCLIP image towers are "
                              f"{', '.join(_TIMM_TOWERS)}")
    if vision.get("timm_proj") not in (None, "none") or text.get("hf_model_name") or text.get("embed_cls"):
        raise CheckpointError(f"{where}: not a MobileCLIP layout (timm_proj, hf_model_name or embed_cls is set)")
    if text.get("pool_type", "argmax") != "argmax" or text.get("proj_bias") or model.get("quick_gelu"):
        raise CheckpointError(f"{where}: the text tower is not CLIP's (argmax pooling, no bias, exact GELU)")
    embed = model.get("embed_dim", 512)
    size = _image_size(vision.get("image_size", 224), where)             # 224: open_clip CLIPVisionCfg's default
    image = replace(_TIMM_TOWERS[tower], embed_dim=embed, image_size=size)
    t = TextConfig(vocab_size=text.get("vocab_size", 49408), context_length=text.get("context_length", 77),
                   width=text.get("width", 512), num_heads=text.get("heads", 8), depth=text.get("layers", 12),
                   mlp_ratio=text.get("mlp_ratio", 4.0), causal=not text.get("no_causal_mask", False), embed_dim=embed)
    return MobileCLIPConfig(image, t, _preprocess(pp, size, where))


def _image_size(size, where: str) -> int:
    """vision_cfg.image_size: pixels per side, or open_clip's [height, width] when they are equal."""
    if isinstance(size, (list, tuple)) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    if isinstance(size, bool) or not isinstance(size, int) or not 0 < size <= _MAX_SIDE:
        raise CheckpointError(f"{where}: vision_cfg.image_size is {size!r}; expected a positive integer, the side of "
                              f"the square images the tower takes (at most {_MAX_SIDE} px)")
    return size


def _preprocess(pp, size: int, where: str) -> PreprocessConfig:
    """open_clip's eval transform: `PreprocessCfg`'s defaults (OpenAI mean / std, bicubic, shortest side)
    under the file's fields, a null field counting as absent (`merge_preprocess_dict`), then the fallbacks
    of `image_transform` (an empty or zero mean / std is OpenAI's; "random" interpolation is bicubic)."""
    if not isinstance(pp, dict):
        raise CheckpointError(f"{where}: preprocess_cfg is a {type(pp).__name__}; expected an object")
    pp = {k: v for k, v in pp.items() if v is not None}
    interpolation = {"bilinear": "bilinear", "bicubic": "bicubic", "random": "bicubic"}.get(
        pp.get("interpolation", "bicubic"))
    if pp.get("resize_mode", "shortest") != "shortest" or interpolation is None:
        raise CheckpointError(f"{where}: preprocess_cfg {pp} is not shortest-side resize, bilinear/bicubic")
    mean = _per_channel(pp.get("mean") or OPENAI_MEAN, "mean", where)
    std = _per_channel(pp.get("std") or OPENAI_STD, "std", where)
    if 0 in std:
        raise CheckpointError(f"{where}: preprocess_cfg.std is {pp['std']!r}; a channel divided by 0 has no value")
    return PreprocessConfig(size, mean, std, interpolation)


def _per_channel(v, name: str, where: str) -> tuple[float, float, float]:
    """One number for all three channels (as open_clip's image_transform allows) or three."""
    values = [v] * 3 if isinstance(v, (int, float)) else v
    if not (isinstance(values, (list, tuple)) and len(values) == 3
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in values)):
        raise CheckpointError(f"{where}: preprocess_cfg.{name} is {v!r}; expected 3 numbers, one per RGB channel")
    return tuple(float(x) for x in values)


def read_mobileclip_config(path) -> MobileCLIPConfig:
    file = os.path.join(os.fspath(path), CONFIG_FILE)
    try:
        with open(file) as f:
            return config_from_open_clip(json.load(f), file)
    except FileNotFoundError:
        raise CheckpointError(f"No {CONFIG_FILE} in {path}: give a preset name (load_mobileclip(path, "
                              "preset='mobileclip2-s0'))") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file} is not valid JSON ({e})") from None


def _pt_sources(path: str) -> list[Source]:
    """A `.pt` / `.bin` state dict through torch.load(weights_only=True): tensors only, no code runs."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path} is not a weights-only PyTorch file ({weights_only_refusal(e)}); nanopali does not run the code "
            "a pickle may hold. If you trust it, convert it once: `sd = torch.load(path, weights_only=False); "
            "safetensors.torch.save_file({k: v.contiguous() for k, v in sd['state_dict'].items()}, "
            "'open_clip_model.safetensors')`") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path} is truncated or not a PyTorch file ({printable(str(e).splitlines()[0])})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]                              # a training checkpoint: {"state_dict": …, "epoch": …}
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors")
    return [Source(k, tuple(v.shape), lambda dtype, device, v=v: v.to(device, dtype), v.dtype) for k, v in obj.items()]


def weight_file(path) -> str:
    path = os.fspath(path)
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise CheckpointError(f"Checkpoint path does not exist: {path}")
    found = sorted(glob.glob(os.path.join(path, "*.safetensors"))) or sorted(
        glob.glob(os.path.join(path, "*.pt")) + glob.glob(os.path.join(path, "*.bin")))
    if len(found) != 1:
        raise CheckpointError(f"Expected one weights file (*.safetensors, else *.pt / *.bin) in {path}, found "
                              f"{', '.join(map(os.path.basename, found)) or 'none'}")
    return found[0]


def _sources(file: str) -> list[Source]:
    if file.endswith(".safetensors"):
        read_safetensors_header(file)  # a clear error for a truncated or corrupt file before anything else
        return list(safetensors_sources([file]))
    return _pt_sources(file)


_WITH_ARTICLE = {"MCi": "an MCi", "ViT": "a ViT"}


def load_mobileclip_model(path, preset: str | None = None, dtype=torch.float32, device="cpu",
                          cfg: MobileCLIPConfig | None = None) -> MobileCLIP:
    """The model from a checkpoint directory or weights file; the config from, in order: `cfg`,
    `preset`, the directory's open_clip_config.json. The block layout (fused or not) from the file."""
    dtype, device = resolve_dtype(dtype), resolve_device(device)
    if cfg is None:
        cfg = mobileclip_preset(preset) if preset else read_mobileclip_config(path)
    file = weight_file(path)
    sources = _sources(file)
    # Decided on the names as nanopali_name reads them: Apple's .pt files prefix every one with "module.".
    found = "MCi" if any(s.key.removeprefix("module.").startswith("visual.trunk.stem.") for s in sources) else "ViT"
    wanted = "MCi" if isinstance(cfg.image, MCiConfig) else "ViT"
    if found != wanted:   # one line for a whole other architecture, not a list of every tensor
        part = "visual.trunk.stem.*" if found == "MCi" else "visual.trunk.blocks.*"
        raise CheckpointError(f"{file} holds {_WITH_ARTICLE[found]} image tower ({part}); its configuration asks for "
                              f"{_WITH_ARTICLE[wanted]}: give the right preset or open_clip_config.json")
    if isinstance(cfg.image, MCiConfig):
        fused = any(".reparam_conv." in s.key for s in sources)
        cfg = replace(cfg, image=replace(cfg.image, fused=fused))
    with torch.device("meta"):
        model = MobileCLIP(cfg)
    layout = "fused" if getattr(cfg.image, "fused", False) else "train-time"
    load_strict(model, sources, nanopali_name, dtype=dtype, device=device,
                where=f"{file} is not a MobileCLIP checkpoint of this configuration ({wanted}, {layout} layout)")
    return use_cpu_inference(model.eval())   # channels-last MCi, oneDNN products: cpu_inference.py


def load_mobileclip(path, preset: str | None = None, dtype=torch.float32, device="cpu", revision: str | None = None):
    """(model, processor) from a MobileCLIP / MobileCLIP2 checkpoint (see the module docstring) or hub name
    (`timm/MobileCLIP2-S0-OpenCLIP`, at `revision`: formats/hub.py). The tokenizer's merges file is read
    from the directory (tokenizer.find_bpe_file)."""
    from .processing import MobileCLIPProcessor
    from .tokenizer import find_bpe_file

    path = local_path(path, "mobileclip", revision)
    model = load_mobileclip_model(path, preset, dtype, device)
    folder = os.fspath(path) if os.path.isdir(path) else os.path.dirname(os.fspath(path))
    return model, MobileCLIPProcessor(find_bpe_file(folder), model.cfg,
                                      embedding=f"the token embedding in {weight_file(path)}")


__all__ = ["load_mobileclip", "load_mobileclip_model", "read_mobileclip_config", "config_from_open_clip",
           "is_mobileclip_dir", "nanopali_name"]
