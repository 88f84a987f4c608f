"""What QLoRA costs in memory (train/cost.py with quantize_base): the estimate of weights, gradients and
AdamW state against the bytes a run actually allocates, the published trainable-parameter anchor, the
recipes' budgets, and (on a GPU only) the peak of a real step."""
import os
from dataclasses import replace

import pytest
import torch

import nanopali
from nanopali import shapes
from nanopali.config import preset
from nanopali.quant import quantized_skeleton
from nanopali.train import finetune, qlora
from nanopali.train.cost import GiB, estimate_memory
from nanopali.train.data import collate, load_examples
from nanopali.train.lora import LoRAConfig, apply_lora
from test_finetune_data import ROOT
from test_finetune_data import one_thread  # noqa: F401  (autouse fixture)
import train  # after test_finetune_data, which puts the repository root on sys.path

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (a view or a shared tensor counts once)."""
    seen = {}
    for t in tensors:
        if t is not None and t.device.type != "meta":
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def tensors_in(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (dict, list, tuple)):
        for v in obj.values() if isinstance(obj, dict) else obj:
            yield from tensors_in(v)


def held_tensors(model) -> list:
    """Every tensor the modules hold: parameters, buffers, and any kept as a plain attribute (an int4
    layer's kernel-packed copy), so that a hidden copy is counted too."""
    return [t for m in model.modules() for k, v in vars(m).items() if k != "_modules" for t in tensors_in(v)]


def measured(model, batch, precision) -> dict:
    """Bytes allocated for weights (parameters + quantized buffers), gradients and AdamW state after
    one step, the gradients kept (train_step would free them)."""
    objective = finetune.Objective(model.train())
    opt = finetune.make_optimizer(objective, lr=1e-4)
    with finetune.autocast(precision, torch.device("cpu")):
        s, n = objective(**batch)
    (s / n).backward()
    grads = storage_bytes(p.grad for p in model.parameters())
    opt.step()
    state = storage_bytes(t for st in opt.state.values() for t in st.values() if isinstance(t, torch.Tensor))
    return {"weights": storage_bytes(held_tensors(model)), "grads": grads, "optimizer": state}


def estimated(cfg, scheme, group_size, frozen, lora_cfg) -> dict:
    est = estimate_memory(cfg, "lora", batch=1, seq_len=cfg.num_image_tokens + 8, lora=lora_cfg,
                          quantize_base=scheme, group_size=group_size, frozen_dtype=frozen)
    return {"weights": est.weights + est.quantized, "grads": est.grads, "optimizer": est.optimizer}


def shapes_batch(processor, n=2):
    rows = []
    for seed in range(n):
        scene = shapes.make_scene(seed)
        prefix, suffix = shapes.examples(scene)[0]
        rows.append({"image": shapes.scene_image(scene), "prefix": prefix, "suffix": suffix})
    return collate(load_examples(rows, processor).examples, processor)


@pytest.mark.parametrize("scheme,group_size,frozen", [("int8", None, "fp32"), ("int4", 32, "bf16")])
def test_estimated_weight_gradient_and_adamw_bytes_match_the_allocation_of_the_bundled_model(scheme, group_size,
                                                                                             frozen):
    base, processor = nanopali.load(shapes.BUNDLED_MODEL)
    lora_cfg = LoRAConfig(rank=8)
    model = qlora.quantize_base(base, scheme, group_size, DTYPES[frozen])
    apply_lora(model, lora_cfg)
    finetune.set_trainable(model, "lora")
    finetune.cast_params(model, torch.float32, DTYPES[frozen])
    got = measured(model, shapes_batch(processor), frozen)
    want = estimated(model.cfg, scheme, group_size, frozen, lora_cfg)
    for k in got:
        assert abs(got[k] - want[k]) <= 0.03 * want[k], (k, got[k], want[k])


def random_quantized(cfg, scheme, group_size, dtype, device):
    """A quantized PaliGemma with random integer weights (memory is what is measured, not quality):
    built on the meta device, so the float model is never held."""
    model = quantized_skeleton(cfg, scheme, group_size, dtype).to_empty(device=device)
    g = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if b.dtype in (torch.int8, torch.uint8):       # in place: no int64 copy of the 0.6 G-weight embedding
                b.random_(-100, 100, generator=g) if b.dtype == torch.int8 else b.random_(0, 256, generator=g)
            else:
                b.fill_(0.0 if name.endswith(("zero", "bias")) else 2e-3)
        finetune.init_random(model, seed=0)
    return model


def random_batch(cfg, B: int, T: int, targets: int) -> dict:
    """B rows of T tokens: the image tokens, a prefix, then `targets` suffix tokens (random ids)."""
    P = cfg.num_image_tokens
    ids = torch.cat([torch.full((B, P), cfg.image_token_id), torch.randint(3, 1000, (B, T - P))], 1)
    types = torch.cat([torch.zeros(B, T - targets, dtype=torch.long), torch.ones(B, targets, dtype=torch.long)], 1)
    return {"input_ids": ids, "attention_mask": torch.ones(B, T, dtype=torch.long), "token_type_ids": types,
            "pixel_values": torch.zeros(B, 3, cfg.vision.image_size, cfg.vision.image_size)}


@pytest.mark.skipif(not os.environ.get("NANOPALI_SLOW"), reason="real-width 1-layer model (~20 s): set NANOPALI_SLOW=1")
@pytest.mark.parametrize("scheme,group_size", [("int8", None), ("int4", 64)])
def test_estimate_matches_the_allocation_at_paligemma_2_3b_widths(scheme, group_size):
    """One layer per tower at PaliGemma 2 3B's widths, the 257,216 x 2304 embedding included."""
    cfg = preset("pg2-3b-224")
    cfg = replace(cfg, vision=replace(cfg.vision, depth=1), text=replace(cfg.text, depth=1))
    lora_cfg = LoRAConfig(rank=8)
    model = random_quantized(cfg, scheme, group_size, torch.bfloat16, "cpu")
    apply_lora(model, lora_cfg)
    finetune.set_trainable(model, "lora")
    finetune.cast_params(model, torch.float32, torch.bfloat16)
    got = measured(model, random_batch(cfg, 1, cfg.num_image_tokens + 4, 2), "bf16")
    want = estimated(cfg, scheme, group_size, "bf16", lora_cfg)
    for k in got:
        assert abs(got[k] - want[k]) <= 0.03 * want[k], (k, got[k], want[k])


def vision_qkv_adapters(cfg, rank):
    """peft matches target names anywhere: SigLIP's q_proj, k_proj, v_proj take adapters too."""
    return cfg.vision.depth * 3 * rank * (cfg.vision.width + cfg.vision.width)


def test_our_count_of_the_hf_qlora_recipe_is_its_published_11_3_m_trainable_parameters():
    """transformers' PaliGemma QLoRA recipe (paligemma-3b-pt-224, r=8 on q, k, v, o, gate, up, down)
    prints `trainable params: 11,298,816`. Ours adapts the decoder only; with the adapters peft also
    puts on SigLIP's q/k/v (same names) the count must be the published one."""
    cfg = preset("pg1-3b-224")
    est = estimate_memory(cfg, "lora", batch=1, seq_len=300, lora=LoRAConfig(rank=8), quantize_base="int4")
    assert est.trainable + vision_qkv_adapters(cfg, 8) == 11_298_816


RECIPES = [("detect_qlora_16gb_pg2_3b_448.py", "pg2-3b-448", 16), ("caption_qlora_24gb_pg2_10b.py", "pg2-10b-224", 24)]


def recipe_estimate(recipe, name):
    """(the recipe's flags, its LoRA config, the estimate for them)."""
    r = train.read_recipe(str(ROOT / "recipes" / recipe))
    lora_cfg = LoRAConfig(r["lora_rank"], r["lora_alpha"], r.get("lora_dropout", 0.0), tuple(r["lora_targets"]))
    return r, lora_cfg, estimate_memory(preset(name), r["trainable"], batch=r["batch_size"], seq_len=r["max_seq_len"],
                              precision=r["precision"], frozen_dtype=r["frozen_dtype"], lora=lora_cfg,
                              grad_checkpointing=r["grad_checkpointing"], quantize_base=r["quantize_base"],
                              group_size=r.get("quantize_group_size"))


@pytest.mark.parametrize("recipe,name,gpu_gb", RECIPES)
def test_each_qlora_recipe_fits_its_gpu_by_the_estimate_with_the_allocator_margin(recipe, name, gpu_gb):
    r, _, est = recipe_estimate(recipe, name)
    assert r["quantize_base"] == "int4" and r["trainable"] == "lora"
    assert est.total * 1.1 < gpu_gb * 1e9 and f"{gpu_gb} GB: fits" in est.table()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="peak GPU memory of a recipe step: needs CUDA")
