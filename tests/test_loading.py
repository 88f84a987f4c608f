"""Presets, config.json parsing and checkpoint loading (issue 3).

Numbers come from the docs, not from nanopali: tensor counts of the hub files
(docs/checkpoints.md#key-layouts), parameter counts (docs/variants.md#parameter-counts, matched there
against keras-hub), transformers' defaults for a 2024 hub config.json that omits them
(docs/files.md#configjson), and transformers' own parsing of the same file.
"""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

import nanopali
from hf_reference import IMAGE_TOKEN_ID, read_weights
from nanopali.formats.hf import hub_names
from nanopali.formats.hf_config import from_hf_config

PRESET_NAMES = [f"{m}-{r}" for m in ("pg1-3b", "pg2-3b", "pg2-10b", "pg2-28b") for r in (224, 448, 896)]

# docs/variants.md#parameter-counts: totals with 257152 embedding rows, and what the 64 padding rows
# of the HF files add.
PARAMS_257152 = {
    "pg1-3b": (2_923_335_408, 2_924_220_144, 2_927_759_088, 131_072),
    "pg2-3b": (3_032_094_960, 3_032_979_696, 3_036_518_640, 147_456),
    "pg2-10b": (9_662_409_456, 9_663_294_192, 9_666_833_136, 229_376),
    "pg2-28b": (27_650_192_112, 27_651_076_848, 27_654_615_792, 294_912),
}
HUB_TENSOR_COUNTS = {"pg1-3b": 603, "pg2-3b": 727, "pg2-10b": 903, "pg2-28b": 947}  # docs/checkpoints.md#key-layouts


def test_every_released_variant_has_a_preset():
    assert sorted(nanopali.PRESETS) == sorted(PRESET_NAMES)


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_preset_parameter_count_matches_the_published_count(name):
    with torch.device("meta"):
        model = nanopali.PaliGemma(nanopali.preset(name))
    *per_res, extra = PARAMS_257152[name.rsplit("-", 1)[0]]
    expected = dict(zip((224, 448, 896), per_res))[int(name.rsplit("-", 1)[1])] + extra
    assert sum(p.numel() for p in model.parameters()) == expected


@pytest.mark.parametrize("family", list(HUB_TENSOR_COUNTS))
def test_hub_tensor_count_matches_the_released_files(family):
    names = hub_names(nanopali.preset(f"{family}-224"))
    assert len(names) == len(set(names)) == HUB_TENSOR_COUNTS[family]


# ---- config.json as the 2024 hub files write it: every default omitted (docs/files.md#configjson) ----

HUB_CONFIG_PG1 = {
    "architectures": ["PaliGemmaForConditionalGeneration"], "bos_token_id": 2, "eos_token_id": 1,
    "hidden_size": 2048, "ignore_index": -100, "image_token_index": 257152, "model_type": "paligemma",
    "pad_token_id": 0, "projection_dim": 2048, "torch_dtype": "float32", "transformers_version": "4.41.0.dev0",
    "vocab_size": 257152,  # stale top-level value: text_config is the truth (docs/files.md#configjson)
    "text_config": {"hidden_size": 2048, "intermediate_size": 16384, "model_type": "gemma",
                    "num_attention_heads": 8, "num_hidden_layers": 18, "num_image_tokens": 256,
                    "num_key_value_heads": 1, "torch_dtype": "float32", "vocab_size": 257216},
    "vision_config": {"hidden_size": 1152, "intermediate_size": 4304, "model_type": "siglip_vision_model",
                      "num_attention_heads": 16, "num_hidden_layers": 27, "num_image_tokens": 256,
                      "patch_size": 14, "projection_dim": 2048, "projector_hidden_act": "gelu_fast",
                      "vision_use_head": False},
}


