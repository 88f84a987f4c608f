"""MobileCLIP2 through the API SigLIP has (zero_shot, embed_images, embed_texts, classify.py), its image
preprocessing, and one clear error for each bad input.

The checkpoint here is an open_clip directory of MobileCLIP2-S0's image tower at 64 px and a 1-layer
text tower over the cut BPE vocabulary (what open_clip_config.json says is what gets built), random weights.
"""
import json
import os
import re
import shutil
from dataclasses import replace

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

import classify
import mobileclip_reference as ref
import nanopali
from nanopali.formats.files import CheckpointError
from nanopali.mobileclip import (MobileCLIP, MobileCLIPProcessor, load_mobileclip, load_mobileclip_model,
                                 mobileclip_preset)
from nanopali.mobileclip.checkpoint import config_from_open_clip
from nanopali.mobileclip.model import OPENAI_MEAN, OPENAI_STD
from nanopali.mobileclip.processing import shortest_side_crop
from nanopali.processing import InputError
from tolerance import assert_rounding_close, module_terms, rounding_bound
from test_bad_inputs import _raises

OPEN_CLIP_CONFIG = {  # open_clip's MobileCLIP2-S0 config with a small text tower (its fields, its names)
    "model_cfg": {"embed_dim": 512, "custom_text": True,
                  "vision_cfg": {"timm_model_name": "fastvit_mci0", "timm_model_pretrained": False, "timm_pool": "avg",
                                 "timm_proj": None, "timm_drop": 0.0, "timm_drop_path": 0.0, "image_size": 64},
                  "text_cfg": {"context_length": 77, "vocab_size": 3514, "width": 64, "heads": 2, "layers": 1,
                               "no_causal_mask": True}},
    "preprocess_cfg": {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0], "interpolation": "bilinear",
                       "resize_mode": "shortest"}}
_OURS_TO_THEIRS = (("image_tower.", "visual.trunk."), ("text_tower.", "text."))


def open_clip_state(cfg) -> dict:
    with torch.device("meta"):
        names = MobileCLIP(cfg).state_dict()
    keys = []
    for k, v in names.items():
        for ours, theirs in _OURS_TO_THEIRS:
            k = theirs + k[len(ours):] if k.startswith(ours) else k
        keys.append((k, list(v.shape), str(v.dtype).removeprefix("torch.")))
    return ref.deterministic_state(keys)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mobileclip2-s0-small")
    state = open_clip_state(config_from_open_clip(OPEN_CLIP_CONFIG, "test"))
    safetensors.torch.save_file(state, str(folder / "open_clip_model.safetensors"))
    (folder / "open_clip_config.json").write_text(json.dumps(OPEN_CLIP_CONFIG))
    shutil.copy(ref.SMALL_BPE, folder / "bpe_simple_vocab_16e6.txt.gz")
    torch.save(state, str(folder.parent / "weights.pt"))
    return str(folder)


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return nanopali.load_mobileclip(checkpoint)


def test_zero_shot_gives_a_softmax_over_the_labels(loaded, test_images):
    model, processor = loaded
    labels = ["a red circle", "two blue squares", "a green triangle"]
    ranked = nanopali.zero_shot(model, processor, test_images["rgb-large"], labels)
    assert sorted(label for label, _ in ranked) == sorted(labels)
    assert sum(p for _, p in ranked) == pytest.approx(1.0, abs=1e-5)
    x = nanopali.embed_images(model, processor, [test_images["rgb-large"]])
    y = nanopali.embed_texts(model, processor, [f"This is a photo of {label}." for label in labels])
    expected = (model.logit_scale.exp() * x @ y.T).softmax(-1)[0]
    assert [p for _, p in ranked] == pytest.approx(sorted(expected.tolist(), reverse=True), abs=1e-6)
    assert torch.allclose(x.norm(dim=-1), torch.ones(1)) and torch.allclose(y.norm(dim=-1), torch.ones(3))


