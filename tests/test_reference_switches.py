"""The documented switches between transformers' and big_vision's behaviour (issue 8; docs/disagreements.md).

Each switch defaults to transformers' behaviour; each test shows the default matching transformers,
the big_vision setting matching what big_vision does (transformers run the big_vision way where it can
be, a hand-computed case where it cannot), and the two differing exactly where they should.

| switch                               | transformers (default) | big_vision              | disagreements.md |
| PaliGemmaConfig.position_base        | 1                      | 0                       | #1               |
| Processor.image_resize               | "bicubic"              | "bilinear"(_antialias)  | #3               |
| Processor.separator                  | "joint"                | "separate"              | #4               |
| GemmaConfig.sliding_window           | 4096 (PaliGemma 2)     | None                    | #5, #6           |
| GemmaConfig.final_softcap            | 30.0 (PaliGemma 2)     | None (transfer configs) | #7               |
"""
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

import hf_reference
from hf_reference import IMAGE_TOKEN_ID, load_tf, tf_forward_logits
from nanopali.kv_cache import StaticKVCache
from nanopali.model import PaliGemma
from nanopali.processing import Processor, preprocess_image
from tolerance import assert_rounding_close, paligemma_terms

LONG_SUFFIX = "a red circle on a white background ; the star is blue. the square is green."  # > window 8


def rebuilt(model, **changes):
    """The same weights under a config with `changes` (PaliGemmaConfig fields, or GemmaConfig fields)."""
    cfg = model.cfg
    text = {k: v for k, v in changes.items() if hasattr(cfg.text, k)}
    cfg = replace(cfg, text=replace(cfg.text, **text), **{k: v for k, v in changes.items() if k not in text})
    out = PaliGemma(cfg)
    out.load_state_dict(model.state_dict())
    return out.eval()


def at_text(batch, logits):
    """transformers' full-length logits (B, T, V) → (B, T_text, V), as nanopali returns them."""
    is_text = batch["input_ids"] != IMAGE_TOKEN_ID
    return logits[is_text].view(logits.shape[0], -1, logits.shape[-1])


def max_diff(a, b):
    return (a - b).abs().max().item()


def assert_logits_close(model, batch, ours, theirs):
    """fp32 logits of the same math in other kernels: equal up to rounding (tests/tolerance.py)."""
    assert_rounding_close(ours, theirs, torch.float32, paligemma_terms(model.cfg, batch["input_ids"].shape[1]))


# ---- RoPE position base ----

def test_position_base_1_matches_transformers_and_0_matches_transformers_given_0_based_positions(model_pair,
                                                                                                  test_images):
    pair = model_pair("pg1")
    assert pair.model.cfg.position_base == 1
    batch = pair.processor(images=[test_images["rgb-square"]], prompts=["caption en"], suffixes=["a red circle"])
    T = batch["input_ids"].shape[1]
    with torch.no_grad():
        tf_zero = pair.tf_model(**batch, position_ids=torch.arange(T)[None]).logits  # big_vision's positions
        ours_one, ours_zero = pair.model(**batch), rebuilt(pair.model, position_base=0)(**batch)
    assert_logits_close(pair.model, batch, ours_one, at_text(batch, tf_forward_logits(pair.tf_model, batch)))
    assert_logits_close(pair.model, batch, ours_zero, at_text(batch, tf_zero))


@pytest.mark.parametrize("base", [0, 1])
def test_position_base_is_the_rope_angle_of_the_first_token(model_pair, test_images, base):
    """RoPE is relative, so the base moves logits only by rounding (~1e-5); where it shows exactly is
    the cached key of the first token: unrotated for big_vision's 0, rotated by one step for 1."""
    model = rebuilt(model_pair("pg1").model, position_base=base)
    batch = model_pair("pg1").processor(images=[test_images["rgb-square"]], prompts=["caption en"])
    t = model.cfg.text
    cache = StaticKVCache(t.depth, 1, t.num_kv_heads, batch["input_ids"].shape[1], t.head_dim, torch.float32, "cpu")
    with torch.no_grad():
        model.hidden_states(**batch, cache=cache)
        x = model.embed(batch["input_ids"], batch["pixel_values"])[:, :1]                 # first token (1, 1, D)
        k = model.language_model.layers[0].attn.k(model.language_model.layers[0].pre_attn_norm(x))[0, 0]
    k = k.double().numpy().reshape(t.num_kv_heads, t.head_dim)                           # (K, H) unrotated
    half = t.head_dim // 2
    angle = base * t.rope_theta ** (-np.arange(half) * 2.0 / t.head_dim)                # (H/2,)
    cos, sin = np.cos(np.r_[angle, angle]), np.sin(np.r_[angle, angle])
    expected = k * cos + np.concatenate([-k[:, half:], k[:, :half]], -1) * sin
    # a width-long projection (rounded in the model's forward) then one rotation: rounding only
    assert_rounding_close(cache.k[0, 0, :, 0], expected, torch.float32, t.width + 2, "first cached key")
    assert (base == 0) == np.array_equal(expected, k)