def _hub_config_pg2(width, depth, mlp, heads, kv_heads, scalar, head_dim=None, image_size=None):
    text = {"hidden_activation": "gelu_pytorch_tanh", "hidden_size": width, "intermediate_size": mlp,
            "model_type": "gemma2", "num_attention_heads": heads, "num_hidden_layers": depth,
            "num_image_tokens": 256, "num_key_value_heads": kv_heads, "query_pre_attn_scalar": scalar,
            "torch_dtype": "bfloat16", "vocab_size": 257216}
    if head_dim is not None:
        text["head_dim"] = head_dim
    vision = {"hidden_size": 1152, "intermediate_size": 4304, "model_type": "siglip_vision_model",
              "num_attention_heads": 16, "num_hidden_layers": 27, "num_image_tokens": 256, "patch_size": 14,
              "projection_dim": width, "torch_dtype": "bfloat16", "vision_use_head": False}
    if image_size is not None:
        vision["image_size"] = image_size
    return {"architectures": ["PaliGemmaForConditionalGeneration"], "bos_token_id": 2, "eos_token_id": 1,
            "hidden_size": width, "image_token_index": 257152, "model_type": "paligemma", "pad_token_id": 0,
            "projection_dim": width, "torch_dtype": "bfloat16", "transformers_version": "4.47.0.dev0",
            "text_config": text, "vision_config": vision}


HUB_CONFIG_PG2_3B = _hub_config_pg2(2304, 26, 9216, 8, 4, 256)
HUB_CONFIG_PG2_28B_448 = _hub_config_pg2(4608, 46, 36864, 32, 16, 144, head_dim=128, image_size=448)


def test_2024_pg2_config_gets_gemma2_soft_caps_window_and_layer_types():
    t = from_hf_config(HUB_CONFIG_PG2_3B).text
    assert (t.attn_softcap, t.final_softcap, t.sliding_window) == (50.0, 30.0, 4096)
    assert t.layer_types == ("sliding_attention", "full_attention") * 13
    assert (t.head_dim, t.query_pre_attn_scalar, t.attn_scale) == (256, 256, 1 / 16)
    assert (t.rms_norm_eps, t.rope_theta, t.vocab_size, t.post_norms) == (1e-6, 10_000.0, 257216, True)


def test_2024_pg2_config_gives_the_pg2_3b_preset():
    assert from_hf_config(HUB_CONFIG_PG2_3B) == nanopali.preset("pg2-3b-224")


def test_2024_28b_config_scales_attention_by_one_twelfth():
    cfg = from_hf_config(HUB_CONFIG_PG2_28B_448)
    assert cfg.text.head_dim == 128 and cfg.text.attn_scale == pytest.approx(1 / 12, rel=1e-12)
    assert cfg == nanopali.preset("pg2-28b-448")


def test_2024_pg1_config_gives_the_pg1_3b_preset():
    cfg = from_hf_config(HUB_CONFIG_PG1)
    assert cfg.text.attn_softcap is None and cfg.text.sliding_window is None and not cfg.text.post_norms
    assert cfg.text.vocab_size == 257216 and cfg.vision.image_size == 224
    assert cfg == nanopali.preset("pg1-3b-224")


@pytest.mark.parametrize("hub_config", [HUB_CONFIG_PG1, HUB_CONFIG_PG2_3B, HUB_CONFIG_PG2_28B_448],
                         ids=["pg1-3b-224", "pg2-3b-224", "pg2-28b-448"])
