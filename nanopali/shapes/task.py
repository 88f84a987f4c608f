"""Shapes: a synthetic task small enough for a few-million-parameter PaliGemma trained on a CPU.

Every scene is drawn from one integer seed: 1-4 circles, squares or triangles of five colours, small
(one cell) or large (2x2 cells) on a GRID x GRID lattice, on a plain or noisy grey background
(make_scene). Because the generator knows every shape, it also knows the exact answer to each of
PaliGemma's task prefixes (paper §3.2, docs/sequence.md#prompts):

    caption en                          a red circle and two blue squares      (canonical order)
    count shapes                        3
    answer en what color is the circle? red                 (asked only when there is one circle)
    detect circle ; square              <loc..><loc..><loc..><loc..> circle ; ...   (docs/boxes-and-masks.md#detection)

It is the task of the tiny model bundled in nanopali/assets/tiny-shapes; this file also holds the
task's tokenizer (`train_tokenizer`) and the held-out metrics (`evaluate`). Regenerate the data,
tokenizer and stage-0 image encoder with `python -m nanopali.shapes OUT_DIR` (__main__.py; then
recipes/tiny_shapes.py).
"""
from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from ..tasks.detection import box_to_locs

KINDS = ("circle", "square", "triangle")
COLOURS = {"red": (215, 45, 45), "green": (45, 165, 70), "blue": (45, 85, 220), "yellow": (235, 200, 35),
           "purple": (145, 65, 195)}
NUMBERS = ("a", "two", "three", "four")
HELD_OUT_SEED = 10_000_000   # training data uses seeds below this, evaluation seeds from here on
# nanopali/assets/images/shapes_{1,2,3}.png (sample.py's default image is the first): of the seeds from
# 20,000,000 on (neither training nor held-out seeds) whose scene has three shapes of three kinds and three
# colours, the first three the shipped model answers right on caption, count and detection (6 of the
# first 7 such scenes; it missed a box in 20,000,194). Its held-out rates are in docs/bundled-model.md.
BUNDLED_SEEDS = (20_000_276, 20_000_292, 20_000_300)
ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
BUNDLED_MODEL = os.path.join(ASSETS, "tiny-shapes")          # the model trained on this task, HF layout
SUPERSAMPLE = 4              # shapes are drawn 4x larger, then box-filtered: anti-aliased edges
GRID = 4                     # shapes sit on a 4x4 lattice of cells (see make_scene)
MARGIN = 1 / 8               # ... inset by an eighth of a cell on each side, so neighbours never touch
IMAGE_SIZE = 56              # the bundled model's input: one 14 px SigLIP patch per cell
RENDER_SIZE = 224            # scenes are drawn this large (training data too), then resized to 56


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    box: tuple[int, int, int, int]   # (x0, y0, x1, y1) pixels, the tight box: x1, y1 are the far edges


@dataclass(frozen=True)
class Scene:
    seed: int
    size: int                        # the image is size x size pixels
    shapes: tuple[Shape, ...]
    background: str                  # "plain" or "noisy"
    grey: int                        # background level 0..255

    def image(self) -> Image.Image:
        """The rendered RGB image (deterministic: noise comes from the scene's seed)."""
        rng = np.random.default_rng([self.seed, 1])
        S, k = self.size, SUPERSAMPLE
        img = np.full((S, S, 3), float(self.grey))
        if self.background == "noisy":
            img += rng.normal(0.0, 28.0, size=(S, S, 3))
        for s in self.shapes:                  # drawn in its own box only, then blended in
            x0, y0, x1, y1 = s.box
            w, h = x1 - x0, y1 - y0
            mask = Image.new("L", (w * k, h * k), 0)
            draw = ImageDraw.Draw(mask)
            if s.kind == "circle":
                draw.ellipse((0, 0, w * k - 1, h * k - 1), fill=255)
            elif s.kind == "square":
                draw.rectangle((0, 0, w * k - 1, h * k - 1), fill=255)
            else:
                draw.polygon([(w * k / 2, 0), (w * k - 1, h * k - 1), (0, h * k - 1)], fill=255)
            alpha = np.asarray(mask.resize((w, h), Image.Resampling.BOX), dtype=np.float64)[..., None] / 255
            colour = np.array(COLOURS[s.colour]) + rng.integers(-20, 21, size=3)   # a little jitter
            img[y0:y1, x0:x1] = img[y0:y1, x0:x1] * (1 - alpha) + colour * alpha
        return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB")


