"""Reinforced training on the shapes task: a tiny MobileCLIP student distilled from stored teacher embeddings.

    python -m nanopali.mobileclip.shapes --out runs/mobileclip-shapes [--images 1024 --steps 250]

1. A reinforced dataset (MobileCLIP §3.2), built once and stored in --out: for each scene
   (nanopali/shapes), A = 2 augmentations (the image and its mirror; the parameter is the flip bit),
   the ground-truth caption and S = 2 synthetic captions written by the captioner, the bundled tiny
   PaliGemma ("caption en" on each augmentation), and for every image and caption the embeddings of
   K = 2 teachers. The teachers stand in for MobileCLIP's CLIP ensemble and know the scene exactly:
   each embeds what is there (`_teacher_vectors`), on the image side from the generator and on the
   text side parsed from the caption, so their similarities grade partial matches that a contrastive
   target treats as plain negatives. No teacher runs during training.
2. Two students trained alike from the same seed: λ = 0 (the contrastive loss alone, on the same
   pairs) and λ > 0 (`distill.reinforced_loss`).
3. Both evaluated on held-out scenes: image → caption retrieval among the held-out captions (top-1,
   a hit when the retrieved caption reads as the true one).
Letters: N images, A augmentations, S synthetic captions, K teachers, D teacher width.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from .. import shapes
from .distill import ReinforcedBatch, reinforced_loss
from .mci import MCiConfig
from .model import MobileCLIP, MobileCLIPConfig, PreprocessConfig
from .processing import MobileCLIPProcessor
from .text import TextConfig

IMAGE_SIZE = 64
TEACHER_SCALES = (30.0, 30.0)   # 1/τk of the two teachers
# CLIP's merges cut to the first 3000 (10 KB; tests/mobileclip_reference.py): enough for the task's few words.
SMALL_BPE = os.path.join(shapes.ASSETS, "mobileclip", "bpe_3000.txt.gz")


def student_config(vocab_size: int = 3514) -> MobileCLIPConfig:
    """An MCi of four single-block stages (widths 16…128) and a 2-layer text transformer."""
    image = MCiConfig((1, 1, 1, 1), (16, 32, 64, 128), embed_dim=64, image_size=IMAGE_SIZE)
    # 32 ids hold the longest caption (27 with SOT / EOT; the cut vocabulary splits some words in two or three)
    text = TextConfig(vocab_size=vocab_size, context_length=32, width=64, num_heads=2, depth=2, embed_dim=64)
    return MobileCLIPConfig(image, text, PreprocessConfig(IMAGE_SIZE, (0.5,) * 3, (0.25,) * 3))


# ---- the teachers: attribute embeddings of a scene, and of a caption parsed back into one ----

_CELLS = [(k, c) for k in shapes.KINDS for c in shapes.COLOURS]


def _teacher_vectors(groups: list[tuple[int, str, str]]) -> list[np.ndarray]:
    """[(count, colour, kind)] → the two teachers' vectors. Teacher 0: counts per (kind, colour), and the
    total one-hot. Teacher 1: counts per kind, counts per colour, presence per (kind, colour), the total
    one-hot. Both tell every caption apart; they grade near misses differently, as two CLIPs would."""
    cells, kinds, colours = len(_CELLS), len(shapes.KINDS), len(shapes.COLOURS)
    t0, t1 = np.zeros(cells + 5), np.zeros(kinds + colours + cells + 5)
    for n, colour, kind in groups:
        cell = _CELLS.index((kind, colour))
        t0[cell] += n
        t1[shapes.KINDS.index(kind)] += n
        t1[kinds + list(shapes.COLOURS).index(colour)] += n
        t1[kinds + colours + cell] = 1
    total = min(sum(n for n, _, _ in groups), 4)
    t0[cells + total] = t1[kinds + colours + cells + total] = 1
    return [t0, t1]


def parse_caption(text: str) -> list[tuple[int, str, str]]:
    """'two red circles and a blue square' → [(2, 'red', 'circle'), (1, 'blue', 'square')]; unreadable
    groups are dropped (a captioner's mistake becomes a sparser teacher embedding)."""
    out = []
    for group in text.strip().split(" and "):
        w = group.split()
        if len(w) == 3 and w[0] in shapes.NUMBERS and w[1] in shapes.COLOURS and w[2].rstrip("s") in shapes.KINDS:
            out.append((shapes.NUMBERS.index(w[0]) + 1, w[1], w[2].rstrip("s")))
    return out


def scene_groups(scene) -> list[tuple[int, str, str]]:
    return [(1, s.colour, s.kind) for s in scene.shapes]


def build_dataset(num_images: int, seed0: int = 0, captioner: str | None = shapes.BUNDLED_MODEL) -> dict:
    """The reinforced dataset (see the module docstring) as arrays; captions as lists of strings."""
    scenes = [shapes.make_scene(seed0 + i, IMAGE_SIZE) for i in range(num_images)]
    images = np.stack([np.asarray(s.image()) for s in scenes])                           # (N, S, S, 3) uint8
    augmented = [images, images[:, :, ::-1]]                                             # A = 2: flip bit 0, 1
    truth = [shapes.caption(s) for s in scenes]
    synthetic = [list(truth) for _ in augmented]
    if captioner is not None:
        from PIL import Image

        from ..formats import load
        from ..generate import generate
        model, processor = load(captioner)
        for a, imgs in enumerate(augmented):
            for i in range(0, num_images, 64):
                batch = [Image.fromarray(np.ascontiguousarray(x)) for x in imgs[i:i + 64]]
                synthetic[a][i:i + 64] = generate(model, processor, batch, "caption en", max_new_tokens=24)
    teach = lambda groups: _teacher_vectors(groups)                                       # noqa: E731
    t_img = [teach(scene_groups(s)) for s in scenes]
    t_txt = [teach(parse_caption(c)) for c in truth]
    t_syn = [[teach(parse_caption(c)) for c in caps] for caps in synthetic]
    stack = lambda rows, k: torch.tensor(np.stack([r[k] for r in rows]), dtype=torch.float32)  # noqa: E731
    return {"images": torch.from_numpy(np.stack(augmented, 1).copy()),                   # (N, A, S, S, 3)
            "flip": torch.tensor([0, 1]), "captions": truth, "synthetic": [list(c) for c in zip(*synthetic)],
            "teacher_images": [torch.stack([stack(t_img, k)] * len(augmented), 1) for k in range(2)],   # (N, A, Dk)
            "teacher_texts": [stack(t_txt, k) for k in range(2)],                                       # (N, Dk)
            "teacher_synthetic": [torch.stack([stack(s, k) for s in t_syn], 1) for k in range(2)]}      # (N, S, Dk)


def _pixels(processor: MobileCLIPProcessor, images: torch.Tensor) -> torch.Tensor:
    """(b, S, S, 3) uint8 → normalised (b, 3, S, S), as the processor's arithmetic (images are already S px)."""
    x = images.float() / 255
    return ((x - torch.from_numpy(processor.mean)) / torch.from_numpy(processor.std)).permute(0, 3, 1, 2)


@torch.no_grad()
def init_text_tower_(model: MobileCLIP) -> None:
    """open_clip `TextTransformer.init_parameters` for the tensors our modules leave empty."""
    t, w = model.text_tower, model.cfg.text.width
    t.token_embedding.weight.normal_(0, 0.02)
    t.positional_embedding.normal_(0, 0.01)
    t.text_projection.normal_(0, w ** -0.5)
    for block in t.transformer.resblocks:
        block.attn.in_proj_weight.normal_(0, w ** -0.5)
        block.attn.in_proj_bias.zero_()


def train(data: dict, lam: float, steps: int, batch_size: int = 64, seed: int = 0, lr: float = 2e-3):
    torch.manual_seed(seed)
    cfg = student_config()
    model = MobileCLIP(cfg)
    processor = MobileCLIPProcessor(SMALL_BPE, cfg)
    init_text_tower_(model)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    g = torch.Generator().manual_seed(seed)
    N, A = data["images"].shape[:2]
    S = len(data["synthetic"][0])
    gt_ids, syn_ids = processor.tokenizer(data["captions"]), [processor.tokenizer([c[s] for c in data["synthetic"]])
                                                              for s in range(S)]
    model.train()
    for step in range(steps):
        idx = torch.randperm(N, generator=g)[:batch_size]
        a = torch.randint(A, (len(idx),), generator=g)                   # one stored augmentation per image
        s = torch.randint(S, (len(idx),), generator=g)                   # one synthetic caption per image
        syn = torch.stack([syn_ids[int(j)][int(i)] for i, j in zip(idx, s)])
        targets = ReinforcedBatch([t[idx, a] for t in data["teacher_images"]], [t[idx] for t in data["teacher_texts"]],
                                  [t[idx, s] for t in data["teacher_synthetic"]])
        x = model.encode_images(_pixels(processor, data["images"][idx, a]))
        losses = reinforced_loss(x, model.encode_texts(gt_ids[idx]), model.encode_texts(syn),
                                 model.logit_scale.exp(), targets, list(TEACHER_SCALES), lam)
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, np.log(100))                     # open_clip's clamp of 1/τ̂ at 100
    return model.eval(), processor


