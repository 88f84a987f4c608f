"""Which layers of PaliGemma are quantized, in place or while loading.

Quantized: every nn.Linear of the image encoder, the projector and the decoder, and the tied embedding
(the LM head, read at every decode step). Left in float: the norms (a few thousand weights each, and the
model is sensitive to their scale), the biases, SigLIP's Conv2d patch embedding (run once per image, its
588-wide input is a handful of weights), and the position table (added, not multiplied: no GEMM to speed up).
int4 needs its group size to divide a layer's input width; a layer it does not divide is quantized int8
instead (SigLIP So400m's MLP is 4304 wide, 16·269, so no int4 group size divides it).
Savers and loaders share this rule (`layer_scheme`), so the quantized file format (formats/quantized.py)
needs no per-layer table.
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn

from .modules import QuantizedEmbedding, QuantizedLinear
from .weight_only import DEFAULT_GROUP_SIZE, SCHEMES, check_scheme, quantize_weight  # noqa: F401 (re-exported)

log = logging.getLogger("nanopali")


def layer_scheme(scheme: str, in_features: int, group_size: int | None) -> str:
    """The scheme one layer gets: int4 falls back to int8 where its groups do not divide the width.
    Savers and loaders share this rule, so a file needs no per-layer table."""
    return "int8" if scheme == "int4" and in_features % group_size else scheme


def quantize_linear_weight(w: torch.Tensor, scheme: str, group_size: int | None = None,
                           dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """One float weight (N, K) → the buffers its quantized module holds, by the per-layer rule
    `quantized` applies (int4 falls back to int8 where its groups do not divide the width)."""
    group_size = check_scheme(scheme, group_size)
    own = layer_scheme(scheme, w.shape[1], group_size)
    return quantize_weight(w, own, group_size if own == "int4" else None, dtype)


def targets(model: nn.Module):
    """(parent, attribute, module, dotted name) of every module to quantize."""
    for root in ("vision_tower", "projector", "language_model"):
        for name, parent in getattr(model, root).named_modules():
            for attr, child in parent.named_children():
                full = ".".join(p for p in (root, name, attr) if p)
                if isinstance(child, nn.Linear) or full == "language_model.embed":
                    yield parent, attr, child, full


def quantized(child: nn.Module, scheme: str, group_size: int | None, dtype) -> nn.Module:
    """The quantized replacement of one Linear or of the tied embedding, by the per-layer rule."""
    own = layer_scheme(scheme, child.weight.shape[1], group_size)
    g = group_size if own == "int4" else None
    if isinstance(child, nn.Linear):
        return QuantizedLinear.from_linear(child, own, g, dtype)
    return QuantizedEmbedding.from_embedding(child, own, g, dtype)


@torch.no_grad()
def quantize_model(model: nn.Module, scheme: str, group_size: int | None = None,
                   dtype: torch.dtype | None = None) -> nn.Module:
    """Replace, in place, the image encoder's, projector's and decoder's Linears and the tied embedding
    by their int8 / int4 versions; return the model. dtype: of the scales, zeros and biases, and so of the
    dequantized weights (default: each weight's own). On a meta-device model this builds the skeleton a
    loader fills. The choice is recorded as `model.quantization` for savers."""
    group_size = check_scheme(scheme, group_size)
    as_int8 = []
    for parent, attr, child, name in list(targets(model)):
        new = quantized(child, scheme, group_size, dtype)
        if new.scheme != scheme:
            as_int8.append(f"{name} ({new.in_features} wide)")
        setattr(parent, attr, new)
    if as_int8:
        log.info("nanopali.quant: int4 groups of %d do not divide %d layers' widths; int8 for those: %s",
                 group_size, len(as_int8), ", ".join(as_int8[:3]) + (", ..." if len(as_int8) > 3 else ""))
    model.quantization = {"scheme": scheme, "group_size": group_size}
    return model


def quantized_skeleton(cfg, scheme: str, group_size: int | None = None, dtype=torch.bfloat16) -> nn.Module:
    """A PaliGemma on the meta device with the quantized modules in place and no storage, to be filled
    tensor by tensor (state_dict names and shapes say what is expected) or by load_state_dict(assign=True)."""
    from ..model import PaliGemma

    with torch.device("meta"):
        model = PaliGemma(cfg).to(dtype)
        return quantize_model(model, scheme, group_size, dtype)


def quantizing_place(model: nn.Module, scheme: str, group_size: int | None = None, dtype=None):
    """A `place` for the strict loader (formats/strict.py) that quantizes while loading: each weight to
    be quantized is assigned, then its module is swapped at once for the quantized one, so the float
    weight is dropped before the next tensor is read. Peak memory: the quantized model plus one tensor.
    The float model (on the meta device) keeps its names for the strict checks and error messages."""
    from ..formats.strict import assign

    group_size = check_scheme(scheme, group_size)
    where = {f"{name}.weight": (parent, attr) for parent, attr, _, name in targets(model)}

    def place(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
        # A tensor that stays float is copied out of the file's memory map (formats/files.py), so that
        # once loading ends nothing holds the map: the pages read to quantize are let go, not kept resident.
        assign(model, name, tensor if name in where else tensor.clone())
        if name in where:
            parent, attr = where[name]
            new = quantized(getattr(parent, attr), scheme, group_size, dtype)
            new.prepare(tensor.dtype if dtype is None else dtype)
            setattr(parent, attr, new)

    model.quantization = {"scheme": scheme, "group_size": group_size}
    return place
