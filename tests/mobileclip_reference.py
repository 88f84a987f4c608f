"""The MobileCLIP2 oracle: open_clip 3.3 + timm 1.0 models, and the fixtures recorded from them.

open_clip and timm import torchvision, whose PyPI wheels do not load beside the CPU build of torch
that CI installs (docs/mobileclip.md), so CI reads what the oracle computed from files in
tests/fixtures/mobileclip/, written by running this file where the oracle is installed:

    python -m venv /tmp/oracle && /tmp/oracle/bin/pip install torch==2.14.1 torchvision==0.29.1 \\
        open_clip_torch==3.3.0 timm==1.0.31 safetensors sentencepiece protobuf pytest
    PYTHONPATH=. /tmp/oracle/bin/python tests/mobileclip_reference.py

Weights come from `deterministic_state` (torch's seeded CPU generator, one seed per tensor name), so a
fixture stores only the oracle's tensor names and shapes and its outputs, and the test rebuilds the
same tensors without the oracle. Cases are real widths; depths are cut where real ones are too slow
for CI (`CASES`); every case is computed in both block layouts of the MCi towers.
"""
from __future__ import annotations

import gzip
import json
import math
import os
import sys
import zlib

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "fixtures", "mobileclip")
SMALL_BPE = os.path.join(os.path.dirname(HERE), "nanopali", "assets", "mobileclip", "bpe_3000.txt.gz")
SOT, EOT = 49406, 49407

# case → (open_clip model name, timm kwargs for the image trunk, text layers); None = the released depth.
CASES = {
    "s0": ("MobileCLIP2-S0", None, None),
    "s2-short": ("MobileCLIP2-S2", dict(layers=(1, 1, 2, 1)), 2),
    "s3-short": ("MobileCLIP2-S3", dict(layers=(1, 1, 2, 1, 1)), 2),
    "s4-short": ("MobileCLIP2-S4", dict(layers=(1, 1, 1, 1, 1)), 1),
    "b-short": ("MobileCLIP2-B", dict(depth=2), 2),
    "l14-short": ("MobileCLIP2-L-14", dict(depth=1), 1),
}
SLOW_CASES = {n: (n, None, None) for n in ("MobileCLIP2-S2", "MobileCLIP2-S3", "MobileCLIP2-S4", "MobileCLIP2-B",
                                           "MobileCLIP2-L-14")}


def deterministic_state(keys: list, seed: int = 0) -> dict[str, torch.Tensor]:
    """[(name, shape, dtype name)] → tensors that keep activations O(1) through any depth: matrices
    N(0, 1/fan_in), norm scales 1 ± 0.1, biases and BN means ±0.05, BN variances in [0.5, 1.5], layer
    scales in [0.05, 0.25], embeddings N(0, 0.02²), the temperature log(1/0.07)."""
    out = {}
    for name, shape, dtype in keys:
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        shape = tuple(shape)
        if dtype == "int64":
            out[name] = torch.zeros(shape, dtype=torch.int64)
            continue
        r = torch.randn(shape, generator=g)
        if name == "logit_scale":
            t = torch.full(shape, math.log(1 / 0.07))
        elif name.endswith("running_var"):
            t = 0.5 + torch.rand(shape, generator=g)
        elif name.endswith(".gamma"):
            t = 0.05 + 0.2 * torch.rand(shape, generator=g)
        elif "embed" in name.rsplit(".", 1)[-1] or "token" in name or "positional" in name:
            t = 0.02 * r
        elif len(shape) >= 2:
            fan_in = math.prod(shape) // shape[0] if "text_projection" not in name else shape[0]
            t = r / math.sqrt(fan_in)
        elif name.endswith("weight"):
            t = 1 + 0.1 * r
        else:
            t = 0.05 * r
        out[name] = t.contiguous()
    return out


def pixel_batch(size: int, seed: int = 0) -> torch.Tensor:
    """(2, 3, S, S) normalised-looking pixels."""
    return torch.randn((2, 3, size, size), generator=torch.Generator().manual_seed(seed))


def token_rows(context_length: int = 77) -> torch.Tensor:
    """(3, 77) rows as the tokenizer makes them: short, long (EOT at the end), and one that is all padding
    after EOT; the EOT position differs per row, so pooling at the wrong place shows."""
    g = torch.Generator().manual_seed(1)
    rows = torch.zeros((3, context_length), dtype=torch.long)
    for j, n in enumerate((5, context_length - 2, 17)):
        rows[j, 0], rows[j, n + 1] = SOT, EOT
        rows[j, 1:n + 1] = torch.randint(1, 49406, (n,), generator=g)
    return rows


def open_clip_config(model_name: str) -> dict:
    """open_clip_config.json as the hub repositories hold it, from open_clip's own tables."""
    import open_clip
    from open_clip.pretrained import get_pretrained_cfg

    pp = get_pretrained_cfg(model_name, "dfndr2b")
    return {"model_cfg": open_clip.get_model_config(model_name),
            "preprocess_cfg": {k: pp[k] for k in ("mean", "std", "interpolation", "resize_mode")}}


