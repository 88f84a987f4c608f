"""Loading big_vision `.npz` checkpoints directly (issue 8; docs/checkpoints.md#big_vision-npz).

A random tiny checkpoint is written in big_vision's layout (names, stacked layers, einsum shapes, bf16
as `|V2`, optional `params/` prefix) from this file's own copy of docs/checkpoints.md#tensor-table. It
is converted to a Hugging Face directory by `convert_to_hf` below, written from that table's
"HF = f(npz)" column (transformers' former conversion script): transformers 5.23 no longer ships that
script (`transformers/models/paligemma/` holds only the configuration, modeling and processing files),
so it cannot be used here. The conversion is itself checked against the oracle: transformers loads the
directory strictly and its logits match. Then nanopali's .npz loader must give the same logits as
nanopali's (already transformers-checked) HF loader.
"""
import os
import pickle
import shutil
import zipfile
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import nanopali
from hf_reference import IMAGE_TOKEN_ID, SP_VOCAB_SIZE, load_tf, tf_forward_logits
from nanopali.formats.bigvision import NpzArrays, infer_variant
from nanopali import CheckpointError
from nanopali.processing import InputError
from tolerance import assert_rounding_close, paligemma_terms, rounding_bound

# hf_reference's tiny towers (the conversion copies config.json from its checkpoints, and transformers'
# strict load proves the sizes agree). The .npz embedding has the SentencePiece size, as big_vision's
# 257152: no <image> row, no 64 padding rows.
TINY_VISION = dict(W=32, depth=2, F=48, N=2, p=14, image=28)
TINY_TEXT = {1: dict(D=64, L=2, F=128, N=4, K=1, H=16, V=SP_VOCAB_SIZE),
             2: dict(D=64, L=2, F=128, N=4, K=2, H=16, V=SP_VOCAB_SIZE)}
ENC = "img/Transformer/encoderblock/"
ATT = ENC + "MultiHeadDotProductAttention_0/"


