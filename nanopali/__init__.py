"""nanopali: PaliGemma and PaliGemma 2 in plain PyTorch.

The top of the package is the paper, one file per idea, in the order data flows through them:
processing → vit (SigLIP image encoder) → projector → masking (prefix-LM) → gemma (decoder, with
attention and kv_cache) → model (ties them) → generate; config holds the dataclasses and presets.
Folders hold the rest: formats/ (checkpoint files), tasks/ (boxes, masks, video), train/ (fine-tuning),
siglip/ and mobileclip/ (the two-tower models), shapes/ (the bundled tiny model's task), kernels/ (fused attention),
quant/ (weight-only int8 / int4). `import nanopali` loads only what inference needs; the names of the
folders below are imported on first use.
"""
import importlib
import importlib.abc
import importlib.util
import sys
import warnings

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


# Modules that moved into folders (issue 14's reorganisation). An import of the old path still works:
# it yields the module at its new path, with one DeprecationWarning naming that path.
MOVED = {
    "nanopali.checkpoint": "nanopali.formats.hf", "nanopali.files": "nanopali.formats.files",
    "nanopali.bigvision": "nanopali.formats.bigvision",
    "nanopali.detection": "nanopali.tasks.detection", "nanopali.segmentation": "nanopali.tasks.segmentation",
    "nanopali.video": "nanopali.tasks.video",
    **{f"nanopali.{m}": f"nanopali.train.{m}" for m in ("data", "finetune", "lora", "resume", "parallel", "cost",
                                                         "evaluate")},
    "nanopali.siglip2": "nanopali.siglip.naflex", "nanopali.siglip_checkpoint": "nanopali.siglip.checkpoint",
    "nanopali.siglip_processing": "nanopali.siglip.processing", "nanopali.shapes_pretrain": "nanopali.shapes.pretrain",
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        return importlib.util.spec_from_loader(fullname, self) if fullname in MOVED else None

    def create_module(self, spec):
        new = MOVED[spec.name]
        warnings.warn(f"{spec.name} moved to {new}; import it from there", DeprecationWarning, stacklevel=3)
        module = importlib.import_module(new)
        self.spec = module.__spec__  # importlib stamps the old name's spec on the module; put its own back
        return module

    def exec_module(self, module):
        module.__spec__ = self.spec


if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
    sys.meta_path.append(_MovedModuleFinder())