def build_oracle(model_name: str, trunk_kwargs: dict | None, text_layers: int | None):
    """An open_clip model with random weights (no download), depths cut as the case says."""
    import open_clip
    import timm

    cfg = open_clip.get_model_config(model_name)
    if text_layers is not None:
        cfg = {**cfg, "text_cfg": {**cfg["text_cfg"], "layers": text_layers}}
    model = open_clip.model.CustomTextCLIP(**{k: v for k, v in cfg.items() if k != "custom_text"})
    if trunk_kwargs is not None:
        v = cfg["vision_cfg"]
        model.visual.trunk = timm.create_model(v["timm_model_name"], num_classes=cfg["embed_dim"],
                                               global_pool=v["timm_pool"], **trunk_kwargs)
    return model.eval()


def layout(model) -> list:
    return [[k, list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in model.state_dict().items()]


@torch.no_grad()
def oracle_outputs(model, size: int) -> dict:
    import torch.nn.functional as F

    x = model.encode_image(pixel_batch(size))
    y = model.encode_text(token_rows())
    logits = model.logit_scale.exp() * F.normalize(x, dim=-1) @ F.normalize(y, dim=-1).T
    return {"image_features": x.tolist(), "text_features": y.tolist(), "logits": logits.tolist()}


def record_case(name: str, model_name: str, trunk_kwargs, text_layers) -> dict:
    """The fixture of one case: the oracle's names and outputs, train-time layout and (MCi) fused."""
    from timm.utils.model import reparameterize_model

    model = build_oracle(model_name, trunk_kwargs, text_layers)
    size = open_clip_config(model_name)["model_cfg"]["vision_cfg"]["image_size"]
    keys = layout(model)
    model.load_state_dict(deterministic_state(keys))
    out = {"model_name": model_name, "trunk_kwargs": trunk_kwargs, "text_layers": text_layers, "image_size": size,
           "config": open_clip_config(model_name), "keys": keys, **oracle_outputs(model, size)}
    if "fastvit" in out["config"]["model_cfg"]["vision_cfg"]["timm_model_name"]:
        fused = reparameterize_model(model)
        fkeys = layout(fused)
        fused.load_state_dict(deterministic_state(fkeys, seed=1))
        out["fused"] = {"keys": fkeys, **oracle_outputs(fused, size)}
    return out


def load_fixture(name: str) -> dict:
    with gzip.open(os.path.join(FIXTURES, f"{name}.json.gz"), "rt") as f:
        return json.load(f)


def write_tokenizer_fixture() -> None:
    """A cut BPE file (the first 3000 merges of CLIP's: 10 KB rather than 1.3 MB; the shapes student's
    tokenizer too, so it lives in nanopali/assets/mobileclip/) and
    open_clip's ids for the tokenizer test's TEXTS with it (the full file is compared live)."""
    from open_clip.tokenizer import SimpleTokenizer, default_bpe

    from test_mobileclip_tokenizer import TEXTS

    with gzip.open(default_bpe(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    cut = SMALL_BPE
    with gzip.GzipFile(cut, "wb", mtime=0) as f:
        f.write("\n".join(lines[:3001]).encode("utf-8"))
    ids = SimpleTokenizer(cut)(TEXTS).tolist()
    # Texts as ascii() spells them: JSON would read an escaped surrogate pair back as one character.
    with gzip.GzipFile(os.path.join(FIXTURES, "tokenizer_ids.json.gz"), "wb", mtime=0) as f:
        f.write(json.dumps({"texts": [ascii(t) for t in TEXTS], "ids": ids}).encode())


def write_preprocessing_fixture() -> None:
    """open_clip's eval transform (32 px, mean 0, std 1, bilinear; and the L-14 setting: bicubic, OpenAI
    mean / std) on conftest's test images, every PIL mode; stored as float32 arrays."""
    import numpy as np
    import open_clip

    from conftest import _make_images

    arrays = {}
    for tag, kw in (("s0", dict(mean=(0.0,) * 3, std=(1.0,) * 3, interpolation="bilinear")),
                    ("l14", dict(mean=open_clip.OPENAI_DATASET_MEAN, std=open_clip.OPENAI_DATASET_STD,
                                 interpolation="bicubic"))):
        transform = open_clip.image_transform(32, is_train=False, resize_mode="shortest", **kw)
        for name, im in _make_images().items():
            arrays[f"{tag}/{name}"] = transform(im).numpy()
    np.savez_compressed(os.path.join(FIXTURES, "preprocessing.npz"), **arrays)


def main() -> None:
    os.makedirs(FIXTURES, exist_ok=True)
    torch.manual_seed(0)
    if sys.argv[1:] == ["preprocessing"]:
        return write_preprocessing_fixture()
    write_tokenizer_fixture()
    write_preprocessing_fixture()
    for name, (model_name, trunk_kwargs, text_layers) in CASES.items():
        data = record_case(name, model_name, trunk_kwargs, text_layers)
        with gzip.GzipFile(os.path.join(FIXTURES, f"{name}.json.gz"), "wb", mtime=0) as f:
            f.write(json.dumps(data).encode())
        print(name, len(data["keys"]), "tensors")


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    main()
