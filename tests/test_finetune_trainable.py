"""Which weights train: the presets, LoRA (init, merge, adapters on their own), frozen weights in bf16."""
import copy
import os
import re

import pytest
import torch

import nanopali
from nanopali.train import finetune
from nanopali.train.data import collate, load_examples
from nanopali.train.lora import LoRAConfig, LoRALinear, apply_lora, load_adapters, merge_lora, save_adapters
from test_finetune_data import records
from test_finetune_data import one_thread  # noqa: F401  (autouse fixture)
from tolerance import assert_rounding_close, paligemma_terms

# The expected trainable names, written from the papers' recipes, not from finetune.TRAINABLE.
EXPECTED = {
    "all": r".*",
    "llm": r"language_model\..*",
    "attn": r"language_model\.layers\.\d+\.attn\.[qkvo]\.weight",
    "projector": r"projector\.linear\.(weight|bias)",
    "lora": r"language_model\.layers\.\d+\.(attn\.[qkvo]|mlp\.(gate|up|down))\.lora_[AB]",
}


@pytest.fixture(scope="module")
def base(hf_checkpoint):
    model, processor = nanopali.load(hf_checkpoint("pg2"))
    return model, processor, collate(load_examples(records(), processor).examples, processor)


@pytest.fixture(scope="module")
def one_image_batch(base):
    """model(**batch) returns logits at text positions, which needs one image per row."""
    _, processor, _ = base
    return collate(load_examples(records()[:5], processor).examples, processor)


def step(model, batch, lr=1e-2, precision="fp32"):
    opt = finetune.make_optimizer(model, lr=lr, weight_decay=0.1)
    return finetune.train_step(finetune.Objective(model.train()), opt, [batch], int(batch["token_type_ids"].sum()),
                               precision=precision)


@pytest.mark.parametrize("preset", list(EXPECTED))
def test_only_the_chosen_preset_changes_after_a_step(base, preset):
    model, _, batch = base
    model = copy.deepcopy(model)
    if preset == "lora":
        apply_lora(model, LoRAConfig(rank=4))
        with torch.no_grad():  # B = 0 at init gives A no gradient; a nonzero B lets both move
            for m in model.modules():
                if isinstance(m, LoRALinear):
                    m.lora_B.normal_()
    finetune.set_trainable(model, preset)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if re.fullmatch(EXPECTED[preset], n)}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert step(model, batch).finite
    for n, p in model.named_parameters():
        if n in trainable:
            assert not torch.equal(p, before[n]), f"{n} is trainable but did not change"
        else:
            assert torch.equal(p, before[n]), f"{n} is frozen but changed"


def test_frozen_weights_can_be_held_in_bf16_while_trainables_stay_fp32(base):
    model, _, batch = base
    model = copy.deepcopy(model)
    finetune.set_trainable(model, "attn")
    finetune.cast_params(model, torch.float32, torch.bfloat16)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert step(model, batch, precision="bf16").finite
    for n, p in model.named_parameters():
        assert p.dtype == (torch.float32 if p.requires_grad else torch.bfloat16), n
        if n in frozen:
            assert torch.equal(p, frozen[n])


@pytest.mark.parametrize("wrapped", [False, True], ids=["model", "objective"])
def test_weight_decay_applies_to_matrices_only(base, wrapped):
    model, _, _ = base
    decay, no_decay = finetune.param_groups(finetune.Objective(model) if wrapped else model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"])
    assert {names[id(p)] for p in no_decay["params"] if p.ndim >= 2} == {"language_model.embed.weight",
                                                                         "vision_tower.pos_embed"}


def test_lora_at_init_leaves_the_outputs_unchanged(base, one_image_batch):
    model, _, _ = base
    batch = one_image_batch
    lora = apply_lora(copy.deepcopy(model), LoRAConfig(rank=4, dropout=0.1)).eval()
    with torch.no_grad():
        assert torch.equal(model.eval()(**batch), lora(**batch))


def trained_lora(model):
    lora = apply_lora(copy.deepcopy(model), LoRAConfig(rank=4, alpha=8, targets=("q", "v", "down")))
    torch.manual_seed(0)
    for m in lora.modules():
        if isinstance(m, LoRALinear):
            torch.nn.init.normal_(m.lora_B, std=0.05)
    return lora.eval()


def test_merged_lora_equals_unmerged_lora(base, one_image_batch):
    model, batch = base[0], one_image_batch
    lora = trained_lora(model)
    with torch.no_grad():
        unmerged = lora(**batch)
        merged_model = merge_lora(copy.deepcopy(lora))
        merged = merged_model(**batch)
    assert not any(isinstance(m, LoRALinear) for m in merged_model.modules())
    assert [n for n, _ in merged_model.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert not torch.equal(unmerged, model(**batch))          # the adapters do change the outputs
    # W + BA folded once vs x·W + (x·A)·B: the same fp32 sums regrouped (tests/tolerance.py)
    assert_rounding_close(merged, unmerged, torch.float32, paligemma_terms(model.cfg, batch["input_ids"].shape[1]))


def test_adapters_saved_alone_load_onto_a_fresh_base_checkpoint(base, one_image_batch, tmp_path, hf_checkpoint):
    model, batch = base[0], one_image_batch
    lora = trained_lora(model)
    save_adapters(lora, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    fresh, _ = nanopali.load(hf_checkpoint("pg2"))
    load_adapters(fresh, str(tmp_path))
    with torch.no_grad():
        assert torch.equal(fresh.eval()(**batch), lora(**batch))
