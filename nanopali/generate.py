"""Autoregressive decoding with a static KV cache (PaliGemma paper §3.2: the suffix is generated).

prefill:  the whole prompt [pads | image | BOS prompt \\n] runs once (SigLIP included) and fills the
          cache slots 0..T-1; the logits of the last slot give the first new token.
decode:   each step embeds one token per row, writes its K/V at slot T+t, attends to the cache under
          the same prefix-LM mask (a generated token is a causal suffix token), and computes the
          257k-wide LM head for that one position only (PaliGemma.prefill / decode_step).
Rows are left-padded, so every row writes at the same slot and the step has fixed shapes.
Positions continue per row from its own first real token (masking.PrefixLMMask.positions_at).
Sampling: temperature, then top-k, then top-p (transformers' warper order), seeded generator.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch

from .model import PaliGemma
from .processing import InputError, Processor

# Letters: B batch, T prompt length, V vocab.


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) → next ids (B,). temperature 0 = greedy (argmax, first index on ties)."""
    if temperature == 0.0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens strictly more likely already reach top_p (keeps at least one)
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


SEED_LIMIT = 2 ** 63  # torch.Generator.manual_seed takes a signed 64-bit integer


def _check_sampling(max_new_tokens, temperature, top_k, top_p, seed):
    """Every sampling argument checked before anything is allocated (NaN fails each comparison, so the
    ranges are written as what is allowed)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be an integer ≥ 1, got {max_new_tokens!r}")
    if not (isinstance(temperature, (int, float)) and 0 <= temperature < float("inf")):
        raise InputError(f"temperature must be a finite number ≥ 0, got {temperature!r}")
    if top_k is not None and not (isinstance(top_k, int) and top_k >= 1):
        raise InputError(f"top_k must be an integer ≥ 1, got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0.0 < top_p <= 1.0):
        raise InputError(f"top_p must be in (0, 1], got {top_p!r}")
    if seed is not None and not (isinstance(seed, int) and 0 <= seed < SEED_LIMIT):
        raise InputError(f"seed must be an integer in [0, 2**63), got {seed!r}")


def check_length(cfg, prompt_tokens: int, max_new_tokens: int) -> None:
    """Refuse a prompt that, with the tokens asked for, runs past the decoder's trained positions
    (GemmaConfig.max_positions): checked before the cache is allocated, so 10⁹ new tokens fail at once."""
    limit = cfg.text.max_positions
    if prompt_tokens + max_new_tokens > limit:
        raise InputError(f"The prompt is {prompt_tokens} tokens (image tokens included) and max_new_tokens is "
                         f"{max_new_tokens}: {prompt_tokens + max_new_tokens} positions, but the model has "
                         f"{limit}. Shorten the prompt or ask for at most {max(limit - prompt_tokens, 0)} new tokens")


def _step(model: PaliGemma, tokens, slot, cache, mask):
    return model.decode_step(tokens, slot, cache, mask)


_COMPILED = {}


def _compiled_step(device: torch.device):
    """torch.compile'd decode step, built once per device type; the eager step if compile is unavailable."""
    if device.type not in _COMPILED:
        try:
            mode = "reduce-overhead" if device.type == "cuda" else None
            _COMPILED[device.type] = torch.compile(_step, mode=mode, dynamic=False)
        except Exception as e:  # noqa: BLE001 - any backend failure means: run eager
            warnings.warn(f"torch.compile unavailable ({e}); decoding eagerly")
            _COMPILED[device.type] = _step
    return _COMPILED[device.type]


@torch.no_grad()
def generate_ids(model: PaliGemma, batch: dict, max_new_tokens: int = 32, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 max_len: int | None = None, stop_at_eos: bool = True, compile: bool = False,
                 on_token: Callable[[torch.Tensor], torch.Tensor | None] | None = None) -> list[list[int]]:
    """New token ids per row, each ending at (and including) its first EOS if one came.

    stop_at_eos=False decodes exactly max_new_tokens for every row (benchmarks). compile=True runs the
    decode step through torch.compile (CUDA graphs with mode "reduce-overhead" on GPU); eager and
    compiled steps are the same function of tensors, the cache slot included; falls back to eager
    where compile fails. on_token(tokens) is called with each step's (B,) new ids as they are decoded
    (rows already done get pad), so a caller can show the answer appearing (sample.py streams it). It may
    return a (B,) bool tensor of rows to finish now (a server's client left, or its row reached its own
    length or stop string: docs/serving.md#batching): they get pad from the next step on, their returned
    rows end in pads, and decoding stops once every row is done."""
    _check_sampling(max_new_tokens, temperature, top_k, top_p, seed)
    cfg, dev = model.cfg, model.device
    B, T = batch["input_ids"].shape
    check_length(cfg, T, max_new_tokens)
    batch = {k: v.to(dev) for k, v in batch.items()}
    max_len = max_len or T + max_new_tokens
    if T + max_new_tokens > max_len:
        raise InputError(f"The prompt is {T} tokens and {max_new_tokens} new tokens were asked for, "
                         f"but the cache holds {max_len}")
    cache = model.new_cache(B, max_len)
    step = _compiled_step(dev) if compile else _step
    generator = None
    if seed is not None:
        generator = torch.Generator(device=dev).manual_seed(seed)

    logits, mask = model.prefill(batch["input_ids"], batch.get("pixel_values"), batch.get("attention_mask"),
                                 batch.get("token_type_ids"), cache=cache)                 # (B, V)
    out = torch.full((B, max_new_tokens), cfg.pad_token_id, dtype=torch.long, device=dev)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    slot = torch.tensor(T, device=dev)                                              # the next token's slot
    steps = max_new_tokens
    for t in range(max_new_tokens):
        tok = sample_next(logits, temperature, top_k, top_p, generator).masked_fill(done, cfg.pad_token_id)
        if stop_at_eos:
            done |= tok == cfg.eos_token_id
        out[:, t] = tok
        if on_token is not None and (finish := on_token(tok)) is not None:
            done |= finish.to(dev)
        if bool(done.all()) or t == max_new_tokens - 1:
            steps = t + 1
            break
        logits = step(model, tok, slot, cache, mask)
        if compile:
            logits = logits.clone()  # CUDA graphs reuse their output buffer at the next step
        slot += 1
    rows = []
    for row in out[:, :steps].tolist():
        rows.append(row[: row.index(cfg.eos_token_id) + 1] if stop_at_eos and cfg.eos_token_id in row else row)
    return rows


def generate(model: PaliGemma, processor: Processor, images, prompts, max_new_tokens: int = 32,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             seed: int | None = None, return_ids: bool = False, compile: bool = False,
             on_token: Callable[[torch.Tensor], None] | None = None):
    """Decoded answers, one string per prompt (one image, or a list of images, per prompt).

    `prompts` may be one string for all images. With return_ids, (texts, new token ids) are returned."""
    if isinstance(prompts, str):
        prompts = [prompts] * (len(images) if isinstance(images, (list, tuple)) else 1)
    # An empty prompt is a valid input (the prefix is then the image and BOS "\n"): transformers
    # generates from it, and so do we. Length and arguments are checked before the image is processed.
    _check_sampling(max_new_tokens, temperature, top_k, top_p, seed)
    batch = processor(images=images, prompts=prompts)
    ids = generate_ids(model, batch, max_new_tokens, temperature, top_k, top_p, seed, compile=compile,
                       on_token=on_token)
    texts = [processor.decode(r) for r in ids]
    return (texts, ids) if return_ids else texts
