"""Weight-only int8 / int4 quantization: the math, in plain PyTorch (the reference every kernel is
tested against).

Not part of the PaliGemma papers: an inference option that shrinks the weights read at every decode
step (the decoder's Linears and the 257,216 x 2304 tied LM head) by 2x (int8) or ~4x (int4).
Activations stay in the model dtype; only weights are stored as integers.
  int8: per output row, symmetric, w ≈ q·s, q ∈ [-127, 127] (gpt-fast `WeightOnlyInt8QuantHandler`).
  int4: per group of G input columns, asymmetric, w ≈ (q - 8)·s + z, q ∈ [0, 15] (gpt-fast
        `WeightOnlyInt4QuantHandler`, torch's `_group_quantize_tensor` test helper): the convention
        torch's int4 kernels read, so the stored s and z go to them unchanged.
modules.py holds the layers that use it: torch's packed kernels for decoding, these for everything else.
"""
from __future__ import annotations

import torch

# Letters: N output features (rows of W), K input features, G int4 group size.

INT4_GROUP_SIZES = (32, 64, 128, 256)  # what torch's int4 kernels accept (tinygemm's tile sizes)

SCHEMES = ("int8", "int4")
# int4 groups: a bf16 scale and zero cost 4 bytes a group, +25% over the 0.5-byte nibbles at 32, +12.5% at 64,
# +6% at 128 (gpt-fast's and torchao's default); kernel speed barely depends on it. On the tiny model's 200
# held-out scenes 32, 64 and 128 all stay within 0.01 of fp32 on every metric; 64 is the middle ground
# until a full-size model is measured.
DEFAULT_GROUP_SIZE = 64


# ---- the math (plain PyTorch: the reference every kernel is tested against) ----

