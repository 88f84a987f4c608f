"""A run directory belongs to one run; a resume is the same run; faults are named, lose nothing, and
never show a traceback. Each test is one way a real run went wrong, with the message it now gives."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from nanopali.formats.files import file_mode
from nanopali.train import finetune, resume, run_dir
from test_finetune_data import ROOT, write_dataset
from test_finetune_data import one_thread  # noqa: F401  (autouse fixture)
import train  # after test_finetune_data, which puts the repository root on sys.path
from test_finetune_train import losses, run, setup  # noqa: F401  (setup: the shared fixture)


def _fails(capsys, code, *flags_and_setup, match):
    assert run(*flags_and_setup) == code
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err, err
    return err


# ---- one run per directory ----

def test_a_second_run_into_a_busy_directory_is_refused_before_any_work(setup, tmp_path, capsys):
    out = tmp_path / "run"
    holder = run_dir.claim(str(out))                               # a live run holds the lock
    _fails(capsys, 2, setup, out, "--max-steps", "1", match=f"is in use by another training run (pid {os.getpid()}")
    holder.close()
    assert not (out / "checkpoints").exists()


def test_a_killed_run_leaves_no_stuck_lock_and_its_leftovers_are_removed(setup, tmp_path):
    out = tmp_path / "run"
    code = f"from nanopali.train import run_dir; import os; run_dir.claim({str(out)!r}); os.kill(os.getpid(), 9)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == -signal.SIGKILL
    (out / "checkpoints" / "step_000003.tmp4242").mkdir(parents=True)   # a killed save
    (out / "model.safetensors.tmp4242").write_bytes(b"\0" * 1000)        # a killed export
    assert run(setup, out, "--max-steps", "1") == 0
    assert not (out / "checkpoints" / "step_000003.tmp4242").exists() and not (out / "model.safetensors.tmp4242").exists()


def test_an_out_dir_that_cannot_be_written_fails_before_the_data_is_read(setup, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    ckpt, _ = setup
    assert train.main(["--init", ckpt, "--data", str(tmp_path / "missing.jsonl"), "--out-dir", str(blocker / "x")]) == 2
    err = capsys.readouterr().err
    assert "cannot be written" in err and "missing.jsonl" not in err


def test_exported_files_get_the_usual_mode_not_0600(setup, tmp_path):
    out = tmp_path / "run"
    assert run(setup, out, "--max-steps", "1") == 0
    for name in ("model.safetensors", "config.json", "tokenizer.model"):
        assert os.stat(out / name).st_mode & 0o777 == file_mode(), name
    step = resume.latest(str(out / "checkpoints"))
    assert all(os.stat(os.path.join(step, n)).st_mode & 0o777 == file_mode() for n in os.listdir(step))


# ---- a resume is the same run ----

def test_resume_with_a_changed_optimiser_flag_is_refused_naming_old_and_new(setup, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(setup, out, "--max-steps", "2", "--save-every", "1") == 0
    err = _fails(capsys, 2, setup, out, "--max-steps", "4", "--resume", "--lr", "1e-2", "--weight-decay", "0.1",
                 match="--lr: 0.003 then, 0.01 now")
    assert "--weight-decay: 0.0 then, 0.1 now" in err and "--max-steps: 2 then, 4 now" in err
    assert "--allow-changed lr,weight_decay,max_steps" in err


def test_allowed_changes_apply_and_are_kept_in_the_history(setup, tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert run(setup, out, "--max-steps", "2") == 0
    seen = []
    real = finetune.train_step
    monkeypatch.setattr(finetune, "train_step", lambda obj, opt, *a, **k: (
        seen.append([g["weight_decay"] for g in opt.param_groups]), real(obj, opt, *a, **k))[1])
    assert run(setup, out, "--max-steps", "3", "--weight-decay", "0.1", "--resume",
               "--allow-changed", "max_steps,weight_decay") == 0
    assert 0.1 in seen[0]                                          # the restored optimizer took the new decay
    history = json.load(open(out / "run.json"))["history"]
    assert [h["from_step"] for h in history] == [0, 2]
    assert history[1]["changed"] == {"max_steps": {"old": 2, "new": 3}, "weight_decay": {"old": 0.0, "new": 0.1}}
    assert train.read_recipe(str(out / "run.json"))["weight_decay"] == 0.1   # still a recipe


@pytest.mark.parametrize("flags, named", [
    (["--batch-size", "3"], "--batch-size: 2 then, 3 now"),
    (["--seed", "5"], "--seed: 0 then, 5 now"),
    (["--trainable", "lora"], "--trainable: 'all' then, 'lora' now"),
    (["--data-format", "jsonl"], "--data-format: 'auto' then, 'jsonl' now"),   # how --data is read: its examples
])
def test_resume_refuses_flags_that_change_which_examples_a_step_sees_or_what_trains(setup, tmp_path, capsys, flags,
                                                                                     named):
    out = tmp_path / "run"
    assert run(setup, out, "--max-steps", "2") == 0
    err = _fails(capsys, 2, setup, out, "--max-steps", "2", "--resume", "--allow-changed", "lr", *flags, match=named)
    assert "cannot change on resume" in err and "adapter_model" not in err


@pytest.mark.parametrize("content", [b"../../elsewhere/checkpoints/step_000001\n", b"\xff\xfe\x00garbage",
                                     b"step_000009\n"])
def test_a_damaged_latest_pointer_is_named_and_never_followed(setup, tmp_path, capsys, content):
    out = tmp_path / "run"
    assert run(setup, out, "--max-steps", "2", "--save-every", "1") == 0
    (out / "checkpoints" / "latest").write_bytes(content)
    err = _fails(capsys, 2, setup, out, "--max-steps", "3", "--resume", "--allow-changed", "max_steps",
                 match="checkpoints/latest")
    assert "step_000001, step_000002" in err


def test_a_truncated_train_state_is_named_with_the_steps_to_resume_from(setup, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(setup, out, "--max-steps", "2", "--save-every", "1") == 0
    state = out / "checkpoints" / "step_000002" / "train_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    _fails(capsys, 2, setup, out, "--max-steps", "2", "--resume", match=f"{state} is damaged or truncated")


def test_a_train_state_holding_foreign_objects_is_refused_without_terminal_escapes(setup, tmp_path, capsys):
    """A crafted train_state.pt names a global with colour codes in it; torch's refusal styles its own text."""
    out = tmp_path / "run"
    assert run(setup, out, "--max-steps", "2", "--save-every", "1") == 0
    state = out / "checkpoints" / "step_000002" / "train_state.pt"
    state.write_bytes(b"\x80\x02cos\x1b[31m\nsystem\nq\x00.")
    err = _fails(capsys, 2, setup, out, "--max-steps", "2", "--resume", match=f"{state} is damaged or truncated")
    assert "\x1b" not in err


