"""`<seg>` answers → masks (issue 8; docs/boxes-and-masks.md).

The decoder is checked against a NumPy computation of big_vision's flax `Decoder` straight from the
.npz arrays: the kernels transposed to HWIO as big_vision's `_get_params` does, NHWC convolutions, and
`ConvTranspose(transpose_kernel=True, padding=2)` written out as jax's `conv_transpose` defines it
(stride-dilated input, explicit padding, spatially flipped kernel with in/out swapped). So the torch
layout (no transposes, ConvTranspose2d padding 1) is proved, not assumed. The file is random, with the
published key names and shapes (docs/boxes-and-masks.md#mask-decoder).
"""
import importlib.util
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import importlib
from nanopali import CheckpointError
from nanopali.tasks.detection import PALETTE
from nanopali.tasks.segmentation import (MaskDecoder, Segmentation, draw_segmentations, mask_to_rle, parse_segments,
                                   paste_mask, segment)

CODE_DIM = 512  # docs/boxes-and-masks.md#mask-decoder, from a third-party port; the loader reads it from the codebook
DECODER_SHAPES = {  # docs/boxes-and-masks.md#mask-decoder: Conv (out, in, kh, kw), ConvTranspose (in, out, kh, kw)
    "_vq_vae._embedding": (128, CODE_DIM),
    "decoder.0.weight": (128, CODE_DIM, 1, 1), "decoder.0.bias": (128,),
    **{f"decoder.{b}.net.{c}.{p}": ((128, 128, k, k) if p == "weight" else (128,))
       for b in (2, 3) for c, k in ((0, 3), (2, 3), (4, 1)) for p in ("weight", "bias")},
    "decoder.4.weight": (128, 128, 4, 4), "decoder.4.bias": (128,),
    "decoder.6.weight": (128, 64, 4, 4), "decoder.6.bias": (64,),
    "decoder.8.weight": (64, 32, 4, 4), "decoder.8.bias": (32,),
    "decoder.10.weight": (32, 16, 4, 4), "decoder.10.bias": (16,),
    "decoder.12.weight": (1, 16, 1, 1), "decoder.12.bias": (1,),
}
ENCODER_SHAPES = {  # unpublished shapes; present in the file, unused by the decoder
    "encoder.0.weight": (16, 1, 3, 3), "encoder.0.bias": (16,), "encoder.2.weight": (32, 16, 3, 3),
    "encoder.2.bias": (32,), "encoder.4.weight": (64, 32, 3, 3), "encoder.4.bias": (64,),
    "encoder.6.weight": (128, 64, 3, 3), "encoder.6.bias": (128,), "encoder.10.weight": (CODE_DIM, 128, 1, 1),
    "encoder.10.bias": (CODE_DIM,),
    **{f"encoder.{b}.net.{c}.{p}": ((128, 128, k, k) if p == "weight" else (128,))
       for b in (8, 9) for c, k in ((0, 3), (2, 3), (4, 1)) for p in ("weight", "bias")},
}


