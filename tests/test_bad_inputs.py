"""Bad input gets one clear error naming what is wrong, never a deep traceback or a silent wrong answer.

Checkpoints: nanopali.CheckpointError; images, prompts and arguments: nanopali.InputError or
ValueError. "One" error: raised on its own (`from None`), not chained onto a KeyError or struct.error
from inside, so a user sees one message. Each broken checkpoint is a copy of a good tiny one.
"""
import json
import os
import pickle
import re
import shutil
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import nanopali
from hf_reference import read_weights

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _raises(exc_type, match, fn, *args, **kwargs):
    """fn(...) raises exactly one exc_type (no chained cause) whose message matches `match`."""
    with pytest.raises(exc_type, match=match) as info:
        fn(*args, **kwargs)
    e = info.value
    assert e.__cause__ is None and (e.__context__ is None or e.__suppress_context__), \
        f"{type(e).__name__} is chained onto {type(e.__cause__ or e.__context__).__name__}"
    return e


@pytest.fixture
def good(hf_checkpoint, tmp_path):
    """A fresh copy of the tiny PaliGemma 1 checkpoint that a test may break."""
    return shutil.copytree(hf_checkpoint("pg1"), tmp_path / "ckpt")


def _rewrite_weights(ckpt, edit):
    state = read_weights(ckpt)
    edit(state)
    save_file(state, os.path.join(ckpt, "model.safetensors"), metadata={"format": "pt"})


# ---- checkpoint directories ----

def test_wrong_path_is_named(tmp_path):
    _raises(nanopali.CheckpointError, "does-not-exist", nanopali.load, tmp_path / "does-not-exist")


def test_a_file_instead_of_a_directory_is_named(good):
    _raises(nanopali.CheckpointError, "model.safetensors", nanopali.load, good / "model.safetensors")


def test_directory_without_config_json_is_named(good):
    os.remove(good / "config.json")
    _raises(nanopali.CheckpointError, "config.json", nanopali.load, good)


def test_config_json_that_is_not_json_is_named(good):
    (good / "config.json").write_text("{not json")
    _raises(nanopali.CheckpointError, "config.json", nanopali.load, good)


def test_directory_without_tokenizer_model_is_named(good):
    os.remove(good / "tokenizer.model")
    _raises(nanopali.CheckpointError, "tokenizer.model", nanopali.load, good)


def test_directory_without_weights_is_named(good):
    os.remove(good / "model.safetensors")
    _raises(nanopali.CheckpointError, "model.safetensors", nanopali.load, good)


def test_checkpoint_of_another_architecture_is_named(good):
    cfg = json.loads((good / "config.json").read_text())
    cfg["model_type"] = "llama"
    (good / "config.json").write_text(json.dumps(cfg))
    _raises(nanopali.CheckpointError, "llama", nanopali.load, good)


def test_text_decoder_of_another_architecture_is_named(good):
    cfg = json.loads((good / "config.json").read_text())
    cfg["text_config"]["model_type"] = "llama"
    (good / "config.json").write_text(json.dumps(cfg))
    _raises(nanopali.CheckpointError, "llama", nanopali.load, good)


# ---- weight files ----

def test_truncated_safetensors_is_named(good):
    path = good / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _raises(nanopali.CheckpointError, "model.safetensors.*truncated", nanopali.load, good)


def test_empty_safetensors_is_named(good):
    (good / "model.safetensors").write_bytes(b"")
    _raises(nanopali.CheckpointError, "model.safetensors", nanopali.load, good)


def test_safetensors_with_garbage_header_is_named(good):
    path = good / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:40] = b"\xff" * 32
    path.write_bytes(bytes(data))
    _raises(nanopali.CheckpointError, "model.safetensors", nanopali.load, good)


def _write_raw_safetensors(path, header: dict, payload: bytes):
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + payload)


@pytest.mark.parametrize("header", [
    {"language_model.model.norm.weight": {"dtype": "F32", "shape": [64]}},                      # no offsets
    {"language_model.model.norm.weight": {"dtype": "F32", "shape": [64], "data_offsets": [0]}},
    ["not", "a", "table"],
], ids=["missing-offsets", "short-offsets", "not-a-table"])
def test_safetensors_with_malformed_header_is_named(good, header):
    _write_raw_safetensors(good / "model.safetensors", header, b"\0" * 256)
    _raises(nanopali.CheckpointError, "model.safetensors", nanopali.load, good)


