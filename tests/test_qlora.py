"""QLoRA: LoRA adapters trained through a frozen int8 / int4 base (nanopali/train/qlora.py). A step on the
quantized base against the same step on its dequantized weights held as plain fp32 Linears; the base's
bytes before and after; what autograd keeps; the two exports read back by nanopali.load; learning the
fine-tuning notebook's new question next to LoRA on the fp32 base."""
import copy

import pytest
import torch
import torch.nn as nn

import nanopali
from nanopali.formats.hf import load_paligemma_model
from nanopali import shapes
from nanopali.quant import QuantizedLinear, cpu_int4, modules
from nanopali.quant.modules import QuantizedWeight
from nanopali.train import finetune, qlora
from nanopali.train.data import DataOrder, collate, load_examples
from nanopali.train.lora import LoRAConfig, LoRALinear, apply_lora
from test_finetune_data import one_thread  # noqa: F401  (autouse fixture)
from tolerance import assert_rounding_close, backward_terms, loss_terms

SCHEMES = [("int8", None), ("int4", 32)]


@pytest.fixture(scope="module")
def bundled():
    model, processor = nanopali.load(shapes.BUNDLED_MODEL)
    rows = []
    for seed in range(4):
        scene = shapes.make_scene(seed)
        for prefix, suffix in shapes.examples(scene)[:2]:
            rows.append({"image": shapes.scene_image(scene), "prefix": prefix, "suffix": suffix})
    return model, processor, collate(load_examples(rows, processor).examples, processor)


def with_adapters(model, seed=0):
    """Adapters drawn from `seed`, B nonzero so that both A and B get gradients at the first step."""
    torch.manual_seed(seed)
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0))
    for m in model.modules():
        if isinstance(m, LoRALinear):
            nn.init.normal_(m.lora_B, std=0.05)
    finetune.set_trainable(model, "lora")
    return model.train()


def quantized_and_reference(base, scheme, group_size, dtype=None):
    """(the base quantized, a float copy whose Linears and embedding hold the dequantized weights in fp32)."""
    q = qlora.quantize_base(copy.deepcopy(base), scheme, group_size, dtype)
    ref = copy.deepcopy(base)
    for name, m in q.named_modules():
        if isinstance(m, QuantizedWeight):
            ref.get_submodule(name).weight.data = m.dequantize(dtype=torch.float32)
    return q, ref


def step_parts(model, batch, precision="fp32"):
    """loss, adapter gradients and adapters after one AdamW step, by name."""
    opt = finetune.make_optimizer(model, lr=1e-3, weight_decay=0.1)
    with finetune.autocast(precision, torch.device("cpu")):
        s, n = finetune.loss_terms(model, batch)
    (s / n).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    opt.step()
    return (s / n).item(), grads, {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("scheme,group_size", SCHEMES)
def test_a_step_on_the_quantized_base_equals_the_step_on_its_dequantized_weights_in_fp32(bundled, scheme, group_size):
    base, _, batch = bundled
    q, ref = quantized_and_reference(base, scheme, group_size)
    loss_q, grads_q, after_q = step_parts(with_adapters(q), batch)
    loss_r, grads_r, after_r = step_parts(with_adapters(ref), batch)
    assert grads_q.keys() == grads_r.keys() and len(grads_q) == 56      # 7 targets x 4 layers x (A, B)
    # fp32 throughout, so only the summation order differs. Measured: loss 7e-7 relative; gradients 3e-6
    # of each tensor's largest entry; adapters 7e-6 after the step. The first AdamW step is lr·g/(|g|+ε),
    # which turns gradient entries near ε into a noisy ±lr: compared to 2 % of lr (1e-3).
    keys = batch["input_ids"].shape[1]
    assert_rounding_close(loss_q, loss_r, torch.float32, loss_terms(base.cfg.text, keys), "loss")
    for k in grads_r:
        assert_rounding_close(grads_q[k], grads_r[k], torch.float32, backward_terms(base.cfg.text, keys), k)
        assert (after_q[k] - after_r[k]).abs().max() < 2e-5, k


def test_under_bf16_autocast_the_step_equals_the_dequantized_step_to_bf16_rounding(bundled):
    """Scales in bf16: the reference's fp32 weight q·s rounds to the same bf16 weight the layer dequantizes;
    the activations differ by bf16 rounding. Measured: loss 3.5e-3 relative, gradient cosine >= 0.998."""
    base, _, batch = bundled
    q, ref = quantized_and_reference(base, "int8", None, torch.bfloat16)
    loss_q, grads_q, _ = step_parts(with_adapters(q), batch, "bf16")
    loss_r, grads_r, _ = step_parts(with_adapters(ref), batch, "bf16")
    assert abs(loss_q - loss_r) < 1e-2 * loss_r
    for k in grads_r:
        cos = torch.nn.functional.cosine_similarity(grads_q[k].flatten(), grads_r[k].flatten(), dim=0)
        assert cos > 0.99, k


@pytest.mark.parametrize("scheme,group_size", SCHEMES)
def test_training_leaves_the_base_bit_identical_with_no_gradient_or_optimizer_state(bundled, scheme, group_size):
    base, processor, batch = bundled
    model = with_adapters(qlora.quantize_base(copy.deepcopy(base), scheme, group_size))
    finetune.cast_params(model, torch.float32, torch.bfloat16)      # frozen float parts to bf16, not the base
    before = {k: t.clone() for k, t in model.state_dict().items() if ".lora_" not in k}
    objective = finetune.Objective(model)
    opt = finetune.make_optimizer(objective, lr=1e-2, weight_decay=0.1)
    for _ in range(2):
        assert finetune.train_step(objective, opt, [batch], int(batch["token_type_ids"].sum()),
                                   precision="bf16").finite
    after = model.state_dict()
    assert all(torch.equal(after[k], t) and after[k].dtype == t.dtype for k, t in before.items())
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in k for k in trainable)
    names = {id(p): k for k, p in model.named_parameters()}
    assert {names[id(p)] for p in opt.state} == trainable
    assert not any(isinstance(b, nn.Parameter) or b.grad is not None for b in model.buffers())


