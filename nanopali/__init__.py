"""nanopali: PaliGemma and PaliGemma 2 in plain PyTorch."""
from .checkpoint import CheckpointError, load, save_checkpoint
from .config import PRESETS, PaliGemmaConfig, preset
from .masking import PrefixLMMask
from .model import PaliGemma
from .processing import InputError, Processor
from .generate import generate
from .video import video_frames
from .siglip_checkpoint import load as load_siglip
from .siglip_processing import embed_images, embed_texts, zero_shot

__all__ = ["load", "save_checkpoint", "CheckpointError", "InputError", "PaliGemma", "PaliGemmaConfig",
           "PRESETS", "preset", "PrefixLMMask", "Processor", "generate", "video_frames",
           "load_siglip", "zero_shot", "embed_images", "embed_texts"]
