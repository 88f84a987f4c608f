"""Weight-only int8 / int4 quantization (nanopali.quant): the math against hand-computed cases, torch's
packed kernels against the plain dequantize-then-matmul reference, the error bounds, the drop-in modules,
and the bundled tiny model quantized end to end (logits, greedy answers, held-out accuracy)."""
import copy
import logging

import pytest
import torch
import torch.nn as nn

import nanopali
from nanopali.gemma import TiedEmbedding
from nanopali.quant import (QuantizedEmbedding, QuantizedLinear, dequantize_int4, dequantize_int8, quantize_int4,
                            quantize_int8, quantize_linear_weight, quantize_model)
from nanopali.quant import cpu_int4, modules, weight_only
from tolerance import assert_rounding_close

TINY = "nanopali/assets/tiny-shapes"
IMAGE = "nanopali/assets/images/shapes_1.png"


@pytest.fixture(autouse=True)
def fresh_kernel_table():
    modules._MISSING.clear()
    yield
    modules._MISSING.clear()


def reference(layer, x):
    """x · Wᵀ (+ b) in float64 from the dequantized weight: what every path must agree with."""
    y = x.double() @ layer.dequantize(dtype=torch.float64).T
    return y if getattr(layer, "bias", None) is None else y + layer.bias.double()


# ---- the math ----

def test_int8_is_symmetric_per_row_with_the_row_max_at_127():
    w = torch.tensor([[0.5, -1.27, 0.0, 0.01], [2.54, 1.0, -0.02, 0.0]])
    q, s = quantize_int8(w)
    torch.testing.assert_close(s, torch.tensor([0.01, 0.02]))
    assert q.tolist() == [[50, -127, 0, 1], [127, 50, -1, 0]]
    torch.testing.assert_close(dequantize_int8(q, s, torch.float32), w)


def test_int4_group_maps_min_to_0_max_to_15_and_reads_as_q_minus_8_times_scale_plus_zero():
    w = torch.arange(32.0).view(1, 32) * 0.5 - 3.0                  # one group: min -3, max 12.5
    nib, s, z = quantize_int4(w, group_size=32)
    step = 15.5 / 15
    torch.testing.assert_close(s, torch.tensor([[step]]))
    torch.testing.assert_close(z, torch.tensor([[-3.0 + 8 * step]]))
    q = weight_only.unpack_nibbles(nib)
    assert q[0, 0] == 0 and q[0, -1] == 15
    assert nib[0, 0] == (int(q[0, 0]) << 4 | int(q[0, 1]))            # even column in the high nibble
    torch.testing.assert_close(dequantize_int4(nib, s, z, torch.float32), (q.float() - 8) * s + z)


def test_int8_error_is_at_most_half_a_step_per_row():
    w = torch.randn(64, 256)
    q, s = quantize_int8(w)
    err = (dequantize_int8(q, s, torch.float32) - w).abs()
    assert bool((err <= s[:, None] / 2 + 1e-6).all())
    assert err.norm() / w.norm() < 0.01


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_error_is_at_most_half_a_step_of_its_group(group_size):
    w = torch.randn(32, 256)
    nib, s, z = quantize_int4(w, group_size)
    err = (dequantize_int4(nib, s, z, torch.float32) - w).abs().view(32, -1, group_size)
    assert bool((err <= s[..., None] / 2 + 1e-5).all())


# ---- torch's kernels == the reference ----

@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("scheme,group_size", [("int8", None), ("int4", 32), ("int4", 128)])
def test_packed_kernel_matches_dequantize_then_matmul(scheme, group_size, dtype, tol):
    """tol is relative to max|y|: fp32 accumulation noise, or the output's rounding to bf16 / fp16."""
    torch.manual_seed(0)
    layer = QuantizedLinear.from_linear(nn.Linear(256, 64, bias=False), scheme, group_size).to(dtype)
    x = torch.randn(3, 256).to(dtype)
    fast = layer._fast(x)
    assert fast is not None, "the CPU kernel ran"
    ref = reference(layer, x)
    assert (fast.double() - ref).abs().max() <= tol * ref.abs().max()


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_decode_and_prefill_paths_agree_with_bias(scheme, monkeypatch):
    linear = nn.Linear(128, 48)
    layer = QuantizedLinear.from_linear(linear, scheme, 32 if scheme == "int4" else None)
    x = torch.randn(2, 3, 128)
    fast = layer(x)                                                    # 6 rows: the packed kernel
    calls = []
    monkeypatch.setattr(layer, "kernel_rows", 0)                       # every row count: dense
    monkeypatch.setattr(layer, "_fast", lambda x: calls.append(x) or None)
    monkeypatch.setattr(modules, "DENSE_CHUNK", 128 * 10)           # and chunked over the rows of W
    dense = layer(x)
    assert calls == []
    # fp32 sums over the 128 inputs in other kernels (tests/tolerance.py); the reference in float64
    assert_rounding_close(fast, dense, torch.float32, 128, "kernel vs dense")
    assert_rounding_close(dense, reference(layer, x), torch.float32, 128, "dense vs float64")
    assert dense.shape == linear(x).shape