@torch.no_grad()
def evaluate(model: MobileCLIP, processor: MobileCLIPProcessor, num_scenes: int = 256) -> dict:
    """Held-out scenes: top-1 image → caption retrieval among their (distinct) captions."""
    scenes = [shapes.make_scene(shapes.HELD_OUT_SEED + i, IMAGE_SIZE) for i in range(num_scenes)]
    truth = [shapes.caption(s) for s in scenes]
    candidates = sorted(set(truth))
    images = torch.from_numpy(np.stack([np.asarray(s.image()) for s in scenes]))
    x = F.normalize(model.encode_images(_pixels(processor, images)), dim=-1)
    y = F.normalize(model.encode_texts(processor.tokenizer(candidates)), dim=-1)
    best = (x @ y.T).argmax(-1).tolist()
    return {"image_to_caption_top1": sum(candidates[b] == t for b, t in zip(best, truth)) / num_scenes,
            "candidates": len(candidates)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for the reinforced dataset and results.json")
    p.add_argument("--images", type=int, default=1024, help="training scenes")
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--lam", type=float, default=0.7, help="λ, the distillation weight of the distilled student")
    p.add_argument("--no-captioner", action="store_true", help="synthetic captions = ground truth (no PaliGemma)")
    p.add_argument("--eval-scenes", type=int, default=256)
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one pair of students per seed")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: the cores this process may use; "
                   "more are cut to them; on a busy 2-core machine 1 was 6x faster than 2)")
    args = p.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be ≥ 1, got {args.threads}")
    from ..cpu.machine import set_threads
    _, note = set_threads(args.threads)
    if note:
        print(note, flush=True)
    os.makedirs(args.out, exist_ok=True)
    start = time.time()
    path = os.path.join(args.out, f"reinforced-{args.images}{'-nocap' if args.no_captioner else ''}.pt")
    if os.path.isfile(path):
        data = torch.load(path, weights_only=True)
    else:
        data = build_dataset(args.images, captioner=None if args.no_captioner else shapes.BUNDLED_MODEL)
        torch.save(data, path)
    results = {"dataset_s": round(time.time() - start, 1),
               "synthetic_caption_exact": float(np.mean([c == t for cs, t in zip(data["synthetic"], data["captions"])
                                                         for c in cs]))}
    for seed in args.seeds:
        for name, lam in (("contrastive_only", 0.0), ("reinforced", args.lam)):
            t = time.time()
            model, processor = train(data, lam, args.steps, seed=seed)
            scores = evaluate(model, processor, args.eval_scenes)
            results[f"{name}_seed{seed}"] = {"lam": lam, **scores, "train_s": round(time.time() - t, 1)}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
