"""Generation: token-for-token equal to transformers' greedy generate, and the cache's invariants."""
import numpy as np
import pytest
import torch
from PIL import Image

import nanopali
from nanopali.generate import generate, generate_ids, sample_next
from hf_reference import load_tf, make_hf_checkpoint, tf_generate
from tolerance import assert_rounding_close, decoder_terms, max_abs, rounding_bound

PROMPTS = ["caption en", "answer en what color is the big circle in the picture", "detect cat ; dog"]


def _images(n, seed=0):
    rng = np.random.RandomState(seed)
    return [Image.fromarray(rng.randint(0, 255, (30 + 7 * i, 50 - 5 * i, 3), dtype=np.uint8)) for i in range(n)]


@pytest.fixture(scope="module", params=[1, 2], ids=["pg1", "pg2"])
def ckpt(request, tmp_path_factory):
    # window 6 is shorter than every prompt here (4 image tokens + BOS + text + \n ≥ 8), so it bites
    extra = {"sliding_window": 6} if request.param == 2 else {}
    d = make_hf_checkpoint(str(tmp_path_factory.mktemp(f"gen{request.param}")), generation=request.param, **extra)
    tf_model, tf_proc = load_tf(d)
    model, proc = nanopali.load(d)
    return model, proc, tf_model, tf_proc


def test_greedy_generation_equals_transformers_for_single_prompts(ckpt):
    model, proc, tf_model, tf_proc = ckpt
    for img, prompt in zip(_images(2), PROMPTS):
        _, ours = generate(model, proc, [img], [prompt], max_new_tokens=12, return_ids=True)
        assert ours == tf_generate(tf_model, tf_proc, [img], [prompt], 12)


def test_greedy_generation_equals_transformers_for_a_padded_batch(ckpt):
    model, proc, tf_model, tf_proc = ckpt
    imgs = _images(3)
    _, ours = generate(model, proc, imgs, PROMPTS, max_new_tokens=12, return_ids=True)
    assert ours == tf_generate(tf_model, tf_proc, imgs, PROMPTS, 12)


def test_each_row_of_a_batch_equals_the_prompt_generated_alone(ckpt):
    model, proc, *_ = ckpt
    imgs = _images(3, seed=1)
    _, batched = generate(model, proc, imgs, PROMPTS, max_new_tokens=10, return_ids=True)
    alone = [generate(model, proc, [i], [p], max_new_tokens=10, return_ids=True)[1][0] for i, p in zip(imgs, PROMPTS)]
    assert batched == alone


def test_cached_decoding_equals_recomputing_the_whole_sequence(ckpt):
    """Every step's logits from the cache equal a full forward over prompt + tokens so far."""
    model, proc, *_ = ckpt
    imgs = _images(2, seed=2)
    batch = proc(imgs, PROMPTS[:2])
    new = generate_ids(model, batch, max_new_tokens=6)
    # Re-run from scratch with the generated tokens as a suffix (causal, exactly how they were decoded)
    # and compare the next-token logits at every generated position.
    n = min(len(r) for r in new)
    suffix_ids = torch.tensor([r[:n] for r in new])
    ids = torch.cat([batch["input_ids"], suffix_ids], 1)
    am = torch.cat([batch["attention_mask"], torch.ones_like(suffix_ids)], 1)
    tt = torch.cat([batch["token_type_ids"], torch.ones_like(suffix_ids)], 1)
    with torch.no_grad():
        h, _ = model.hidden_states(ids, batch["pixel_values"], am, tt)
        full = model.logits(h[:, batch["input_ids"].shape[1] - 1:-1])          # (B, n, V)
        stepwise = _stepwise_logits(model, batch, suffix_ids)
    # the same sums in another order (one query against the cache, not all at once): rounding only
    assert_rounding_close(stepwise, full, torch.float32, _terms(model, ids), "cached vs recomputed logits")


def test_a_decode_step_one_slot_off_is_far_outside_the_rounding_bound(ckpt):
    """The bound the two cache tests use catches a real cache bug: each step written one slot (and one
    RoPE position) too far leaves a gap and shifts every key, and moves the logits by many bounds."""
    model, proc, *_ = ckpt
    batch = proc(_images(2), PROMPTS[:2])
    with torch.no_grad():
        suffix = torch.tensor([r[:4] for r in generate_ids(model, batch, 4, stop_at_eos=False)])
        right = _stepwise_logits(model, batch, suffix)
        off = _stepwise_logits(model, batch, suffix, cache_len=batch["input_ids"].shape[1] + 8, slot_offset=1)
    bound = rounding_bound(torch.float32, max_abs(right), _terms(model, batch["input_ids"]) + 4)
    assert (off - right).abs().max().item() > 100 * bound


def _terms(model, ids) -> int:
    return decoder_terms(model.cfg.text, keys=ids.shape[1])


