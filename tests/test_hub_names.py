"""Checkpoints by Hugging Face hub name (nanopali/formats/hub.py), through huggingface_hub's own code.

Offline: a cache built here as huggingface_hub lays it out (models--owner--name/blobs/<sha256>, snapshots/
<commit>/<file> symlinks to the blobs, refs/<branch or tag> holding the commit). Online: a fake hub on
127.0.0.1 answering the four calls snapshot_download makes (repo info, tree listing, HEAD and GET of a
file), so the requests it makes are the ones a real download makes. huggingface_hub reads HF_HUB_CACHE,
HF_HUB_OFFLINE and HF_ENDPOINT into `constants` at import, so the tests set those constants.
"""
import hashlib
import json
import os
import shlex
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from PIL import Image

import nanopali
import sample
import train
from nanopali.formats import hub
from nanopali.formats.files import CheckpointError
from nanopali.formats.hf_config import read_paligemma_config
from test_bad_inputs import _raises

constants = pytest.importorskip("huggingface_hub.constants")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLED = os.path.join(ROOT, "nanopali", "assets", "tiny-shapes")
IMAGE = os.path.join(ROOT, "nanopali", "assets", "images", "shapes_1.png")
A, B = "a" * 40, "b" * 40  # two commits
# Every file a PaliGemma, SigLIP or MobileCLIP repository may hold, and those nanopali never reads.
JUNK = ["pytorch_model.bin", "open_clip_pytorch_model.bin", "flax_model.msgpack", "model.gguf", "README.md",
        "tokenizer.json", "special_tokens_map.json", ".gitattributes"]
EVERY = ["config.json", "tokenizer.model", "spiece.model", "tokenizer_config.json", "preprocessor_config.json",
         "model.safetensors", "open_clip_config.json", "open_clip_model.safetensors", "merges.txt",
         "mobileclip2_s0.pt", *JUNK]


def bundled_files() -> dict:
    return {n: open(os.path.join(BUNDLED, n), "rb").read() for n in os.listdir(BUNDLED)}


def put(cache, repo, commit, files: dict, refs=("main",)):
    """Write a snapshot into `cache` exactly as huggingface_hub's hf_hub_download leaves it."""
    root = os.path.join(cache, "models--" + repo.replace("/", "--"))
    for name, data in files.items():
        blob = os.path.join(root, "blobs", hashlib.sha256(data).hexdigest())
        os.makedirs(os.path.dirname(blob), exist_ok=True)
        open(blob, "wb").write(data)
        link = os.path.join(root, "snapshots", commit, name)
        os.makedirs(os.path.dirname(link), exist_ok=True)
        os.symlink(os.path.relpath(blob, os.path.dirname(link)), link)
    for ref in refs:
        os.makedirs(os.path.join(root, "refs"), exist_ok=True)
        open(os.path.join(root, "refs", ref), "w").write(commit)  # no newline, as huggingface_hub writes it
    return os.path.join(root, "snapshots", commit)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty hub cache, offline."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return str(tmp_path / "hub")


