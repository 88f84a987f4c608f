"""attn_impl: "auto" resolves to an exact implementation for the model and device, visibly and once."""
import logging

import pytest

import nanopali
from nanopali.attention import LOGGED_CHOICES


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
