"""`bench.py train` (benchmarks/train.py) at a tiny width and depth, so its code path cannot rot: nanopali's
LoRA step as train.py runs it and transformers + peft's, from the same weights and the same initial
adapters, lose the same amount step by step; the check fails when peft starts from other adapters."""
import math
import os
from dataclasses import replace

import pytest
import torch

pytest.importorskip("peft")

from benchmarks import train as bench_train  # noqa: E402

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "nanopali", "assets", "tiny-shapes")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The bundled model's widths (128, vocab 1616, 56 px = 16 image tokens), 2 + 2 layers, random bf16 weights."""
    from benchmarks.random_checkpoint import write_random_checkpoint
    from nanopali.config import alternating_layers
    from nanopali.formats.hf_config import read_paligemma_config

    cfg = read_paligemma_config(TINY)
    cfg = replace(cfg, text=replace(cfg.text, depth=2, layer_types=alternating_layers(2)),
                  vision=replace(cfg.vision, depth=2))
    return write_random_checkpoint(cfg, str(tmp_path_factory.mktemp("bench-train")), log=lambda *a: None)


def test_nanopali_and_transformers_peft_losses_agree_step_by_step_from_the_same_adapters(checkpoint, capsys,
                                                                                       monkeypatch):
    # the int4 pair takes the path of a pair that does not fit in memory: one side after the other
    monkeypatch.setattr(bench_train, "fits", lambda mem, sides: "int4" not in sides)
    timing, mem = bench_train.compare(checkpoint, ["bf16", "int4"], [1, 2], steps=3, threads=1, memory=False,
                                      say=lambda s: None)
    for b in (1, 2):
        peer, ours = timing["bf16"][0]["transformers"][b][1], timing["bf16"][0]["bf16"][b][1]
        assert len(peer) == len(ours) == bench_train.WARMUP + 3
        assert bench_train.losses_agree(peer, ours), (peer, ours, bench_train.loss_tolerance(peer))
        assert peer[-1] < peer[0] - 0.1   # the adapters trained: the check covers more than the frozen forward
        assert timing["int4"][0]["int4"][b][1][-1] < timing["int4"][0]["int4"][b][1][0] - 0.1   # QLoRA trains too
    bench_train.print_results(timing, mem, [1, 2], 16 + bench_train.TEXT_TOKENS)
    out = capsys.readouterr().out
    assert out.count("(agree)") == 2 and "DIFFER" not in out and out.count("(quantized base)") == 2
    assert out.count("(not interleaved)") == 2 and timing["int4"][1] is False


def test_the_loss_check_fails_when_peft_starts_from_other_adapters(checkpoint):
    """The same A drawn with another seed (B is 0 either way): step 1 still agrees, as B = 0 makes the
    adapters vanish; from step 2 on the trajectories part by more than the allowed rounding."""
    ours = bench_train.load("bf16", checkpoint)[0]
    peer = bench_train.load("transformers", checkpoint)[0]
    initial = {k: p.detach().clone() for k, p in bench_train.adapters(ours).items()}
    g = torch.Generator().manual_seed(1)
    other = {k: (torch.rand(t.shape, generator=g) * 2 - 1) / math.sqrt(t.shape[1]) if k[2] == "A" else t
             for k, t in initial.items()}   # kaiming_uniform(a=√5): U(-1/√in, 1/√in), as both libraries draw A
    same = bench_train.interleaved([ours], initial, [1, 2], steps=3)["bf16"]
    moved = bench_train.interleaved([peer], other, [1, 2], steps=3)["transformers"]
    for b in (1, 2):
        assert abs(same[b][1][0] - moved[b][1][0]) <= bench_train.loss_tolerance(moved[b][1])[0]
    assert not all(bench_train.losses_agree(moved[b][1], same[b][1]) for b in (1, 2)), (moved, same)


def test_a_child_process_measures_one_side_alone(checkpoint):
    res = bench_train.memory_in_child("bf16", checkpoint, [1, 2], threads=1)
    assert res["load_s"] > 0 and sorted(res["peak_gb"]) == [1, 2]
    assert 0 < res["base_gb"] < res["loaded_gb"] <= min(res["peak_gb"].values())