def test_gradient_checkpointing_gives_the_same_adapter_gradients(bundled):
    base, _, batch = bundled
    q = qlora.quantize_base(copy.deepcopy(base), "int4", 32)
    plain = step_parts(with_adapters(copy.deepcopy(q)), batch)
    checkpointed = with_adapters(copy.deepcopy(q))
    checkpointed.set_gradient_checkpointing(True)
    again = step_parts(checkpointed, batch)
    assert plain[0] == again[0]
    assert all(torch.equal(plain[1][k], again[1][k]) for k in plain[1])


@pytest.mark.parametrize("rows,packed", [(96, False), pytest.param(128, True, marks=pytest.mark.skipif(
    not cpu_int4.layout_known(), reason="this torch build's CPU int4 layout is not the known one"))],
    ids=["portable-nibbles", "cpu-packed"])
def test_backward_keeps_no_float_weight_and_dequantizes_a_chunk_at_a_time(monkeypatch, rows, packed):
    """x · Wᵀ through a QuantizedLinear: autograd saves nothing of W's size (dense autograd on the
    dequantized W would save all of it), and the chunked input gradient equals g · W in float64, read
    from the portable nibbles or from the CPU kernel's packed copy (what a load leaves)."""
    monkeypatch.setattr(modules, "DENSE_CHUNK", 1024)            # 64 wide: chunks of 16 rows
    layer = QuantizedLinear.from_linear(nn.Linear(64, rows), "int4", 32)
    if packed:
        layer.prepare(torch.float32)
        assert layer.qweight is None
    x = torch.randn(5, 7, 64, requires_grad=True)
    g = torch.randn(5, 7, rows)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        y = layer(x)
        dense = torch.nn.functional.linear(x, layer.dequantize(), layer.bias)
    y.backward(g)
    w = layer.dequantize(dtype=torch.float64)
    # fp32 sums over the 64 inputs (forward) and the output rows (backward) in other kernels
    assert_rounding_close(x.grad, g.double() @ w, torch.float32, rows, "input gradient")
    assert_rounding_close(y, dense, torch.float32, 64, "forward")
    assert saved.count(rows * 64) == 1                             # the dense call's W only, not the layer's


def test_a_full_preset_on_a_quantized_base_is_one_clear_error(bundled):
    model = qlora.quantize_base(copy.deepcopy(bundled[0]), "int8")
    with pytest.raises(ValueError, match="'attn' on a int8 base.*preset 'lora'"):
        finetune.set_trainable(model, "attn")


@pytest.fixture(scope="module")
def trained(bundled):
    """An int4 base with adapters after three steps, in eval mode, and a one-image batch for logits."""
    base, processor, batch = bundled
    model = with_adapters(qlora.quantize_base(copy.deepcopy(base), "int4", 32))
    objective = finetune.Objective(model)
    opt = finetune.make_optimizer(objective, lr=1e-2)
    for _ in range(3):
        finetune.train_step(objective, opt, [batch], int(batch["token_type_ids"].sum()))
    return model.eval(), {k: v for k, v in batch.items()}


def logits(model, batch):
    with torch.no_grad():
        return model.eval()(**batch)


