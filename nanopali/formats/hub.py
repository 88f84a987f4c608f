"""Hugging Face hub names (`google/paligemma2-3b-pt-224`) → a local checkpoint directory.

Where a loader takes a checkpoint path it also takes a hub model id: `local_path` fetches the files that
loader reads, and no others, with `huggingface_hub.snapshot_download` (the optional `hub` extra) and
returns the snapshot directory. The cache (HF_HOME / HF_HUB_CACHE), offline use (HF_HUB_OFFLINE=1 reads
the cache alone), logins and progress bars are huggingface_hub's own. A local path always wins over a
name, and one process reads one commit of a repository (`_PINNED`). See docs/checkpoints.md#by-hub-name.
"""
from __future__ import annotations

import glob
import json
import os
import re

from .files import CheckpointError

# kind → (the patterns fetched, the files the loader cannot do without: each a tuple of alternatives).
# Weights are safetensors only: never .bin / .gguf / .msgpack. MobileCLIP also takes Apple's .pt files
# (torch.load with weights_only=True: no code runs), which are the only weights Apple's repositories hold.
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
_PALIGEMMA = ["config.json", "tokenizer.model", "model*.safetensors", "model.safetensors.index.json"]
_SIGLIP = ["config.json", "spiece.model", "tokenizer.model", "tokenizer_config.json", "preprocessor_config.json",
           "processor_config.json", "model*.safetensors", "model.safetensors.index.json"]
_MOBILECLIP = ["open_clip_config.json", "*.safetensors", "*.pt", "bpe_simple_vocab_16e6.txt.gz", "merges.txt"]
KINDS = {
    "paligemma": (_PALIGEMMA, [("config.json",), ("tokenizer.model",), _WEIGHTS]),
    "paligemma-config": (_PALIGEMMA[:2], [("config.json",), ("tokenizer.model",)]),  # train.py, before weights
    "siglip": (_SIGLIP, [("config.json",), ("spiece.model", "tokenizer.model"), _WEIGHTS]),
    "mobileclip": (_MOBILECLIP, [("*.safetensors", "*.pt")]),
    "classify": (_SIGLIP + _MOBILECLIP, [("config.json", "open_clip_config.json"), ("*.safetensors", "*.pt")]),
}
# huggingface_hub's validate_repo_id: owner/name, each 1-96 of letters, digits, '_', '-', '.', starting and
# ending with a letter, digit or '_'; no '--' or '..'; not ending in .git.
_PART = r"(?=[\w.-]{1,96}(?:/|$))\w(?:[\w.-]*\w)?"
_REPO_ID = re.compile(rf"(?!.*(?:--|\.\.))(?!.*\.git$){_PART}/{_PART}")
_FILE_ENDINGS = (".json", ".npz", ".safetensors", ".pt", ".bin")  # a missing file, not a repository
_PINNED: dict[tuple, str] = {}  # (cache, repo, revision asked) → the commit first resolved in this process


def hub_name(path) -> str | None:
    """`path` as a hub name to resolve, or None when it is a local path: one that exists, or one shaped
    as a path (absolute, relative with ./ ~ or two levels, a file name, under an existing directory)."""
    s = os.fspath(path)
    if (os.path.exists(s) or s.count("/") != 1 or s.startswith((".", "~", "/")) or s.endswith(_FILE_ENDINGS)
            or (os.sep != "/" and os.sep in s) or os.path.isdir(s.split("/")[0])):
        return None
    return s