@pytest.fixture
def fake_hub(cache, monkeypatch):
    """A hub at http://127.0.0.1:PORT serving repos[name] = {"refs": {branch or tag: commit}, commit: {file: bytes}}
    or {"error": (status, X-Error-Code or None)}; yields (repos, the files GET-requested, in order)."""
    repos, fetched = {}, []

    class Hub(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def send(self, status, body=b"", headers=()):
            self.send_response(status)
            for k, v in headers:
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command == "GET":
                self.wfile.write(body)

        def do_GET(self):
            path = self.path.split("?")[0]
            parts = path.strip("/").split("/")
            api = parts[0] == "api"
            repo = repos.get("/".join(parts[2:4] if api else parts[0:2]), {"error": (404, "RepoNotFound")})
            ref = (parts + [""] * 6)[5 if api else 3]  # /api/models/o/n/{revision|tree}/REF, /o/n/resolve/REF/FILE
            commit = repo.get("refs", {}).get(ref, ref)
            status, code = repo.get("error") or ((404, "RevisionNotFound") if commit not in repo else (200, None))
            if status != 200:
                return self.send(status, b"{}", [("X-Error-Code", code)] if code else [])
            files, sha = repo[commit], lambda b: hashlib.sha1(b).hexdigest()
            if api and parts[4] == "revision":
                return self.send(200, json.dumps({"id": "/".join(parts[2:4]), "sha": commit}).encode())
            if api and parts[4] == "tree":
                return self.send(200, json.dumps([{"type": "file", "path": n, "size": len(b), "oid": sha(b)}
                                                  for n, b in files.items()]).encode())
            name = "/".join(parts[4:])
            if self.command == "GET":
                fetched.append(name)
            self.send(200, files[name], [("X-Repo-Commit", commit), ("ETag", f'"{sha(files[name])}"')])

        do_HEAD = do_GET

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_port}"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    yield repos, fetched
    server.shutdown()


def logits(model, processor):
    with torch.no_grad():
        return model(**processor(images=[Image.open(IMAGE)], prompts=["caption en"]))


def test_a_hub_name_loads_offline_from_the_cache_with_the_bundled_models_logits(cache):
    put(cache, "google/tiny-shapes", A, bundled_files())
    # Bit for bit: the same bytes read by the same code in the same process.
    assert torch.equal(logits(*nanopali.load("google/tiny-shapes")), logits(*nanopali.load(BUNDLED)))


def test_a_download_shows_the_hubs_progress_and_loads_the_bundled_model(fake_hub, capfd):
    repos, fetched = fake_hub
    repos["google/tiny-shapes"] = {"refs": {"main": A}, A: bundled_files()}
    model, processor = nanopali.load("google/tiny-shapes")
    assert "Fetching 3 files" in capfd.readouterr().err
    assert torch.equal(logits(model, processor), logits(*nanopali.load(BUNDLED)))


@pytest.mark.parametrize("kind, wanted", [
    ("paligemma", {"config.json", "tokenizer.model", "model.safetensors"}),
    ("paligemma-config", {"config.json", "tokenizer.model"}),
    ("siglip", {"config.json", "tokenizer.model", "spiece.model", "tokenizer_config.json", "preprocessor_config.json",
                "model.safetensors"}),
    ("mobileclip", {"open_clip_config.json", "open_clip_model.safetensors", "model.safetensors", "merges.txt",
                    "mobileclip2_s0.pt"}),
    ("classify", {"config.json", "tokenizer.model", "spiece.model", "tokenizer_config.json", "preprocessor_config.json",
                  "model.safetensors", "open_clip_config.json", "open_clip_model.safetensors", "merges.txt",
                  "mobileclip2_s0.pt"}),
])
def test_only_the_files_a_loader_reads_are_requested_from_the_hub(fake_hub, kind, wanted):
    repos, fetched = fake_hub
    repos["o/every"] = {"refs": {"main": A}, A: {n: n.encode() for n in EVERY}}
    folder = hub.local_path("o/every", kind)
    assert sorted(fetched) == sorted(wanted) and set(os.listdir(folder)) == wanted


def test_revision_picks_the_snapshot_of_a_tag_or_of_a_commit(cache):
    put(cache, "o/n", A, {"config.json": b"{}", "tokenizer.model": b"a"})
    put(cache, "o/n", B, {"config.json": b"{}", "tokenizer.model": b"b"}, refs=("v2",))
    main, tag, commit = (hub.local_path("o/n", "paligemma-config", r) for r in (None, "v2", B))
    assert os.path.basename(main) == A and tag == commit and os.path.basename(tag) == B