def test_tensor_whose_byte_size_disagrees_with_its_dtype_and_shape_is_named(good):
    """A header that says F16 over 256 bytes of F32 data: reading it as 128 bytes of F16 would load
    garbage silently."""
    name = "language_model.model.norm.weight"
    path = good / "model.safetensors"
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    assert header[name]["dtype"] == "F32"
    header[name]["dtype"] = "F16"
    new = json.dumps(header, separators=(",", ":")).encode()
    assert len(new) <= n
    path.write_bytes(data[:8] + new.ljust(n, b" ") + data[8 + n:])  # same header length: offsets stay valid
    _raises(nanopali.CheckpointError, name, nanopali.load, good)


def test_shape_mismatched_tensor_is_named_with_both_shapes(good):
    name = "multi_modal_projector.linear.bias"

    def edit(state):
        state[name] = torch.zeros(65)
    _rewrite_weights(good, edit)
    e = _raises(nanopali.CheckpointError, name, nanopali.load, good)
    assert "[64]" in str(e) and "[65]" in str(e)


def test_missing_tensor_is_named(good):
    name = "language_model.model.norm.weight"
    _rewrite_weights(good, lambda state: state.pop(name))
    _raises(nanopali.CheckpointError, f"Missing.*{name}", nanopali.load, good)


def test_unexpected_tensor_is_named(good):
    name = "language_model.model.layers.0.self_attn.extra_proj.weight"

    def edit(state):
        state[name] = torch.zeros(2, 2)
    _rewrite_weights(good, edit)
    _raises(nanopali.CheckpointError, f"Unexpected.*{name}", nanopali.load, good)


def test_every_problem_is_listed_in_one_error(good):
    def edit(state):
        state.pop("language_model.model.norm.weight")
        state["extra.weight"] = torch.zeros(1)
        state["multi_modal_projector.linear.bias"] = torch.zeros(65)
    _rewrite_weights(good, edit)
    e = _raises(nanopali.CheckpointError, "Missing", nanopali.load, good)
    for name in ("language_model.model.norm.weight", "extra.weight", "multi_modal_projector.linear.bias"):
        assert name in str(e)


def test_a_stray_tensor_past_the_last_layer_is_named_with_what_its_layer_lacks(good):
    stray = "language_model.model.layers.2.mlp.up_proj.weight"  # the tiny decoder has layers 0 and 1

    def edit(state):
        state[stray] = state["language_model.model.layers.1.mlp.up_proj.weight"].clone()
    _rewrite_weights(good, edit)
    e = _raises(nanopali.CheckpointError, r"text layer 2 is incomplete", nanopali.load, good)
    assert stray in str(e) and "lacks 8 tensor(s): language_model.model.layers.2.input_layernorm.weight" in str(e)
    assert "3 text layers" not in str(e)


@pytest.mark.parametrize("quantize", [None, "int4"])
def test_nan_or_inf_in_weights_is_named_for_every_tensor_that_holds_one(good, quantize):
    def edit(state):
        state["language_model.model.norm.weight"][3] = float("nan")
        state["multi_modal_projector.linear.weight"][0, 1] = float("-inf")   # quantized while loading
    _rewrite_weights(good, edit)
    e = _raises(nanopali.CheckpointError, r"model.safetensors .*\nNaN or inf in 2 tensor\(s\): ", nanopali.load, good,
                quantize=quantize)
    assert "language_model.model.norm.weight" in str(e) and "multi_modal_projector.linear.weight" in str(e)


@pytest.mark.parametrize("scheme, name", [("int8", "language_model.layers.0.attn.q.scale"),
                                          ("int4", "language_model.layers.1.mlp.up.zero")])
def test_nan_or_inf_in_a_quantized_checkpoints_scales_is_named(good, tmp_path, scheme, name):
    from safetensors.torch import load_file

    model, _ = nanopali.load(good, quantize=scheme)
    nanopali.save_checkpoint(model, str(tmp_path / "q"), str(good / "tokenizer.model"))
    state = load_file(tmp_path / "q" / "model.safetensors")
    state[name][0] = float("inf")
    save_file(state, tmp_path / "q" / "model.safetensors")
    _raises(nanopali.CheckpointError, rf"NaN or inf in 1 tensor\(s\): {name}$", nanopali.load, tmp_path / "q")


