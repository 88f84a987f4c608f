"""Limits are checked before work starts: the model's positions, config sizes and types against the
weights, the tokenizer against the embedding, and image orientation as a person sees it.

Each test states the limit and the message a user gets; none needs more than the bundled model or a
copy of it with one file changed."""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

import nanopali
from nanopali.formats.hf_config import from_hf_config
from nanopali.formats.files import CheckpointError
from nanopali.generate import generate, generate_ids
from nanopali.processing import load_image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLED = os.path.join(ROOT, "nanopali", "assets", "tiny-shapes")
IMAGE = os.path.join(ROOT, "nanopali", "assets", "images", "shapes_1.png")


@pytest.fixture(scope="module")
def bundled():
    return nanopali.load(BUNDLED)


def _copy_with_config(tmp_path, **changes) -> str:
    """The bundled checkpoint with its config.json changed (None deletes a field); weights shared."""
    d = tmp_path / "ckpt"
    d.mkdir(parents=True)
    for name in ("model.safetensors", "tokenizer.model"):
        os.symlink(os.path.join(BUNDLED, name), d / name)
    cfg = json.load(open(os.path.join(BUNDLED, "config.json")))
    for path, value in changes.items():
        node, *keys = path.split(".")
        target = cfg if not keys else cfg[node]
        target[keys[0] if keys else node] = value
    (d / "config.json").write_text(json.dumps(cfg))
    return str(d)


# ---- the decoder's positions ----

def test_prompt_plus_new_tokens_past_the_positions_is_refused_naming_both_numbers(bundled):
    model, proc = bundled
    limit = model.cfg.text.max_positions
    T = proc(images=[IMAGE], prompts=["caption en"])["input_ids"].shape[1]
    with pytest.raises(nanopali.InputError, match=rf"{T} tokens .* {limit - T + 1}: {limit + 1} positions, but the "
                                                  rf"model has {limit}"):
        generate(model, proc, [IMAGE], ["caption en"], max_new_tokens=limit - T + 1)
    assert len(generate(model, proc, [IMAGE], ["caption en"], max_new_tokens=limit - T)) == 1  # the limit itself runs


def test_a_huge_max_new_tokens_fails_at_once_without_allocating(bundled):
    model, proc = bundled
    t0 = time.perf_counter()
    for n in (10 ** 7, 10 ** 9):
        with pytest.raises(nanopali.InputError, match="positions"):
            generate(model, proc, [IMAGE], ["caption en"], max_new_tokens=n)
    assert time.perf_counter() - t0 < 5


def test_a_prompt_longer_than_the_model_is_refused_by_generate_and_forward(tmp_path):
    model, proc = nanopali.load(_copy_with_config(tmp_path, **{"text_config.max_position_embeddings": 40}))
    long_prompt = "caption en " + "red " * 40
    with pytest.raises(nanopali.InputError, match="the model has 40"):
        generate(model, proc, [IMAGE], [long_prompt], max_new_tokens=1)
    batch = proc(images=[IMAGE], prompts=[long_prompt])
    with pytest.raises(ValueError, match="40 positions"):
        model(**batch)
    with pytest.raises(nanopali.InputError, match="the model has 40"):
        generate_ids(model, proc(images=[IMAGE], prompts=["caption en"]), max_new_tokens=40)


