"""QLoRA: LoRA adapters trained on a frozen base held as int8 / int4 (Dettmers et al. 2023, arXiv
2305.14314, with nanopali's weight-only schemes of nanopali/quant in place of NF4; docs/qlora.md).

The base is quantized as nanopali.quant does for inference: every Linear of the image encoder, the
projector and the decoder, and the tied embedding (quant/convert.py `targets`). The embedding is
quantized too: it is the largest tensor (0.59 G weights in the 3B, 0.92 G in the 10B: 1.2 / 1.8 GB in
bf16), it is frozen under LoRA (its rows are only read, and as the LM head only the gradient w.r.t. the
hidden states is needed, which QuantizedWeight gives chunk by chunk), and a quantized checkpoint has no
per-layer table, so keeping it in float would make a file `nanopali.load` cannot read.
Forward and backward dequantize the frozen weights on the fly (quant/modules.py `_FrozenMatmul`); the
adapters, their gradients and AdamW state stay fp32 (`finetune.cast_params` touches parameters only).

    quantize_base      a loaded float model → its quantized base, before lora.apply_lora
    model_from_state   a training state dict (quantized base + adapters) → the model, on the meta device
    merged_state       → the float state dict of a plain PaliGemma, adapters merged (export_merged saves it)
    export_quantized   → the quantized base in nanopali's quantized format + the adapters beside it
    load_quantized     reads what export_quantized wrote
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn

from ..config import PaliGemmaConfig
from ..model import PaliGemma
from ..quant import QuantizedEmbedding, QuantizedLinear, quantize_model, quantized_skeleton
from .lora import LoRALinear, apply_lora, load_adapters, save_adapters

ADAPTER_DIR = "lora"   # export_quantized's adapters, as train.py writes <out-dir>/lora


def quantize_base(model: PaliGemma, scheme: str, group_size: int | None = None,
                  dtype: torch.dtype | None = None) -> PaliGemma:
    """Quantize the frozen base in place (scheme "int8" or "int4", groups of group_size; int4 falls
    back to int8 where its groups do not divide a width: SigLIP's 4304-wide MLP). dtype: of the scales,
    zeros and biases, hence of the dequantized weights; pass the run's frozen dtype (default: each
    weight's own). Loading with `nanopali.load(path, dtype, device, quantize=scheme, group_size=...)`
    gives the same model without ever holding the float one. Call it before lora.apply_lora."""
    return quantize_model(model, scheme, group_size, dtype)


def model_from_state(cfg: PaliGemmaConfig, state: dict[str, torch.Tensor], quantization: dict,
                     lora=None) -> PaliGemma:
    """The model holding `state` (a state dict of a QLoRA run: quantized buffers and, with `lora`, the
    adapters) without copying it; built on the meta device, filled strictly. quantization: the
    model's `quantization` attribute ({"scheme", "group_size"})."""
    model = quantized_skeleton(cfg, quantization["scheme"], quantization["group_size"])
    if lora is not None:
        with torch.device("meta"):
            apply_lora(model, lora)
    model.load_state_dict(state, strict=True, assign=True)
    return model


def _dequantized(module: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """weight (and bias) of one Linear / embedding, float, adapters merged."""
    if isinstance(module, LoRALinear):
        w = module.base.dequantize(dtype=torch.float32) if isinstance(module.base, QuantizedLinear) \
            else module.base.weight.float()
        w = w + module.scale * (module.lora_B.float() @ module.lora_A.float())     # (O, I)
        bias = module.base.bias
    else:                                                        # QuantizedLinear, QuantizedEmbedding
        w, bias = module.dequantize(dtype=torch.float32), getattr(module, "bias", None)
    out = {"weight": w.to(dtype).cpu()}
    return out if bias is None else {**out, "bias": bias.to(dtype).cpu()}


@torch.no_grad()
def merged_state(model: PaliGemma, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """The state dict of a plain float PaliGemma (its names and shapes, on the CPU, in `dtype`) equal to
    `model`: quantized weights dequantized, adapters merged as W + (α / r) · B A in float32 and rounded
    once. One layer is dequantized at a time: the peak is the float result plus one float32 layer."""
    out, done = {}, set()
    for name, module in model.named_modules():
        prefix = name + "." if name else ""
        if any(name.startswith(d) for d in done):
            continue                                            # the base under a LoRALinear: merged above
        if isinstance(module, (LoRALinear, QuantizedLinear, QuantizedEmbedding)):
            out.update({prefix + k: t for k, t in _dequantized(module, dtype).items()})
            done.add(prefix)
        else:
            for k, p in module.named_parameters(recurse=False):
                out[prefix + k] = p.detach().to(dtype).cpu()
    return out


def export_merged(model: PaliGemma, out_dir: str, tokenizer_path: str | None = None,
                  dtype: torch.dtype = torch.bfloat16) -> None:
    """A plain HF-layout checkpoint (`dtype`, adapters merged into the dequantized base) that
    `nanopali.load(out_dir)` reads, and that can itself be quantized again for inference."""
    from ..formats import save_checkpoint

    with torch.device("meta"):
        plain = PaliGemma(model.cfg)
    plain.load_state_dict(merged_state(model, dtype), strict=True, assign=True)
    save_checkpoint(plain, out_dir, tokenizer_path)


def base_state(model: PaliGemma) -> dict[str, torch.Tensor]:
    """The quantized base's state dict under the names of an unwrapped model (no `.base.`, no adapters)."""
    return {k.replace(".base.", "."): t for k, t in model.state_dict().items() if ".lora_" not in k}


def export_quantized(model: PaliGemma, out_dir: str, tokenizer_path: str | None = None) -> None:
    """The quantized base exactly as trained (nanopali's quantized format: `nanopali.load(out_dir)`
    reads it, int8 / int4 as it was) and the adapters unmerged in out_dir/lora (lora.save_adapters).
    Merging into the quantized weights would quantize W + B A again and lose what the adapters learned
    below one quantization step; `load_quantized` puts them back on top instead."""
    from ..formats import save_checkpoint

    base = quantized_skeleton(model.cfg, model.quantization["scheme"], model.quantization["group_size"])
    base.load_state_dict(base_state(model), strict=True, assign=True)
    save_checkpoint(base, out_dir, tokenizer_path)
    if getattr(model, "lora_config", None) is not None:
        save_adapters(model, os.path.join(out_dir, ADAPTER_DIR))


def load_quantized(path: str, dtype=torch.float32, device="cpu", attn_impl: str = "auto"):
    """(model, processor) from export_quantized's directory: the quantized base with its adapters
    (nanopali.load refuses such a directory, which it would otherwise run without them)."""
    from ..formats.hf import load_paligemma_model
    from ..processing import Processor

    model = load_paligemma_model(path, dtype, device, attn_impl)
    processor = Processor.for_model(os.path.join(path, "tokenizer.model"), model.cfg)
    if os.path.isdir(os.path.join(path, ADAPTER_DIR)):
        load_adapters(model, os.path.join(path, ADAPTER_DIR))
        for name, p in model.named_parameters():               # in the activations' dtype: no autocast here
            if ".lora_" in name:
                p.data = p.data.to(model.dtype)
    return model.eval(), processor