# ---- image resize ----

def test_default_resize_is_transformers_bicubic_and_bilinear_differs(model_pair, test_images):
    pair = model_pair("pg1")
    image = test_images["rgb-large"]
    theirs = pair.tf_processor(images=[image], text=["<image>caption en"], return_tensors="pt")["pixel_values"][0]
    assert pair.processor.image_resize == "bicubic"
    assert torch.equal(pair.processor(images=[image], prompts=["caption en"])["pixel_values"][0], theirs)
    assert max_diff(preprocess_image(image, 28, "bilinear"), theirs) > 0.05
    assert max_diff(preprocess_image(image, 28, "bilinear_antialias"), preprocess_image(image, 28, "bilinear")) > 0.05


def _bv(value):
    """big_vision's value_range(-1, 1) of a uint8 value, in float32."""
    return np.float32(-1) + np.float32(value) / np.float32(255) * np.float32(2)


def test_bilinear_resize_is_big_vision_half_pixel_bilinear_truncated_to_uint8():
    """4×4 → 2×2, hand-computed. tf.image.resize samples output pixel i at input (i + ½)·2 − ½ = 2i + ½,
    the midpoint of a 2×2 block; big_vision then casts back to uint8, which truncates (1.75 → 1)."""
    grey = np.zeros((4, 4), np.uint8)
    grey[:2, :2] = [[1, 2], [2, 2]]          # block mean 1.75 → 1 (rounding would give 2)
    grey[:2, 2:] = 100                       # 100
    grey[2:, :2] = [[10, 11], [10, 10]]      # 10.25 → 10
    grey[2:, 2:] = [[254, 255], [255, 255]]  # 254.75 → 254
    out = preprocess_image(Image.fromarray(np.repeat(grey[..., None], 3, -1)), 2, "bilinear")
    expected = np.array([[_bv(1), _bv(100)], [_bv(10), _bv(254)]], np.float32)
    np.testing.assert_array_equal(out.numpy(), np.broadcast_to(expected, (3, 2, 2)))


def test_antialiased_bilinear_resize_uses_the_widened_triangle_filter():
    """4 → 2 columns with antialias: a triangle of half-width 2 input pixels centred at input 1.0 and 3.0
    (TF's scale_and_translate, PIL's bilinear) weighs pixel centres 0.5, 1.5, 2.5, 3.5 by ¾, ¾, ¼, 0
    (and 0, ¼, ¾, ¾), normalised. Rows are constant, so only columns filter."""
    row = np.array([0, 100, 200, 255], np.uint8)
    img = np.repeat(np.tile(row, (4, 1))[..., None], 3, -1)
    left = (0.75 * 0 + 0.75 * 100 + 0.25 * 200) / 1.75      # 71.43 → 71
    right = (0.25 * 100 + 0.75 * 200 + 0.75 * 255) / 1.75   # 209.29 → 209
    out = preprocess_image(Image.fromarray(img), 2, "bilinear_antialias")
    assert math.trunc(left) == 71 and math.trunc(right) == 209
    np.testing.assert_array_equal(out[0].numpy(), np.array([[_bv(71), _bv(209)]] * 2, np.float32))
    plain = preprocess_image(Image.fromarray(img), 2, "bilinear")
    np.testing.assert_array_equal(plain[0].numpy(), np.array([[_bv(50), _bv(227)]] * 2, np.float32))


# ---- separator tokenization ----

