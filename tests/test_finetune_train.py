"""train.py end to end on a tiny model: it learns, resumes bit for bit, survives kill -9 during a save,
and stops cleanly on a non-finite loss."""
import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch

import nanopali
from nanopali import shapes
from nanopali.train import finetune, resume
from nanopali.generate import generate
from test_finetune_data import ROOT, records, write_dataset
from test_finetune_data import one_thread  # noqa: F401  (autouse fixture)
import train  # after test_finetune_data, which puts the repository root on sys.path


@pytest.fixture(scope="module")
def setup(hf_checkpoint, tmp_path_factory):
    ckpt = hf_checkpoint("pg1")
    return ckpt, write_dataset(tmp_path_factory.mktemp("data"))


def run(setup, out, *flags):
    ckpt, data = setup
    return train.main(["--init", ckpt, "--data", data, "--out-dir", str(out), "--batch-size", "2", "--lr", "3e-3",
                       "--log-every", "1", "--metrics-file", str(out) + ".jsonl", *flags])


def losses(out) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, open(str(out) + ".jsonl")) if "loss" in r}


def test_a_tiny_model_overfits_a_handful_of_examples(setup, tmp_path):
    assert run(setup, tmp_path / "run", "--batch-size", "6", "--max-steps", "25", "--eval-data", setup[1],
               "--eval-max-new-tokens", "8") == 0
    assert losses(tmp_path / "run")[25] < 0.01
    evals = [r for r in map(json.loads, open(str(tmp_path / "run") + ".jsonl")) if "eval_loss" in r]
    assert evals[-1]["eval_exact_match"] == 1.0 and evals[-1]["eval_box_iou"] == 1.0
    model, processor = nanopali.load(tmp_path / "run")          # the final export is a plain checkpoint
    rows = records()
    assert generate(model, processor, [r["image"] for r in rows], [r["prefix"] for r in rows],
                    max_new_tokens=8) == [r["suffix"] for r in rows]


LORA = ["--trainable", "lora", "--lora-dropout", "0.2", "--lr", "1e-2"]


@pytest.mark.parametrize("flags", [[], LORA, [*LORA, "--quantize-base", "int8"],
                                   [*LORA, "--quantize-base", "int4", "--quantize-group-size", "32"]],
                         ids=["full", "lora-with-dropout", "qlora-int8", "qlora-int4"])
