"""Choices that depend on the CPU are made from what this CPU reports and measures, never assumed.

dtype="auto" follows the features torch may use here (an ONEDNN_MAX_CPU_ISA cap hides AVX-512 BF16, as
on a laptop); threads default to the cores this process may use and are clamped to them; the one-row
product form and a quantized layer's kernel/dense crossover are the ones measured fastest, remembered
per machine, and every form computes the same products up to rounding.
"""
import json
import logging
import os

import pytest
import torch
import torch.nn as nn

import nanopali
from nanopali import shapes
from nanopali.cpu import machine, products
from nanopali.formats.files import resolve_dtype
from tolerance import assert_rounding_close, decoder_terms


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOPALI_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("NANOPALI_ROW_PRODUCT", raising=False)
    return tmp_path / "cache"


def _fake_timings(seconds_by_form):
    """A stand-in for products.best_seconds: the given seconds per form, and a count of calls."""
    calls = []

    def best(fns, rounds=products.ROUNDS):
        calls.append(sorted(fns))
        return {name: seconds_by_form[name] for name in fns}
    return best, calls


# ---- dtype and threads ----

def test_auto_dtype_is_fp32_where_onednn_is_capped_below_avx512_bf16(monkeypatch, caplog):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert not machine.native_bf16() and not machine.features()["avx512_bf16"]
    with caplog.at_level(logging.INFO, logger="nanopali"):
        assert resolve_dtype("auto", "cpu") == torch.float32
    assert "float32" in caplog.text and "no native bf16" in caplog.text


