"""Shared fixtures: transformers-built checkpoints (made once per session), loaded model pairs, test images.

Every checkpoint is built lazily by `hf_reference.make_hf_checkpoint` the first time a test asks for
it, under one session temp dir, so a run that selects a few tests pays only for what they use.
`model_pair(name)` gives (tf_model, tf_processor, model, processor) for a checkpoint; real-width pairs
(~2.7 GB each in fp32) are kept one at a time so the session never holds both generations.
Parity numbers recorded with `record_parity` are printed at the end of the run (and written as JSON
to $NANOPALI_PARITY_JSON when that is set).
"""
import gc
import io
import json
import os
from dataclasses import dataclass

# The fused-kernel tests run Triton's interpreter on CPU. Triton reads TRITON_INTERPRET when it is
# first imported, and importing torch already imports triton, so the switch must be set here, before
# any test module imports torch. A machine with an NVIDIA GPU runs the compiled kernels instead.
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Speed choices measured on this CPU (nanopali/cpu/products.py) go to a file of the test session, not the
# user's cache: a test then measures what it loads, whatever an earlier run remembered.
if "NANOPALI_CACHE_DIR" not in os.environ:
    import tempfile
    os.environ["NANOPALI_CACHE_DIR"] = tempfile.mkdtemp(prefix="nanopali-test-cache-")

import numpy as np
import pytest
import torch
from PIL import Image

import hf_reference

# name -> make_hf_checkpoint arguments. Same seed and same shapes give the same weights, so
# "pg2", "pg2-window-4096" and the layout/shard variants hold identical tensors.
CHECKPOINTS = {
    "pg1": dict(generation=1),                                   # MQA: 4 heads, 1 KV head
    "pg1-56px": dict(generation=1, image_size=56),               # 16 image tokens, another position table
    "pg2": dict(generation=2),                                   # GQA 4/2, sliding window 8 on layer 0
    "pg2-56px": dict(generation=2, image_size=56),
    "pg2-window-4096": dict(generation=2, sliding_window=4096),  # "pg2" with a window that never bites
    "pg2-transformers-layout": dict(generation=2, layout="transformers"),  # model.* keys + lm_head
    "pg2-save-layout": dict(generation=2, layout="save"),        # vision_tower.* without vision_model.
    "pg2-sharded": dict(generation=2, shard=True),               # 3 shards + model.safetensors.index.json
    "pg1-real-widths": dict(generation=1, real_widths=True),     # 1 layer per tower, released widths;
                                                                 # ~40 s to build: used only with NANOPALI_SLOW=1
    "pg2-real-widths": dict(generation=2, real_widths=True),
}
REAL_WIDTHS = ("pg1-real-widths", "pg2-real-widths")

# The tests whose numbers depend on which kernels the CPU runs (parity, cached == uncached, the quantized
# paths, training steps, the notebooks' printed results, the choices made per CPU). CI runs them a second
# time as a laptop without AVX-512 or native bf16: `ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2
# pytest -m numerics` (docs/tests.md#the-avx2-pass).
NUMERICS = {"test_parity_transformers.py", "test_generation.py", "test_quantization.py", "test_qlora.py",
            "test_notebooks.py", "test_reference_switches.py", "test_multi_image.py", "test_cpu_choices.py",
            "test_finetune_loss.py", "test_bundled_model.py", "test_bigvision_npz.py"}


def pytest_collection_modifyitems(items):
    for item in items:
        if item.path.name in NUMERICS:
            item.add_marker(pytest.mark.numerics)
TINY_WINDOW = 8  # hf_reference's tiny Gemma 2 sliding_window


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """hf_checkpoint(name) -> path of the checkpoint directory `CHECKPOINTS[name]`, built once."""
    root = tmp_path_factory.mktemp("hf_checkpoints")
    built = {}

    def get(name: str) -> str:
        if name not in built:
            kwargs = CHECKPOINTS[name]
            if kwargs.get("real_widths"):
                # transformers' own random init is overwritten by hf_reference._perturb_ (every
                # parameter, from its own seeded generator), so skipping it gives the same tensors
                # (checked bit for bit on the tiny configs) in ~15 s instead of ~45 s.
                from transformers.initialization import no_init_weights
                with no_init_weights():
                    built[name] = hf_reference.make_hf_checkpoint(str(root / name), **kwargs)
            else:
                built[name] = hf_reference.make_hf_checkpoint(str(root / name), **kwargs)
        return built[name]

    return get