def test_classify_cli_reads_a_mobileclip_directory(checkpoint, tmp_path, capsys):
    image = tmp_path / "cat.png"
    Image.fromarray(np.full((40, 30, 3), 200, np.uint8)).save(image)
    assert classify.main(["--checkpoint", checkpoint, "--image", str(image), "--labels", "cat,dog", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert sorted(x["label"] for x in out["labels"]) == ["cat", "dog"]
    assert sum(x["probability"] for x in out["labels"]) == pytest.approx(1)


def test_every_pil_mode_becomes_a_normalised_rgb_batch(loaded, test_images):
    _, processor = loaded
    batch = processor.images(list(test_images.values()))["pixel_values"]
    assert batch.shape == (len(test_images), 3, 64, 64) and batch.dtype == torch.float32
    assert 0 <= batch.min() and batch.max() <= 1                 # MobileCLIP2-S0: mean 0, std 1


def test_shortest_side_resize_and_centre_crop_as_torchvision():
    """torchvision Resize(8) on 30×12 (w×h): 12 → 8, 30 → int(8·30/12) = 20; CenterCrop: left = round(6)."""
    im = Image.fromarray(np.tile(np.arange(30, dtype=np.uint8)[None, :, None] * 8, (12, 1, 3)))
    out = shortest_side_crop(im, 8, Image.Resampling.NEAREST)
    full = im.resize((20, 8), Image.Resampling.NEAREST)
    assert out.size == (8, 8) and np.array_equal(np.asarray(out), np.asarray(full)[:, 6:14])


@pytest.mark.parametrize("preset, tag", [("mobileclip2-s0", "s0"), ("mobileclip2-l14", "l14")])
def test_preprocessing_matches_open_clip_on_every_pil_mode(preset, tag, test_images):
    """open_clip's eval transform, recorded at 32 px (tests/mobileclip_reference.py): S0's mean 0 / std 1
    bilinear and L-14's OpenAI mean / std bicubic, on RGB, RGBA, LA, L, CMYK and palette images."""
    cfg = mobileclip_preset(preset)
    cfg = replace(cfg, preprocess=replace(cfg.preprocess, image_size=32), text=replace(cfg.text, vocab_size=3514))
    processor = MobileCLIPProcessor(ref.SMALL_BPE, cfg)              # the cut merges file: 3514 ids
    with np.load(os.path.join(ref.FIXTURES, "preprocessing.npz"), allow_pickle=False) as theirs:
        for name, im in test_images.items():
            ours = processor.images([im])["pixel_values"][0].numpy()
            # a bicubic resize (4 x 4 taps) in float, then (x - mean) / std: rounding only
            assert_rounding_close(ours, theirs[f"{tag}/{name}"], torch.float32, 16, name)


def test_preprocessing_matches_open_clip_live(loaded, test_images):
    open_clip = pytest.importorskip("open_clip", reason="open_clip is the oracle; see docs/mobileclip.md")
    _, processor = loaded
    transform = open_clip.image_transform(64, is_train=False, mean=(0.0,) * 3, std=(1.0,) * 3,
                                          interpolation="bilinear", resize_mode="shortest")
    for name, im in test_images.items():
        ours = processor.images([im])["pixel_values"][0]
        assert_rounding_close(ours, transform(im), torch.float32, 16, name)


def test_weights_only_pt_loads_as_the_safetensors_do(checkpoint, loaded):
    model = load_mobileclip_model(os.path.join(os.path.dirname(checkpoint), "weights.pt"),
                                  cfg=loaded[0].cfg)
    a, b = model.state_dict(), loaded[0].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_pickle_that_runs_code_is_refused_with_how_to_convert(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "note": Image.new("L", (1, 1))}, str(path))
    with pytest.raises(CheckpointError, match="not a weights-only PyTorch file.*safetensors.torch.save_file"):
        load_mobileclip_model(str(path), preset="mobileclip2-s0")


def test_a_truncated_file_is_named(checkpoint, tmp_path):
    data = open(os.path.join(checkpoint, "open_clip_model.safetensors"), "rb").read()
    (tmp_path / "open_clip_model.safetensors").write_bytes(data[: len(data) // 2])
    shutil.copy(os.path.join(checkpoint, "open_clip_config.json"), tmp_path)
    with pytest.raises(CheckpointError, match="truncated"):
        load_mobileclip_model(str(tmp_path))
    pt = open(os.path.join(os.path.dirname(checkpoint), "weights.pt"), "rb").read()
    (tmp_path / "half.pt").write_bytes(pt[: len(pt) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_mobileclip_model(str(tmp_path / "half.pt"), preset="mobileclip2-s0")


def test_a_checkpoint_of_another_architecture_names_its_tensors(checkpoint, tmp_path):
    with pytest.raises(CheckpointError, match="holds an MCi image tower.*asks for a ViT"):
        load_mobileclip_model(os.path.join(checkpoint, "open_clip_model.safetensors"), preset="mobileclip2-b")
    other = dict(OPEN_CLIP_CONFIG, model_cfg={**OPEN_CLIP_CONFIG["model_cfg"],
                                              "vision_cfg": {"timm_model_name": "convnext_base"}})
    (tmp_path / "open_clip_config.json").write_text(json.dumps(other))
    with pytest.raises(CheckpointError, match="convnext_base.*fastvit_mci0"):
        load_mobileclip(str(tmp_path))


def test_bad_labels_and_inputs_get_one_clear_error(loaded, checkpoint, tmp_path):
    model, processor = loaded
    image = Image.new("RGB", (8, 8))
    with pytest.raises(InputError, match="labels"):
        nanopali.zero_shot(model, processor, image, [])
    with pytest.raises(InputError, match="not found"):
        processor.images(["/no/such/image.png"])
    with pytest.raises(InputError, match="Text 1"):
        processor.texts(["ok", 3])
    shutil.copy(os.path.join(checkpoint, "open_clip_config.json"), tmp_path)
    shutil.copy(os.path.join(checkpoint, "open_clip_model.safetensors"), tmp_path)
    with pytest.raises(CheckpointError, match="No tokenizer"):
        load_mobileclip(str(tmp_path))


_BAD_TEMPLATES = ["a {} photo of {}", "a photo of {label}", "a {} photo of {label}", "a photo of {0}", "a {} photo {",
                  "a } photo {}", "a {:>9} photo", "a photo"]


@pytest.mark.parametrize("template", _BAD_TEMPLATES)
def test_a_template_without_exactly_one_placeholder_is_refused_by_zero_shot(loaded, template):
    model, processor = loaded
    e = _raises(InputError, "exactly one '{}'", nanopali.zero_shot, model, processor, Image.new("RGB", (8, 8)),
                   ["cat", "dog"], template)
    assert repr(template) in str(e)


@pytest.mark.parametrize("template", _BAD_TEMPLATES)
def test_a_template_without_exactly_one_placeholder_is_refused_by_classify_before_loading(template, tmp_path):
    e = _raises(InputError, "--template", classify.main, ["--checkpoint", str(tmp_path / "not-loaded"), "--image",
                                                             "x.png", "--labels", "cat,dog", "--template", template])
    assert repr(template) in str(e) and "exactly one '{}'" in str(e)


def test_a_template_may_hold_literal_braces_written_double(loaded):
    model, processor = loaded
    image = Image.new("RGB", (8, 8))
    ranked = nanopali.zero_shot(model, processor, image, ["cat", "dog"], "{{a}} {}")
    y = nanopali.embed_texts(model, processor, ["{a} cat", "{a} dog"])
    probs = (model.logit_scale.exp() * nanopali.embed_images(model, processor, [image]) @ y.T).softmax(-1)[0]
    assert dict(ranked) == pytest.approx({"cat": probs[0].item(), "dog": probs[1].item()}, abs=1e-6)


def test_a_labels_file_that_is_not_utf8_is_named_with_its_line_and_byte(tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_bytes("cat\ndog\nthe café\n".encode("utf-8") + b"caf\xe9 au lait\n")
    _raises(InputError, re.escape(f"--labels-file {labels}:4: not valid UTF-8 (byte 0xe9 at column 4)"),
               classify.main, ["--checkpoint", str(tmp_path / "not-loaded"), "--image", "x.png",
                               "--labels-file", str(labels)])


def _with_vocabulary(checkpoint: str, folder, rows: int) -> str:
    """A copy of the checkpoint whose text embedding (and config) has `rows` rows; same merges file."""
    state = safetensors.torch.load_file(os.path.join(checkpoint, "open_clip_model.safetensors"))
    state["text.token_embedding.weight"] = torch.zeros(rows, state["text.token_embedding.weight"].shape[1])
    safetensors.torch.save_file(state, str(folder / "open_clip_model.safetensors"))
    cfg = json.loads(json.dumps(OPEN_CLIP_CONFIG))
    cfg["model_cfg"]["text_cfg"]["vocab_size"] = rows
    (folder / "open_clip_config.json").write_text(json.dumps(cfg))
    shutil.copy(ref.SMALL_BPE, folder / "bpe_simple_vocab_16e6.txt.gz")
    return str(folder)


@pytest.mark.parametrize("rows", [3600, 3400])
def test_a_merges_file_that_does_not_fit_the_text_embedding_is_refused(checkpoint, tmp_path, rows):
    """3000 merges give 3514 ids: with more rows the start / end ids would sit in the wrong rows (3512, 3513
    rather than rows - 2, rows - 1), silently; with fewer, ids past the table."""
    folder = _with_vocabulary(checkpoint, tmp_path, rows)
    e = _raises(CheckpointError, "3514 token ids", load_mobileclip, folder)
    assert f"{rows} rows" in str(e) and "bpe_simple_vocab_16e6.txt.gz" in str(e)
    assert "open_clip_model.safetensors" in str(e)


@pytest.mark.parametrize("size", [0, -64, 10**6, "64", 64.0, True, [64, 32], None])
def test_an_image_size_that_is_not_a_sensible_positive_integer_is_refused_at_load(size):
    cfg = json.loads(json.dumps(OPEN_CLIP_CONFIG))
    cfg["model_cfg"]["vision_cfg"]["image_size"] = size
    e = _raises(CheckpointError, "vision_cfg.image_size", config_from_open_clip, cfg, "open_clip_config.json")
    assert repr(size) in str(e) and "open_clip_config.json" in str(e)


@pytest.mark.parametrize("preprocess_cfg", [None, {}, {"mean": list(OPENAI_MEAN), "std": list(OPENAI_STD)},
                                            {"interpolation": None, "resize_mode": None, "mean": None}])
def test_missing_preprocessing_fields_take_open_clips_defaults(preprocess_cfg, test_images):
    """open_clip `PreprocessCfg` (bicubic, OpenAI mean / std, shortest side) fills what the file leaves out
    (merge_preprocess_dict skips None); its recorded pixels for exactly that setting are the fixture's l14/."""
    cfg = json.loads(json.dumps(OPEN_CLIP_CONFIG))
    cfg["model_cfg"]["vision_cfg"]["image_size"] = 32
    if preprocess_cfg is None:
        del cfg["preprocess_cfg"]
    else:
        cfg["preprocess_cfg"] = preprocess_cfg
    processor = MobileCLIPProcessor(ref.SMALL_BPE, config_from_open_clip(cfg, "test"))
    with np.load(os.path.join(ref.FIXTURES, "preprocessing.npz"), allow_pickle=False) as theirs:
        for name, im in test_images.items():
            ours = processor.images([im])["pixel_values"][0].numpy()
            assert_rounding_close(ours, theirs[f"l14/{name}"], torch.float32, 16, name)


@pytest.mark.parametrize("field, value", [("mean", "0.5"), ("mean", [0.5, 0.5]), ("std", [0.0, 1.0, 1.0]),
                                          ("std", [1.0, float("nan"), 1.0]), ("interpolation", "nearest")])
def test_preprocessing_values_that_cannot_normalise_an_image_are_refused_at_load(field, value):
    cfg = json.loads(json.dumps(OPEN_CLIP_CONFIG))
    cfg["preprocess_cfg"][field] = value
    e = _raises(CheckpointError, "preprocess_cfg", config_from_open_clip, cfg, "open_clip_config.json")
    assert "open_clip_config.json" in str(e) and repr(value) in str(e)


@pytest.mark.parametrize("causal", [True, False])
def test_a_causal_text_tower_pools_a_feature_no_later_token_can_change(causal):
    """MobileCLIP2-B keeps CLIP's causal mask, so the feature pooled at EOT cannot read the pads after it;
    S0–S4 and L-14 attend both ways, and there it does. Masked keys add exact zeros to the softmax, while
    a key that leaks moves the feature by ~0.1 with these weights: far past fp32 rounding (tests/tolerance.py)."""
    from nanopali.mobileclip.text import TextConfig, TextTransformer
    torch.manual_seed(0)
    tower = TextTransformer(TextConfig(vocab_size=50, context_length=8, width=16, num_heads=2, depth=2,
                                       causal=causal, embed_dim=8))
    for p in tower.parameters():
        torch.nn.init.normal_(p, std=0.2)
    ids = torch.tensor([[48, 5, 6, 49, 0, 0, 0, 0]])   # [SOT] a b [EOT] pads (EOT is the largest id)
    later = ids.clone()
    later[0, 4:] = 7
    bound = rounding_bound(torch.float32, tower(ids).abs().max().item(), module_terms(tower) + 8)
    moved = (tower(ids) - tower(later)).abs().max().item()
    assert moved <= bound if causal else moved > 100 * bound
