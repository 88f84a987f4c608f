"""Files on disk: the safetensors format read by hand, atomic writes, dtype/device names, one error type.

safetensors is an 8-byte header length, a JSON table {name: {dtype, shape, data_offsets}} and the raw
bytes. nanopali reads it itself (the `safetensors` package still writes): every tensor is validated
against the file's size before anything is read. A tensor wanted on the CPU in the file's own dtype is
a view of the memory-mapped file (`mapped_tensor`: no copy, loading takes as long as reading the
header); any other is read with plain file reads straight into its destination, converting dtype in
64 MiB pieces, so a load never holds a second full copy nor maps pages it only converts.
"""
from __future__ import annotations

import json
import logging
import math
import os
import struct
import unicodedata

import torch


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is; the message names the file and the tensors."""


def printable(text: str) -> str:
    """`text` as an error may show it when it quotes a file's name or content: every control or format
    character escaped (`\\x1b`, `\\u202e`), so a crafted file cannot recolour, clear or retitle the
    terminal, or reorder what is shown, and the name shown still identifies the file. Newlines and tabs stay."""
    return "".join(c if c in "\n\t" or unicodedata.category(c)[0] != "C" else c.encode("unicode_escape").decode()
                   for c in text)


def weights_only_refusal(e: Exception) -> str:
    """What torch.load(weights_only=True) refused, as one printable line: its "WeightsUnpickler error"
    ("Unsupported global: GLOBAL PIL.Image.Image was not an allowed global by default"), not its first
    line, which is advice to load the file unsafely, styled with terminal colour codes."""
    lines = str(e).splitlines() or [type(e).__name__]
    why = next((x.split("WeightsUnpickler error:", 1)[1] for x in lines if "WeightsUnpickler error:" in x), lines[0])
    return printable(why.split(". ")[0].strip())


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def read_safetensors_header(path: str) -> tuple[dict, int]:
    """(tensor table, byte offset of the data) of a .safetensors file, validated against its size."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is truncated or not a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100_000_000):
            raise CheckpointError(f"{path} is truncated or not a safetensors file (header of {n} bytes)")
        try:
            table = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CheckpointError(f"{path} is corrupt: its safetensors header is not valid JSON") from None
    if not isinstance(table, dict):
        raise CheckpointError(f"{path} is corrupt: its safetensors header is not a JSON object")
    table.pop("__metadata__", None)
    for name, t in table.items():
        try:
            dtype, shape, (b, e) = t["dtype"], [int(d) for d in t["shape"]], t["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path} is corrupt: tensor {name} has no valid dtype/shape/data_offsets") from None
        if dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {dtype}")
        if not 0 <= b <= e or 8 + n + e > size:
            raise CheckpointError(f"{path} is truncated or corrupt: tensor {name} spans bytes {b}..{e} of the "
                                  f"data, but the file has {size - 8 - n}")
        if e - b != math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize:
            raise CheckpointError(f"{path} is corrupt: tensor {name} is {dtype}{shape} but spans {e - b} bytes")
    return table, 8 + n


_CHUNK_BYTES = 64 << 20