@dataclass
class ModelPair:
    tf_model: object
    tf_processor: object
    model: object
    processor: object


class _Pairs:
    def __init__(self, hf_checkpoint):
        self.hf_checkpoint, self.cache = hf_checkpoint, {}

    def __call__(self, name: str) -> ModelPair:
        import nanopali

        if name not in self.cache:
            if name in REAL_WIDTHS:
                self.release_real_widths()
            path = self.hf_checkpoint(name)
            tf_model, tf_processor = hf_reference.load_tf(path)
            model, processor = nanopali.load(path)
            self.cache[name] = ModelPair(tf_model, tf_processor, model, processor)
        return self.cache[name]

    def release_real_widths(self) -> None:
        for name in REAL_WIDTHS:
            self.cache.pop(name, None)
        gc.collect()


@pytest.fixture(scope="session")
def model_pair(hf_checkpoint):
    """model_pair(name) -> ModelPair(tf_model, tf_processor, model, processor), fp32 on CPU.

    transformers runs eager attention on the PIL image backend (hf_reference.load_tf)."""
    pairs = _Pairs(hf_checkpoint)
    yield pairs
    pairs.cache.clear()


def _noise(rng, h, w, c):
    """Smooth gradients plus noise: every uint8 value occurs, and bicubic resizing has work to do."""
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([(x * 255 // max(w - 1, 1)), (y * 255 // max(h - 1, 1)), ((x + y) * 7) % 256], -1)[..., :c]
    if c > 3:
        base = np.concatenate([base, ((x * y) % 256)[..., None]], -1)
    return np.clip(base + rng.integers(-40, 41, size=(h, w, c)), 0, 255).astype(np.uint8)


def _make_images():
    rng = np.random.default_rng(0)
    images = {
        "rgb-square": Image.fromarray(_noise(rng, 28, 28, 3), "RGB"),
        "rgb-wide": Image.fromarray(_noise(rng, 23, 61, 3), "RGB"),
        "rgb-tall": Image.fromarray(_noise(rng, 47, 19, 3), "RGB"),
        "rgb-large": Image.fromarray(_noise(rng, 200, 300, 3), "RGB"),
        "rgba": Image.fromarray(_noise(rng, 30, 40, 4), "RGBA"),
        "la": Image.fromarray(_noise(rng, 33, 33, 4)[..., [0, 3]], "LA"),
        "l": Image.fromarray(_noise(rng, 37, 25, 1)[..., 0], "L"),
        "cmyk": Image.fromarray(_noise(rng, 20, 30, 4), "CMYK"),
    }
    # A palette image with a transparent index, round-tripped through PNG as a user's file would be.
    p = images["rgb-wide"].quantize(colors=16)
    buf = io.BytesIO()
    p.save(buf, "PNG", transparency=3)
    buf.seek(0)
    images["p-transparency"] = Image.open(buf)
    images["p-transparency"].load()
    return images


@pytest.fixture(scope="session")
def test_images():
    """name -> deterministic PIL image: several sizes and aspect ratios, and every colour mode the
    processor converts (RGB, RGBA, LA, L, CMYK, P with a transparent index)."""
    images = _make_images()
    assert images["p-transparency"].mode == "P" and "transparency" in images["p-transparency"].info
    return images


# ---- parity numbers, printed at the end of the run ----

PARITY: dict[str, float] = {}


@pytest.fixture(scope="session")
def record_parity():
    def record(case: str, max_abs_diff: float) -> None:
        PARITY[case] = float(max_abs_diff)
    return record


def pytest_terminal_summary(terminalreporter):
    if not PARITY:
        return
    terminalreporter.write_sep("-", "nanopali vs transformers: max abs logit diff (fp32)")
    for case, diff in PARITY.items():
        terminalreporter.write_line(f"{case:45s} {diff:.3e}")
    path = os.environ.get("NANOPALI_PARITY_JSON")
    if path:
        with open(path, "w") as f:
            json.dump(PARITY, f, indent=2)