def test_2024_config_is_read_as_transformers_reads_it(hub_config):
    from transformers import PaliGemmaConfig

    tf = PaliGemmaConfig.from_dict(json.loads(json.dumps(hub_config)))
    t, v, ours = tf.text_config, tf.vision_config, from_hf_config(hub_config)
    g2 = t.model_type == "gemma2"
    assert ours.text.width == t.hidden_size and ours.text.depth == t.num_hidden_layers
    assert ours.text.mlp_dim == t.intermediate_size and ours.text.vocab_size == t.vocab_size
    assert (ours.text.num_heads, ours.text.num_kv_heads, ours.text.head_dim) == (
        t.num_attention_heads, t.num_key_value_heads, t.head_dim)
    assert ours.text.rms_norm_eps == t.rms_norm_eps
    assert ours.text.rope_theta == t.rope_parameters["rope_theta"]
    if g2:
        assert (ours.text.attn_softcap, ours.text.final_softcap) == (t.attn_logit_softcapping,
                                                                     t.final_logit_softcapping)
        assert ours.text.sliding_window == t.sliding_window
        assert list(ours.text.layer_types) == list(t.layer_types)
        assert ours.text.query_pre_attn_scalar == t.query_pre_attn_scalar
    assert (ours.vision.width, ours.vision.depth, ours.vision.mlp_dim, ours.vision.num_heads) == (
        v.hidden_size, v.num_hidden_layers, v.intermediate_size, v.num_attention_heads)
    assert (ours.vision.image_size, ours.vision.patch_size, ours.vision.layer_norm_eps) == (
        v.image_size, v.patch_size, v.layer_norm_eps)
    assert ours.image_token_id == tf.image_token_id


# ---- the same weights in every layout ----

@pytest.mark.parametrize("variant", ["pg2-transformers-layout", "pg2-save-layout", "pg2-sharded"])
def test_every_layout_loads_the_same_model_as_the_hub_layout(hf_checkpoint, variant):
    hub, _ = nanopali.load(hf_checkpoint("pg2"))
    other, _ = nanopali.load(hf_checkpoint(variant))
    a, b = hub.state_dict(), other.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sharded_fixture_really_is_sharded(hf_checkpoint):
    d = hf_checkpoint("pg2-sharded")
    assert os.path.isfile(os.path.join(d, "model.safetensors.index.json"))
    assert len([f for f in os.listdir(d) if f.endswith(".safetensors")]) >= 2


