"""nanopali: PaliGemma and PaliGemma 2 in plain PyTorch.

The top of the package is the paper, one file per idea, in the order data flows through them:
processing → vit (SigLIP image encoder) → projector → masking (prefix-LM) → gemma (decoder, with
attention and kv_cache) → model (ties them) → generate; config names the released variants.
Folders hold the rest: formats/ (checkpoint files), tasks/ (boxes, masks, video), train/ (fine-tuning),
siglip/ and mobileclip/ (the two-tower models), shapes/ (the bundled tiny model's task), kernels/ (fused attention),
quant/ (weight-only int8 / int4). `import nanopali` loads only what inference needs; the names of the
folders below are imported on first use.
"""
import importlib

from .config import PRESETS, PaliGemmaConfig, preset
from .formats import CheckpointError, load, save_checkpoint
from .generate import generate
from .masking import PrefixLMMask
from .model import PaliGemma
from .processing import InputError, Processor

_LAZY = {  # public name → the module that defines it, imported when the name is first used
    "video_frames": "nanopali.tasks.video",
    "load_siglip": "nanopali.siglip", "zero_shot": "nanopali.siglip",
    "embed_images": "nanopali.siglip", "embed_texts": "nanopali.siglip",
    "load_mobileclip": "nanopali.mobileclip",
}

__all__ = ["load", "save_checkpoint", "CheckpointError", "InputError", "PaliGemma", "PaliGemmaConfig",
           "PRESETS", "preset", "PrefixLMMask", "Processor", "generate", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'nanopali' has no attribute {name!r}")
