"""What a step costs: the FLOP count behind MFU and the memory estimate, against independent numbers."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import nanopali
from nanopali.train import finetune
from nanopali.config import preset
from nanopali.train.cost import GiB, estimate_memory, forward_flops
from nanopali.train.data import collate, load_examples
from test_finetune_data import records
from test_finetune_data import one_thread  # noqa: F401  (autouse fixture)
import train  # after test_finetune_data, which puts the repository root on sys.path


@pytest.mark.parametrize("generation", [1, 2])
@pytest.mark.parametrize("row", [0, 4, 5], ids=["caption", "detect", "two-images"])
def test_flop_formula_matches_torchs_flop_counter(hf_checkpoint, generation, row):
    model, processor = nanopali.load(hf_checkpoint(f"pg{generation}"))
    model.attn_impl = "reference"    # plain matmuls: the counter does not see into CPU SDPA kernels
    ex = load_examples([records()[row]], processor).examples[0]
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        finetune.loss_terms(model, collate([ex], processor))
    assert forward_flops(model.cfg, ex.num_tokens, len(ex.images), ex.num_targets) == counter.get_total_flops()


@pytest.mark.parametrize("attention, measured_gib", [("sdpa", 36.6), ("eager", 38.9)])
def test_memory_estimate_is_within_10_percent_of_transformers_measured_peak(attention, measured_gib):
    """docs/performance.md#training-on-one-h100: transformers, PaliGemma 2 3B, batch 8 x 288, bf16
    weights and AdamW, H100. Its sdpa with a mask runs PyTorch's memory-efficient kernel (no
    probabilities kept); eager keeps them."""
    est = estimate_memory(preset("pg2-3b-224"), "all", batch=8, seq_len=288, precision="bf16",
                          trainable_dtype="bf16", frozen_dtype="bf16", fused_attention=attention == "sdpa")
    assert abs(est.total / GiB - measured_gib) < 0.1 * measured_gib


def test_estimate_memory_flag_prints_the_28b_budget_without_allocating_it(capsys):
    """LoRA on PaliGemma 2 28B at 896 px, frozen weights in bf16: 52 GiB of weights alone, which this
    machine could not allocate; the estimate builds the model on the meta device."""
    assert train.main(["--init", "pg2-28b-896", "--tokenizer", "unused", "--estimate-memory", "--batch-size", "1",
                       "--max-seq-len", "4200", "--precision", "bf16", "--trainable", "lora", "--frozen-dtype", "bf16",
                       "--grad-checkpointing"]) == 0
    out = capsys.readouterr().out
    assert "27,654,910,704 frozen" in out and "total (expected peak)" in out and "80 GB: fits" in out