def bv_shapes(generation, vision, text):
    """The `.npz` column of docs/checkpoints.md#tensor-table: every array and its shape."""
    W, Lv, Fv, Nv, p = vision["W"], vision["depth"], vision["F"], vision["N"], vision["p"]
    P, Hv = (vision["image"] // p) ** 2, W // Nv
    D, L, F, N, K, H, V = (text[k] for k in "DLFNKHV")
    s = {"img/embedding/kernel": (p, p, 3, W), "img/embedding/bias": (W,), "img/pos_embedding": (1, P, W),
         ENC + "LayerNorm_0/scale": (Lv, W), ENC + "LayerNorm_0/bias": (Lv, W),
         ENC + "LayerNorm_1/scale": (Lv, W), ENC + "LayerNorm_1/bias": (Lv, W),
         ATT + "out/kernel": (Lv, Nv, Hv, W), ATT + "out/bias": (Lv, W),
         ENC + "MlpBlock_0/Dense_0/kernel": (Lv, W, Fv), ENC + "MlpBlock_0/Dense_0/bias": (Lv, Fv),
         ENC + "MlpBlock_0/Dense_1/kernel": (Lv, Fv, W), ENC + "MlpBlock_0/Dense_1/bias": (Lv, W),
         "img/Transformer/encoder_norm/scale": (W,), "img/Transformer/encoder_norm/bias": (W,),
         "img/head/kernel": (W, D), "img/head/bias": (D,),
         "llm/embedder/input_embedding": (V, D), "llm/final_norm/scale": (D,),
         "llm/layers/attn/q_einsum/w": (L, N, D, H), "llm/layers/attn/kv_einsum/w": (L, 2, K, D, H),
         "llm/layers/attn/attn_vec_einsum/w": (L, N, H, D),
         "llm/layers/mlp/gating_einsum": (L, 2, D, F), "llm/layers/mlp/linear": (L, F, D),
         "llm/layers/pre_attention_norm/scale": (L, D), "llm/layers/pre_ffw_norm/scale": (L, D)}
    for n in ("query", "key", "value"):
        s[ATT + n + "/kernel"], s[ATT + n + "/bias"] = (Lv, W, Nv, Hv), (Lv, Nv, Hv)
    if generation == 2:
        s["llm/layers/post_attention_norm/scale"] = s["llm/layers/post_ffw_norm/scale"] = (L, D)
    return s


def random_bv_params(generation, seed=0):
    """Random float32 arrays with activations O(1) and no exact 0/1 (as hf_reference._perturb_ does)."""
    rng = np.random.default_rng(seed)
    W, Fv, D, F, NH = TINY_VISION["W"], TINY_VISION["F"], 64, 128, 4 * 16
    r = 2.4 / np.sqrt(D)  # short embedding rows, a large final-norm scale: logits O(2) (see _perturb_)
    fan_in = {"img/embedding/kernel": 14 * 14 * 3, ATT + "query/kernel": W, ATT + "key/kernel": W,
              ATT + "value/kernel": W, ATT + "out/kernel": W, ENC + "MlpBlock_0/Dense_0/kernel": W,
              ENC + "MlpBlock_0/Dense_1/kernel": Fv, "img/head/kernel": W, "llm/layers/attn/q_einsum/w": D,
              "llm/layers/attn/kv_einsum/w": D, "llm/layers/attn/attn_vec_einsum/w": NH,
              "llm/layers/mlp/gating_einsum": D, "llm/layers/mlp/linear": F}
    out = {}
    for key, shape in bv_shapes(generation, TINY_VISION, TINY_TEXT[generation]).items():
        x = rng.standard_normal(shape).astype(np.float32)
        if key == "llm/embedder/input_embedding":
            x *= r / np.sqrt(D)
        elif key == "llm/final_norm/scale":
            x = 0.2 * x + 2.0 / r - 1.0
        elif key.endswith("/scale"):
            x = 0.2 * x + (1.0 if key.startswith("img/") else 0.0)  # LayerNorm scale vs RMSNorm 1 + w
        elif key.endswith("/bias"):
            x *= 0.1
        elif key == "img/pos_embedding":
            x *= 0.5
        else:
            gain = 2.0 if key.endswith(("q_einsum/w", "kv_einsum/w", "query/kernel", "key/kernel")) else 1.0
            x *= gain / np.sqrt(fan_in[key])
        out[key] = x.astype(np.float32)
    return out


def bf16_void(a):
    """float32 → bfloat16 bits in a |V2 array, as np.save writes an ml_dtypes/jax bfloat16 array."""
    return torch.from_numpy(np.ascontiguousarray(a)).to(torch.bfloat16).view(torch.int16).numpy().view("V2")


def from_bf16_void(a):
    return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16).float().numpy()


def save_npz(path, params, bf16=False, prefix="", compressed=False):
    arrays = {prefix + k: (bf16_void(v) if bf16 else v) for k, v in params.items()}
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return str(path)