def test_a_process_reads_one_commit_of_a_repository_even_when_its_branch_moves(fake_hub):
    """train.py reads config.json first and the weights minutes later: both come from the first commit."""
    repos, fetched = fake_hub
    repos["o/n"] = {"refs": {"main": A}, A: bundled_files()}
    args = train.parse_args(["--init", "o/n", "--data", "unused.jsonl"])
    cfg, _ = train.model_config(args)
    assert sorted(fetched) == ["config.json", "tokenizer.model"]  # no weights before the data is checked
    repos["o/n"].update({"refs": {"main": B}, B: {"config.json": b"not json"}})
    model = train.build_model(args, cfg, None, "cpu", materialize=True)
    assert cfg == read_paligemma_config(BUNDLED) and model.cfg == cfg and fetched[-1] == "model.safetensors"


def test_a_local_path_wins_over_a_hub_name_of_the_same_spelling(cache, tmp_path, monkeypatch):
    put(cache, "o/n", A, {"config.json": b"not json", "tokenizer.model": b"", "model.safetensors": b""})
    os.makedirs(tmp_path / "o")
    os.symlink(BUNDLED, tmp_path / "o" / "n")
    monkeypatch.chdir(tmp_path)
    assert torch.equal(logits(*nanopali.load("o/n")), logits(*nanopali.load(BUNDLED)))