@pytest.mark.parametrize("recipe,name,gpu_gb", RECIPES)
def test_peak_gpu_memory_of_a_recipe_step_is_within_10_percent_of_the_estimate(recipe, name, gpu_gb):
    """Random weights at full size; two steps, so that the peak sees the AdamW state."""
    r, lora_cfg, est = recipe_estimate(recipe, name)
    cfg, device, frozen = preset(name), torch.device("cuda"), DTYPES[r["frozen_dtype"]]
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    model = random_quantized(cfg, r["quantize_base"], r.get("quantize_group_size"), frozen, device)
    apply_lora(model, lora_cfg)
    finetune.set_trainable(model, "lora")
    finetune.cast_params(model, torch.float32, frozen)
    model.set_gradient_checkpointing(r["grad_checkpointing"])
    B, T = r["batch_size"], r["max_seq_len"]
    targets = T - cfg.num_image_tokens - 2           # the estimate counts every text position as a target
    batch = random_batch(cfg, B, T, targets)
    objective = finetune.Objective(model.train())
    opt = finetune.make_optimizer(objective, lr=1e-4)
    for _ in range(2):
        assert finetune.train_step(objective, opt, [batch], B * targets, precision=r["precision"]).finite
    peak = torch.cuda.max_memory_allocated() - start
    print(f"{recipe}: peak {peak / GiB:.2f} GiB, estimate {est.total / GiB:.2f} GiB")
    assert abs(peak - est.total) < 0.1 * est.total