def read_tensor(f, info: dict, data_start: int, dtype: torch.dtype | None = None, device="cpu") -> torch.Tensor:
    """One tensor of a safetensors file, converted to dtype/device while it is read.

    The file is read in 64 MiB pieces straight into the destination, so loading never holds a second
    full-size copy of a tensor (the fp32 embedding of a 3B model is 2.1 GB; in bf16 it becomes 1.05)."""
    src = SAFETENSORS_DTYPES[info["dtype"]]
    out = torch.empty(info["shape"], dtype=dtype or src, device=device)
    f.seek(data_start + info["data_offsets"][0])
    if out.dtype == src and out.device.type == "cpu":
        f.readinto(out.view(-1).view(torch.uint8).numpy())
        return out
    flat, size = out.view(-1), src.itemsize
    step = max(1, _CHUNK_BYTES // size)
    for i in range(0, flat.numel(), step):
        m = min(step, flat.numel() - i)
        buf = torch.empty(m * size, dtype=torch.uint8)
        f.readinto(buf.numpy())
        flat[i:i + m].copy_(buf.view(src))
    return out


def mapped_tensor(mapped, info: dict, data_start: int) -> torch.Tensor:
    """One tensor of a memory-mapped safetensors file as a view of the mapping: nothing is read or
    copied until it is used, the pages are the file's (shared with the page cache, never swapped
    out, only dropped), and a write touches a private copy of its page (the mapping is copy-on-write,
    so the file on disk never changes). How transformers and safetensors load too."""
    b, e = info["data_offsets"]
    src = SAFETENSORS_DTYPES[info["dtype"]]
    return torch.frombuffer(mapped, dtype=src, count=(e - b) // src.itemsize,
                            offset=data_start + b).view(info["shape"])


def weight_files(ckpt_dir: str) -> list[str]:
    """The safetensors files of a checkpoint directory, from the shard index when there is one."""
    index = os.path.join(ckpt_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                names = sorted(set(json.load(f)["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise CheckpointError(f"{index} is not a valid shard index ({e})") from None
        missing = [n for n in names if not os.path.isfile(os.path.join(ckpt_dir, n))]
        if missing:
            raise CheckpointError(f"{index} names shard(s) that are not in {ckpt_dir}: {', '.join(missing)}")
        return [os.path.join(ckpt_dir, n) for n in names]
    single = os.path.join(ckpt_dir, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    if any(n.endswith((".bin", ".pt", ".pth")) for n in os.listdir(ckpt_dir)):
        raise CheckpointError(f"{ckpt_dir} holds only pickle weights (.bin/.pt); nanopali loads safetensors only")
    raise CheckpointError(f"No model.safetensors or model.safetensors.index.json in {ckpt_dir}")


def file_mode() -> int:
    """The mode a plain new file gets under this process's umask (0644 under the usual 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str, write) -> None:
    """write(tmp_path), fsync, then os.replace: a crash leaves the old file or the new, never half.
    The file gets the mode of a plain new file (safetensors' writer would leave it 0600)."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


_LOGGED: set[str] = set()


def resolve_dtype(dtype, device=None) -> torch.dtype:
    """A torch dtype from a dtype or its name; "auto": bf16 on CUDA, and on a CPU where torch multiplies
    bf16 natively (`cpu.machine.native_bf16`: AVX-512 BF16 or AMX, not capped by ONEDNN_MAX_CPU_ISA /
    ATEN_CPU_CAPABILITY), else fp32 (emulated bf16 is slower than fp32). The choice is logged."""
    if isinstance(dtype, str) and dtype.lower() == "auto":
        from ..cpu.machine import native_bf16

        dev = resolve_device(device)
        native = dev.type == "cuda" or native_bf16()
        chosen = torch.bfloat16 if native else torch.float32
        why = "" if dev.type == "cuda" else (" (torch multiplies bf16 natively on this CPU)" if native else
                                             " (no native bf16 for torch on this CPU: AVX-512 BF16 or AMX absent "
                                             "or capped, and emulated bf16 is slower than fp32)")
        msg = f"dtype='auto' on {dev.type}: {str(chosen).removeprefix('torch.')}{why}"
        if msg not in _LOGGED:
            _LOGGED.add(msg)
            logging.getLogger("nanopali").info(msg)
        return chosen
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ValueError(f"Unsupported dtype {dtype!r}; use float32, bfloat16, float16 or 'auto'")


def resolve_device(device) -> torch.device:
    try:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu") if device in (None, "auto") \
            else torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"Unknown device {device!r}; use 'cpu', 'cuda', 'cuda:N' or 'auto'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"Device {device!r} requested but this PyTorch sees no CUDA GPU")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"Unsupported device {device!r}; use 'cpu' or 'cuda'")
    return dev
