"""The prefix-LM fine-tuning loss (docs/sequence.md#loss) against transformers, and its two normalisations."""
import copy

import pytest
import torch

import nanopali
from hf_reference import load_tf
from nanopali.train import finetune
from nanopali.train.data import collate, load_examples
from test_finetune_data import records
from test_finetune_data import one_thread  # noqa: F401  (autouse fixture)
from tolerance import assert_rounding_close, backward_terms, loss_terms


@pytest.fixture(scope="module", params=[1, 2], ids=["paligemma", "paligemma2"])
def models(request, hf_checkpoint):
    ckpt = hf_checkpoint(f"pg{request.param}")
    model, processor = nanopali.load(ckpt)
    tf_model, _ = load_tf(ckpt)
    return model, processor, tf_model


def tf_loss(tf_model, batch):
    """transformers' own loss with the processor's labels: input_ids on suffix + EOS, -100 elsewhere."""
    labels = batch["input_ids"].masked_fill(batch["token_type_ids"] == 0, -100)
    with torch.no_grad():
        return tf_model(**batch, labels=labels).loss.item()


def test_loss_equals_transformers_loss_on_suffix_tokens(models):
    model, processor, tf_model = models
    batch = collate(load_examples(records(), processor).examples, processor)   # rows of different lengths
    with torch.no_grad():
        s, n = finetune.loss_terms(model, batch, "tokens")
    assert int(n) == int(batch["token_type_ids"].sum())
    assert_rounding_close((s / n).item(), tf_loss(tf_model, batch), torch.float32, _terms(model, batch), "loss")


def test_per_example_normalization_is_the_mean_of_each_examples_transformers_loss(models):
    model, processor, tf_model = models
    examples = load_examples(records(), processor).examples
    want = sum(tf_loss(tf_model, collate([ex], processor)) for ex in examples) / len(examples)
    with torch.no_grad():
        s, n = finetune.loss_terms(model, collate(examples, processor), "examples")
    assert int(n) == len(examples)
    batch = collate(examples, processor)
    assert_rounding_close((s / n).item(), want, torch.float32, _terms(model, batch), "per-example loss")


def _terms(model, batch) -> int:
    return loss_terms(model.cfg.text, batch["input_ids"].shape[1])


def test_the_lm_head_runs_only_at_the_supervised_positions(models, monkeypatch):
    model, processor, _ = models
    batch = collate(load_examples(records(), processor).examples, processor)
    rows = []
    head = model.language_model.logits
    monkeypatch.setattr(model.language_model, "logits", lambda h: rows.append(h.shape[0]) or head(h))
    with torch.no_grad():
        finetune.loss_terms(model, batch)
    assert rows == [int(batch["token_type_ids"].sum())]


def test_accumulated_micro_batches_make_the_update_of_one_batch(hf_checkpoint):
    """SGD with lr 1 makes the update the gradient itself (Adam's first step, ±lr·sign(g), would turn
    rounding noise in near-zero gradients into lr-sized differences)."""
    model, processor = nanopali.load(hf_checkpoint("pg1"))
    examples = load_examples(records(), processor).examples
    count = sum(ex.num_targets for ex in examples)
    updated = []
    for micro in ([examples], [examples[:2], examples[2:]]):
        m = copy.deepcopy(model).train()
        opt = torch.optim.SGD(m.parameters(), lr=1.0)
        result = finetune.train_step(finetune.Objective(m), opt, [collate(b, processor) for b in micro], count)
        updated.append((result.loss, [p.detach().clone() for p in m.parameters()]))
    (loss_one, one), (loss_acc, acc) = updated
    keys = max(ex.num_tokens for ex in examples)
    assert_rounding_close(loss_one, loss_acc, torch.float32, loss_terms(model.cfg.text, keys), "loss")
    for i, (a, b) in enumerate(zip(one, acc)):   # parameter - gradient: the gradient's rounding shows
        assert_rounding_close(a, b, torch.float32, backward_terms(model.cfg.text, keys), f"parameter {i}")
