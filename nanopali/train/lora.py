"""LoRA: low-rank adapters on the decoder's linear layers (Hu et al. 2021, arXiv 2106.09685).

A frozen weight W (out × in) is used as  y = x Wᵀ + (α / r) · dropout(x) Aᵀ Bᵀ,  with A (r × in)
drawn like nn.Linear's own init and B (out × r) zero, so at initialisation the model is exactly the
base model. Only A and B train. `merge_lora` folds W + (α / r) · B A back into plain nn.Linear layers,
so inference runs the unchanged model code. Adapters are saved alone (safetensors + a small JSON of
rank, alpha, dropout, targets) and loaded on top of any copy of the base checkpoint.

Targets are decoder module names: q, k, v, o (attention) and gate, up, down (MLP), as peft's
`target_modules` for PaliGemma (q_proj ... down_proj). The vision tower is left alone. A base whose
Linears are int8 / int4 (nanopali.quant, QLoRA: qlora.py) is wrapped the same way; it is exported by
qlora.py, not merged here.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..formats.files import atomic_write
from ..quant import QuantizedLinear

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = TARGETS

    def __post_init__(self):
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets:
            raise ValueError(f"LoRA targets {list(self.targets)}: each must be one of {', '.join(TARGETS)}")
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")


class LoRALinear(nn.Module):
    """A frozen nn.Linear (or QuantizedLinear) plus a trainable rank-r update. Letters: I in features,
    O out features, R rank."""

    def __init__(self, base: nn.Linear | QuantizedLinear, cfg: LoRAConfig):
        super().__init__()
        self.base, self.scale = base, cfg.alpha / cfg.rank
        # the shapes and device without base.weight, which a QuantizedLinear would dequantize whole
        device = next(base.buffers() if isinstance(base, QuantizedLinear) else base.parameters()).device
        self.lora_A = nn.Parameter(torch.empty(cfg.rank, base.in_features, device=device))   # (R, I), fp32
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, cfg.rank, device=device))  # (O, R)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's init, as peft does
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.base(x) + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scale

    def merged(self) -> nn.Linear:
        """A plain nn.Linear holding W + scale · B A (computed in fp32, stored in W's dtype)."""
        w = self.base.weight
        out = nn.Linear(w.shape[1], w.shape[0], bias=self.base.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            out.weight.copy_(w.float() + self.scale * (self.lora_B.float() @ self.lora_A.float()))
            if self.base.bias is not None:
                out.bias.copy_(self.base.bias)
        return out


def _targets(model: nn.Module, cfg: LoRAConfig):
    """(parent module, attribute name) of every decoder Linear (float or quantized) whose name is a target."""
    for name, mod in model.language_model.named_modules():
        for attr in cfg.targets:
            child = getattr(mod, attr, None)
            if isinstance(child, (nn.Linear, QuantizedLinear)) and name.startswith("layers."):
                yield mod, attr


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> nn.Module:
    """Wrap every target Linear of the decoder in place; freeze everything but the adapters."""
    for p in model.parameters():
        p.requires_grad_(False)
    n = 0
    for parent, attr in list(_targets(model, cfg)):
        setattr(parent, attr, LoRALinear(getattr(parent, attr), cfg))
        n += 1
    if n == 0:
        raise ValueError(f"No decoder Linear is named any of {list(cfg.targets)}")
    model.lora_config = cfg
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by its merged nn.Linear (in place); the model then has no adapters."""
    if getattr(model, "quantization", None) is not None:
        raise ValueError(f"merge_lora: the base is quantized ({model.quantization['scheme']}); merging would quantize "
                         "W + BA again. Use nanopali.train.qlora.export_merged or export_quantized")
    for mod in list(model.modules()):
        for attr, child in list(mod.named_children()):
            if isinstance(child, LoRALinear):
                setattr(mod, attr, child.merged())
    model.__dict__.pop("lora_config", None)
    return model


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if ".lora_" in n}


def save_adapters(model: nn.Module, out_dir: str, state: dict[str, torch.Tensor] | None = None) -> None:
    """adapter_model.safetensors + adapter_config.json, each written atomically.

    `state` overrides the tensors (e.g. a full state dict gathered from FSDP shards)."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    tensors = adapter_state(model) if state is None else {k: v for k, v in state.items() if ".lora_" in k}
    atomic_write(os.path.join(out_dir, ADAPTER_WEIGHTS), lambda tmp: save_file(tensors, tmp, {"format": "pt"}))
    cfg = json.dumps(asdict(model.lora_config), indent=2)
    atomic_write(os.path.join(out_dir, ADAPTER_CONFIG), lambda tmp: open(tmp, "w").write(cfg))


def read_lora_config(adapter_dir: str) -> LoRAConfig:
    path = os.path.join(adapter_dir, ADAPTER_CONFIG)
    if not os.path.isfile(path):
        raise ValueError(f"No {ADAPTER_CONFIG} in {adapter_dir}: not a nanopali LoRA adapter directory")
    with open(path) as f:
        d = json.load(f)
    return LoRAConfig(rank=int(d["rank"]), alpha=float(d["alpha"]), dropout=float(d["dropout"]),
                      targets=tuple(d["targets"]))


def load_adapters(model: nn.Module, adapter_dir: str) -> nn.Module:
    """Wrap `model` (a base checkpoint) with the adapters saved in adapter_dir, strictly."""
    from safetensors.torch import load_file

    if getattr(model, "lora_config", None) is None:
        apply_lora(model, read_lora_config(adapter_dir))
    path = os.path.join(adapter_dir, ADAPTER_WEIGHTS)
    if not os.path.isfile(path):
        raise ValueError(f"No {ADAPTER_WEIGHTS} in {adapter_dir}")
    saved, params = load_file(path), dict(model.named_parameters())
    want = {n for n in params if ".lora_" in n}
    missing, unexpected = sorted(want - saved.keys()), sorted(saved.keys() - want)
    if missing or unexpected:
        raise ValueError(f"{path} does not match the model's adapters: missing {missing[:4]} ({len(missing)}), "
                         f"unexpected {unexpected[:4]} ({len(unexpected)})")
    with torch.no_grad():
        for n, t in saved.items():
            if t.shape != params[n].shape:
                raise ValueError(f"{path}: {n} has shape {list(t.shape)}, the model expects {list(params[n].shape)}")
            params[n].copy_(t)
    return model