def test_the_merged_export_loads_as_a_plain_checkpoint_with_the_trained_logits(trained, tmp_path):
    model, batch = trained
    want = logits(model, batch)
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 0.1)):    # logits O(10); bf16 weights: 2^-9
        qlora.export_merged(model, str(tmp_path / str(dtype)), f"{shapes.BUNDLED_MODEL}/tokenizer.model", dtype)
        merged, _ = nanopali.load(tmp_path / str(dtype))
        assert not any(isinstance(m, (QuantizedWeight, LoRALinear)) for m in merged.modules())
        assert next(merged.parameters()).dtype == torch.float32              # loaded as asked, stored in dtype
        torch.testing.assert_close(logits(merged, batch), want, rtol=0, atol=tol)


def test_the_quantized_export_loads_back_with_its_adapters_and_the_trained_logits(trained, tmp_path):
    model, batch = trained
    qlora.export_quantized(model, str(tmp_path), f"{shapes.BUNDLED_MODEL}/tokenizer.model")
    with pytest.raises(nanopali.CheckpointError, match="adapters unmerged.*qlora.load_quantized"):
        nanopali.load(tmp_path)                                         # would answer as the base alone
    base = load_paligemma_model(str(tmp_path))                          # the quantized base alone
    assert base.quantization == {"scheme": "int4", "group_size": 32}
    loaded, _ = qlora.load_quantized(str(tmp_path))
    assert torch.equal(logits(loaded, batch), logits(model, batch))
    assert not torch.equal(logits(base, batch), logits(model, batch))   # the adapters matter


def test_a_training_state_dict_rebuilds_the_model_it_came_from(trained):
    model, batch = trained
    rebuilt = qlora.model_from_state(model.cfg, model.state_dict(), model.quantization, model.lora_config)
    assert torch.equal(logits(rebuilt, batch), logits(model, batch))


def new_question_data(processor, n_train_scenes=300, n_test=40):
    """The fine-tuning notebook's task: "answer en which shape is <colour>?" where one shape has it."""
    def questions(scene):
        colours = [s.colour for s in scene.shapes]
        return {f"answer en which shape is {s.colour}?": s.kind for s in scene.shapes if colours.count(s.colour) == 1}

    def rows(seeds, first_only):
        out = []
        for seed in seeds:
            scene = shapes.make_scene(seed)
            qa = sorted(questions(scene).items())[:1 if first_only else None]
            out += [{"image": shapes.scene_image(scene), "prefix": q, "suffix": a} for q, a in qa]
        return load_examples(out, processor).examples

    return (rows(range(n_train_scenes), False),
            collate(rows(range(shapes.HELD_OUT_SEED, shapes.HELD_OUT_SEED + n_test), True), processor))


def held_out_loss_after_lora(model, processor, train, held, steps=30, batch=8, lr=3e-3):
    torch.manual_seed(0)
    apply_lora(model, LoRAConfig(rank=8, alpha=16.0))
    finetune.set_trainable(model, "lora")
    objective = finetune.Objective(model.train())
    opt = finetune.make_optimizer(objective, lr)
    order = DataOrder(len(train), seed=0)
    for step in range(1, steps + 1):
        for group in opt.param_groups:
            group["lr"] = finetune.lr_at(step, lr, steps, warmup_steps=5)
        rows = [train[i] for i in order.step(step, batch)[0]]
        finetune.train_step(objective, opt, [collate(rows, processor)], sum(r.num_targets for r in rows), grad_clip=1.0)
    with torch.no_grad():
        s, n = finetune.loss_terms(model.eval(), held)
    return (s / n).item()


def test_lora_on_an_int8_base_learns_the_new_question_as_well_as_on_the_fp32_base(bundled):
    """Held-out loss on 40 unseen scenes, measured: 8.93 before; after 30 steps of 8, 4.38 with LoRA on
    the fp32 base, 4.37 on the int8 base. Thresholds: a drop of 3 nats (4.55 measured) and int8 within
    0.1 nat of fp32 (it is 0.016 below)."""
    base, processor, _ = bundled
    train, held = new_question_data(processor)
    with torch.no_grad():
        s, n = finetune.loss_terms(base.eval(), held)
    before = (s / n).item()
    fp32 = held_out_loss_after_lora(copy.deepcopy(base), processor, train, held)
    int8 = held_out_loss_after_lora(qlora.quantize_base(copy.deepcopy(base), "int8"), processor, train, held)
    assert fp32 < before - 3 and int8 < before - 3                     # both learn
    assert int8 < fp32 + 0.1


def test_merging_adapters_into_a_quantized_base_is_refused_naming_the_exports(trained):
    from nanopali.train.lora import merge_lora
    with pytest.raises(ValueError, match="quantized \\(int4\\).*export_merged or export_quantized"):
        merge_lora(copy.deepcopy(trained[0]))