def _stepwise_logits(model, batch, suffix_ids, cache_len=None, garbage=False, slot_offset=0):
    """Next-token logits (B, n, V) of prefill + one decode step per suffix token, through the cache."""
    B, T = batch["input_ids"].shape
    n = suffix_ids.shape[1]
    cache = model.new_cache(B, cache_len or T + n)
    if garbage:  # slots a step has not written yet must be invisible to it, whatever they hold
        g = torch.Generator().manual_seed(0)
        cache.k.copy_(torch.randn(cache.k.shape, generator=g) * 100)
        cache.v.copy_(torch.randn(cache.v.shape, generator=g) * 100)
    logits, mask = model.prefill(batch["input_ids"], batch["pixel_values"], batch["attention_mask"],
                                 batch["token_type_ids"], cache=cache)
    out = [logits]
    for t in range(n - 1):
        out.append(model.decode_step(suffix_ids[:, t], torch.tensor(T + t + slot_offset), cache, mask))
    return torch.stack(out, 1)


def test_seeded_sampling_is_reproducible_and_seed_dependent(ckpt):
    model, proc, *_ = ckpt
    imgs = _images(2)
    a = generate(model, proc, imgs, PROMPTS[:2], 10, temperature=1.0, seed=7, return_ids=True)[1]
    b = generate(model, proc, imgs, PROMPTS[:2], 10, temperature=1.0, seed=7, return_ids=True)[1]
    c = generate(model, proc, imgs, PROMPTS[:2], 10, temperature=1.0, seed=8, return_ids=True)[1]
    assert a == b and a != c


def test_top_k_never_emits_a_token_outside_the_k_most_likely():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g)
    allowed = torch.topk(logits, 3, dim=-1).indices
    for _ in range(200):
        tok = sample_next(logits, temperature=1.5, top_k=3, generator=g)
        assert all(int(tok[b]) in allowed[b].tolist() for b in range(4))


def test_top_p_keeps_the_smallest_set_reaching_p_and_never_more():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    seen = {int(sample_next(logits, 1.0, top_p=0.75, generator=g)) for _ in range(300)}
    assert seen == {0, 1}  # 0.5 < 0.75 ≤ 0.5 + 0.3
    seen = {int(sample_next(logits, 1.0, top_p=0.4, generator=g)) for _ in range(100)}
    assert seen == {0}     # the top token alone reaches 0.4


def test_greedy_is_argmax_with_the_first_index_on_ties():
    assert sample_next(torch.tensor([[1.0, 3.0, 3.0, 0.0]])).tolist() == [1]


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": -1.0}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": float("inf")}, "temperature"),
    ({"top_p": float("nan")}, "top_p"),
    ({"seed": 99999999999999999999999, "temperature": 1.0}, "seed"),
    ({"seed": -1, "temperature": 1.0}, "seed"),
])
def test_bad_sampling_arguments_give_a_clear_error(ckpt, kwargs, message):
    model, proc, *_ = ckpt
    with pytest.raises(nanopali.InputError, match=message):
        generate(model, proc, _images(1), ["caption en"], **{"max_new_tokens": 4, **kwargs})


def test_an_empty_or_whitespace_prompt_generates_what_transformers_generates(ckpt):
    """An empty prefix is a valid PaliGemma input (transformers' integration test asks
    paligemma-3b-pt-224 with "" and expects "cow on the beach"; another feeds 200 newlines)."""
    model, proc, tf_model, tf_proc = ckpt
    for prompt in ["", " ", "\n" * 200]:
        _, ours = generate(model, proc, _images(1), [prompt], max_new_tokens=6, return_ids=True)
        assert ours == tf_generate(tf_model, tf_proc, _images(1), [prompt], 6), repr(prompt[:3])


def test_mismatched_counts_give_a_clear_error(ckpt):
    model, proc, *_ = ckpt
    with pytest.raises(nanopali.InputError, match="2 images"):
        generate(model, proc, _images(2), ["caption en"] * 3)


def test_a_prompt_longer_than_the_cache_names_the_limit(ckpt):
    model, proc, *_ = ckpt
    batch = proc(_images(1), ["caption en"])
    with pytest.raises(nanopali.InputError, match="cache holds 8"):
        generate_ids(model, batch, max_new_tokens=4, max_len=8)


def test_the_decode_step_ignores_cache_slots_it_has_not_written(ckpt):
    """The one decode step (slot as a tensor, attention over every slot of a fixed-size cache, the
    mask hiding unwritten ones) gives the same logits in an exact-size cache and in a 20-slot-longer
    one whose unwritten slots hold large random values."""
    model, proc, *_ = ckpt
    batch = proc(_images(2), PROMPTS[:2])
    with torch.no_grad():
        suffix = torch.tensor([r[:4] for r in generate_ids(model, batch, 4, stop_at_eos=False)])
        exact = _stepwise_logits(model, batch, suffix)
        longer = _stepwise_logits(model, batch, suffix, cache_len=batch["input_ids"].shape[1] + 20, garbage=True)
    # 20 more (masked) slots change how the softmax's sums are blocked, nothing else: rounding only
    assert_rounding_close(longer, exact, torch.float32, _terms(model, batch["input_ids"]) + 20 + 4,
                          "exact-size vs longer cache")
