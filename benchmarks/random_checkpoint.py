"""A full-size PaliGemma checkpoint with random weights, for benchmarks that must not download one.

The 3B model in fp32 is 12 GB; nothing here holds it. The model is built on the meta device only to
list its tensors (name, shape); each tensor is then drawn in 32 M-value pieces and streamed into one
bf16 `model.safetensors` in the hub layout (`formats.hf.nanopali_names`), beside the config.json
nanopali would write (`formats.hf_config.to_hf_config`) and the bundled tiny tokenizer (the benchmark feeds token
ids, the tokenizer only lets a processor be built). safetensors is written by hand, as it is read in
`formats/files.py`: 8-byte header length, JSON table, raw bytes in table order.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from dataclasses import replace

import torch

import nanopali
from nanopali.config import alternating_layers
from nanopali.formats.files import atomic_write
from nanopali.formats.hf import nanopali_names
from nanopali.formats.hf_config import to_hf_config

_PIECE = 32 << 20   # values drawn at a time: 128 MB of fp32, 64 MB once in bf16


def bench_config(generation: int, text_layers: int | None, vision_layers: int | None):
    """The released 3B / 224 px config of a generation, optionally with fewer layers (for quick checks)."""
    cfg = nanopali.preset(f"pg{generation}-3b-224")
    text, vision = cfg.text, cfg.vision
    if text_layers is not None:
        text = replace(text, depth=text_layers,
                       layer_types=alternating_layers(text_layers) if text.layer_types else ())
    if vision_layers is not None:
        vision = replace(vision, depth=vision_layers)
    return replace(cfg, text=text, vision=vision)


def _tensor_table(cfg) -> list[tuple[str, tuple[int, ...]]]:
    """(hub name, shape) of every stored tensor, in the order nanopali's model declares them."""
    with torch.device("meta"):
        model = nanopali.PaliGemma(cfg)
    to_hf = nanopali_names(cfg)
    return [(to_hf[n], tuple(p.shape)) for n, p in model.named_parameters()]


def _draw(name: str, n: int, g: torch.Generator) -> torch.Tensor:
    """n values of one tensor: N(0, 0.02), except SigLIP's LayerNorm scales, which multiply directly
    (1 + N(0, 0.02)); Gemma's RMSNorm stores the scale minus one, so N(0, 0.02) suits it as it is."""
    x = torch.randn(n, generator=g) * 0.02
    if name.startswith("vision_tower") and "norm" in name and name.endswith("weight"):
        x += 1
    return x.to(torch.bfloat16)


def _write_safetensors(path: str, table, seed: int) -> None:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in table:
        size = 2 * torch.Size(shape).numel()
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)   # the data starts 8-byte aligned, as the safetensors package writes it
    g = torch.Generator().manual_seed(seed)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for name, shape in table:
            n = torch.Size(shape).numel()
            for i in range(0, n, _PIECE):
                f.write(_draw(name, min(_PIECE, n - i), g).view(torch.int16).numpy().tobytes())


def write_random_checkpoint(cfg, out_dir: str, seed: int = 0, log=print) -> str:
    """out_dir holding config.json, model.safetensors (bf16) and tokenizer.model for `cfg`; kept as it is
    when it already holds a complete one for the same config (config.json is written last)."""
    config = json.dumps(to_hf_config(cfg), indent=2)
    cfg_path = os.path.join(out_dir, "config.json")
    if os.path.isfile(cfg_path) and open(cfg_path).read() == config and os.path.isfile(
            os.path.join(out_dir, "model.safetensors")):
        log(f"reusing the random checkpoint in {out_dir}")
        return out_dir
    os.makedirs(out_dir, exist_ok=True)
    table = _tensor_table(cfg)
    gb = sum(2 * torch.Size(s).numel() for _, s in table) / 1e9
    log(f"writing a random bf16 checkpoint ({len(table)} tensors, {gb:.1f} GB) to {out_dir} ...")
    atomic_write(os.path.join(out_dir, "model.safetensors"), lambda tmp: _write_safetensors(tmp, table, seed))
    tok = os.path.join(os.path.dirname(nanopali.__file__), "assets", "tiny-shapes", "tokenizer.model")
    shutil.copyfile(tok, os.path.join(out_dir, "tokenizer.model"))
    atomic_write(cfg_path, lambda tmp: open(tmp, "w").write(config))
    return out_dir
