"""MobileCLIP2 (arXiv 2508.20691) and MobileCLIP (arXiv 2311.17049): fast two-tower image-text models.

    reparam.py     the train-time multi-branch blocks and `reparameterize`, which folds them into one conv
    mci.py         MCi, the hybrid conv / attention image encoder of S0–S4 (timm fastvit_mci*)
    vit.py         the ViT image encoders of B (convolutional stem) and L-14
    text.py        CLIP's text transformer
    model.py       the two towers, the temperature, presets for every released variant
    tokenizer.py   CLIP's byte-level BPE, written out
    processing.py  images and texts → tensors (siglip's zero_shot / embed_* take them as they are)
    checkpoint.py  open_clip directories and Apple's .pt files, strictly, train-time or fused
    cpu_inference.py  CPU inference swaps the loader applies: MCi in channels-last, oneDNN products
    distill.py     the multi-modal reinforced training loss (contrastive + distillation)
    shapes.py      a small student distilled from stored teacher embeddings on the shapes task

Data flows image → MCi / ViT → x ┐ and text → tokenizer → text transformer → y ┘ → normalised →
logits; distill.py and shapes.py train the same model from stored teacher embeddings.
"""
from .checkpoint import is_mobileclip_dir, load_mobileclip, load_mobileclip_model
from .model import MOBILECLIP_PRESETS, MobileCLIP, MobileCLIPConfig, mobileclip_preset
from .processing import MobileCLIPProcessor
from .reparam import reparameterize
from .tokenizer import BPETokenizer

__all__ = ["is_mobileclip_dir", "load_mobileclip", "load_mobileclip_model", "MOBILECLIP_PRESETS", "MobileCLIP",
           "MobileCLIPConfig", "mobileclip_preset", "MobileCLIPProcessor", "reparameterize", "BPETokenizer"]