def _copy_with_weights(src, dst, state):
    """dst = src with its weights replaced by `state` in one model.safetensors."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    save_file(state, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    return str(dst)


def test_lm_head_equal_to_the_embedding_is_accepted(hf_checkpoint, tmp_path):
    state = read_weights(hf_checkpoint("pg2"))
    state["language_model.lm_head.weight"] = state["language_model.model.embed_tokens.weight"].clone()
    model, _ = nanopali.load(_copy_with_weights(hf_checkpoint("pg2"), tmp_path / "ckpt", state))
    assert torch.equal(model.language_model.embed.weight, state["language_model.model.embed_tokens.weight"])


def test_transformers_layout_with_its_lm_head_is_accepted(hf_checkpoint):
    d = hf_checkpoint("pg2-transformers-layout")
    assert "lm_head.weight" in read_weights(d)
    nanopali.load(d)


def test_lm_head_different_from_the_embedding_is_rejected_by_name(hf_checkpoint, tmp_path):
    state = read_weights(hf_checkpoint("pg2-transformers-layout"))
    state["lm_head.weight"] = state["lm_head.weight"].clone()
    state["lm_head.weight"][7, 3] += 1e-3
    d = _copy_with_weights(hf_checkpoint("pg2"), tmp_path / "ckpt", state)
    with pytest.raises(nanopali.CheckpointError, match="lm_head"):
        nanopali.load(d)


def test_integer_weights_are_refused_by_name_not_converted(hf_checkpoint, tmp_path):
    state = read_weights(hf_checkpoint("pg2"))
    key = "language_model.model.layers.0.mlp.up_proj.weight"
    state[key] = state[key].round().to(torch.int32)
    with pytest.raises(nanopali.CheckpointError, match=key + ": expected a float tensor, found torch.int32"):
        nanopali.load(_copy_with_weights(hf_checkpoint("pg2"), tmp_path / "ckpt", state))


def test_weights_read_without_a_copy_never_write_back_to_the_file(hf_checkpoint, tmp_path):
    """Loaded in the file's own dtype on the CPU, parameters are views of the mapped file; changing
    them in place (training) changes a private copy, never the checkpoint."""
    d = _copy_with_weights(hf_checkpoint("pg2"), tmp_path / "ckpt", read_weights(hf_checkpoint("pg2")))
    model, _ = nanopali.load(d)
    before = read_weights(d)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    after = read_weights(d)
    assert all(torch.equal(before[k], after[k]) for k in before)
    again, _ = nanopali.load(d)
    assert torch.equal(again.projector.linear.weight + 1.0, model.projector.linear.weight)


# ---- dtypes ----

def _logits(model, processor, test_images):
    batch = processor(images=[test_images["rgb-square"], test_images["rgba"]],
                      prompts=["caption en", "answer en where is the cow? the cow is on the beach"],
                      suffixes=["a red circle on a white background", "beach"])
    real = batch["attention_mask"].bool()[batch["input_ids"] != IMAGE_TOKEN_ID].view(2, -1)
    with torch.no_grad():
        return model(**batch), real


# Loose: one rounding of 8 (bf16) or 11 (fp16) mantissa bits per op, through 2 layers per tower, on
# logits of std ~2 and max ~10. A wrong dtype path (norms or soft-caps in half precision, an
# unconverted scale) moves logits by whole units or gives inf/NaN.
HALF_TOLERANCE = {torch.bfloat16: 1.0, torch.float16: 0.5}


@pytest.mark.parametrize("checkpoint", ["pg1", "pg2"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_load_gives_logits_close_to_fp32_in_the_requested_dtype(hf_checkpoint, test_images,
                                                                              checkpoint, dtype):
    ref, real = _logits(*nanopali.load(hf_checkpoint(checkpoint)), test_images)
    model, processor = nanopali.load(hf_checkpoint(checkpoint), dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}
    out, _ = _logits(model, processor, test_images)
    assert out.dtype == dtype
    diff = (out.float() - ref).abs()[real]
    assert diff.isfinite().all() and diff.max() <= HALF_TOLERANCE[dtype]


def test_dtype_may_be_given_as_a_string(hf_checkpoint):
    model, _ = nanopali.load(hf_checkpoint("pg1"), dtype="bfloat16")
    assert model.projector.linear.weight.dtype == torch.bfloat16


# ---- peak memory while loading (issue 3: within ~1.2x the model's size in the requested dtype) ----

# Peak RSS is read from VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over exec from the
# process that forked the child (here pytest, holding GBs of models), so the child would report the
# parent's peak. VmHWM belongs to the child's own address space; clear_refs "5" resets it to now.
PEAK_RAM_SCRIPT = textwrap.dedent("""
    import gc, json, sys
    import nanopali

    def status(key):  # bytes, from /proc/self/status
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

    out = {}
    for dtype in sys.argv[2:]:
        with open("/proc/self/clear_refs", "w") as f:  # peak RSS (VmHWM) := current RSS
            f.write("5")
        before = status("VmRSS")
        model, _ = nanopali.load(sys.argv[1], dtype=dtype)
        peak = status("VmHWM")
        size = sum(p.numel() * p.element_size() for p in model.parameters())
        out[dtype] = {"model_bytes": size, "peak_minus_before": peak - before, "ratio": (peak - before) / size}
        del model
        gc.collect()
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def peak_ram(hf_checkpoint):
    """Peak RSS growth while loading the real-width PaliGemma 2 checkpoint (2.76 GB of fp32 weights,
    dominated by the 257216 x 2304 embedding), in fp32 and in bf16, measured in a fresh interpreter."""
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux /proc to measure peak RSS")
    path = hf_checkpoint("pg2-real-widths")
    result = subprocess.run([sys.executable, "-c", PEAK_RAM_SCRIPT, path, "float32", "bfloat16"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"\nloading peak RAM / model size: {json.dumps(out)}")
    return out


def test_fp32_load_peak_ram_stays_within_1_2x_the_model_size(peak_ram):
    assert peak_ram["float32"]["model_bytes"] > 2e9  # dominates the ~0.25 GB interpreter baseline
    assert peak_ram["float32"]["ratio"] <= 1.2


def test_bf16_load_of_fp32_weights_peak_ram_stays_within_1_2x_the_bf16_model_size(peak_ram):
    assert peak_ram["bfloat16"]["ratio"] <= 1.2