def make_scene(seed: int, size: int = RENDER_SIZE) -> Scene:
    """A scene from its seed: the same seed gives the same scene at every image size (≤ 1024).

    Each shape fills one cell or a 2x2 block of cells of a GRID x GRID lattice, inset by MARGIN. At
    the bundled model's 56 px a cell is exactly one 14 px SigLIP patch, so every patch shows one
    whole small shape or one corner of a large one: the kind is visible inside a single patch, and
    16 image tokens keep a CPU training step short. That is what lets a ViT trained from scratch for
    minutes on a CPU tell shapes apart (measured at 112 px: shapes at arbitrary positions reached 0.18
    caption exact match after 6000 steps; 1-3-cell shapes on an 8x8 grid, whose inner patches are a
    plain colour in every kind, kept the caption loss at chance on the kind for 600 steps). The boxes
    are exact: the answer is where the generator drew the shape."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 5))
    placed: list[tuple[tuple[int, int, int, int], str, str]] = []   # (cell box, kind, colour)
    for _ in range(n):
        side = int(rng.integers(1, 3))
        kind, colour = KINDS[int(rng.integers(len(KINDS)))], list(COLOURS)[int(rng.integers(len(COLOURS)))]
        for _ in range(50):             # rejection sampling; a shape that never fits is left out
            x0, y0 = (int(v) for v in rng.integers(0, GRID - side + 1, size=2))
            box = (x0, y0, x0 + side, y0 + side)
            if not any(boxes_near(box, b, gap=0) for b, _, _ in placed):      # cells never overlap
                placed.append((box, kind, colour))
                break
    inset = (MARGIN, MARGIN, -MARGIN, -MARGIN)
    shapes = tuple(Shape(kind, colour, tuple(round((c + m) * size / GRID) for c, m in zip(box, inset)))
                   for box, kind, colour in placed)
    background = "noisy" if rng.random() < 0.5 else "plain"
    return Scene(seed, size, shapes, background, int(rng.integers(110, 236)))


def boxes_near(a, b, gap: int) -> bool:
    return a[0] < b[2] + gap and b[0] < a[2] + gap and a[1] < b[3] + gap and b[1] < a[3] + gap


# ---- answers --------------------------------------------------------------------------------------

def _order(s: Shape):
    return KINDS.index(s.kind), list(COLOURS).index(s.colour), s.box[1], s.box[0]


def caption(scene: Scene) -> str:
    """'a red circle and two blue squares': groups of (kind, colour) in KINDS then COLOURS order."""
    groups: dict[tuple[str, str], int] = {}
    for s in sorted(scene.shapes, key=_order):
        groups[s.kind, s.colour] = groups.get((s.kind, s.colour), 0) + 1
    return " and ".join(f"{NUMBERS[n - 1]} {colour} {kind}{'s' if n > 1 else ''}"
                        for (kind, colour), n in groups.items())


def count(scene: Scene) -> str:
    return str(len(scene.shapes))


def colour_questions(scene: Scene) -> dict[str, str]:
    """{prompt: answer} for every kind that occurs exactly once (otherwise "the circle" is ambiguous)."""
    kinds = [s.kind for s in scene.shapes]
    return {f"answer en what color is the {s.kind}?": s.colour for s in scene.shapes if kinds.count(s.kind) == 1}


def detect(scene: Scene, kinds=KINDS) -> str:
    """Boxes of the shapes of `kinds`, `<locY0><locX0><locY1><locX1> kind` joined by ' ; ', in the
    order of KINDS, then top to bottom, left to right. Empty when none of `kinds` is in the image."""
    out = []
    for s in sorted((s for s in scene.shapes if s.kind in kinds), key=lambda s: (KINDS.index(s.kind), s.box[1],
                                                                               s.box[0])):
        out.append(f"{box_to_locs(s.box, scene.size, scene.size)} {s.kind}")
    return " ; ".join(out)


def detect_prompt(kinds=KINDS) -> str:
    return "detect " + " ; ".join(kinds)


def examples(scene: Scene) -> list[tuple[str, str]]:
    """The (prefix, suffix) pairs one scene trains: a caption, a count, one colour question when there
    is an unambiguous one, and one detection prompt (all kinds half the time, else a random subset)."""
    rng = np.random.default_rng([scene.seed, 2])
    pairs = [("caption en", caption(scene)), ("count shapes", count(scene))]
    questions = sorted(colour_questions(scene).items())
    if questions:
        pairs.append(questions[int(rng.integers(len(questions)))])
    if rng.random() < 0.5:
        kinds = KINDS
    else:
        kinds = tuple(k for k, keep in zip(KINDS, rng.integers(0, 2, size=3)) if keep) or (KINDS[int(rng.integers(3))],)
    pairs.append((detect_prompt(kinds), detect(scene, kinds)))
    return pairs


def kind_count_examples(scene: Scene) -> list[tuple[str, str]]:
    """The README quickstart's new prompt, which the bundled model never saw: "count circles" → the
    number of circles, "0" when there is none (a kind of the scene three times in four, else another).
    Its words are pieces the model knows, and stage 0 taught the image encoder each patch's kind, so
    LoRA alone learns it in a few hundred steps (recipes/quickstart_cpu.py)."""
    rng = np.random.default_rng([scene.seed, 3])
    present = sorted({s.kind for s in scene.shapes})
    absent = [k for k in KINDS if k not in present]
    kind = present[int(rng.integers(len(present)))] if rng.random() < 0.75 or not absent \
        else absent[int(rng.integers(len(absent)))]
    return [(f"count {kind}s", str(sum(s.kind == kind for s in scene.shapes)))]


PROMPT_SETS = {"pretraining": examples, "kind-count": kind_count_examples}


def scene_image(scene: Scene, size: int = IMAGE_SIZE) -> Image.Image:
    """The scene drawn at its own size, resized to `size` with the processor's resampling (PIL
    bicubic): training images are exactly what the model sees of a RENDER_SIZE picture."""
    image = scene.image()
    return image if image.size == (size, size) else image.resize((size, size), Image.Resampling.BICUBIC)


def write_jsonl(out_dir: str, name: str, seeds, size: int = IMAGE_SIZE, render_size: int = RENDER_SIZE,
                prompts=examples, report=None) -> str:
    """Render the scenes of `seeds` (drawn at render_size, stored at `size`) into out_dir/images/ and
    write out_dir/<name>.jsonl, one {"image", "prefix", "suffix"} line per example of prompts(scene)
    (train.py's format; the answers' boxes are in render_size pixels, and <loc> tokens do not depend
    on the size). report(line), if given, hears the progress every 1,000 scenes."""
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    path = os.path.join(out_dir, f"{name}.jsonl")
    seeds = list(seeds)
    with open(path + ".tmp", "w") as f:
        for i, seed in enumerate(seeds, 1):
            scene = make_scene(seed, render_size)
            image = f"images/{seed:08d}.png"
            scene_image(scene, size).save(os.path.join(out_dir, image))
            for prefix, suffix in prompts(scene):
                f.write(json.dumps({"image": image, "prefix": prefix, "suffix": suffix}) + "\n")
            if report is not None and (i % 1000 == 0 or i == len(seeds)):
                report(f"{name}: {i:,}/{len(seeds):,} scenes")
    os.replace(path + ".tmp", path)
    return path


# ---- tokenizer ------------------------------------------------------------------------------------

def train_tokenizer(path: str, num_scenes: int = 2000) -> str:
    """A SentencePiece BPE model of the task's words laid out like Gemma's (docs/files.md#token-ids):
    <pad> <eos> <bos> <unk> = 0 1 2 3, "\\n" one piece, byte fallback (any text encodes), no dummy-prefix space,
    then <loc0000>..<loc1023> and <seg000>..<seg127> appended as consecutive user-defined pieces, as
    big_vision's `_add_pieces` appends them to Gemma's 256000."""
    import io

    import sentencepiece as spm

    lines = []                          # with repeats: BPE merges follow the words' frequencies
    for seed in range(num_scenes):
        for prefix, suffix in examples(make_scene(seed, 64)):
            lines += [prefix, *re.split(r"(?:<loc\d{4}>)+", suffix)]   # the text between <loc> pieces
    lines += [f"answer en what color is the {k}?" for k in KINDS] + list(COLOURS) + [f"{k}s" for k in KINDS]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=400,
        hard_vocab_limit=False, character_coverage=1.0, byte_fallback=True, split_digits=True,
        normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, user_defined_symbols=["\n"], num_threads=1, minloglevel=2,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
        unk_piece="<unk>")
    pieces = [f"<loc{i:04d}>" for i in range(1024)] + [f"<seg{i:03d}>" for i in range(128)]
    data = model.getvalue() + b"".join(_user_defined_piece(p) for p in pieces)
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.replace(path + ".tmp", path)
    return path


def _user_defined_piece(piece: str) -> bytes:
    """One `ModelProto.pieces` entry {piece, score 0, type USER_DEFINED} in protobuf wire format.
    Protobuf parses repeated fields appended to a message as appended elements, so adding pieces is
    concatenation (sentencepiece_model.proto: field 1 piece, 2 score, 3 type; USER_DEFINED = 4)."""
    def varint(n: int) -> bytes:
        out = b""
        while n >= 0x80:
            out, n = out + bytes([n & 0x7F | 0x80]), n >> 7
        return out + bytes([n])

    text = piece.encode()
    body = b"\x0a" + varint(len(text)) + text + b"\x15" + struct.pack("<f", 0.0) + b"\x18" + varint(4)
    return b"\x0a" + varint(len(body)) + body


# ---- held-out metrics -----------------------------------------------------------------------------

def score(scenes: list[Scene], answer) -> dict[str, float]:
    """Held-out accuracy on `scenes`; answer(images, prompts) → texts (e.g. nanopali.generate bound
    to a model). caption exact match, count accuracy, colour-question accuracy (one question per
    scene that has one), detection mean IoU (all kinds asked; evaluate.detection_score per scene:
    each true box scores its best same-label predicted IoU, missing boxes 0)."""
    from ..train.evaluate import detection_score

    images = [s.image() for s in scenes]
    jobs = [(i, "caption en", caption(s)) for i, s in enumerate(scenes)]
    jobs += [(i, "count shapes", count(s)) for i, s in enumerate(scenes)]
    jobs += [(i, *sorted(colour_questions(s).items())[0]) for i, s in enumerate(scenes) if colour_questions(s)]
    jobs += [(i, detect_prompt(), detect(s)) for i, s in enumerate(scenes)]
    preds = answer([images[i] for i, _, _ in jobs], [p for _, p, _ in jobs])
    right: dict[str, list[float]] = {"caption_exact_match": [], "count_accuracy": [], "vqa_accuracy": [],
                                     "detection_mean_iou": []}
    for (i, prompt, target), pred in zip(jobs, preds):
        if prompt.startswith("detect"):
            right["detection_mean_iou"].append(detection_score(pred, target))
        else:
            name = {"caption": "caption_exact_match", "count": "count_accuracy"}.get(prompt.split()[0], "vqa_accuracy")
            right[name].append(float(pred.strip() == target))
    return {k: sum(v) / len(v) for k, v in right.items()}


def evaluate(model, processor, num_scenes: int = 100, size: int = RENDER_SIZE, batch_size: int = 32,
             first_seed: int = HELD_OUT_SEED) -> dict[str, float]:
    """`score` of a model on freshly generated scenes it never trained on (greedy decoding); the
    processor resizes the `size`-pixel pictures to the model's input, as for a user's image."""
    from ..generate import generate

    def answer(images, prompts):
        out = []
        for i in range(0, len(images), batch_size):
            out += generate(model, processor, images[i:i + batch_size], prompts[i:i + batch_size], max_new_tokens=40)
        return out

    return score([make_scene(first_seed + i, size) for i in range(num_scenes)], answer)
