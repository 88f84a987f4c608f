"""Stage 0 of the bundled tiny model: its image encoder learns to see shapes before the decoder learns to talk.

PaliGemma never trains its image encoder from scratch: it starts from SigLIP, pretrained alone (paper
§3.2, "Stage0: unimodal pretraining"), and even then warms the encoder's learning rate up slowly in
stage 1 so that the random decoder's first gradients do not wreck it. There is no pretrained SigLIP
for 56-pixel cartoons, and a ViT trained only through the language model's loss learns very slowly:
at first the decoder attends evenly to all image tokens, so each patch gets a sliver of the gradient
(measured on this task: caption loss stuck at chance on the shape kind for 600 steps while the
colour was learned in 150).

So stage 0 here is a dense, supervised stand-in for SigLIP's pretraining: a linear head on the
projector's output names, for every patch, the kind and the colour of the shape covering it (or
background). 16 labels per image instead of one caption; the kind accuracy on shape patches reaches
~100 % in about 300 steps (measured: 1.000 after 400 steps, 13-16 s on two CPU cores). The head is then dropped, and stage 1
(train.py recipes/tiny_shapes.py, `trainable = "llm"`) trains the decoder with the image encoder and
projector frozen.

    python -m nanopali.shapes runs/tiny-shapes/data      # data, tokenizer and this stage → data/init
"""
from __future__ import annotations

import os
import time

import numpy as np
import sentencepiece as spm
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from .. import formats
from ..config import PaliGemmaConfig, alternating_layers
from ..gemma import GemmaConfig
from ..model import PaliGemma
from ..processing import preprocess_image
from ..train import finetune
from ..vit import SigLIPConfig
from . import task as shapes


def tiny_config(tokenizer_path: str) -> PaliGemmaConfig:
    """The bundled model: PaliGemma 2's architecture at widths of 128 (about 2 M parameters).

    Gemma 2 decoder (post-norms, attention soft-cap 50, final soft-cap 30, sliding window on even
    layers), 4 layers, 4 query heads sharing 2 KV heads (GQA); SigLIP encoder 4 layers at 56 px with
    14 px patches (16 image tokens). The window of 24 keys is shorter than every detection sequence
    (16 image tokens + BOS + prompt + \\n + one box ≥ 27), so it bites as PaliGemma 2's 4096 does only
    at 896 px. Vocabulary: the tokenizer's pieces, `<image>` right after them and 64 padding rows, as
    PaliGemma's 257152 + 64 (docs/files.md#token-ids)."""
    pieces = spm.SentencePieceProcessor(model_file=tokenizer_path).get_piece_size()
    text = GemmaConfig(vocab_size=pieces + 64, width=128, depth=4, mlp_dim=512, num_heads=4, num_kv_heads=2,
                       head_dim=32, query_pre_attn_scalar=32, post_norms=True, attn_softcap=50.0,
                       final_softcap=30.0, sliding_window=24, layer_types=alternating_layers(4))
    vision = SigLIPConfig(width=128, depth=4, mlp_dim=512, num_heads=4, patch_size=14, image_size=shapes.IMAGE_SIZE)
    return PaliGemmaConfig(vision=vision, text=text, image_token_id=pieces)


def patch_labels(scene: shapes.Scene, grid: int) -> tuple[np.ndarray, np.ndarray]:
    """(kind, colour) of every patch of a grid x grid patching, raster order, each (grid², ): 0 for
    background, else 1 + the index in KINDS / COLOURS of the shape whose box holds the patch centre."""
    kind, colour = np.zeros((grid, grid), np.int64), np.zeros((grid, grid), np.int64)
    centres = (np.arange(grid) + 0.5) * scene.size / grid
    for s in scene.shapes:
        x0, y0, x1, y1 = s.box
        rows, cols = (y0 <= centres) & (centres < y1), (x0 <= centres) & (centres < x1)
        cell = rows[:, None] & cols[None, :]
        kind[cell] = 1 + shapes.KINDS.index(s.kind)
        colour[cell] = 1 + list(shapes.COLOURS).index(s.colour)
    return kind.reshape(-1), colour.reshape(-1)


def pretrain_image_encoder(out_dir: str, tokenizer_path: str, data_dir: str, seeds, steps: int = 400,
                           batch_size: int = 32, lr: float = 1e-3, seed: int = 0, log_every: int = 100) -> str:
    """Write out_dir: a full tiny PaliGemma (config.json, model.safetensors, tokenizer.model) whose
    decoder is freshly initialised (finetune.init_random) and whose image encoder + projector were
    trained `steps` steps on patch labels of the scenes `seeds` (images read from data_dir/images,
    as shapes.write_jsonl wrote them). Returns out_dir."""
    cfg = tiny_config(tokenizer_path)
    model = finetune.init_random(PaliGemma(cfg), seed)
    if steps > 0:
        grid = cfg.vision.image_size // cfg.vision.patch_size
        seeds = list(seeds)
        pixels = torch.stack([preprocess_image(Image.open(os.path.join(data_dir, "images", f"{s:08d}.png")),
                                               cfg.vision.image_size) for s in seeds])     # (N, 3, S, S)
        labels = [patch_labels(shapes.make_scene(s, shapes.RENDER_SIZE), grid) for s in seeds]
        kinds = torch.from_numpy(np.stack([k for k, _ in labels]))                        # (N, P)
        colours = torch.from_numpy(np.stack([c for _, c in labels]))                      # (N, P)
        head = nn.Linear(cfg.text.width, 1 + len(shapes.KINDS) + 1 + len(shapes.COLOURS))
        finetune.init_random(head, seed + 1)
        params = [*model.vision_tower.parameters(), *model.projector.parameters(), *head.parameters()]
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        g = torch.Generator().manual_seed(seed)
        nk = 1 + len(shapes.KINDS)
        t0, acc = time.perf_counter(), []
        for step in range(1, steps + 1):
            for group in optimizer.param_groups:
                group["lr"] = finetune.lr_at(step, lr, steps, min(50, steps // 4), lr / 10)
            idx = torch.randint(0, len(seeds), (batch_size,), generator=g)
            out = head(model.projector(model.vision_tower(pixels[idx])))                  # (B, P, 4 + 6)
            loss = F.cross_entropy(out[..., :nk].flatten(0, 1), kinds[idx].flatten()) + \
                F.cross_entropy(out[..., nk:].flatten(0, 1), colours[idx].flatten())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            shape_patch = kinds[idx] > 0
            acc.append((out[..., :nk].argmax(-1) == kinds[idx])[shape_patch].float().mean().item())
            if step % log_every == 0 or step == steps:
                print(f"stage 0 step {step}/{steps} | loss {loss.item():.4f} | kind accuracy on shape patches "
                      f"{np.mean(acc[-log_every:]):.3f} | {time.perf_counter() - t0:.0f} s", flush=True)
    formats.save_checkpoint(model, out_dir, tokenizer_path)
    print(f"wrote {out_dir} (stage 0: image encoder + projector trained {steps} steps; decoder random)")
    return out_dir
