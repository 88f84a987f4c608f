"""The README's CPU quickstart, at smoke-test scale: the three commands run as written (fewer scenes and
steps), the data command writes only data, every long step prints progress, and LoRA teaches the bundled
model the new prompt ("count circles") measurably above where it started, on a float or an int8 base."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "recipes", "quickstart_cpu.py")


def _run(*args, cwd=ROOT):
    r = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def _train(data, out, *flags):
    """(exact match at step 0, at step 40, stdout) of the recipe at smoke scale."""
    r = _run("train.py", RECIPE, f"--data={data / 'train.jsonl'}", f"--eval-data={data / 'eval.jsonl'}",
             f"--out-dir={out}", "--max-steps=40", "--eval-every=40", "--save-every=40", *flags)
    evals = [line for line in r.stdout.splitlines() if line.startswith("eval step")]
    assert evals[0].startswith("eval step 0 ") and evals[-1].startswith("eval step 40 "), r.stdout
    before, after = (float(e.split("exact_match ")[1].split()[0]) for e in (evals[0], evals[-1]))
    return before, after, r.stdout


def test_the_quickstart_commands_teach_the_bundled_model_a_new_prompt(tmp_path):
    data = tmp_path / "data"
    r = _run("-m", "nanopali.shapes", str(data), "--data-only", "--prompts", "kind-count", "--train", "160",
             "--eval", "60")
    assert sorted(os.listdir(data)) == ["eval.jsonl", "images", "train.jsonl"]      # no tokenizer, no init/
    assert "train: 160/160 scenes" in r.stdout
    rows = [json.loads(line) for line in open(data / "train.jsonl")]
    assert len(rows) == 160 and all(r["prefix"] in ("count circles", "count squares", "count triangles") for r in rows)

    out = tmp_path / "run"
    before, after, stdout = _train(data, out)
    assert "elapsed" in stdout and " left" in stdout                                  # progress with an ETA
    assert after >= before + 0.15, (before, after)     # measured: 0.17 -> 0.47 at this scale
    # QLoRA: the same run on the model held in int8 learns as well (measured: 0.47 too; at full scale,
    # docs/fine-tuning.md: 92 / 89.5 / 89 % against 92 / 88.5 / 90 % over three seeds)
    assert abs(_train(data, tmp_path / "run-int8", "--quantize-base=int8")[1] - after) <= 0.1

    r = _run("sample.py", "--checkpoint", str(out), "--prompt", "count circles", "--prompt", "count squares")
    assert r.stdout.count(" ->") == 2 and r.stdout.strip().splitlines()[-1].isdigit()
