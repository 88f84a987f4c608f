"""SigLIP and SigLIP 2 as two-tower image-text models of their own (arXiv 2303.15343, 2502.14786).

PaliGemma uses only SigLIP's image encoder (nanopali/vit.py). This folder adds what the two-tower
models have besides it, and their checkpoints:

    model.py       `TwoTowers` (what SigLIP and MobileCLIP share: normalised embeddings → logits), the
                   text tower, the attention-pooling (MAP) head, the learned temperature and bias, the
                   sigmoid loss, presets for every released checkpoint
    naflex.py      SigLIP 2 NaFlex: any aspect ratio, per-image position tables
    processing.py  text and image inputs; zero-shot classification and retrieval embeddings
    checkpoint.py  Hugging Face directories, strictly; a SigLIP 2 tower put into a PaliGemma
    onednn.py      CPU inference of both towers' Linears and MLPs through oneDNN, bias and GELU fused:
                   module swaps the loaders apply (MobileCLIP's too)

Data flows image → vit encoder → MAP head ┐ and text → text tower ┘ → normalised embeddings → logits.
"""
from .checkpoint import load_siglip, paligemma_with_siglip
from .model import SIGLIP_PRESETS, SigLIPModel, SigLIPModelConfig, TextConfig, sigmoid_loss, siglip_preset
from .processing import SigLIPProcessor, embed_images, embed_texts, zero_shot

__all__ = ["load_siglip", "paligemma_with_siglip", "SIGLIP_PRESETS", "SigLIPModel", "SigLIPModelConfig", "TextConfig",
           "sigmoid_loss", "siglip_preset", "SigLIPProcessor", "embed_images", "embed_texts", "zero_shot"]
