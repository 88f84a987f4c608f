"""The linear projector from image tokens to the decoder's width (PaliGemma paper §3.1).

One Linear(1152 → D) with bias and no activation: big_vision's ViT classifier head `img/head`,
transformers' `multi_modal_projector.linear`. Its output is NOT multiplied by √D, unlike the text
embeddings (docs/variants.md#projector: transformers ≥ 5 and big_vision agree; transformers 4.x
divided by √D first).
"""
from __future__ import annotations

import torch.nn as nn


class Projector(nn.Module):
    def __init__(self, vision_width: int, text_width: int):
        super().__init__()
        self.linear = nn.Linear(vision_width, text_width)

    def forward(self, x):  # (B, P, W) → (B, P, D)
        return self.linear(x)
