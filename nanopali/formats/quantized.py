"""nanopali's quantized checkpoint directory: the one place its format is defined, written and read.

A model quantized by nanopali/quant saves as a Hugging Face directory (hf.py `save_checkpoint` writes
config.json, tokenizer.model and model.safetensors for both) with two differences: the tensors keep
nanopali's own names (each quantized layer's qweight, scale[, zero]: the hub layout has no such tensors),
and config.json and the safetensors metadata both carry "quantization": {"scheme", "group_size"}. int4 is
stored as the portable nibbles of quant/weight_only.py, never as a kernel's packed tiles, which differ per
device and per CPU ISA. Which layers are quantized, and which fall back to int8, is quant/convert.py's
rule (`layer_scheme`), so a file needs no per-layer table. This file imports nothing from quant/ until a
quantized directory is loaded: `import nanopali` and a float load stay without it.
"""
from __future__ import annotations

import json
import os

import torch

from .files import CheckpointError
from .strict import load_strict, safetensors_sources

ENTRY = "quantization"   # the key in config.json and in the safetensors metadata


def read_quantization(ckpt_dir: str) -> dict | None:
    """The "quantization" entry of a checkpoint's config.json ({"scheme", "group_size"}), or None."""
    with open(os.path.join(ckpt_dir, "config.json")) as f:
        quant = json.load(f).get(ENTRY)
    if quant is not None and not (isinstance(quant, dict) and quant.get("scheme") in ("int8", "int4")):
        raise CheckpointError(f"{ckpt_dir}/config.json: \"{ENTRY}\" is {quant!r}; expected "
                              '{"scheme": "int8" or "int4", "group_size": ...}')
    return quant


def quantized_contents(model) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors under nanopali's names, the entry added to config.json and to the metadata) of a quantized
    model. The state dict holds int4 as portable nibbles (quant/modules.py `QuantizedWeight`)."""
    tensors = {n: t.detach().contiguous().cpu() for n, t in model.state_dict().items()}
    return tensors, {ENTRY: model.quantization}


def load_quantized(path: str, cfg, files: list[str], saved: dict, dtype, device, quantize, group_size,
                   adapt=None):
    """A directory saved from a quantized model: the quantized skeleton, filled strictly, each int4 layer
    then packed for this CPU's kernel (`prepare`). quantize= / group_size= may only repeat what was saved.
    adapt: as for a float directory (the position table stays float, so another image size resamples it)."""
    from ..quant import quantized_skeleton

    scheme, group = saved["scheme"], saved.get("group_size")
    if (quantize is not None and quantize != scheme) or (group_size is not None and group_size != group):
        raise CheckpointError(f"{path} holds a model quantized as {scheme}" + (f" (groups of {group})" if group else "")
                              + f"; it cannot be loaded as quantize={quantize!r}, group_size={group_size!r}: "
                              "load it without them, or quantize its full-precision checkpoint")
    model = quantized_skeleton(cfg, scheme, group, dtype)
    load_strict(model, safetensors_sources(files), lambda key: key, dtype=dtype, device=device, adapt=adapt,
                where=f"Quantized checkpoint {', '.join(files)} cannot be loaded as its config.json describes")
    for module in model.modules():
        if hasattr(module, "prepare"):
            module.prepare(dtype)
    return model