def convert_to_hf(npz_path, out_dir, template_dir, generation):
    """.npz → Hugging Face directory by the "HF = f(npz)" column of docs/checkpoints.md#tensor-table.
    config.json, tokenizer and processor files come from an hf_reference checkpoint of the same tiny sizes."""
    with np.load(npz_path, allow_pickle=False) as z:
        a = {k.removeprefix("params/"): (from_bf16_void(z[k]) if z[k].dtype == np.dtype("V2") else z[k])
             for k in z.files}
    W, D = TINY_VISION["W"], TINY_TEXT[generation]["D"]
    v, lm = "vision_tower.vision_model.", "language_model.model."
    sd = {v + "embeddings.patch_embedding.weight": a["img/embedding/kernel"].transpose(3, 2, 0, 1),
          v + "embeddings.patch_embedding.bias": a["img/embedding/bias"],
          v + "embeddings.position_embedding.weight": a["img/pos_embedding"].reshape(-1, W),
          v + "post_layernorm.weight": a["img/Transformer/encoder_norm/scale"],
          v + "post_layernorm.bias": a["img/Transformer/encoder_norm/bias"],
          "multi_modal_projector.linear.weight": a["img/head/kernel"].T,
          "multi_modal_projector.linear.bias": a["img/head/bias"],
          lm + "norm.weight": a["llm/final_norm/scale"]}
    for i in range(TINY_VISION["depth"]):
        p = f"{v}encoder.layers.{i}."
        for hf, bv in (("layer_norm1", "LayerNorm_0"), ("layer_norm2", "LayerNorm_1")):
            sd[p + hf + ".weight"], sd[p + hf + ".bias"] = a[ENC + bv + "/scale"][i], a[ENC + bv + "/bias"][i]
        for hf, bv in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value"), ("out_proj", "out")):
            sd[p + f"self_attn.{hf}.weight"] = a[ATT + bv + "/kernel"][i].reshape(W, W).T
            sd[p + f"self_attn.{hf}.bias"] = a[ATT + bv + "/bias"][i].reshape(-1)
        for hf, bv in (("fc1", "Dense_0"), ("fc2", "Dense_1")):
            sd[p + f"mlp.{hf}.weight"] = a[ENC + f"MlpBlock_0/{bv}/kernel"][i].T
            sd[p + f"mlp.{hf}.bias"] = a[ENC + f"MlpBlock_0/{bv}/bias"][i]
    t = TINY_TEXT[generation]
    N, K, H = t["N"], t["K"], t["H"]
    norms = {"input_layernorm": "pre_attention_norm"}
    norms.update({"post_attention_layernorm": "pre_ffw_norm"} if generation == 1 else
                 {"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "pre_ffw_norm",
                  "post_feedforward_layernorm": "post_ffw_norm"})
    for i in range(t["L"]):
        p = f"{lm}layers.{i}."
        sd[p + "self_attn.q_proj.weight"] = a["llm/layers/attn/q_einsum/w"][i].transpose(0, 2, 1).reshape(N * H, D)
        sd[p + "self_attn.k_proj.weight"] = a["llm/layers/attn/kv_einsum/w"][i, 0].transpose(0, 2, 1).reshape(K * H, D)
        sd[p + "self_attn.v_proj.weight"] = a["llm/layers/attn/kv_einsum/w"][i, 1].transpose(0, 2, 1).reshape(K * H, D)
        o = a["llm/layers/attn/attn_vec_einsum/w"][i]
        sd[p + "self_attn.o_proj.weight"] = o.transpose(2, 0, 1).reshape(D, N * H)
        sd[p + "mlp.gate_proj.weight"] = a["llm/layers/mlp/gating_einsum"][i, 0].T
        sd[p + "mlp.up_proj.weight"] = a["llm/layers/mlp/gating_einsum"][i, 1].T
        sd[p + "mlp.down_proj.weight"] = a["llm/layers/mlp/linear"][i].T
        for hf, bv in norms.items():
            sd[p + hf + ".weight"] = a[f"llm/layers/{bv}/scale"][i]
    # <image> and 63 padding rows appended, near the mean row as the converter made them
    # (docs/variants.md#vocabulary-size).
    emb = a["llm/embedder/input_embedding"]
    extra = emb.mean(0) + 1e-3 * emb.std(0) * np.random.default_rng(1).standard_normal((64, D)).astype(np.float32)
    sd[lm + "embed_tokens.weight"] = np.concatenate([emb, extra])
    os.makedirs(out_dir, exist_ok=True)
    save_file({k: torch.from_numpy(np.ascontiguousarray(x)) for k, x in sd.items()},
              os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    for name in os.listdir(template_dir):
        if not name.startswith("model"):
            shutil.copy(os.path.join(template_dir, name), out_dir)
    return out_dir


CASES = {  # name: (generation, stored as bf16 |V2, key prefix)
    "pg1-float32": (1, False, ""),
    "pg2-bfloat16-params-prefix": (2, True, "params/"),
}


@pytest.fixture(scope="module")
def converted(tmp_path_factory, hf_checkpoint):
    """case -> (npz path, converted HF dir)."""
    root = tmp_path_factory.mktemp("bigvision")
    out = {}
    for name, (gen, bf16, prefix) in CASES.items():
        npz = save_npz(root / f"{name}.npz", random_bv_params(gen, seed=gen), bf16=bf16, prefix=prefix)
        out[name] = (npz, convert_to_hf(npz, str(root / name), hf_checkpoint(f"pg{gen}"), gen))
    return out


def _npz_variant(hf_dir):
    """The HF directory's config with big_vision's embedding rows (no 64-row padding)."""
    from nanopali.formats.hf_config import read_paligemma_config as read_config

    cfg = read_config(hf_dir)
    return replace(cfg, text=replace(cfg.text, vocab_size=SP_VOCAB_SIZE))


@pytest.mark.parametrize("case", list(CASES))
def test_npz_and_its_hf_conversion_give_the_same_logits_and_match_transformers(converted, case, test_images,
                                                                               record_parity):
    npz, hf_dir = converted[case]
    from_npz, processor = nanopali.load(npz, variant=_npz_variant(hf_dir),
                                        tokenizer=os.path.join(hf_dir, "tokenizer.model"))
    from_hf, _ = nanopali.load(hf_dir)
    tf_model, _ = load_tf(hf_dir)  # raises on any missing / unexpected / mis-shaped key
    batch = processor(images=[test_images["rgb-square"], test_images["rgb-wide"]],
                      prompts=["caption en", "answer en where is the cow? the cow is on the beach"],
                      suffixes=["a red circle on a white background", "beach"])
    with torch.no_grad():
        ours_npz, ours_hf = from_npz(**batch), from_hf(**batch)
    assert ours_npz.shape[-1] == SP_VOCAB_SIZE and ours_hf.shape[-1] == SP_VOCAB_SIZE + 64
    is_text = batch["input_ids"] != IMAGE_TOKEN_ID
    real = batch["attention_mask"].bool()[is_text].view(2, -1)
    theirs = tf_forward_logits(tf_model, batch)[is_text].view(2, -1, SP_VOCAB_SIZE + 64)
    npz_vs_hf = (ours_npz - ours_hf[..., :SP_VOCAB_SIZE]).abs()[real].max().item()
    npz_vs_tf = (ours_npz - theirs[..., :SP_VOCAB_SIZE]).abs()[real].max().item()
    record_parity(f"npz-vs-hf-{case}", npz_vs_hf)
    record_parity(f"npz-vs-transformers-{case}", npz_vs_tf)
    # the same fp32 math in other kernels (transformers eager vs ours: docs/checkpoints.md#what-transformers-does)
    terms = paligemma_terms(from_hf.cfg, batch["input_ids"].shape[1])
    assert npz_vs_hf <= rounding_bound(torch.float32, ours_hf.abs().max().item(), terms)
    assert npz_vs_tf <= rounding_bound(torch.float32, ours_hf.abs().max().item(), terms)


def test_npz_saved_as_hugging_face_by_nanopali_loads_in_transformers(converted, tmp_path, test_images):
    """.npz → save_checkpoint: a directory with big_vision's embedding rows (no padding rows, so <image> =
    the vocab size, which transformers looks up as id 0) that transformers loads strictly, same logits."""
    npz, hf_dir = converted["pg2-bfloat16-params-prefix"]
    tokenizer = os.path.join(hf_dir, "tokenizer.model")
    model, processor = nanopali.load(npz, variant=_npz_variant(hf_dir), tokenizer=tokenizer)
    nanopali.save_checkpoint(model, str(tmp_path), tokenizer)
    for name in os.listdir(hf_dir):  # processor files, for load_tf
        if not os.path.exists(tmp_path / name):
            shutil.copy(os.path.join(hf_dir, name), tmp_path)
    tf_model, _ = load_tf(str(tmp_path))
    batch = processor(images=[test_images["rgb-tall"]], prompts=["caption en"], suffixes=["a red circle"])
    with torch.no_grad():
        ours = model(**batch)
    theirs = tf_forward_logits(tf_model, batch)[batch["input_ids"] != IMAGE_TOKEN_ID].view(1, -1, SP_VOCAB_SIZE)
    assert_rounding_close(ours, theirs, torch.float32, paligemma_terms(model.cfg, batch["input_ids"].shape[1]))


def test_npz_saved_by_nanopali_loads_back_with_identical_logits(converted, tmp_path, test_images):
    """The saved embedding keeps the tokenizer's rows, so <image> is the id one past it, as in big_vision;
    transformers looks such an id up as 0 (`PaliGemmaModel.forward`: an image token id >= vocab_size is
    out of vocabulary), and `load` must read that config.json as it does."""
    npz, hf_dir = converted["pg2-bfloat16-params-prefix"]
    tokenizer = os.path.join(hf_dir, "tokenizer.model")
    model, processor = nanopali.load(npz, variant=_npz_variant(hf_dir), tokenizer=tokenizer)
    nanopali.save_checkpoint(model, str(tmp_path), tokenizer)
    again, again_processor = nanopali.load(tmp_path)
    assert (again.cfg.image_token_id, again.cfg.text.vocab_size) == (IMAGE_TOKEN_ID, SP_VOCAB_SIZE)
    args = dict(images=[test_images["rgb-wide"]], prompts=["caption en"], suffixes=["a red circle"])
    batch = processor(**args)
    assert torch.equal(again_processor(**args)["input_ids"], batch["input_ids"])
    with torch.no_grad():
        assert torch.equal(again(**batch), model(**batch))  # same weights, same process, same path


def test_npz_loaded_at_another_image_size_matches_its_hf_conversion_loaded_at_that_size(converted, test_images):
    npz, hf_dir = converted["pg1-float32"]
    from_npz, processor = nanopali.load(npz, variant=_npz_variant(hf_dir), image_size=56,
                                        tokenizer=os.path.join(hf_dir, "tokenizer.model"))
    from_hf, _ = nanopali.load(hf_dir, image_size=56)
    assert processor.image_size == 56 and from_npz.vision_tower.pos_embed.shape[0] == 16
    assert torch.equal(from_npz.vision_tower.pos_embed, from_hf.vision_tower.pos_embed)
    batch = processor(images=[test_images["rgb-square"]], prompts=["caption en"])
    with torch.no_grad():
        assert_rounding_close(from_npz(**batch), from_hf(**batch)[..., :SP_VOCAB_SIZE], torch.float32,
                              paligemma_terms(from_hf.cfg, batch["input_ids"].shape[1]))


@pytest.mark.parametrize("kwargs, message", [
    (dict(image_size=30), r"image_size=30 is not a positive multiple of the patch size 14"),
    (dict(group_size=64), r"group_size=64 goes with quantize='int4'"),
    (dict(quantize="int8", group_size=64), r"group_size=64 is for int4"),
])
def test_npz_load_arguments_are_checked_as_for_a_directory(tiny_pg1_npz, converted, kwargs, message):
    hf_dir = converted["pg1-float32"][1]
    with pytest.raises(ValueError, match=message):
        nanopali.load(tiny_pg1_npz, variant=_npz_variant(hf_dir), tokenizer=os.path.join(hf_dir, "tokenizer.model"),
                      **kwargs)


def test_nan_or_inf_in_an_npz_array_is_named_with_its_layer(tmp_path, converted):
    params = random_bv_params(1)
    params["llm/layers/mlp/linear"][1, 3, 5] = np.nan
    params["img/head/bias"][0] = -np.inf
    with pytest.raises(CheckpointError, match=r"NaN or inf in 2 array\(s\): img/head/bias, llm/layers/mlp/linear\[1\]$"):
        nanopali.formats.bigvision.load_npz_model(save_npz(tmp_path / "nan.npz", params),
                                                  _npz_variant(converted["pg1-float32"][1]))


def test_bf16_arrays_load_as_their_bfloat16_values(converted):
    npz, hf_dir = converted["pg2-bfloat16-params-prefix"]
    model = nanopali.formats.bigvision.load_npz_model(npz, _npz_variant(hf_dir))
    with np.load(npz, allow_pickle=False) as z:
        stored = z["params/llm/layers/mlp/linear"]
    assert stored.dtype == np.dtype("V2")
    expected = torch.from_numpy(from_bf16_void(stored[1]).T.copy())
    assert torch.equal(model.language_model.layers[1].mlp.down.weight, expected)
    assert bf16_void(np.float32([1.0])).view("<u2")[0] == 0x3F80  # the test's own encoding is bfloat16


def test_compressed_npz_gives_the_same_weights_as_an_uncompressed_one(tmp_path, converted):
    params = random_bv_params(1, seed=1)
    variant = _npz_variant(converted["pg1-float32"][1])
    a = nanopali.formats.bigvision.load_npz_model(save_npz(tmp_path / "a.npz", params), variant)
    b = nanopali.formats.bigvision.load_npz_model(save_npz(tmp_path / "b.npz", params, compressed=True), variant)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_layers_of_an_uncompressed_npz_are_read_one_slice_at_a_time(tmp_path, monkeypatch):
    params = random_bv_params(2, seed=3)
    path = save_npz(tmp_path / "x.npz", params)

    def whole_array_read(*args, **kwargs):
        raise AssertionError("a whole array was read")

    monkeypatch.setattr(np.lib.format, "read_array", whole_array_read)
    with NpzArrays(path) as npz:
        kv = params["llm/layers/attn/kv_einsum/w"]
        assert np.array_equal(npz.read("llm/layers/attn/kv_einsum/w", (1, 0)), kv[1, 0])
        assert np.array_equal(npz.read("llm/layers/attn/kv_einsum/w", (0,)), kv[0])
        assert np.array_equal(npz.read("img/head/kernel"), params["img/head/kernel"])


# ---- the variant: inferred from shapes, or checked against them ----

RELEASED_VISION = dict(W=1152, depth=27, F=4304, N=16, p=14)  # docs/variants.md#vision-tower
RELEASED_TEXT = {  # docs/variants.md#decoder-sizes: D, L, F, N, K, H; 257152 rows in the .npz
    "pg1-3b": dict(D=2048, L=18, F=16384, N=8, K=1, H=256, V=257152),
    "pg2-3b": dict(D=2304, L=26, F=9216, N=8, K=4, H=256, V=257152),
    "pg2-10b": dict(D=3584, L=42, F=14336, N=16, K=8, H=256, V=257152),
    "pg2-28b": dict(D=4608, L=46, F=36864, N=32, K=16, H=128, V=257152),
}


@pytest.mark.parametrize("family", list(RELEASED_TEXT))
@pytest.mark.parametrize("res", [224, 448, 896])
def test_variant_is_inferred_from_the_released_shapes(family, res):
    shapes = bv_shapes(1 if family.startswith("pg1") else 2, dict(RELEASED_VISION, image=res), RELEASED_TEXT[family])
    assert infer_variant(shapes) == f"{family}-{res}"


def test_released_shape_table_agrees_with_the_documented_examples():
    pg1 = bv_shapes(1, dict(RELEASED_VISION, image=224), RELEASED_TEXT["pg1-3b"])
    pg2 = bv_shapes(2, dict(RELEASED_VISION, image=224), RELEASED_TEXT["pg2-3b"])
    assert (len(pg1), len(pg2)) == (32, 34)  # docs/checkpoints.md#big_vision-npz
    assert pg1["llm/layers/attn/q_einsum/w"] == (18, 8, 2048, 256)
    assert pg2["llm/layers/attn/kv_einsum/w"] == (26, 2, 4, 2304, 256)
    assert pg2["llm/layers/mlp/gating_einsum"] == (26, 2, 2304, 9216)
    assert pg1[ATT + "query/kernel"] == (27, 1152, 16, 72) and pg1["img/pos_embedding"] == (1, 256, 1152)


@pytest.fixture(scope="module")
def tiny_pg1_npz(tmp_path_factory):
    return save_npz(tmp_path_factory.mktemp("npz") / "pg1.npz", random_bv_params(1))


def test_shapes_of_no_released_variant_are_refused_with_the_shapes_named(tiny_pg1_npz, hf_checkpoint):
    with pytest.raises(CheckpointError, match=r"matches no released PaliGemma variant.*q_einsum/w \[2, 4, 64, 16\]"
                                              r".*variant=PaliGemmaConfig"):
        nanopali.load(tiny_pg1_npz, tokenizer=os.path.join(hf_checkpoint("pg1"), "tokenizer.model"))


def test_preset_that_does_not_match_the_arrays_is_named(tiny_pg1_npz):
    with pytest.raises(CheckpointError, match=r"does not match variant 'pg1-3b-224'") as e:
        nanopali.formats.bigvision.load_npz_model(tiny_pg1_npz, "pg1-3b-224")
    assert "llm/layers/attn/q_einsum/w: expected [18, 8, 2048, 256], found [2, 4, 64, 16]" in str(e.value)


def test_generation_that_does_not_match_the_arrays_is_named(tiny_pg1_npz, converted):
    pg2 = _npz_variant(converted["pg2-bfloat16-params-prefix"][1])
    with pytest.raises(CheckpointError) as e:
        nanopali.formats.bigvision.load_npz_model(tiny_pg1_npz, pg2)
    msg = str(e.value)
    assert "Missing 2 array(s): llm/layers/post_attention_norm/scale, llm/layers/post_ffw_norm/scale" in msg
    assert "llm/layers/attn/kv_einsum/w: expected [2, 2, 2, 64, 16], found [2, 2, 1, 64, 16]" in msg


def test_missing_unexpected_and_mis_shaped_arrays_are_named_in_one_error(tmp_path, converted):
    params = random_bv_params(1)
    del params["llm/final_norm/scale"]
    params["img/head/bias"] = params["img/head/bias"][:-1]
    params["llm/extra"] = np.zeros(3, np.float32)
    with pytest.raises(CheckpointError) as e:
        nanopali.formats.bigvision.load_npz_model(save_npz(tmp_path / "bad.npz", params), _npz_variant(converted["pg1-float32"][1]))
    msg = str(e.value)
    assert "Missing 1 array(s): llm/final_norm/scale" in msg and "Unexpected 1 array(s): llm/extra" in msg
    assert "img/head/bias: expected [64], found [63]" in msg


# ---- bad input ----

class _Payload:
    """Unpickling this creates a file: proof that nothing was unpickled if the file never appears."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def test_object_arrays_are_refused_without_unpickling(tmp_path):
    marker = tmp_path / "unpickled"
    params = random_bv_params(1)
    params["img/head/bias"] = np.array([_Payload(str(marker))], dtype=object)
    path = tmp_path / "evil.npz"
    np.savez(path, **params)  # np.savez pickles object arrays
    with pytest.raises(CheckpointError, match=r"img/head/bias holds Python objects"):
        nanopali.formats.bigvision.load_npz_model(str(path))
    assert not marker.exists()
    pickle.loads(pickle.dumps(_Payload(str(marker))))  # control: the payload does fire when unpickled
    assert marker.exists()


def test_npz_without_a_tokenizer_is_refused(tiny_pg1_npz):
    with pytest.raises(CheckpointError, match=r"holds weights only: pass tokenizer="):
        nanopali.load(tiny_pg1_npz, variant="pg1-3b-224")


def test_npz_with_a_missing_tokenizer_file_is_named(tiny_pg1_npz, converted, tmp_path):
    with pytest.raises(InputError, match="Tokenizer file not found: .*nope.model"):
        nanopali.load(tiny_pg1_npz, variant=_npz_variant(converted["pg1-float32"][1]),
                      tokenizer=tmp_path / "nope.model")


def test_variant_and_tokenizer_are_refused_for_a_hugging_face_directory(hf_checkpoint):
    with pytest.raises(CheckpointError, match="variant= and tokenizer= are for big_vision .npz files"):
        nanopali.load(hf_checkpoint("pg1"), variant="pg1-3b-224")


def test_file_that_is_not_an_npz_is_named(tmp_path):
    path = tmp_path / "weights.npz"
    path.write_bytes(b"not a zip file at all")
    with pytest.raises(CheckpointError, match=r"weights.npz is not an .npz file"):
        nanopali.load(str(path), tokenizer="unused.model")


def test_truncated_npz_is_named(tmp_path, tiny_pg1_npz):
    data = open(tiny_pg1_npz, "rb").read()
    path = tmp_path / "cut.npz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut.npz is not an .npz file"):
        nanopali.formats.bigvision.load_npz_model(str(path))


def test_array_of_integers_is_refused_with_its_dtype_named(tmp_path):
    params = random_bv_params(1)
    params["img/head/bias"] = params["img/head/bias"].astype(np.int32)
    with pytest.raises(CheckpointError, match=r"img/head/bias has dtype int32"):
        nanopali.formats.bigvision.load_npz_model(save_npz(tmp_path / "int.npz", params))


def test_npz_is_a_zip_of_npy_files():
    """The layout assumption behind NpzArrays: np.savez writes uncompressed .npy members."""
    import io

    buf = io.BytesIO()
    np.savez(buf, a=np.zeros(3, np.float32))
    with zipfile.ZipFile(buf) as z:
        assert [(i.filename, i.compress_type) for i in z.infolist()] == [("a.npy", zipfile.ZIP_STORED)]