def test_the_command_the_offline_error_prints_fetches_what_the_loader_needs(fake_hub, cache, monkeypatch):
    repos, _ = fake_hub
    repos["o/n"] = {"refs": {"main": A}, A: {**bundled_files(), **{n: b"" for n in JUNK}}}
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    e = _raises(CheckpointError, r"o/n: not in the hub cache .*HF_HUB_OFFLINE is set. Fetch the files once online "
                r"with `hf download o/n --include", nanopali.load, "o/n")
    command = shlex.split(str(e).split("`")[1])
    env = dict(os.environ, HF_ENDPOINT=constants.ENDPOINT, HF_HUB_CACHE=cache, HF_HUB_OFFLINE="0")
    run = subprocess.run([sys.executable, "-m", "huggingface_hub.cli.hf", *command[1:]], env=env, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert sorted(os.listdir(hub.local_path("o/n"))) == ["config.json", "model.safetensors", "tokenizer.model"]


def test_offline_a_snapshot_missing_a_file_names_it(cache):
    put(cache, "o/n", A, {n: b for n, b in bundled_files().items() if n != "tokenizer.model"})
    _raises(CheckpointError, r"o/n: tokenizer.model not in the snapshot .*snapshots/a{40}; HF_HUB_OFFLINE is set\. "
            r'.*hf download o/n --include "config.json" --include "tokenizer.model"', nanopali.load, "o/n")


@pytest.mark.parametrize("same_process", [True, False])
def test_offline_a_snapshot_the_hub_listed_but_left_incomplete_names_the_missing_weights(fake_hub, monkeypatch,
                                                                                          same_process):
    """A download of config.json alone (train.py's first step) leaves the hub's file list in the cache; in the
    same process the commit is pinned, and huggingface_hub fails on the file rather than on the snapshot."""
    repos, _ = fake_hub
    repos["o/n"] = {"refs": {"main": A}, A: bundled_files()}
    hub.local_path("o/n", "paligemma-config")
    if not same_process:
        monkeypatch.setattr(hub, "_PINNED", {})
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    _raises(CheckpointError, r"the cached snapshot .*snapshots/a{40} lacks model.safetensors or "
            r"model.safetensors.index.json; HF_HUB_OFFLINE is set", nanopali.load, "o/n")


@pytest.mark.parametrize("error, message", [
    ((403, "GatedRepo"), r"o/n is gated: accept its licence on https://huggingface.co/o/n .*`hf auth login`"),
    ((404, "RepoNotFound"), r"o/n: no such local path, and no such repository on the Hugging Face hub"),
    ((401, None), r"o/n: the hub answered .*401 Unauthorized.*; check the token that `hf auth login` saved"),
])
def test_a_refused_repository_says_why_and_what_to_do(fake_hub, error, message):
    repos, _ = fake_hub
    repos["o/n"] = {"error": error}
    _raises(CheckpointError, message, nanopali.load, "o/n")


def test_an_unknown_revision_is_named(fake_hub):
    repos, _ = fake_hub
    repos["o/n"] = {"refs": {"main": A}, A: bundled_files()}
    _raises(CheckpointError, r"o/n has no revision 'v9': give a branch, tag or commit hash", nanopali.load, "o/n",
            revision="v9")


def test_a_repository_without_the_loaders_files_is_named_with_what_nanopali_reads(fake_hub):
    repos, _ = fake_hub
    repos["o/n"] = {"refs": {"main": A}, A: {"config.json": b"{}", "pytorch_model.bin": b""}}
    _raises(CheckpointError, r"o/n: tokenizer.model, model.safetensors or model.safetensors.index.json not in the "
            r"snapshot .*: the repository holds no paligemma checkpoint", nanopali.load, "o/n")


def test_an_unreachable_hub_with_nothing_cached_says_so(fake_hub, monkeypatch):
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: connection refused
    _raises(CheckpointError, r"o/n: not in the hub cache .*; the hub could not be reached\. Fetch", nanopali.load,
            "o/n")


@pytest.mark.parametrize("name", ["google/pali--gemma", "google/-paligemma", "google/pali gemma", "google/x.git",
                                  "google/" + "x" * 97])
def test_a_malformed_hub_name_is_refused_before_any_lookup(cache, name):
    _raises(CheckpointError, r"no such local path, and not a hub name: owner/name", nanopali.load, name)


def test_without_huggingface_hub_a_hub_name_says_which_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import huggingface_hub raises ImportError
    _raises(CheckpointError, r'o/n is not a local path, and loading it by hub name needs huggingface_hub: pip install '
            r'"nanopali\[hub\]"', nanopali.load, "o/n")


def test_a_revision_for_a_local_path_is_refused(cache):
    _raises(CheckpointError, r"revision 'v2' is for hub names \(owner/name\); .*tiny-shapes is a local path",
            nanopali.load, BUNDLED, revision="v2")


@pytest.mark.parametrize("load, include", [
    (nanopali.load_siglip, r'--include "config.json" --include "spiece.model" .*--include "preprocessor_config.json"'),
    (nanopali.load_mobileclip, r'--include "open_clip_config.json" --include "\*.safetensors" --include "\*.pt"'),
])
def test_the_siglip_and_mobileclip_loaders_take_hub_names(cache, load, include):
    _raises(CheckpointError, rf"o/n at revision v2: not in the hub cache .*hf download o/n --revision v2 {include}",
            load, "o/n", revision="v2")


def test_sample_py_answers_from_a_hub_name_as_from_the_bundled_directory(cache, capsys):
    put(cache, "google/tiny-shapes", A, bundled_files())
    args = ["--image", IMAGE, "--prompt", "count shapes", "--dtype", "float32", "--json"]
    answers, threads = [], torch.get_num_threads()
    try:
        for ckpt in ("google/tiny-shapes", BUNDLED):
            assert sample.main(["--checkpoint", ckpt, *args]) == 0
            answers.append(json.loads(capsys.readouterr().out.splitlines()[-1])["tokens"])
    finally:
        torch.set_num_threads(threads)  # sample.py sets torch's threads for the process: the next test's again
    assert answers[0] == answers[1]


@pytest.mark.parametrize("script", ["sample.py", "classify.py"])
def test_the_scripts_exit_2_with_one_line_for_a_name_not_in_the_cache(cache, script):
    env = dict(os.environ, HF_HUB_CACHE=cache, HF_HUB_OFFLINE="1")
    labels = ["--labels", "a,b"] if script == "classify.py" else []
    run = subprocess.run([sys.executable, os.path.join(ROOT, script), "--checkpoint", "o/n", "--revision", "v2",
                          "--image", IMAGE, *labels], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr
    assert run.stderr.startswith("error: o/n at revision v2: not in the hub cache")
    assert ('"open_clip_config.json"' in run.stderr) == (script == "classify.py")