# ---- faults while saving ----

def test_not_enough_disk_space_is_known_before_writing(setup, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setattr(resume.shutil, "disk_usage", lambda p: type("U", (), {"free": 1000})())
    err = _fails(capsys, 2, setup, out, "--max-steps", "1", match="Not enough disk space to save step 1")
    assert "1000" not in err or "GB" in err
    assert not [n for n in os.listdir(out / "checkpoints") if n.startswith("step_")]


def test_a_disk_full_during_a_save_removes_the_partial_save_and_says_so(setup, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert run(setup, out, "--max-steps", "1") == 0
    real = torch.save

    def full_disk(obj, path, *a, **k):
        real(obj, path, *a, **k)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4096 vs 3968")

    monkeypatch.setattr(resume.torch, "save", full_disk)
    err = _fails(capsys, 2, setup, out, "--max-steps", "2", "--resume", "--allow-changed", "max_steps",
                 match="the disk is full")
    assert "step_000001) is intact" in err and "enforce fail" not in err
    assert sorted(os.listdir(out / "checkpoints")) == ["latest", "step_000001"]


# ---- data and limits ----

def test_invalid_utf8_in_the_data_names_the_file_and_line(tmp_path, setup, capsys):
    ckpt, _ = setup
    data = write_dataset(tmp_path)
    with open(data, "ab") as f:
        f.write(b'{"image": "img/0_0.png", "prefix": "caption en", "suffix": "caf\xe9"}\n')
    assert train.main(["--init", ckpt, "--data", data, "--out-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "1 bad example(s)" in err and f"{data}:7: not valid UTF-8 (byte 0xe9 at column 64)" in err


def test_a_very_long_example_is_refused_by_the_default_max_seq_len_with_its_line(tmp_path, setup, capsys):
    ckpt, _ = setup
    data = write_dataset(tmp_path)
    rows = [json.loads(line) for line in open(data)]
    rows[1]["suffix"] = "red " * 10_000
    with open(data, "w") as f:
        f.write("\n".join(json.dumps(r) for r in rows))
    assert train.main(["--init", ckpt, "--data", data, "--out-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"{data}:2:" in err and "exceed --max-seq-len 8192 (default: the model's positions)" in err


def test_a_run_that_cannot_fit_in_memory_is_refused_before_the_model_is_built(setup, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(run_dir, "available_memory", lambda device: 100_000)
    _fails(capsys, 2, setup, tmp_path / "run", "--max-steps", "1", match="GiB are available")
    assert run(setup, tmp_path / "run", "--max-steps", "1", "--no-memory-check") == 0


def test_a_random_init_too_large_for_the_machine_is_refused_without_allocating(tmp_path, setup, capsys):
    ckpt, data = setup
    cfg = json.load(open(os.path.join(ckpt, "config.json")))
    cfg["text_config"].update(hidden_size=60_000, intermediate_size=240_000, num_hidden_layers=40)
    (tmp_path / "big.json").write_text(json.dumps(cfg))
    assert train.main(["--init", str(tmp_path / "big.json"), "--tokenizer", os.path.join(ckpt, "tokenizer.model"),
                       "--data", data, "--out-dir", str(tmp_path / "run")]) == 2
    assert "GiB are available" in capsys.readouterr().err


@pytest.mark.parametrize("flags", [["--quantize-base", "int4", "--quantize-group-size", "16"],
                                   ["--quantize-base", "int4", "--quantize-group-size", "0", "--estimate-memory"],
                                   ["--quantize-base", "int8", "--quantize-group-size", "64"]],
                         ids=["int4-16", "int4-0-estimate", "int8-with-group"])
def test_a_group_size_the_int4_kernels_lack_is_a_usage_error_before_the_run_directory(setup, tmp_path, capsys, flags):
    """It once surfaced as a 26-line traceback from the memory estimate, with run/.lock left behind."""
    with pytest.raises(SystemExit) as e:
        run(setup, tmp_path / "run", "--trainable", "lora", *flags)
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if "error:" in x]
    assert e.value.code == 2 and "--quantize-group-size" in line and "Traceback" not in err
    assert ("32, 64, 128, 256" in line) if "int4" in flags else ("--quantize-base int4" in line)
    assert not (tmp_path / "run").exists()


def test_a_seed_past_64_bits_is_a_usage_error(setup, tmp_path):
    with pytest.raises(SystemExit) as e:
        run(setup, tmp_path / "run", "--seed", "99999999999999999999999")
    assert e.value.code == 2


# ---- Ctrl-C ----

def test_ctrl_c_stops_after_the_step_saves_and_the_resume_matches_an_uninterrupted_run(setup, tmp_path, monkeypatch,
                                                                                       capsys):
    assert run(setup, tmp_path / "whole", "--max-steps", "4") == 0
    real, calls = finetune.train_step, []

    def interrupted_in_step_2(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)                 # arrives in the middle of the step
        return real(*a, **k)

    monkeypatch.setattr(finetune, "train_step", interrupted_in_step_2)
    assert run(setup, tmp_path / "split", "--max-steps", "4") == 130
    out = capsys.readouterr().out
    assert "stopped at step 2 of 4" in out and "--resume" in out
    monkeypatch.setattr(finetune, "train_step", real)
    assert resume.read_train_state(resume.latest(str(tmp_path / "split" / "checkpoints")))["step"] == 2
    assert run(setup, tmp_path / "split", "--max-steps", "4", "--resume") == 0
    assert losses(tmp_path / "split") == losses(tmp_path / "whole")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler   # the caller's handler is back
