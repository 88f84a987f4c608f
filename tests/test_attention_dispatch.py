"""attn_impl: "auto" resolves to an exact implementation for the model and device, visibly and once;
the reference attention's two forms (the einsum definition, the grouped copy-free one) agree."""
import logging

import pytest
import torch

import nanopali
from nanopali.attention import LOGGED_CHOICES, grouped_attention, reference_attention
from nanopali.masking import PrefixLMMask
from tolerance import assert_rounding_close


@pytest.mark.parametrize("name, want", [("pg1", "sdpa"), ("pg2", "reference")])
def test_auto_on_cpu_is_sdpa_without_soft_cap_and_the_reference_with_it(hf_checkpoint, name, want):
    model, _ = nanopali.load(hf_checkpoint(name))
    assert model.attn_impl == want


def test_the_choice_is_logged_once_per_distinct_choice(hf_checkpoint, caplog):
    LOGGED_CHOICES.clear()
    with caplog.at_level(logging.INFO, logger="nanopali"):
        for _ in range(3):
            nanopali.load(hf_checkpoint("pg2"))
    lines = [r.getMessage() for r in caplog.records if r.name == "nanopali"]
    assert lines == ["attention: attn_impl='auto' runs 'reference' on cpu (soft-capped: SDPA cannot)"]


def test_an_unknown_implementation_is_refused_by_name(hf_checkpoint):
    model, _ = nanopali.load(hf_checkpoint("pg1"))
    with pytest.raises(ValueError, match="attn_impl must be one of"):
        model.attn_impl = "flash"


def _per_head(q, k, v, allowed, scale, softcap):
    """Attention written head by head, query head n reading K/V head n // G: independent of both forms."""
    B, N, T, H = q.shape
    G = N // k.shape[1]
    out = torch.empty_like(q)
    for n in range(N):
        s = q[:, n] @ k[:, n // G].transpose(-1, -2) * scale                       # (B, T, S)
        s = torch.tanh(s / softcap) * softcap if softcap is not None else s
        s = s.masked_fill(~allowed[:, 0], float("-inf"))
        out[:, n] = torch.softmax(s, -1) @ v[:, n // G]
    return out


@pytest.mark.parametrize("N, K", [(4, 4), (4, 2), (4, 1)], ids=["MHA", "GQA", "MQA"])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_the_grouped_query_heads_read_their_own_kv_head_in_both_reference_forms(N, K, softcap):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, N, 5, 8, generator=g) * 3
    k, v = (torch.randn(2, K, 9, 8, generator=g) for _ in range(2))
    allowed = PrefixLMMask(torch.tensor([0, 2]), torch.tensor([3, 6]), 9).allowed(4, 5, 9, window=4)
    want = _per_head(q, k, v, allowed, 0.3, softcap)
    for form in (reference_attention, grouped_attention):
        got = form(q, k, v, allowed, 0.3, softcap)
        # fp32 sums of 8 products and softmaxes of 9 terms, in another order: rounding only
        assert_rounding_close(got, want, torch.float32, 8 + 9, form.__name__)