@pytest.mark.skipif(not cpu_int4.layout_known(), reason="this torch build's CPU int4 layout is not the known one")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_unpacks_the_cpu_packed_int4_weight_bit_for_bit_chunk_by_chunk(dtype, monkeypatch):
    """The dense path's fast unpacking (shift, mask, wrap, scale in place) gives exactly the reference
    dequantization (table lookup, then (q - 8)·s + z) for every chunk, into one reused buffer."""
    layer = QuantizedLinear.from_linear(nn.Linear(256, 192, bias=False), "int4", 64).to(dtype)
    layer.prepare(dtype)
    assert layer.cpu_int4 is not None and layer.qweight is None
    monkeypatch.setattr(modules, "DENSE_CHUNK", 256 * 64)                # one block of 64 rows a chunk
    chunks, buffers = list(layer._chunks()), set()
    assert chunks == [(0, 64), (64, 128), (128, 192)]
    for n0, n1 in chunks:
        w, scale = layer._weight_chunk(n0, n1, dtype)
        assert scale is None and torch.equal(w, layer.dequantize(slice(n0, n1), dtype)), (n0, n1)
        buffers.add(w.data_ptr())
    assert len(buffers) == 1


@pytest.mark.parametrize("first", ["inference_mode", "no_grad"])
def test_the_reused_prefill_buffer_serves_inference_mode_and_no_grad_alike(first, monkeypatch):
    """The dense path's buffer outlives the call that made it: one made under inference_mode (generate)
    must still be writable under no_grad (the crossover measured at load), and the other way round."""
    monkeypatch.setattr(modules, "_SCRATCH", __import__("threading").local())     # a fresh buffer
    layer = QuantizedLinear.from_linear(nn.Linear(128, 64, bias=False), "int4", 32)
    x = torch.randn(40, 128)
    contexts = {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad}
    order = [first, "no_grad" if first == "inference_mode" else "inference_mode"]
    ys = []
    for name in order:
        with contexts[name]():
            ys.append(layer._dense(x).clone())
    torch.testing.assert_close(ys[0], ys[1], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_prefill_unpacks_portable_int4_nibbles_bit_for_bit(dtype):
    """A layer the CPU layout cannot hold alone (144 rows: not whole blocks of 64, as SigLIP So400m's 4304-row
    MLP) keeps its portable nibbles; their fast unpacking equals the table lookup's dequantization."""
    layer = QuantizedLinear.from_linear(nn.Linear(256, 144, bias=False), "int4", 64).to(dtype)
    assert layer.cpu_int4 is None
    w, scale = layer._weight_chunk(0, 144, dtype)
    assert scale is None and torch.equal(w, layer.dequantize(dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_prefill_leaves_the_row_scale_to_the_output_exactly_where_the_dtype_holds_q(dtype):
    """bf16 / fp32 hold every q in [-127, 127] exactly, so the chunk is q itself and the scale goes on the
    (M, N) output; the product still equals the dequantized weight's within rounding."""
    layer = QuantizedLinear.from_linear(nn.Linear(128, 48, bias=False), "int8").to(dtype)
    w, scale = layer._weight_chunk(0, 48, dtype)
    assert torch.equal(w, layer.qweight.to(dtype)) and torch.equal(scale, layer.scale)
    x = torch.randn(40, 128).to(dtype)
    assert_rounding_close(layer._dense(x), reference(layer, x), dtype, 128, "dense vs float64")


def test_int8_prefill_in_float16_scales_the_weight_first_so_the_product_cannot_overflow():
    """x · qᵀ would pass float16's 65504 here (q up to 127 over 256 inputs of size ~100): fp16 dequantizes
    the weight first, as the reference does, and stays finite and close."""
    layer = QuantizedLinear.from_linear(nn.Linear(256, 32, bias=False), "int8").to(torch.float16)
    x = (torch.randn(30, 256) * 100).to(torch.float16)
    assert (x.float() @ layer.qweight.float().t()).abs().max() > 65504           # what folding would compute
    w, scale = layer._weight_chunk(0, 32, torch.float16)
    assert scale is None
    y = layer._dense(x)
    assert torch.isfinite(y).all()
    assert_rounding_close(y, reference(layer, x), torch.float16, 256, "fp16 dense vs float64")


def test_int4_rows_the_cpu_packer_cannot_tile_take_the_dense_path_without_disabling_the_kernel():
    odd = QuantizedLinear.from_linear(nn.Linear(64, 24, bias=False), "int4", 32)     # 24 % 16 ≠ 0
    even = QuantizedLinear.from_linear(nn.Linear(64, 32, bias=False), "int4", 32)
    x = torch.randn(1, 64)
    assert odd._fast(x) is None
    assert_rounding_close(odd(x), reference(odd, x), torch.float32, 64)
    assert even._fast(x) is not None


def test_a_missing_kernel_logs_once_and_falls_back_to_the_reference(monkeypatch, caplog):
    def missing(*args):
        raise NotImplementedError("Could not run '_weight_int8pack_mm' with arguments from the 'CPU' backend")
    monkeypatch.setattr(torch.ops.aten, "_weight_int8pack_mm", missing, raising=False)
    layer = QuantizedLinear.from_linear(nn.Linear(64, 32, bias=False), "int8")
    x = torch.randn(1, 64)
    with caplog.at_level(logging.INFO, logger="nanopali"):
        ys = [layer(x) for _ in range(3)]
    assert len([r for r in caplog.records if "_weight_int8pack_mm" in r.getMessage()]) == 1
    for y in ys:
        assert_rounding_close(y, reference(layer, x), torch.float32, 64)


# ---- the embedding / LM head ----

@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_embedding_reads_rows_and_unembeds_like_its_dequantized_table(scheme):
    emb = TiedEmbedding(100, 64)
    q = QuantizedEmbedding.from_embedding(emb, scheme, 32 if scheme == "int4" else None)
    table = q.dequantize()
    ids = torch.tensor([[3, 99, 0], [7, 7, 42]])
    torch.testing.assert_close(q(ids), table[ids])
    h = torch.randn(2, 64)
    assert_rounding_close(q.unembed(h), h @ table.T, torch.float32, 64, "LM head")
    assert (table - emb.weight).abs().max() < (0.05 if scheme == "int8" else 0.5)


# ---- bad inputs ----

def test_unknown_scheme_is_one_error_listing_the_known_ones():
    with pytest.raises(ValueError, match="'fp8'.*'int8', 'int4'"):
        quantize_linear_weight(torch.randn(8, 32), "fp8")


def test_int4_group_size_must_be_one_the_kernels_take():
    with pytest.raises(ValueError, match=r"\(32, 64, 128, 256\).*got 48"):
        quantize_linear_weight(torch.randn(8, 96), "int4", group_size=48)


def test_a_layer_whose_width_int4_groups_do_not_divide_is_quantized_int8(caplog):
    model = nn.Module()
    model.vision_tower = nn.Sequential(nn.Linear(96, 64))              # 96 % 64 ≠ 0, like SigLIP's 4304
    model.projector = nn.Sequential(nn.Linear(64, 64))
    model.language_model = nn.Module()
    model.language_model.embed = TiedEmbedding(10, 64)
    with caplog.at_level(logging.INFO, logger="nanopali"):
        quantize_model(model, "int4", group_size=64)
    assert model.vision_tower[0].scheme == "int8" and model.projector[0].scheme == "int4"
    assert "vision_tower.0 (96 wide)" in caplog.text
    assert quantize_linear_weight(torch.randn(8, 96), "int4", 64)["qweight"].dtype == torch.int8


# ---- the bundled tiny model ----

@pytest.fixture(scope="module")
def batch():
    _, processor = nanopali.load(TINY)
    return processor(images=[IMAGE], prompts=["caption en"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scheme,bound", [("int8", 0.03), ("int4", 0.12)])
def test_quantized_tiny_model_keeps_logits_and_greedy_answer(scheme, bound, dtype, batch):
    """bound: max |Δlogit| / max |logit| (measured 0.008 / 0.014 int8, 0.058 / 0.053 int4, fp32 / bf16)."""
    model, processor = nanopali.load(TINY, dtype=dtype)
    ref = model(**batch).float()
    answer = nanopali.generate(model, processor, [IMAGE], ["caption en"])
    quantize_model(model, scheme)
    assert model.quantization["scheme"] == scheme
    assert not any(type(m) in (nn.Linear, nn.Embedding, TiedEmbedding) for m in model.modules())
    out = model(**batch).float()
    assert (out - ref).abs().max() <= bound * ref.abs().max()
    assert nanopali.generate(model, processor, [IMAGE], ["caption en"]) == answer


def test_a_saved_quantized_model_loads_back_as_it_was(tmp_path, batch):
    model, _ = nanopali.load(TINY, dtype=torch.bfloat16)
    quantize_model(model, "int4", group_size=32)
    nanopali.save_checkpoint(model, tmp_path, f"{TINY}/tokenizer.model")
    again, _ = nanopali.load(tmp_path, dtype=torch.bfloat16)
    assert again.quantization == {"scheme": "int4", "group_size": 32}
    torch.testing.assert_close(again(**batch), model(**batch), atol=0, rtol=0)


def test_a_saved_quantized_model_loads_at_its_native_image_size_unchanged(tmp_path, batch):
    model, _ = nanopali.load(TINY, quantize="int4")
    nanopali.save_checkpoint(model, tmp_path, f"{TINY}/tokenizer.model")
    again, _ = nanopali.load(tmp_path, image_size=model.cfg.vision.image_size)
    torch.testing.assert_close(again(**batch), model(**batch), atol=0, rtol=0)


def test_a_saved_quantized_model_loads_at_another_image_size_as_its_float_checkpoint_would(tmp_path):
    """The position table is kept in float by the quantizer, so it is resampled as for a float directory."""
    model, _ = nanopali.load(TINY, quantize="int4")
    nanopali.save_checkpoint(model, tmp_path, f"{TINY}/tokenizer.model")
    again, processor = nanopali.load(tmp_path, image_size=112)
    direct, _ = nanopali.load(TINY, image_size=112, quantize="int4")
    assert processor.image_size == 112 and again.vision_tower.pos_embed.shape[0] == 64
    batch = processor(images=[IMAGE], prompts=["caption en"])
    torch.testing.assert_close(again(**batch), direct(**batch), atol=0, rtol=0)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantizing_while_loading_equals_quantizing_the_loaded_model(scheme, batch):
    streamed, _ = nanopali.load(TINY, quantize=scheme)                 # one float tensor at a time
    model, _ = nanopali.load(TINY)
    quantize_model(model, scheme)
    assert streamed.quantization == model.quantization
    torch.testing.assert_close(streamed(**batch), model(**batch), atol=0, rtol=0)


def test_a_quantized_checkpoint_refuses_another_scheme_and_names_both(tmp_path):
    model, _ = nanopali.load(TINY, quantize="int8")
    nanopali.save_checkpoint(model, tmp_path, f"{TINY}/tokenizer.model")
    with pytest.raises(nanopali.CheckpointError, match="quantized as int8; it cannot be loaded as quantize='int4'"):
        nanopali.load(tmp_path, quantize="int4")


def test_a_quantized_checkpoint_with_a_missing_tensor_is_refused_by_name(tmp_path):
    from safetensors.torch import load_file, save_file

    model, _ = nanopali.load(TINY, quantize="int4")
    nanopali.save_checkpoint(model, tmp_path, f"{TINY}/tokenizer.model")
    state = load_file(tmp_path / "model.safetensors")
    del state["language_model.layers.1.mlp.up.zero"]
    state["language_model.layers.0.attn.q.qweight"] = state["language_model.layers.0.attn.q.qweight"].to(torch.int32)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(nanopali.CheckpointError, match=r"(?s)Missing 2 tensor\(s\): .*layers.1.mlp.up.zero"
                                                       r".*layers.0.attn.q.qweight: expected torch.uint8, found torch.int32"):
        nanopali.load(tmp_path)


def test_quantize_with_an_unknown_scheme_or_group_size_is_one_clear_error():
    with pytest.raises(ValueError, match="Unknown quantization scheme 'int3'"):
        nanopali.load(TINY, quantize="int3")
    with pytest.raises(ValueError, match="group_size must be one of"):
        nanopali.load(TINY, quantize="int4", group_size=48)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_tiny_model_keeps_held_out_accuracy(scheme):
    """Measured on 200 held-out scenes (caption / count / vqa / detection IoU): fp32 0.92 / 0.94 / 1.0 / 0.938,
    bf16 0.92 / 0.94 / 1.0 / 0.938, int8 equal to fp32, int4 (groups of 64) 0.915 / 0.94 / 1.0 / 0.943.
    On 48 scenes int4 loses one caption; allowed: two scenes on each accuracy, 0.03 of IoU."""
    from nanopali.shapes import evaluate

    n = 48
    model, processor = nanopali.load(TINY, dtype=torch.bfloat16)
    base = evaluate(model, processor, num_scenes=n)
    quantize_model(model, scheme)
    got = evaluate(model, processor, num_scenes=n)
    for k in base:
        slack = 0.03 if k == "detection_mean_iou" else 2 / n + 1e-9
        assert got[k] >= base[k] - slack, (k, got[k], base[k])


def test_train_py_refuses_to_fine_tune_a_quantized_checkpoint(tmp_path):
    import os
    import subprocess
    import sys

    model, _ = nanopali.load(TINY, quantize="int8")
    nanopali.save_checkpoint(model, tmp_path / "q", f"{TINY}/tokenizer.model")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, os.path.join(root, "train.py"), "--init", str(tmp_path / "q"), "--data",
                        str(tmp_path / "none.jsonl"), "--out-dir", str(tmp_path / "run")], capture_output=True, text=True)
    assert r.returncode != 0 and "quantized as int8" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.skipif(not cpu_int4.layout_known(), reason="this torch build's CPU int4 layout is not the known one")
def test_int4_layers_keep_only_the_kernels_copy_once_decoding_and_still_save_the_portable_one():
    """On a CPU whose packed int4 layout is known, each int4 layer holds the kernel's packed copy instead
    of its portable nibbles (half the memory), from quantization on and through decoding; prefill
    dequantizes from the packed copy to the numbers the portable nibbles give, and the state dict (what a
    save writes) holds the portable nibbles, unchanged. nanopali.load(quantize="int4") does the same."""
    model, processor = nanopali.load(TINY, dtype=torch.bfloat16)
    portable = copy.deepcopy(model)
    with pytest.MonkeyPatch.context() as m:                                 # a layout this build cannot read
        m.setattr(cpu_int4, "layout_known", lambda: False)
        quantize_model(portable, "int4")
    quantize_model(model, "int4")
    assert portable.language_model.layers[0].mlp.up.qweight is not None
    big = processor(images=[IMAGE] * 8, prompts=["caption en"] * 8)          # > DECODE_MAX_ROWS rows: dense path
    saved = {k: v.clone() for k, v in portable.state_dict().items()}
    before = portable(**big)                                                # from the portable nibbles
    nanopali.generate(model, processor, [IMAGE], ["caption en"], max_new_tokens=3)
    layer = model.language_model.layers[0].mlp.up
    assert layer.qweight is None and layer.cpu_int4.packed.numel() == layer.out_features * layer.in_features // 2
    torch.testing.assert_close(model(**big), before, atol=0, rtol=0)        # from the packed copy
    after = model.state_dict()
    assert after.keys() == saved.keys() and all(torch.equal(after[k], saved[k]) for k in saved)


@pytest.mark.skipif(not cpu_int4.layout_known(), reason="this torch build's CPU int4 layout is not the known one")
def test_embedding_rows_read_from_the_cpu_packed_copy_equal_the_portable_ones():
    emb = TiedEmbedding(320, 128)
    nn.init.normal_(emb.weight)
    with pytest.MonkeyPatch.context() as m:                                 # a layout this build cannot read
        m.setattr(cpu_int4, "layout_known", lambda: False)
        portable = QuantizedEmbedding.from_embedding(emb, "int4", 32)
    q = QuantizedEmbedding.from_embedding(emb, "int4", 32)
    assert portable.qweight is not None and q.qweight is None              # only the packed copy
    ids = torch.tensor([[0, 31, 32, 63, 64, 200, 319, 5]])
    rows = portable(ids)
    h = torch.randn(1, 128)
    head = portable.unembed(h)
    torch.testing.assert_close(q(ids), rows, atol=0, rtol=0)
    torch.testing.assert_close(q.unembed(h), head, atol=0, rtol=0)
    table = dequantize_int4(q.state_dict()["qweight"], q.scale, q.zero, torch.float32)
    torch.testing.assert_close(q.dequantize(slice(40, 250)), table[40:250], atol=0, rtol=0)


def test_real_width_layers_and_logits_stay_within_what_each_scheme_promises(hf_checkpoint, test_images):
    """PaliGemma 2 at its released widths (one layer per tower, random weights) against bf16.

    Every quantized weight's relative error: int8 ≤ 1 %, int4 (groups of 64) ≤ 9.5 % (measured 0.9 % and
    9.0 %: random weights are spread evenly over each group's range, int4's worst case). Logits at 37 text
    positions: int8 agrees on the top token at 92 %, max error 6.7 % of the largest logit; int4 30 % and
    53 %. A random model's logits are nearly flat (std 0.17, median gap between its two best tokens 0.28),
    so any perturbation reorders them: the trained tiny model's held-out accuracy above is int4's real test."""
    path = hf_checkpoint("pg2-real-widths")
    ref_model, processor = nanopali.load(path, dtype=torch.bfloat16)
    image = test_images["rgb-square"]
    batch = processor(images=[image, image], prompts=["caption en", "answer en what is this?"],
                      suffixes=["a red circle on a white background with a long suffix", "a cow"])
    real = batch["attention_mask"].bool()[batch["input_ids"] != ref_model.cfg.image_token_id].view(2, -1)
    with torch.no_grad():
        ref = ref_model(**batch).float()
        for scheme, weight_err, top1, logit_err in (("int8", 0.01, 0.85, 0.1), ("int4", 0.095, 0.25, 0.65)):
            model, _ = nanopali.load(path, dtype=torch.bfloat16, quantize=scheme)
            for name, layer in model.named_modules():
                if isinstance(layer, (QuantizedLinear, QuantizedEmbedding)):
                    w = ref_model.get_submodule(name).weight.float()
                    bound = 0.01 if layer.scheme == "int8" else weight_err   # int4 falls back to int8 where
                    assert (layer.dequantize().float() - w).norm() <= bound * w.norm(), name  # groups don't fit
            out = model(**batch).float()
            assert (out.argmax(-1) == ref.argmax(-1))[real].float().mean() >= top1
            assert (out - ref).abs().max() <= logit_err * ref.abs().max()


@pytest.mark.skipif(not cpu_int4.layout_known(), reason="this torch build's CPU int4 layout is not the known one")
def test_packing_for_the_cpu_kernel_a_slice_of_rows_at_a_time_equals_torchs_packer_at_once():
    """cpu_int4 writes the kernel's layout itself with byte operations (5x faster than torch's packer,
    which wants an int32 per weight); the bytes must be torch's, bit for bit."""
    nibbles, _, _ = quantize_int4(torch.randn(64 * 40, 256), 64)
    whole = torch.ops.aten._convert_weight_to_int4pack_for_cpu(weight_only.unpack_nibbles(nibbles).to(torch.int32), 2)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(cpu_int4, "PACK_CHUNK", 64 * 3 * 256)             # 3 blocks of 64 rows per slice
        assert torch.equal(cpu_int4.pack(nibbles), whole)


@pytest.mark.skipif(not cpu_int4.layout_known(), reason="this torch build's CPU int4 layout is not the known one")
def test_an_int4_load_packs_for_the_cpu_kernel_while_loading(tmp_path, batch):
    model, _ = nanopali.load(TINY, dtype=torch.bfloat16, quantize="int4")
    up = model.language_model.layers[0].mlp.up
    assert up.qweight is None and (torch.bfloat16 in [dt for _, dt in up._packed])
    nanopali.save_checkpoint(model, tmp_path, f"{TINY}/tokenizer.model")
    again, _ = nanopali.load(tmp_path, dtype=torch.bfloat16)                # a saved int4 directory: the same
    assert again.language_model.layers[0].mlp.up.qweight is None
    torch.testing.assert_close(again(**batch), model(**batch), atol=0, rtol=0)
