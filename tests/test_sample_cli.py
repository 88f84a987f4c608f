"""sample.py end to end on a tiny checkpoint: answer on the last line, --json, boxes drawn."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from hf_reference import make_hf_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLED_IMAGE = os.path.join(ROOT, "nanopali", "assets", "images", "shapes_1.png")


def run(*args, cwd=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), *args], capture_output=True,
                          text=True, cwd=cwd, timeout=120)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    ckpt = make_hf_checkpoint(str(d / "ckpt"), generation=2)
    img = d / "img.png"
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (40, 60, 3), dtype=np.uint8)).save(img)
    return ckpt, str(img), d


def test_json_output_has_text_and_tokens_matching_the_library(setup):
    import nanopali
    from nanopali.generate import generate

    ckpt, img, d = setup
    r = run("--checkpoint", ckpt, "--image", img, "--prompt", "caption en", "--max-new-tokens", "6", "--json")
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout.strip().splitlines()[-1])
    model, proc = nanopali.load(ckpt, dtype="auto")
    texts, ids = generate(model, proc, [Image.open(img)], ["caption en"], 6, return_ids=True)
    assert rec["text"] == texts[0] and rec["tokens"] == ids[0]


def test_plain_output_prints_the_answer_on_the_last_line(setup):
    import nanopali
    from nanopali.generate import generate

    ckpt, img, d = setup
    r = run("--checkpoint", ckpt, "--image", img, "--prompt", "detect cat", "--max-new-tokens", "4")
    assert r.returncode == 0, r.stderr
    model, proc = nanopali.load(ckpt, dtype="auto")          # sample.py's default: bf16 where the CPU has it
    (text,) = generate(model, proc, [Image.open(img)], ["detect cat"], 4)
    assert r.stdout.endswith(text + "\n")


@pytest.mark.parametrize("args, message", [
    (["--image", "missing.png"], "not found"),
    (["--temperature", "-1"], "temperature"),
    (["--temperature", "nan"], "temperature"),
    (["--temperature", "1", "--seed", "99999999999999999999999"], "seed must be an integer in [0, 2**63)"),
    (["--vae", "missing-vae-oid.npz", "--prompt", "segment cat"], "--vae missing-vae-oid.npz: no such file"),
])
def test_bad_arguments_print_one_error_line_and_exit_2(setup, args, message):
    ckpt, img, d = setup
    base = ["--checkpoint", ckpt, "--image", img]
    if args[0] == "--image":
        base = ["--checkpoint", ckpt]
    r = run(*base, *args, cwd=str(d))
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


def test_multi_sends_every_image_with_one_prompt_as_the_library_does(setup):
    import nanopali
    from nanopali.generate import generate

    ckpt, img, d = setup
    r = run("--checkpoint", ckpt, "--image", img, "--image", img, "--multi", "--prompt", "answer en same?",
            "--max-new-tokens", "5", "--json")
    assert r.returncode == 0, r.stderr
    (line,) = r.stdout.strip().splitlines()
    rec = json.loads(line)
    model, proc = nanopali.load(ckpt, dtype="auto")
    pil = Image.open(img)
    _, ids = generate(model, proc, [[pil, pil]], ["answer en same?"], 5, return_ids=True)
    assert rec["image"] == [img, img] and rec["tokens"] == ids[0]


def test_several_prompts_for_one_image_each_get_their_answer(setup):
    import nanopali
    from nanopali.generate import generate

    ckpt, img, d = setup
    r = run("--checkpoint", ckpt, "--image", img, "--prompt", "caption en", "--prompt", "ocr", "--max-new-tokens",
            "3", "--json")
    assert r.returncode == 0, r.stderr
    recs = [json.loads(line) for line in r.stdout.strip().splitlines()]
    model, proc = nanopali.load(ckpt, dtype="auto")
    pil = Image.open(img)
    _, ids = generate(model, proc, [pil, pil], ["caption en", "ocr"], 3, return_ids=True)
    assert [(x["prompt"], x["tokens"]) for x in recs] == [("caption en", ids[0]), ("ocr", ids[1])]


def test_the_drawn_boxes_line_comes_after_its_answer_on_stderr(tmp_path):
    """The bundled model answers 'detect ...' with boxes: stdout ends with the answer, the 'drawn into'
    line goes to stderr, and the file is written where --out says."""
    r = run("--prompt", "detect circle ; square ; triangle", "--out", str(tmp_path / "boxes.png"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1].startswith("<loc") and "drawn into" not in r.stdout
    assert "box(es) drawn into " + str(tmp_path / "boxes.png") in r.stderr
    assert Image.open(tmp_path / "boxes.png").size == Image.open(BUNDLED_IMAGE).size


# ---- threads, the machine line, --out, pipes, untrusted text ----

def test_threads_past_the_usable_cores_are_clamped_and_the_clamp_is_said_on_stderr():
    """10,000 threads once took 27 s to start for 2 tokens (0.2 s normally) and a MemoryError under ulimit -v."""
    cores = len(os.sched_getaffinity(0))
    r = run("--prompt", "caption en", "--max-new-tokens", "2", "--threads", "10000")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert f"10000 threads requested; this process may use {cores} core(s)" in r.stderr
    assert f", {cores} threads)" in r.stderr                    # the loaded line: what torch ran with


def test_help_says_threads_default_to_the_cores_this_process_may_use():
    r = run("--help")
    assert "default: the cores this process may use" in " ".join(r.stdout.split())


def test_stderr_names_the_cpu_its_bf16_features_torch_and_the_threads(setup):
    import torch
    from nanopali.cpu import machine

    ckpt, img, d = setup
    r = run("--checkpoint", ckpt, "--image", img, "--prompt", "caption en", "--max-new-tokens", "2")
    assert r.returncode == 0, r.stderr
    line = next((x for x in r.stderr.splitlines() if x.startswith("CPU: ")), r.stderr)
    assert machine.cpu_model() in line and "avx512_bf16" in line and "amx" in line
    assert f"torch {torch.__version__}" in line and f"{machine.usable_cores()} threads" in line
    assert "CPU: " not in r.stdout


@pytest.mark.parametrize("out, named", [("missing-dir/boxes.png", "missing-dir: no such directory"),
                                        (".", "is a directory"), ("boxes.xyz", "'.xyz'")])
def test_an_out_path_that_cannot_be_written_is_refused_before_loading(tmp_path, out, named):
    r = run("--prompt", "detect circle", "--out", out, cwd=str(tmp_path))
    assert r.returncode == 2 and r.stdout == "" and "loaded" not in r.stderr, r.stderr
    (line,) = r.stderr.splitlines()
    assert line.startswith(f"error: --out {out}") and named in line


def test_out_without_an_extension_is_written_as_png(tmp_path):
    r = run("--prompt", "detect circle ; square ; triangle", "--out", "boxes", cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "boxes").format == "PNG"


def test_a_reader_that_stops_early_closes_the_pipe_without_an_error_message():
    """As `sample.py | head -c 10`: the answer streams; the reader leaves after 10 bytes."""
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "sample.py"), "--prompt", "caption en"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert len(p.stdout.read(10)) == 10
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) in (0, 141)                      # 141: cut off, as a shell reports SIGPIPE
    assert "Broken pipe" not in err and "Traceback" not in err and "error" not in err, err


def test_a_refused_pickle_checkpoint_cannot_send_terminal_escapes_to_stderr(tmp_path):
    """The message names the directory: a crafted name must not recolour, clear or retitle the terminal."""
    ckpt = tmp_path / "ckpt\x1b[31m\x1b]0;owned\x07"
    ckpt.mkdir()
    bundled = os.path.join(ROOT, "nanopali", "assets", "tiny-shapes")
    for name in ("config.json", "tokenizer.model"):
        (ckpt / name).write_bytes(open(os.path.join(bundled, name), "rb").read())
    (ckpt / "pytorch_model.bin").write_bytes(b"\x80\x02cos\x1b[2J\nsystem\nq\x00.")
    r = run("--checkpoint", str(ckpt), "--image", BUNDLED_IMAGE)
    assert r.returncode == 2 and "pickle weights" in r.stderr, r.stderr
    assert "\x1b" not in r.stderr and "\x07" not in r.stderr and "\\x1b[31m" in r.stderr