def quantize_int8(w: torch.Tensor, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) → q int8 (N, K), s (N,) in `dtype` (default w's). -128 is left unused so that the grid is
    symmetric about 0 (q and -q both exist). q is rounded against s as stored, so the error bound
    |w - q·s| ≤ s/2 holds for the s the kernels will read."""
    dtype = dtype or w.dtype
    w = w.float()
    s = (w.abs().amax(1) / 127).clamp(min=1e-12).to(dtype)                     # (N,)
    q = (w / s.float()[:, None]).round().clamp(-127, 127).to(torch.int8)        # (N, K)
    return q, s


def dequantize_int8(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return q.to(dtype) * s.to(dtype)[:, None]                                   # (N, K)


def quantize_int4(w: torch.Tensor, group_size: int, dtype: torch.dtype | None = None):
    """w (N, K) → (nibbles uint8 (N, K/2), s (N, K/G), z (N, K/G)), s and z in `dtype` (default w's).

    Per group: s = (max - min) / 15, z = min + 8·s, q = round((w - (z - 8·s)) / s) ∈ [0, 15] with s, z as
    stored, so that w ≈ (q - 8)·s + z within s/2. Two q per byte, even column in the high nibble: the
    portable layout that torch's CUDA packer `_convert_weight_to_int4pack` takes as input."""
    N, K = w.shape
    check_int4_shape(K, group_size)
    dtype = dtype or w.dtype
    # One float32 copy, then in place (min and max in one pass): 17 against 27 ms for 4 M bf16 weights on
    # a core of an AMD EPYC, the same bits; a load that quantizes spends most of its time here.
    g = w.to(torch.float32, copy=True).reshape(N, K // group_size, group_size)  # (N, K/G, G)
    lo, hi = torch.aminmax(g, dim=-1)
    s = ((hi - lo) / 15).clamp(min=1e-6).to(dtype)                             # (N, K/G)
    z = (lo + 8 * s.float()).to(dtype)
    sf = s.float()
    q = g.sub_((z.float() - 8 * sf)[..., None]).div_(sf[..., None]).round_().clamp_(0, 15)
    return pack_nibbles(q.reshape(N, K).to(torch.uint8)), s, z


def dequantize_int4(nibbles: torch.Tensor, s: torch.Tensor, z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(N, K/2) nibbles, s and z (N, K/G) → w (N, K) = (q - 8)·s + z, in `dtype`."""
    N, groups = s.shape
    q8 = byte_lookup(nibbles, byte_table(dtype, nibbles.device))                 # (N, K/2, 2): q - 8 per nibble
    return scale_groups(q8.view(N, groups, -1), s, z).view(N, -1)                     # (N, K)


def dequantize_int4_into(nibbles: torch.Tensor, s: torch.Tensor, z: torch.Tensor, out: torch.Tensor,
                         scratch) -> torch.Tensor:
    """`dequantize_int4` written into `out` (N, K), bit for bit, without a table: the nibbles split by shift
    and mask into a reused buffer (scratch(name, shape, dtype)), made signed by wrapping (q + 248 mod 256
    is q - 8 as an int8), converted, scaled and shifted in place. The prefill path's form; the table
    lookup stays the reference (and reads single rows, for the embedding)."""
    N, groups = s.shape
    q = scratch("nibbles", (N, nibbles.shape[1], 2), torch.uint8)               # (N, K/2, 2): even, odd column
    torch.bitwise_right_shift(nibbles, 4, out=q[..., 0])
    torch.bitwise_and(nibbles, 15, out=q[..., 1])
    return scale_nibbles_into(q.view(N, -1), s, z, out)


def scale_nibbles_into(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Nibbles q in [0, 15] (N, K) uint8, in row order (overwritten) → (q - 8)·s + z written into `out`
    (N, K), s and z (N, K/G): q + 248 mod 256 is q - 8 as an int8, then convert, scale, shift in place."""
    q.add_(248)
    out.copy_(q.view(torch.int8))
    out.view(s.shape[0], s.shape[1], -1).mul_(s[..., None].to(out.dtype)).add_(z[..., None].to(out.dtype))
    return out


def byte_lookup(byte: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """table (256, 2) rows for each byte: (..., 2). index_select on the flat bytes, the fastest of the
    gathers measured (1.8 ms for 2 M bytes; F.embedding 2.9, advanced indexing slower still)."""
    return table.index_select(0, byte.reshape(-1).int()).view(*byte.shape, 2)


def scale_groups(q8: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """(q - 8) (N, K/G, G) → (q - 8)·s + z per group. A multiply then an add: 1.0 ms for 4 M bf16
    weights where addcmul, broadcasting s and z, took 3.0."""
    return q8 * s.to(q8.dtype)[..., None] + z.to(q8.dtype)[..., None]


_TABLES: dict = {}


def byte_table(dtype: torch.dtype, device, high_first: bool = True) -> torch.Tensor:
    """(256, 2): a byte's two nibbles minus 8, as `dtype` (high nibble first, or low first). Unpacking by
    one table lookup per byte, then scaling, is 5x faster than shifting, masking and converting in
    separate passes (2.9 vs 14.7 ms for 4 M weights to bf16, this project's 2-core CPU)."""
    key = (dtype, torch.device(device), high_first)
    if key not in _TABLES:
        b = torch.arange(256, device=device)
        pair = (b >> 4, b & 15) if high_first else (b & 15, b >> 4)
        _TABLES[key] = (torch.stack(pair, -1) - 8).to(dtype)
    return _TABLES[key]


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    return (q[:, 0::2] << 4 | q[:, 1::2]).to(torch.uint8)                     # (N, K/2)


def unpack_nibbles(p: torch.Tensor) -> torch.Tensor:
    return torch.stack((p >> 4, p & 15), -1).view(p.shape[0], -1)             # (N, K) uint8 in [0, 15]


def check_group_size(group_size) -> int:
    """An int4 group size the kernels take. A float or a bool equal to one is refused too: 64.0 would
    pass `in INT4_GROUP_SIZES` and fail later in a reshape, True is 1."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group_size must be one of {INT4_GROUP_SIZES}, an int (the tile sizes of torch's "
                         f"int4 kernels); got {group_size!r}")
    return group_size


def check_scheme(scheme: str, group_size: int | None) -> int | None:
    """Validated group size (None for int8). A group size given with int8 is refused, not ignored: the
    caller asked for something int8 does not do; so is one given with no scheme (nanopali.load's
    quantize=None). The one check of these arguments: load, quantize_model and quantize_weight call it."""
    if scheme is None and group_size is not None:
        raise ValueError(f"group_size={group_size!r} goes with quantize='int4'")
    if not isinstance(scheme, str) or scheme not in SCHEMES:
        raise ValueError(f"Unknown quantization scheme {scheme!r}; known: {', '.join(map(repr, SCHEMES))}")
    if scheme == "int8":
        if group_size is not None:
            raise ValueError(f"group_size={group_size!r} is for int4: int8 has one scale per output row, no "
                             "groups; drop group_size or use quantize='int4'")
        return None
    return check_group_size(DEFAULT_GROUP_SIZE if group_size is None else group_size)


def check_int4_shape(K: int, group_size: int) -> None:
    check_group_size(group_size)
    if K % group_size:
        raise ValueError(f"int4 groups of {group_size} do not divide the input width {K}")


QUANTIZE_CHUNK = 1 << 22  # weights quantized at a time: float32 temporaries stay ~100 MB, not 7 GB


def quantize_weight(w: torch.Tensor, scheme: str, group_size: int | None = None,
                    dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """One float weight (N, K) → the buffers a quantized module holds: {"qweight", "scale"[, "zero"]}.

    Rows are quantized a few million weights at a time (both schemes work row by row, so this is
    exact): the 257,216 x 2304 embedding would otherwise need several float32 copies of itself at once.
    A loader calls this tensor by tensor, never holding the full-precision model."""
    group_size = check_scheme(scheme, group_size)
    names = ("qweight", "scale") if scheme == "int8" else ("qweight", "scale", "zero")
    if w.is_meta:   # a skeleton to be filled (a loader, the memory estimate): shapes only, no arithmetic
        return dict(zip(names, meta_buffers(w.shape, scheme, group_size, dtype or w.dtype)))
    step = max(1, QUANTIZE_CHUNK // w.shape[1])
    out = None
    for n in range(0, w.shape[0], step):
        part = quantize_int8(w[n:n + step], dtype) if scheme == "int8" else quantize_int4(w[n:n + step], group_size,
                                                                                           dtype)
        if out is None:   # filled in place: no second copy of the quantized weight either
            out = [t.new_empty(w.shape[0], *t.shape[1:]) for t in part]
        for o, t in zip(out, part):
            o[n:n + step] = t
    return dict(zip(names, out))


def meta_buffers(shape, scheme: str, group_size: int | None, dtype: torch.dtype) -> list[torch.Tensor]:
    """quantize_weight's buffers for a (N, K) weight, on the meta device: what it would return, unfilled."""
    N, K = shape
    if scheme == "int8":
        return [torch.empty(N, K, dtype=torch.int8, device="meta"), torch.empty(N, dtype=dtype, device="meta")]
    check_int4_shape(K, group_size)
    return [torch.empty(N, K // 2, dtype=torch.uint8, device="meta"),
            *(torch.empty(N, K // group_size, dtype=dtype, device="meta") for _ in range(2))]