def local_path(path, kind: str = "paligemma", revision: str | None = None):
    """`path` itself when it is a local path; else the snapshot directory (in the hub cache) of the
    repository it names, at `revision` (a branch, tag or commit; default main), holding `kind`'s files."""
    repo = hub_name(path)
    if repo is None:
        if revision is not None:
            raise CheckpointError(f"revision {revision!r} is for hub names (owner/name); {path} is a local path")
        return path
    if not _REPO_ID.fullmatch(repo):
        raise CheckpointError(f"{repo}: no such local path, and not a hub name: owner/name, each of letters, digits, "
                              "'-', '_', '.' (at most 96; no '--' or '..'), e.g. google/paligemma2-3b-pt-224")
    try:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                            RepositoryNotFoundError, RevisionNotFoundError)
    except ImportError:
        raise CheckpointError(f"{repo} is not a local path, and loading it by hub name needs huggingface_hub: "
                              'pip install "nanopali[hub]" (or pip install huggingface_hub)') from None
    patterns, needed = KINDS[kind]
    at = f" at revision {revision}" if revision else ""
    key = (constants.HF_HUB_CACHE, repo, revision)
    rev = _PINNED.get(key, revision)  # the commit this process read before, if it did
    try:
        folder = snapshot_download(repo, revision=rev, allow_patterns=patterns, library_name="nanopali")
    except GatedRepoError:  # a RepositoryNotFoundError: it goes first
        raise CheckpointError(f"{repo} is gated: accept its licence on https://huggingface.co/{repo} (signed in), "
                              "then log in here with `hf auth login` (or set HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"{repo}: no such local path, and no such repository on the Hugging Face hub (or it is "
                              "private: `hf auth login`)") from None
    except RevisionNotFoundError:
        raise CheckpointError(f"{repo} has no revision {revision!r}: give a branch, tag or commit hash") from None
    except LocalEntryNotFoundError:  # the hub unreachable or offline, and the cache lacks (some of) the files
        folder = _snapshot(constants.HF_HUB_CACHE, repo, rev)
        what = (f"the cached snapshot {folder} lacks {', '.join(_missing(folder, needed)) or 'some of its files'}"
                if folder else f"not in the hub cache {constants.HF_HUB_CACHE} (and no local path of that name)")
        raise CheckpointError(_fetch(repo, revision, patterns, f"{at}: {what}", constants.HF_HUB_OFFLINE)) from None
    except HfHubHTTPError as e:  # refused otherwise: a 401 for a token the hub does not accept
        raise CheckpointError(f"{repo}{at}: the hub answered {str(e).splitlines()[0]}; check the token that "
                              "`hf auth login` saved, or HF_TOKEN") from None
    if missing := _missing(folder, needed):
        what = f"{at}: {', '.join(missing)} not in the snapshot {folder}"
        if constants.HF_HUB_OFFLINE:  # offline, snapshot_download returns what the cache holds
            raise CheckpointError(_fetch(repo, revision, patterns, what, True))
        raise CheckpointError(f"{repo}{what}: the repository holds no {kind} checkpoint in the layout nanopali "
                              f"reads ({', '.join(patterns)}), or the hub was unreachable and the cache holds part")
    _PINNED[key] = os.path.basename(folder)
    return folder


def _snapshot(cache: str, repo: str, revision: str | None) -> str | None:
    """The cached snapshot directory of `revision` (a commit, or a branch or tag in refs/), if there is one."""
    root = os.path.join(cache, "models--" + repo.replace("/", "--"))  # huggingface_hub's repo_folder_name
    ref = os.path.join(root, "refs", revision or "main")
    commit = open(ref).read().strip() if os.path.isfile(ref) else revision
    folder = os.path.join(root, "snapshots", commit) if commit else None
    return folder if folder and os.path.isdir(folder) else None


def _missing(folder: str, needed) -> list[str]:
    """The needed files (a shard index's shards too) absent from `folder`, named as alternatives."""
    missing = [" or ".join(alt) for alt in needed if not any(glob.glob(os.path.join(folder, f)) for f in alt)]
    try:
        with open(os.path.join(folder, "model.safetensors.index.json")) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # absent, or broken: the loader says so
        shards = []
    return missing + [s for s in shards if not os.path.isfile(os.path.join(folder, s))]


def _fetch(repo: str, revision: str | None, patterns: list[str], what: str, offline: bool) -> str:
    """The message for files the cache lacks: which, why, and the one command that fetches them (the `hf`
    CLI takes one pattern per --include: `--include a b` would read b as a file name)."""
    rev = f" --revision {revision}" if revision else ""
    include = " ".join(f'--include "{p}"' for p in patterns)
    why = "HF_HUB_OFFLINE is set" if offline else "the hub could not be reached"
    return f"{repo}{what}; {why}. Fetch the files once online with `hf download {repo}{rev} {include}`"


__all__ = ["local_path", "hub_name", "KINDS"]