def test_finite_weights_whose_sum_overflows_half_precision_still_load(good):
    """The check sums each tensor (one pass, no temporary); a sum past fp16's 65504 is not a NaN in the file."""
    _rewrite_weights(good, lambda state: state["multi_modal_projector.linear.weight"].fill_(60000.0))
    model, _ = nanopali.load(good, dtype=torch.float16)
    assert bool((model.projector.linear.weight == 60000.0).all())


def test_index_naming_a_missing_shard_is_named(hf_checkpoint, tmp_path):
    d = shutil.copytree(hf_checkpoint("pg2-sharded"), tmp_path / "ckpt")
    shard = sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))[-1]
    os.remove(d / shard)
    _raises(nanopali.CheckpointError, shard, nanopali.load, d)


class _Trap:
    """Unpickling this touches a marker file: proof that the loader executed pickle code."""
    marker = None

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_only_weights_are_refused_without_unpickling(good, tmp_path):
    os.remove(good / "model.safetensors")
    trap = _Trap()
    trap.marker = str(tmp_path / "pickle-code-ran")
    (good / "pytorch_model.bin").write_bytes(pickle.dumps(trap))
    _raises(nanopali.CheckpointError, "safetensors", nanopali.load, good)
    assert not os.path.exists(trap.marker)


def test_a_refused_pickle_message_carries_no_terminal_escapes(tmp_path):
    """torch styles its weights-only refusal with colour codes, and a crafted file names its own globals;
    the message quotes torch's reason, and neither may drive the terminal that shows it."""
    from nanopali.mobileclip import load_mobileclip_model

    path = tmp_path / "evil.pt"
    path.write_bytes(b"\x80\x02cos\x1b[31m\x1b]0;owned\x07\nsystem\nq\x00.")
    with pytest.raises(nanopali.CheckpointError, match="not a weights-only PyTorch file") as e:
        load_mobileclip_model(str(path), preset="mobileclip2-s0")
    assert not any(c in str(e.value) for c in "\x1b\x07"), str(e.value)


# ---- arguments ----

def test_unknown_preset_is_named():
    _raises(ValueError, "pg3-1b-224", nanopali.preset, "pg3-1b-224")


@pytest.mark.parametrize("dtype", [torch.int8, torch.float64, "float8", "half-ish"])
def test_unsupported_dtype_is_named(hf_checkpoint, dtype):
    _raises(ValueError, "dtype", nanopali.load, hf_checkpoint("pg1"), dtype=dtype)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_refused(hf_checkpoint):
    _raises(ValueError, "cuda", nanopali.load, hf_checkpoint("pg1"), device="cuda")


def test_unknown_device_is_named(hf_checkpoint):
    _raises(ValueError, "tpu9", nanopali.load, hf_checkpoint("pg1"), device="tpu9")


@pytest.mark.parametrize("image_size", [56.0, "56", True, 30])
def test_image_size_that_is_not_a_whole_number_of_patches_is_named(hf_checkpoint, image_size):
    _raises(nanopali.CheckpointError, rf"image_size={re.escape(repr(image_size))} is not a positive multiple "
            r"of the patch size 14", nanopali.load, hf_checkpoint("pg1"), image_size=image_size)


def test_an_image_size_past_any_paligemma_resolution_is_refused_before_the_table_is_built(hf_checkpoint):
    _raises(nanopali.CheckpointError, r"image_size=1400000 is past 8192 px", nanopali.load, hf_checkpoint("pg1"),
            image_size=1_400_000)


@pytest.mark.parametrize("group_size", [64.0, True, "64", 48])
def test_int4_group_size_that_is_not_one_the_kernels_take_is_named(hf_checkpoint, group_size):
    _raises(ValueError, rf"group_size must be one of \(32, 64, 128, 256\), an int .*; got {re.escape(repr(group_size))}$",
            nanopali.load, hf_checkpoint("pg1"), quantize="int4", group_size=group_size)


def test_group_size_with_int8_is_refused_not_ignored(hf_checkpoint):
    _raises(ValueError, r"group_size=64 is for int4: int8 has one scale per output row",
            nanopali.load, hf_checkpoint("pg1"), quantize="int8", group_size=64)