def test_resume_reproduces_the_uninterrupted_losses_exactly(setup, tmp_path, monkeypatch, flags):
    common = ["--max-steps", "6", "--save-every", "3", *flags]
    assert run(setup, tmp_path / "whole", *common) == 0

    real_step, calls = finetune.train_step, []

    def crash_at_step_5(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt("simulated crash")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(finetune, "train_step", crash_at_step_5)
    assert run(setup, tmp_path / "split", *common) == 130      # a hard stop: exits without a traceback
    monkeypatch.setattr(finetune, "train_step", real_step)
    assert resume.read_train_state(resume.latest(str(tmp_path / "split" / "checkpoints")))["step"] == 3
    assert run(setup, tmp_path / "split", *common, "--resume") == 0

    whole, split = losses(tmp_path / "whole"), losses(tmp_path / "split")
    assert list(split) == [1, 2, 3, 4, 5, 6]
    assert split == whole                                       # bit for bit, not approximately
    a, _ = nanopali.load(tmp_path / "whole")
    b, _ = nanopali.load(tmp_path / "split")
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def poison_loss_from_call(monkeypatch, n):
    real, calls = finetune.loss_terms, []

    def loss_terms(*args, **kwargs):
        s, count = real(*args, **kwargs)
        calls.append(1)
        return (s * float("nan"), count) if len(calls) >= n else (s, count)

    monkeypatch.setattr(finetune, "loss_terms", loss_terms)


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(setup, tmp_path, monkeypatch, capsys):
    poison_loss_from_call(monkeypatch, 3)
    assert run(setup, tmp_path / "run", "--max-steps", "6", "--save-every", "1") == 3
    err = capsys.readouterr().err
    last = resume.latest(str(tmp_path / "run" / "checkpoints"))
    assert "step 3: loss nan is not finite" in err and last in err
    assert last.endswith("step_000002") and not os.path.exists(tmp_path / "run" / "config.json")
    model, _ = nanopali.load(last)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_skip_nonfinite_skips_and_counts_the_bad_steps(setup, tmp_path, monkeypatch):
    poison_loss_from_call(monkeypatch, 3)
    assert run(setup, tmp_path / "run", "--max-steps", "4", "--skip-nonfinite") == 0
    assert list(losses(tmp_path / "run")) == [1, 2]
    assert resume.read_train_state(resume.latest(str(tmp_path / "run" / "checkpoints")))["nonfinite_skipped"] == 2


# Runs train.py in a child whose torch.save writes half of the second train_state.pt and then
# SIGKILLs its own process: a kill in the middle of a save, at a deterministic point.
KILLED_DURING_SAVE = """
import os, signal, sys, torch
sys.path.insert(0, {root!r})
import train
real_save, saves = torch.save, []
def save_then_die(obj, path, *args, **kwargs):
    saves.append(path)
    real_save(obj, path, *args, **kwargs)
    if len(saves) == 2:
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        os.kill(os.getpid(), signal.SIGKILL)
torch.save = save_then_die
sys.exit(train.main(sys.argv[1:]))
"""


def test_sigkill_during_a_save_leaves_a_loadable_last_checkpoint(setup, tmp_path):
    ckpt, data = setup
    out = tmp_path / "run"
    args = ["--init", ckpt, "--data", data, "--out-dir", str(out), "--batch-size", "2", "--max-steps", "3",
            "--save-every", "1"]
    child = subprocess.run([sys.executable, "-c", KILLED_DURING_SAVE.format(root=str(ROOT)), *args],
                           capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert child.returncode == -signal.SIGKILL, child.stderr
    root = str(out / "checkpoints")
    assert any(".tmp" in n for n in os.listdir(root))           # the interrupted save
    last = resume.latest(root)
    assert last.endswith("step_000001") and resume.read_train_state(last)["step"] == 1
    nanopali.load(last)
    assert train.main([*args, "--resume"]) == 0
    assert sorted(os.listdir(root)) == ["latest", "step_000001", "step_000002", "step_000003"]


def test_a_recipe_file_sets_flags_and_the_command_line_overrides_it(tmp_path):
    recipe = tmp_path / "r.py"
    recipe.write_text("# a run in one file\ninit = 'ckpt'\ndata = 'train.jsonl'\nlr = 3e-4\nskip_bad = True\n"
                      "trainable = 'lora'\nlora_targets = ['q', 'v']\neval_generate = False\n")
    args = train.parse_args([str(recipe), "--lr=1e-3"])
    assert (args.init, args.data, args.lr, args.skip_bad, args.trainable, args.lora_targets, args.eval_generate) == \
        ("ckpt", "train.jsonl", 1e-3, True, "lora", "q,v", False)
    recipe.write_text("import os\n")
    with pytest.raises(SystemExit, match="only `name = literal` lines"):
        train.parse_args([str(recipe)])


def test_every_flag_is_documented_in_help():
    parser = train.build_parser()
    undocumented = [a.dest for a in parser._actions if a.option_strings and not a.help]
    assert undocumented == []


def test_every_bundled_recipe_is_a_valid_set_of_flags():
    recipes = sorted((ROOT / "recipes").glob("*.py"))
    assert recipes
    for recipe in recipes:
        args = train.parse_args([str(recipe), "--init=pg2-3b-224", "--data=train.jsonl"])
        assert args.out_dir.startswith("runs/"), recipe


def test_training_from_scratch_starts_at_the_uniform_loss_and_learns(setup, tmp_path):
    """--init config.json: fresh weights (std 0.02) predict nearly uniformly, so the first loss is ln V."""
    ckpt, _ = setup
    assert run(setup, tmp_path / "run", "--init", os.path.join(ckpt, "config.json"), "--tokenizer",
               os.path.join(ckpt, "tokenizer.model"), "--max-steps", "8", "--lr", "1e-2") == 0
    first, last = losses(tmp_path / "run")[1], losses(tmp_path / "run")[8]
    vocab = nanopali.load(tmp_path / "run")[0].cfg.text.vocab_size
    assert abs(first - math.log(vocab)) < 0.05 and last < first - 1.0


def test_a_lora_run_reads_the_base_straight_into_the_frozen_dtype_with_the_same_weights(monkeypatch):
    """The base is never held in fp32 first (the 3B's load peak and time), and reading into bf16 rounds each
    weight as casting the fp32 copy did: the frozen weights are the same bits."""
    dtypes, BUNDLED = [], str(shapes.BUNDLED_MODEL)
    real_load = nanopali.load

    def spy(path, dtype=torch.float32, *a, **k):
        dtypes.append(dtype)
        return real_load(path, dtype, *a, **k)

    monkeypatch.setattr(nanopali, "load", spy)
    flags = ["--init", BUNDLED, "--data", "x.jsonl", "--trainable", "lora", "--frozen-dtype", "bf16",
             "--precision", "bf16"]
    args = train.parse_args(flags)
    cfg, _ = train.model_config(args)
    model = train.build_model(args, cfg, None, torch.device("cpu"), materialize=True)
    assert dtypes == [torch.bfloat16]
    cast, _ = real_load(BUNDLED, torch.float32)
    cast = {k: v.to(torch.bfloat16) for k, v in cast.state_dict().items()}
    frozen = {k.replace(".base.", "."): v for k, v in model.state_dict().items() if "lora_" not in k}  # LoRA wraps
    assert frozen.keys() <= cast.keys() and all(torch.equal(frozen[k], cast[k]) for k in frozen)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if p.requires_grad)
