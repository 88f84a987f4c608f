"""Checkpoint files in, checkpoint files out: everything between a file on disk and a model's parameters.

    files.py      the safetensors format read by hand (validated, no pickle), atomic writes, dtype/device names
    strict.py     the one strict loader every format fills a model through
    hf_config.py  a Hugging Face config.json ↔ PaliGemmaConfig: transformers' defaults, size limits
    hf.py         Hugging Face PaliGemma directories: three key layouts in, the hub layout out
    quantized.py  nanopali's quantized directory (a quantized model's save and load): its one home
    bigvision.py  Google's big_vision `.npz` checkpoints (stacked layers, einsum shapes)
    images.py     image files: the one strict image loader every processor opens images with, and RGB
    hub.py        Hugging Face hub names → the snapshot directory in the hub cache (huggingface_hub, on use)

Data flows file → Source (name, shape, reader) → rename → check → parameter. `load` below is the one
entry point behind `nanopali.load`.
"""
from __future__ import annotations

import os

import torch

from .files import CheckpointError
from .hub import local_path
from .hf import load_paligemma_model, refuse_unmerged_qlora, save_checkpoint

__all__ = ["load", "save_checkpoint", "CheckpointError"]


def load(path, dtype=torch.float32, device="cpu", attn_impl: str = "auto", *, variant=None,
         tokenizer: str | None = None, image_size: int | None = None, quantize: str | None = None,
         group_size: int | None = None, revision: str | None = None):
    """(model, processor) from a Hugging Face PaliGemma / PaliGemma 2 checkpoint directory or hub name
    (`google/paligemma2-3b-pt-224`, at `revision`: hub.py), or from a big_vision `.npz` file, which needs
    `tokenizer=` and takes `variant=` (see `bigvision.load_npz`).

    dtype: float32, bfloat16, float16, or "auto" (bf16 on CUDA and on CPUs with native bf16, else fp32).
    image_size: load into another resolution, resampling the position table (the native size never does).
    quantize: None, "int8" or "int4" (with group_size 32 / 64 / 128 / 256, default 64): weight-only
    quantization of every Linear and of the tied embedding, done tensor by tensor while reading
    (nanopali/quant). A directory saved from a quantized model loads quantized as it was saved."""
    from ..processing import Processor

    path = local_path(path, "paligemma", revision)
    if os.fspath(path).endswith(".npz"):
        from .bigvision import load_npz
        model, processor = load_npz(path, variant=variant, tokenizer=tokenizer, dtype=dtype, device=device,
                                    attn_impl=attn_impl, image_size=image_size, quantize=quantize,
                                    group_size=group_size)
        return for_this_cpu(model), processor
    if variant is not None or tokenizer is not None:
        raise CheckpointError(f"variant= and tokenizer= are for big_vision .npz files; {path} is loaded as a "
                              "Hugging Face directory, whose config.json and tokenizer.model say both")
    tok = os.path.join(os.fspath(path), "tokenizer.model")
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")) and not os.path.isfile(tok):
        raise CheckpointError(f"No tokenizer.model in {path} (the SentencePiece file of the checkpoint)")
    refuse_unmerged_qlora(os.fspath(path))
    model = load_paligemma_model(path, dtype, device, attn_impl, image_size, quantize, group_size)
    return for_this_cpu(model), Processor.for_model(tok, model.cfg)


def for_this_cpu(model):
    """The speed choices measured on this CPU (nanopali/cpu/products.py), swapped into a CPU model:
    the decode step's one-row products, and a quantized model's kernel/dense crossover."""
    if next(model.parameters()).device.type == "cpu":
        from ..cpu.products import use_fastest_row_products, use_measured_kernel_rows
        use_fastest_row_products(model)
        use_measured_kernel_rows(model)
    return model