def test_auto_dtype_is_bf16_exactly_where_the_cpu_lists_avx512_bf16_or_amx_and_nothing_caps_it(monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    _, flags = machine._cpuinfo()
    listed = ("avx512_bf16" in flags or {"amx_bf16", "amx_tile"} <= flags)
    uncapped = torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    want = torch.bfloat16 if listed and uncapped else torch.float32
    assert resolve_dtype("auto", "cpu") == want


def test_threads_default_to_the_usable_cores_and_a_larger_request_is_clamped_with_a_note(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        cores = machine.usable_cores()
        assert 1 <= cores <= len(os.sched_getaffinity(0))
        assert machine.set_threads(None) == (cores, None) and torch.get_num_threads() == cores
        n, note = machine.set_threads(10_000)
        assert n == cores == torch.get_num_threads() and "10000 threads requested" in note
        with pytest.raises(ValueError, match="threads must be an integer ≥ 1"):
            machine.set_threads(0)
    finally:
        torch.set_num_threads(before)


def test_omp_num_threads_is_the_default_when_set_as_torchrun_sets_it(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert machine.set_threads(None) == (1, None)
        monkeypatch.setenv("OMP_NUM_THREADS", "100000")
        n, note = machine.set_threads(None)
        assert n == machine.usable_cores() and "OMP_NUM_THREADS=100000" in note
    finally:
        torch.set_num_threads(before)


def test_the_machine_line_names_the_cpu_its_bf16_and_amx_and_the_threads():
    line = machine.describe(2)
    assert machine.cpu_model() in line and "avx512_bf16" in line and "amx" in line
    assert f"torch {torch.__version__}" in line and "2 threads" in line


# ---- the one-row product ----

def _bundled(dtype=torch.float32):
    return nanopali.load(shapes.BUNDLED_MODEL, dtype=dtype)


def test_the_form_measured_fastest_is_swapped_in_and_remembered_for_the_next_process(cache_dir, monkeypatch):
    monkeypatch.setattr(products, "MIN_BYTES", 0)            # the bundled model's weights are tiny
    best, calls = _fake_timings({"mv": 3.0, "linear": 2.0, "matmul": 1.0})
    monkeypatch.setattr(products, "best_seconds", best)
    model, _ = _bundled()
    layer = model.language_model.layers[0]
    assert type(layer.mlp.gate) is products.RowLinear and layer.mlp.gate.form == "matmul"
    assert type(model.language_model.embed).__name__ == "RowTiedEmbedding"
    assert all(type(m) is nn.Linear for m in model.vision_tower.modules() if isinstance(m, nn.Linear))  # prefill only
    saved = json.loads((cache_dir / "products.json").read_text())
    assert list(saved) == [products._machine_key()] and set(saved[products._machine_key()].values()) == {"matmul"}
    measured = len(calls)
    assert measured == len(saved[products._machine_key()])           # one measurement per weight shape
    model, _ = _bundled()                                            # the file answers: nothing measured
    assert len(calls) == measured and model.language_model.layers[0].mlp.gate.form == "matmul"


def test_f_linear_stays_unless_another_form_is_faster_by_more_than_the_noise(cache_dir, monkeypatch):
    monkeypatch.setattr(products, "MIN_BYTES", 0)
    best, _ = _fake_timings({"mv": 0.99, "linear": 1.0, "matmul": 1.0})
    monkeypatch.setattr(products, "best_seconds", best)
    model, _ = _bundled()
    assert type(model.language_model.layers[0].mlp.gate) is nn.Linear
    assert type(model.language_model.embed).__name__ == "TiedEmbedding"


def test_small_weights_are_not_measured(cache_dir, monkeypatch):
    best, calls = _fake_timings({"mv": 0.0, "linear": 1.0, "matmul": 1.0})
    monkeypatch.setattr(products, "best_seconds", best)
    model, _ = _bundled()
    assert calls == [] and not (cache_dir / "products.json").exists()
    assert type(model.language_model.layers[0].mlp.gate) is nn.Linear


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("form", ["mv", "matmul"])
def test_every_form_decodes_the_plain_models_logits_up_to_rounding(cache_dir, monkeypatch, dtype, form):
    plain, processor = _bundled(dtype)
    monkeypatch.setenv("NANOPALI_ROW_PRODUCT", form)
    swapped, _ = _bundled(dtype)
    assert swapped.language_model.layers[0].mlp.down.form == form
    batch = processor(images=[_image()], prompts=["caption en"])
    texts = nanopali.generate(plain, processor, [_image()], ["caption en"], max_new_tokens=6)
    assert nanopali.generate(swapped, processor, [_image()], ["caption en"], max_new_tokens=6) == texts
    T = batch["input_ids"].shape[1]
    with torch.no_grad():
        runs = []
        for m in (plain, swapped):
            cache = m.new_cache(1, T + 1)
            logits, mask = m.prefill(batch["input_ids"], batch["pixel_values"], batch["attention_mask"],
                                     batch["token_type_ids"], cache=cache)
            step = m.decode_step(logits.argmax(-1), torch.tensor(T), cache, mask)   # one row: the forms differ
            runs.append((logits, step))
    (a, step_a), (b, step_b) = runs
    assert torch.equal(a, b)                                            # prefill has many rows: untouched
    assert_rounding_close(step_b, step_a, dtype, decoder_terms(plain.cfg.text, T + 1))


def _image():
    from PIL import Image
    return Image.open(os.path.join(os.path.dirname(shapes.BUNDLED_MODEL), "images", "shapes_1.png"))


def test_an_unknown_forced_form_is_refused_by_name(cache_dir, monkeypatch):
    monkeypatch.setenv("NANOPALI_ROW_PRODUCT", "gemv")
    with pytest.raises(ValueError, match="NANOPALI_ROW_PRODUCT='gemv'"):
        _bundled()


# ---- a quantized layer's crossover ----

def test_a_quantized_model_takes_the_kernel_up_to_the_rows_where_it_was_measured_faster(cache_dir, monkeypatch):
    monkeypatch.setattr(products, "MIN_BYTES", 0)
    rows_seen = []

    def best(fns, rounds=products.ROUNDS):   # kernel 0.1 per row, dense 3.0: the kernel wins up to 30 rows
        m = rows_seen[-1]
        return {"kernel": 0.1 * m, "dense": 3.0} if "kernel" in fns else {n: 1.0 for n in fns}

    real_fast = products.kernel_row_limit

    def spy(layer, rows=products.ROW_CANDIDATES):
        fast = layer._fast
        layer._fast = lambda x: rows_seen.append(x.shape[0]) or fast(x)
        try:
            return real_fast(layer, rows)
        finally:
            del layer._fast
    monkeypatch.setattr(products, "best_seconds", best)
    monkeypatch.setattr(products, "kernel_row_limit", spy)
    model, _ = nanopali.load(shapes.BUNDLED_MODEL, quantize="int8")
    gate = model.language_model.layers[0].mlp.gate
    assert gate.kernel_rows == 24 == model.language_model.embed.kernel_rows   # candidates ... 24, 32 ...
    used = []
    monkeypatch.setattr(gate, "_fast", lambda x: used.append("kernel") or None)
    gate(torch.randn(24, gate.in_features))
    gate(torch.randn(32, gate.in_features))
    assert used == ["kernel"]                                            # 32 rows went straight to dense


def test_the_crossover_bisection_finds_the_last_winning_row_count(monkeypatch):
    class Layer:   # the kernel is faster up to `crossover` rows, the dense path past them
        dtype, in_features = torch.float32, 8

        def __init__(self, crossover):
            self.crossover, self.rows = crossover, 0

        def _fast(self, x):
            self.rows = x.shape[0]
            return x

        def _dense(self, x):
            return x

    layer = None
    monkeypatch.setattr(products, "best_seconds", lambda fns, rounds=2: {
        "kernel": 1.0 if layer.rows <= layer.crossover else 2.0, "dense": 1.5})
    limits = {}
    for crossover in (0, 1, 20, 100, 256, 10_000):
        layer = Layer(crossover)
        limits[crossover] = products.kernel_row_limit(layer)
    assert limits == {0: 0, 1: 1, 20: 16, 100: 96, 256: 256, 10_000: 256}
