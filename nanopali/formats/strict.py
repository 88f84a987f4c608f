"""The one strict loader: every checkpoint format fills a model through `load_strict`.

A format describes its file as `Source`s: a tensor's name in the file, its shape, and how to read it
as a given dtype on a given device. `load_strict` then, for every source,
    renames it to a parameter of the model (the format's own table),
    checks it: known to the model, not seen twice, the parameter's shape,
    reads it straight into a new tensor of the requested dtype and makes that tensor the parameter
    (the model was built on the meta device, so nothing is allocated twice),
and raises one `CheckpointError` that names every missing, unexpected and mis-shaped tensor.
Hugging Face PaliGemma and SigLIP directories and the VQ-VAE `.npz` go through it whole; a big_vision
PaliGemma `.npz` is checked array by array against its config first (its arrays are stacked over
layers, see bigvision.py) and then uses `assign` and `mismatch_error` from here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn as nn

from .files import CheckpointError

SKIP = "<skip>"  # what a rename returns for a tensor that is knowingly not loaded (another part of the file)


@dataclass
class Source:
    key: str                                                    # the name in the file
    shape: tuple[int, ...]
    read: Callable[[torch.dtype, torch.device], torch.Tensor]   # (dtype, device) → the tensor


def assign(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Make `value` the parameter `name` (no copy), keeping its requires_grad."""
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name)
    old = mod._parameters[attr]
    if tuple(old.shape) != tuple(value.shape):  # a format's table is wrong, not the file (shapes were checked)
        raise RuntimeError(f"nanopali bug: {name} is {list(old.shape)}; the loader gave {list(value.shape)}")
    mod._parameters[attr] = nn.Parameter(value, requires_grad=old.requires_grad)


def mismatch_error(where: str, missing: list[str], unexpected: list[str], misshaped: list[str],
                   noun: str = "tensor", hint: str = "") -> CheckpointError | None:
    """The one error naming everything wrong, or None when nothing is."""
    parts = [f"{what} {len(items)} {noun}(s): " + ", ".join(items)
             for what, items in (("Missing", missing), ("Unexpected", unexpected), ("Mis-shaped", misshaped)) if items]
    return CheckpointError(f"{where}:\n" + "\n".join(parts) + hint) if parts else None


def load_strict(model: nn.Module, sources: Iterable[Source], rename: Callable[[str], str | None], *,
                dtype: torch.dtype, device, where: str, only: str = "",
                adapt: dict[str, Callable] | None = None, file_name: Callable[[str], str] = str,
                unexpected: list[str] | None = None, noun: str = "tensor") -> None:
    """Fill the parameters of `model` (those whose name starts with `only`) from `sources`, strictly.

    rename(key) → parameter name; None: the model has no such tensor (unexpected); SKIP: not loaded.
    With `only`, a source landing outside that part is skipped (a PaliGemma takes just the image tower
    of a SigLIP checkpoint). adapt: {parameter: f(source, shape, dtype, device) → tensor} for a tensor
    that may be converted rather than refused when its shape differs (a position table resampled to
    another resolution). file_name: parameter → the name to report it by when missing.
    `unexpected`: items the format already found unexpected (e.g. members that are not arrays)."""
    params = {n: p for n, p in model.named_parameters() if n.startswith(only)}
    adapt = adapt or {}
    seen, unexpected, misshaped = set(), list(unexpected or []), []
    for src in sources:
        name = rename(src.key)
        if name == SKIP or (only and name is not None and not name.startswith(only)):
            continue
        if name not in params:
            unexpected.append(src.key)
        elif name in seen:
            unexpected.append(f"{src.key} (duplicate)")
        elif tuple(src.shape) != tuple(params[name].shape):
            if name not in adapt:
                misshaped.append(f"{src.key}: expected {list(params[name].shape)}, found {list(src.shape)}")
                continue
            assign(model, name, adapt[name](src, tuple(params[name].shape), dtype, device))
            seen.add(name)
        else:
            assign(model, name, src.read(dtype, device))
            seen.add(name)
    missing = [file_name(n) for n in params if n not in seen]
    error = mismatch_error(where, missing, unexpected, misshaped, noun)
    if error is not None:
        raise error


def safetensors_sources(files: list[str]) -> Iterable[Source]:
    """Every tensor of these safetensors files as a Source (headers validated first, files.py);
    each read opens the file, seeks and reads that tensor alone, so a Source may be read later."""
    from .files import read_safetensors_header, read_tensor

    def reader(path, info, start):
        def read(dtype, device):
            with open(path, "rb") as f:
                return read_tensor(f, info, start, dtype, device)
        return read

    for path in files:
        table, start = read_safetensors_header(path)
        for key, info in table.items():
            yield Source(key, tuple(info["shape"]), reader(path, info, start))