def random_vae(seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for k, shape in {**DECODER_SHAPES, **ENCODER_SHAPES}.items():
        x = rng.standard_normal(shape).astype(np.float32)
        if k.endswith("bias"):
            x *= 0.1
        elif k != "_vq_vae._embedding":  # He init, std sqrt(2 / fan in): O(1) activations after every ReLU
            transposed = k in ("decoder.4.weight", "decoder.6.weight", "decoder.8.weight", "decoder.10.weight")
            fan_in = shape[0] * 4 if transposed else np.prod(shape[1:])  # stride 2: 2×2 of the 4×4 taps hit
            x *= np.sqrt(2 / fan_in)
        out[k] = x
    return out


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    arrays = random_vae()
    path = tmp_path_factory.mktemp("vae") / "vae-oid.npz"
    np.savez(path, **arrays)
    return str(path), arrays


# ---- an independent NumPy decoder: big_vision's flax Decoder on the .npz arrays ----

def hwio(w):
    return np.transpose(w, (2, 3, 1, 0)).astype(np.float64)  # big_vision `_get_params.transp`


def conv(x, kernel, bias, pad):
    """flax nn.Conv, NHWC × HWIO, stride 1, symmetric padding: a correlation."""
    kh, kw = kernel.shape[:2]
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    h, w = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    return sum(np.einsum("bhwc,co->bhwo", x[:, i:i + h, j:j + w], kernel[i, j])
               for i in range(kh) for j in range(kw)) + bias


def conv_transpose(x, kernel, bias):
    """jax conv_transpose(strides 2, padding ((2, 2), (2, 2)), transpose_kernel=True)."""
    b, h, w, c = x.shape
    dilated = np.zeros((b, 2 * h - 1, 2 * w - 1, c))
    dilated[:, ::2, ::2] = x
    return conv(dilated, kernel[::-1, ::-1].swapaxes(2, 3), bias, pad=2)


def numpy_decoder(a, codes):
    relu = lambda x: np.maximum(x, 0)  # noqa: E731
    x = a["_vq_vae._embedding"].astype(np.float64)[codes].reshape(len(codes), 4, 4, -1)    # (B, 4, 4, C)
    x = relu(conv(x, hwio(a["decoder.0.weight"]), a["decoder.0.bias"], 0))
    for blk in ("decoder.2.net", "decoder.3.net"):
        y = relu(conv(x, hwio(a[blk + ".0.weight"]), a[blk + ".0.bias"], 1))
        y = relu(conv(y, hwio(a[blk + ".2.weight"]), a[blk + ".2.bias"], 1))
        x = x + conv(y, hwio(a[blk + ".4.weight"]), a[blk + ".4.bias"], 0)
    for n in (4, 6, 8, 10):
        x = relu(conv_transpose(x, hwio(a[f"decoder.{n}.weight"]), a[f"decoder.{n}.bias"]))
    return conv(x, hwio(a["decoder.12.weight"]), a["decoder.12.bias"], 0)[..., 0]          # (B, 64, 64)


def test_decoder_matches_big_vision_flax_decoder_computed_in_numpy(vae):
    path, arrays = vae
    codes = np.random.default_rng(1).integers(0, 128, size=(3, 16))
    with torch.no_grad():
        ours = MaskDecoder.from_npz(path)(torch.from_numpy(codes)).double().numpy()
    theirs = numpy_decoder(arrays, codes)
    assert ours.shape == theirs.shape == (3, 64, 64)
    assert theirs.std() > 0.1 and (theirs > 0).mean() not in (0.0, 1.0)  # a mask with both signs
    np.testing.assert_allclose(ours, theirs, atol=1e-4 * np.abs(theirs).max())


def _save(tmp_path, arrays, name="vae.npz"):
    path = tmp_path / name
    np.savez(path, **arrays)
    return str(path)


def test_missing_decoder_array_is_named(tmp_path):
    arrays = random_vae()
    del arrays["decoder.6.bias"]
    with pytest.raises(CheckpointError, match=r"Missing 1 array\(s\): decoder.6.bias"):
        MaskDecoder.from_npz(_save(tmp_path, arrays))


def test_mis_shaped_decoder_array_is_named_with_both_shapes(tmp_path):
    arrays = random_vae()
    arrays["decoder.8.weight"] = arrays["decoder.8.weight"][:, :16]
    with pytest.raises(CheckpointError, match=r"decoder.8.weight: expected \[64, 32, 4, 4\], found \[64, 16, 4, 4\]"):
        MaskDecoder.from_npz(_save(tmp_path, arrays))


def test_array_that_belongs_to_no_vq_vae_is_named(tmp_path):
    arrays = {**random_vae(), "head.kernel": np.zeros(3, np.float32)}
    with pytest.raises(CheckpointError, match=r"Unexpected 1 array\(s\): head.kernel"):
        MaskDecoder.from_npz(_save(tmp_path, arrays))


def test_object_array_in_the_vae_file_is_refused(tmp_path):
    arrays = {**random_vae(), "decoder.0.bias": np.array([{"a": 1}], dtype=object)}
    with pytest.raises(CheckpointError, match=r"decoder.0.bias holds Python objects"):
        MaskDecoder.from_npz(_save(tmp_path, arrays))


# ---- parsing "segment" answers ----

def seg_answer(bins, codes, label=""):
    tokens = "".join(f"<loc{b:04d}>" for b in bins) + "".join(f"<seg{c:03d}>" for c in codes)
    return tokens + (f" {label}" if label else "")


CODES = list(range(100, 116))


def test_well_formed_answer_is_parsed():
    (obj,) = parse_segments(seg_answer((10, 20, 500, 700), CODES, "cat"))
    assert (obj.label, obj.bins, obj.codes) == ("cat", (10, 20, 500, 700), tuple(CODES))


def test_several_objects_are_parsed_in_order_with_their_labels():
    text = " ; ".join([seg_answer((10, 20, 500, 700), CODES, "cat"), seg_answer((0, 0, 1023, 1023), [5] * 16, "dog"),
                       seg_answer((1, 2, 3, 4), [127] * 16)])  # no label: big_vision's RefCOCO targets
    parsed = [(o.label, o.bins[0], o.codes[0]) for o in parse_segments(text)]
    assert parsed == [("cat", 10, 100), ("dog", 0, 5), ("", 1, 127)]


def test_space_between_the_loc_and_seg_groups_is_accepted():
    text = "<loc0722><loc0047><loc0895><loc0378> " + "".join(f"<seg{c:03d}>" for c in CODES) + " car"
    assert [o.label for o in parse_segments(text)] == ["car"]


def test_truncated_last_object_is_skipped():
    text = seg_answer((10, 20, 500, 700), CODES, "cat") + " ; " + seg_answer((10, 20, 500, 700), CODES[:9])
    assert [o.label for o in parse_segments(text)] == ["cat"]
    assert parse_segments("<loc0010><loc0020><loc05") == []


@pytest.mark.parametrize("bad", [
    seg_answer((10, 20, 500), CODES, "three locs"),
    seg_answer((10, 20, 500, 1024), CODES, "bin past 1023"),
    seg_answer((500, 20, 10, 700), CODES, "y1 above y0"),
    seg_answer((10, 700, 500, 700), CODES, "empty width"),
    seg_answer((10, 20, 500, 700), CODES[:15] + [128], "code past 127"),
    seg_answer((10, 20, 500, 700), CODES + [1], "seventeen codes"),
    seg_answer((10, 20, 500, 700), [], "no codes"),
    "a cat, no tokens at all",
])
def test_malformed_object_is_skipped_and_the_next_one_kept(bad):
    assert parse_segments(bad) == []
    assert [o.label for o in parse_segments(bad + " ; " + seg_answer((1, 2, 3, 4), CODES, "good"))] == ["good"]


# ---- pasting the 64×64 mask into the box ----

def _box(bins, width, height):
    """The evaluator's box (docs/boxes-and-masks.md#pasting-a-mask): int(bin / 1023 · side)."""
    y0, x0, y1, x1 = bins
    return int(x0 / 1023 * width), int(y0 / 1023 * height), int(x1 / 1023 * width), int(y1 / 1023 * height)


@pytest.mark.parametrize("width,height,split", [(300, 100, "left"), (100, 300, "top"), (160, 90, "left")])
def test_mask_lands_in_its_box_on_images_of_any_aspect_ratio(width, height, split):
    """Positive on the left (or top) half of the 64×64 mask → exactly the left (top) half of the box: the
    box stretches the mask to its own aspect ratio, and nothing outside the box is set."""
    m = np.where(np.arange(64) < 32, 1.0, -1.0).astype(np.float32)
    mask64 = np.tile(m, (64, 1)) if split == "left" else np.tile(m[:, None], (1, 64))
    bins = (205, 103, 819, 921)  # y0, x0, y1, x1
    x0, y0, x1, y1 = _box(bins, width, height)
    assert (x1 - x0) % 2 == (y1 - y0) % 2 == 0  # even sides, so that the halves are exact
    expected = np.zeros((height, width), bool)
    if split == "left":
        expected[y0:y1, x0:(x0 + x1) // 2] = True
    else:
        expected[y0:(y0 + y1) // 2, x0:x1] = True
    got = paste_mask(mask64, bins, width, height)
    assert got.shape == (height, width)
    np.testing.assert_array_equal(got, expected)


def test_box_that_collapses_to_no_pixels_gives_an_empty_mask():
    assert not paste_mask(np.ones((64, 64), np.float32), (0, 0, 1, 1), 50, 50).any()


def test_segment_places_one_mask_per_object_in_its_box(tmp_path):
    """A decoder whose output is +1 everywhere: each mask must be exactly its box."""
    arrays = random_vae()
    for k in arrays:
        if k.startswith("decoder."):
            arrays[k] = np.zeros_like(arrays[k])
    arrays["decoder.12.bias"] = np.ones(1, np.float32)
    decoder = MaskDecoder.from_npz(_save(tmp_path, arrays))
    text = seg_answer((100, 200, 600, 900), CODES, "cat") + " ; " + seg_answer((700, 50, 1000, 300), CODES, "dog")
    segs = segment(text, decoder, 240, 120)
    assert [s.label for s in segs] == ["cat", "dog"]
    for s in segs:
        x0, y0, x1, y1 = _box(s.bins, 240, 120)
        assert s.box == (x0, y0, x1, y1)
        expected = np.zeros((120, 240), bool)
        expected[y0:y1, x0:x1] = True
        np.testing.assert_array_equal(s.mask, expected)
    assert segment("no objects here", decoder, 240, 120) == []


def _rle_decode(rle):
    h, w = rle["size"]
    flat, value = [], False
    for n in rle["counts"]:
        flat += [value] * n
        value = not value
    return np.array(flat, bool).reshape(w, h).T


def test_rle_is_coco_column_major_starting_with_zeros():
    assert mask_to_rle(np.array([[0, 1], [1, 1]], bool)) == {"size": [2, 2], "counts": [1, 3]}
    assert mask_to_rle(np.array([[1, 0], [0, 0]], bool)) == {"size": [2, 2], "counts": [0, 1, 3]}
    m = np.random.default_rng(0).random((7, 5)) > 0.5
    np.testing.assert_array_equal(_rle_decode(mask_to_rle(m)), m)


def test_drawing_tints_masks_and_leaves_the_rest_of_the_image():
    image = Image.fromarray(np.full((60, 80, 3), 200, np.uint8))
    mask = np.zeros((60, 80), bool)
    mask[20:40, 30:60] = True
    out = np.asarray(draw_segmentations(image, [Segmentation("cat", (25, 15, 65, 45), (0, 0, 0, 0), (), mask)]))
    assert out.shape == (60, 80, 3)
    np.testing.assert_array_equal(out[30, 45], np.rint(0.5 * 200 + 0.5 * np.array(PALETTE[0])))
    np.testing.assert_array_equal(out[5, 5], [200, 200, 200])           # outside mask and box
    np.testing.assert_array_equal(out[15, 45], PALETTE[0])              # the box outline


# ---- sample.py ----

def test_sample_writes_the_mask_picture_and_json_masks_for_segment_prompts(vae, hf_checkpoint, tmp_path, monkeypatch,
                                                                          capsys):
    answer = seg_answer((100, 200, 600, 900), CODES, "cat")
    # the module, not the package's `nanopali.generate` function of the same name
    monkeypatch.setattr(importlib.import_module("nanopali.generate"), "generate", lambda *a, **k: ([answer], [[1, 2, 3]]))
    spec = importlib.util.spec_from_file_location("sample", os.path.join(os.path.dirname(__file__), "..", "sample.py"))
    sample = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sample)
    img = tmp_path / "img.png"
    Image.fromarray(np.full((50, 70, 3), 128, np.uint8)).save(img)
    out = tmp_path / "seg.png"
    assert sample.main(["--checkpoint", hf_checkpoint("pg1"), "--image", str(img), "--prompt", "segment cat",
                        "--vae", vae[0], "--out", str(out), "--json"]) == 0
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rec["annotated"] == str(out) and Image.open(out).size == (70, 50)
    (mask,) = rec["masks"]
    assert mask["label"] == "cat" and mask["codes"] == CODES and mask["rle"]["size"] == [50, 70]
    expected = segment(answer, MaskDecoder.from_npz(vae[0]), 70, 50)[0].mask
    np.testing.assert_array_equal(_rle_decode(mask["rle"]), expected)