@pytest.fixture(scope="module")
def newline_tokenizer(tmp_path_factory):
    """hf_reference's tokenizer plus a "\\n\\n" piece, as Gemma's has (ids 108 "\\n", 109 "\\n\\n")."""
    proto = sp_pb2.ModelProto()
    proto.ParseFromString(hf_reference._tokenizer_bytes())
    proto.pieces.add(piece="\n\n", score=0.0, type=sp_pb2.ModelProto.SentencePiece.USER_DEFINED)
    d = tmp_path_factory.mktemp("newline_tokenizer")
    (d / "tokenizer.model").write_bytes(proto.SerializeToString())
    return d


def test_separator_joint_is_transformers_and_separate_is_big_vision(newline_tokenizer):
    from transformers import GemmaTokenizer, PaliGemmaProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    path = str(newline_tokenizer / "tokenizer.model")
    n = hf_reference.SP_VOCAB_SIZE + 1  # pieces; <image> is the next id
    joint, separate = (Processor(path, 28, 4, n, separator=s) for s in ("joint", "separate"))
    nl, nlnl = joint.sp.piece_to_id("\n"), joint.sp.piece_to_id("\n\n")
    prompt = "caption en\n"  # a prompt that already ends in "\n", as the prompt docs write them
    assert joint.prefix_ids(prompt)[-2:] != separate.prefix_ids(prompt)[-2:]
    assert joint.prefix_ids(prompt)[-1] == nlnl and separate.prefix_ids(prompt)[-2:] == [nl, nl]
    assert joint.prefix_ids("caption en") == separate.prefix_ids("caption en")  # no merge, no difference
    tf = PaliGemmaProcessor(tokenizer=GemmaTokenizer.from_pretrained(str(newline_tokenizer)),
                            image_processor=SiglipImageProcessorPil(size={"height": 28, "width": 28},
                                                                    image_seq_length=4))
    image = Image.new("RGB", (28, 28))
    for p in (prompt, "caption en"):
        assert tf(images=[image], text=["<image>" + p])["input_ids"][0] == joint.prefix_ids(p)


# ---- Gemma 2 sliding window ----

@pytest.fixture(scope="module")
def long_batch(model_pair, test_images):
    return model_pair("pg2").processor(images=[test_images["rgb-large"]], prompts=["caption en"],
                                       suffixes=[LONG_SUFFIX])


def test_sliding_window_on_matches_transformers_and_off_matches_transformers_without_one(model_pair, long_batch):
    short, never = model_pair("pg2"), model_pair("pg2-window-4096")  # same weights; window 8 vs one never reached
    assert short.model.cfg.text.sliding_window == 8
    with torch.no_grad():
        on, off = short.model(**long_batch), rebuilt(short.model, sliding_window=None)(**long_batch)
    assert_logits_close(short.model, long_batch, on, at_text(long_batch, tf_forward_logits(short.tf_model, long_batch)))
    assert_logits_close(short.model, long_batch, off, at_text(long_batch, tf_forward_logits(never.tf_model, long_batch)))
    suffix = long_batch["token_type_ids"][long_batch["input_ids"] != IMAGE_TOKEN_ID].bool().view(1, -1)
    assert max_diff(on[suffix], off[suffix]) > 1e-2        # the window bites on late suffix tokens
    assert torch.equal(on[~suffix], off[~suffix])          # and never on the prefix


# ---- final-logit soft-cap ----

def test_final_softcap_on_matches_transformers_and_off_matches_transformers_without_one(model_pair, hf_checkpoint,
                                                                                        long_batch):
    pair = model_pair("pg2")
    assert pair.model.cfg.text.final_softcap == 30.0
    tf_uncapped, _ = load_tf(hf_checkpoint("pg2"))
    tf_uncapped.config.text_config.final_logit_softcapping = None  # what big_vision's transfer configs do
    with torch.no_grad():
        on, off = pair.model(**long_batch), rebuilt(pair.model, final_softcap=None)(**long_batch)
    assert_logits_close(pair.model, long_batch, on, at_text(long_batch, tf_forward_logits(pair.tf_model, long_batch)))
    assert_logits_close(pair.model, long_batch, off, at_text(long_batch, tf_forward_logits(tf_uncapped, long_batch)))
    assert max_diff(on, off) > 0.05 and off.abs().max() > on.abs().max()
    assert on.abs().max() < 30.0
