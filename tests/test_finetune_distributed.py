"""torchrun with two CPU processes (gloo) trains exactly as one process on the combined batch."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

import nanopali

from nanopali.train.data import load_examples
from test_finetune_data import ROOT, records, write_dataset
from test_finetune_data import one_thread  # noqa: F401  (autouse fixture)
import train  # after test_finetune_data, which puts the repository root on sys.path
from tolerance import assert_rounding_close, backward_terms


def losses(path) -> list[float]:
    return [r["loss"] for r in map(json.loads, open(path)) if "loss" in r]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
@pytest.mark.parametrize("parallel", ["ddp", pytest.param("fsdp", marks=pytest.mark.slow)])
def test_two_processes_give_the_loss_of_one_process_on_the_combined_batch(hf_checkpoint, tmp_path, parallel):
    ckpt, data = hf_checkpoint("pg1"), write_dataset(tmp_path / "data")
    flags = ["--init", ckpt, "--data", data, "--lr", "3e-3", "--max-steps", "3", "--log-every", "1"]
    assert train.main([*flags, "--batch-size", "2", "--out-dir", str(tmp_path / "one"),
                       "--metrics-file", str(tmp_path / "one.jsonl")]) == 0
    # --standalone picks a free port, so concurrent test runs on one machine do not collide
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train.py"), *flags, "--batch-size", "1", "--parallel", parallel,
           "--out-dir", str(tmp_path / "two"), "--metrics-file", str(tmp_path / "two.jsonl")]
    child = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert child.returncode == 0, child.stderr[-3000:]
    one, two = losses(tmp_path / "one.jsonl"), losses(tmp_path / "two.jsonl")
    assert len(one) == len(two) == 3
    # step 1 is a pure forward; steps 2-3 follow updates from all-reduced gradients. Rows are padded
    # and summed differently, so equality is up to float32 rounding of a gradient's chain.
    model, processor = nanopali.load(ckpt)
    keys = max(ex.num_tokens for ex in load_examples(records(), processor).examples)
    assert_rounding_close(two, one, torch.float32, backward_terms(model.cfg.text, keys), "losses")