def test_sample_py_refuses_past_the_positions_with_exit_2():
    r = subprocess.run([sys.executable, "sample.py", "--prompt", "caption en", "--max-new-tokens", "1000000000"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "but the model has 8192" in r.stderr and "Traceback" not in r.stderr


# ---- config.json ----

@pytest.mark.parametrize("field, value, message", [
    ("text_config.num_hidden_layers", 100_000, r"num_hidden_layers = 100000 is outside \(0, 512\]"),
    ("vision_config.hidden_size", 10 ** 9, r"hidden_size = 1000000000 is outside"),
    ("text_config.hidden_size", "128", r"hidden_size is '128' \(str\); expected int"),
    ("text_config.num_hidden_layers", True, r"num_hidden_layers is True \(bool\)"),
    ("text_config.rms_norm_eps", [1e-6], r"rms_norm_eps is \[1e-06\] \(list\); expected float"),
    ("text_config", [1, 2], r"text_config is list, expected a JSON object"),
    ("text_config.layer_types", ["full_attention"], r"layer_types must be a list of 4 strings"),
    ("image_token_index", 5000, r"image_token_id 5000 is not a row of the 1616-row embedding"),
])
def test_a_config_with_absurd_sizes_or_wrong_types_is_refused_at_once(tmp_path, field, value, message):
    d = _copy_with_config(tmp_path, **{field: value})
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match=message):
        nanopali.load(d)
    assert time.perf_counter() - t0 < 5


def test_a_config_that_is_not_a_json_object_is_named(tmp_path):
    d = _copy_with_config(tmp_path)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump([1, 2, 3], f)
    with pytest.raises(CheckpointError, match=r"config.json: config.json holds a JSON list, expected an object"):
        nanopali.load(d)


def test_a_plausible_config_that_contradicts_the_weights_is_refused_from_the_headers(tmp_path):
    """A depth within the bounds but not the weights' is named against what the file holds, before the
    model is built (the strict loader would otherwise list hundreds of missing tensors)."""
    d = _copy_with_config(tmp_path, **{"text_config.num_hidden_layers": 300, "text_config.layer_types": None})
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match="num_hidden_layers is 300; the weights hold 4 text layers"):
        nanopali.load(d)
    assert time.perf_counter() - t0 < 5
    d2 = _copy_with_config(tmp_path / "b", **{"text_config.vocab_size": 2000, "vocab_size": 2000})
    with pytest.raises(CheckpointError, match="2000 x 128; the token embedding is 1616 x 128"):
        nanopali.load(d2)


def test_the_config_reader_checks_divisibility():
    base = json.load(open(os.path.join(BUNDLED, "config.json")))
    base["text_config"]["num_key_value_heads"] = 3
    with pytest.raises(ValueError, match="4 attention heads do not split into 3"):
        from_hf_config(base)


# ---- the tokenizer against the embedding ----

def test_a_tokenizer_larger_than_the_embedding_is_refused(tmp_path, hf_checkpoint):
    d = _copy_with_config(tmp_path)
    os.remove(d + "/tokenizer.model")
    shutil.copy(os.path.join(hf_checkpoint("pg1"), "tokenizer.model"), d + "/tokenizer.model")  # 1752 pieces
    with pytest.raises(nanopali.InputError, match="does not fit this model: it has 1752 pieces, the model's "
                                                  "embedding 1616 rows"):
        nanopali.load(d)


def test_an_image_token_id_that_is_a_text_piece_is_refused(tmp_path):
    d = _copy_with_config(tmp_path, image_token_index=100)
    with pytest.raises(nanopali.InputError, match="image token id 100 is its text piece"):
        nanopali.load(d)


# ---- what a person sees ----

def test_exif_orientation_is_applied_when_nanopali_opens_the_file(tmp_path, bundled):
    """A portrait photo stored landscape with orientation 6 ("rotate 90° clockwise to view")."""
    _, proc = bundled
    stored = Image.new("RGB", (80, 40), (255, 0, 0))
    stored.paste((0, 0, 255), (0, 0, 20, 40))                   # blue on the stored image's left
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "portrait.jpg"
    stored.save(path, exif=exif, quality=95)
    seen = load_image(str(path))
    assert seen.size == (40, 80)                                 # turned: portrait, as a viewer shows it
    r, g, b = seen.getpixel((20, 5))
    assert b > 200 and r < 60                                    # the stored left is now the top
    from_path = proc(images=[str(path)], prompts=["caption en"])["pixel_values"]
    as_stored = proc(images=[Image.open(path)], prompts=["caption en"])["pixel_values"]  # a PIL image: as given
    as_seen = proc(images=[seen], prompts=["caption en"])["pixel_values"]
    assert torch.equal(from_path, as_seen) and not torch.equal(from_path, as_stored)