def test_unknown_quantize_value_is_named_even_for_an_already_quantized_directory(good, tmp_path):
    model, _ = nanopali.load(good, quantize="int8")
    nanopali.save_checkpoint(model, str(tmp_path / "q"), str(good / "tokenizer.model"))
    _raises(ValueError, r"Unknown quantization scheme 'int3'; known: 'int8', 'int4'",
            nanopali.load, tmp_path / "q", quantize="int3")


# ---- images and prompts ----

@pytest.fixture
def processor(model_pair):
    return model_pair("pg1").processor


def _png_header_only(path, width, height):
    """A PNG whose header claims width x height (8-bit RGB) with no pixel data: PIL opens it lazily."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return str(path)


def test_file_that_is_not_an_image_is_named(processor, tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not a picture")
    _raises(nanopali.InputError, "notes.png", processor, images=[str(path)], prompts=["caption en"])


def test_empty_image_file_is_named(processor, tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    _raises(nanopali.InputError, "empty.jpg", processor, images=[str(path)], prompts=["caption en"])


def test_missing_image_file_is_named(processor, tmp_path):
    _raises(nanopali.InputError, "nowhere.png", processor, images=[str(tmp_path / "nowhere.png")],
            prompts=["caption en"])


@pytest.mark.parametrize("size", [(0, 0), (0, 10), (10, 0)])
def test_zero_size_image_is_refused(processor, size):
    _raises(nanopali.InputError, "zero size", processor, images=[Image.new("RGB", size)], prompts=["caption en"])


def test_absurdly_large_image_file_is_refused_with_the_limit_named(processor, tmp_path):
    # 12000 x 12000 = 144 MP: above nanopali's 100 MP limit, below PIL's own error threshold.
    path = _png_header_only(tmp_path / "huge.png", 12000, 12000)
    with pytest.warns(Image.DecompressionBombWarning):
        _raises(nanopali.InputError, "huge.png.*100,000,000", processor, images=[path], prompts=["caption en"])


def test_decompression_bomb_file_is_refused_with_the_limit_named(processor, tmp_path):
    path = _png_header_only(tmp_path / "bomb.png", 100_000, 100_000)  # 10^10 pixels: PIL refuses to open
    _raises(nanopali.InputError, "bomb.png.*limit", processor, images=[path], prompts=["caption en"])


def test_large_in_memory_image_is_refused_with_the_limit_named(processor, monkeypatch):
    import nanopali.formats.images

    monkeypatch.setattr(nanopali.formats.images, "MAX_IMAGE_PIXELS", 1000)
    _raises(nanopali.InputError, "1,000", processor, images=[Image.new("RGB", (40, 40))], prompts=["caption en"])


def test_image_of_another_type_is_named(processor):
    _raises(nanopali.InputError, "ndarray", processor, images=[np.zeros((4, 4, 3))],
            prompts=["caption en"])


def test_prompt_longer_than_max_length_is_refused_with_the_limit_named(processor, test_images):
    _raises(nanopali.InputError, "limit is 10", processor, images=[test_images["rgb-square"]],
            prompts=["answer en where is the cow? the cow is on the beach"], max_length=10)


def test_mismatched_numbers_of_images_and_prompts_are_named(processor, test_images):
    _raises(nanopali.InputError, "2 images.*3 prompts", processor, images=[test_images["rgb-square"]] * 2,
            prompts=["a", "b", "c"])


def test_mismatched_numbers_of_suffixes_and_prompts_are_named(processor, test_images):
    _raises(nanopali.InputError, "1 suffixes.*2 prompts", processor, images=[test_images["rgb-square"]] * 2,
            prompts=["a", "b"], suffixes=["x"])


def test_empty_batch_is_refused(processor):
    _raises(nanopali.InputError, "prompt", processor, images=[], prompts=[])


def test_prompt_that_is_not_a_string_is_named(processor, test_images):
    _raises(nanopali.InputError, "Prompt 0", processor, images=[test_images["rgb-square"]], prompts=[42])


# ---- the command line ----

def test_sample_cli_with_a_bad_checkpoint_path_prints_one_error_line_and_exits_2(tmp_path, test_images):
    image = tmp_path / "x.png"
    test_images["rgb-square"].save(image)
    result = subprocess.run(
        [sys.executable, "sample.py", "--checkpoint", str(tmp_path / "no-such-dir"), "--image", str(image)],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "no-such-dir" in result.stderr
    assert "Traceback" not in result.stderr
