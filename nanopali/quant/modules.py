"""QuantizedLinear and QuantizedEmbedding: drop-in layers holding int8 / int4 weights, and torch's kernels.

Each layer has the reference path (weight_only.py: dequantize, then a dense matmul), used for many rows
(prefill), and a fast path through torch's own packed kernels for few rows (decoding); a kernel this
torch build or device lacks falls back to the reference with one log line. An input that needs a
gradient (LoRA on a frozen quantized base: train/qlora.py) goes through `_FrozenMatmul`, which
dequantizes again in backward instead of keeping a float weight.
"""
from __future__ import annotations

import logging
import math
import threading

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cpu_int4 import BLOCK, CpuInt4, pack
from .weight_only import dequantize_int4, dequantize_int4_into, dequantize_int8, quantize_weight, scale_groups

# Letters: N output features (rows of W), K input features, G int4 group size, M activation rows;
# for the embedding E (V, D): V vocab = N, D width = K.

log = logging.getLogger("nanopali")

# Rows up to which x · Wᵀ goes through the packed kernel (decoding); past them, dequantize + dense GEMM
# (prefill). The kernels are GEMV-class: their cost grows ~linearly in rows (~90 GFLOP/s past 16 rows),
# while the dense path pays one dequantization (DENSE_CHUNK at a time) and then runs at bf16 GEMM speed.
# Measured, torch 2.13, 2-core AVX-512/AMX CPU, bf16 activations, a 2304x9216 layer (out x in), ms,
# int4 as a load leaves it (only the CPU-packed copy); 9216x2304 agrees within ~20 %:
#   rows              1     4    16    32    48    64    96   128   256
#   bf16 F.linear   1.7   1.2   1.4   1.6    -    2.4    -    3.2   5.3
#   int8 kernel     0.56  0.97  3.7   7.0  10.7  13.9  20.8  27.8  59.6
#   int8 dense      6.7   6.6   6.2   7.0   7.6   8.1   9.0   9.5  13.9
#   int4 kernel     0.52  1.16  3.7   7.5  10.9  14.8  22.3  29.7  61.9
#   int4 dense       -     -   28.6  29.9  31.6  32.0  32.6  34.0    -
# int8 crosses over at ~28 rows, int4 (slower to dequantize from the packed layout) at ~110. Other CPUs
# cross elsewhere, so these are only the defaults: nanopali.load measures the crossover on the CPU it
# runs on and sets each layer's `kernel_rows` (cpu/products.py, `use_measured_kernel_rows`).
DECODE_MAX_ROWS = {"int8": 24, "int4": 112}

# The dense path dequantizes at most this many weights at a time: the 257,216-row LM head never needs a
# full float copy (0.6 G weights = 1.2 GB in bf16), and an 8 MB bf16 chunk is reused by the allocator
# where a fresh 40 MB one costs page faults (int8 dense, 64 rows: 11 ms with 2^22, 35 ms with 2^24).
DENSE_CHUNK = 1 << 22

_SCRATCH = threading.local()


def _scratch(name: str, shape, dtype: torch.dtype, device) -> torch.Tensor:
    """A buffer of `shape` reused by every layer's dense path in this thread: a dequantized chunk is
    consumed by its product before the next one is written, so one buffer serves them all, and a reused
    buffer costs no page faults where a fresh 8 MB one does (4.7 ms per chunk, measured). Per thread, so
    two threads running the model do not share one. Held: ~DENSE_CHUNK weights in the model dtype."""
    bufs = _SCRATCH.__dict__.setdefault("bufs", {})
    key, numel = (name, dtype, torch.device(device)), math.prod(shape)
    if key not in bufs or bufs[key].numel() < numel:
        with torch.inference_mode(False):   # a normal tensor: writable inside and outside inference mode
            bufs[key] = torch.empty(numel, dtype=dtype, device=device)
    return bufs[key][:numel].view(shape)


def _scratch_on(device):
    """scratch(name, shape, dtype) on `device`: what cpu_int4 unpacks into."""
    return lambda name, shape, dtype: _scratch(name, shape, dtype, device)


# ---- torch's kernels, with one fallback ----

_MISSING: set = set()


def _try_kernel(name: str, x: torch.Tensor, fn):
    """fn() through a torch kernel, or None (→ the reference path) where this build/device lacks it.
    Logged once per (kernel, device type, dtype); any later call goes straight to the reference."""
    key = (name, x.device.type, x.dtype)
    if key in _MISSING:
        return None
    try:
        return fn()
    except (RuntimeError, NotImplementedError, AttributeError) as e:
        _MISSING.add(key)
        log.info("nanopali.quant: no %s for %s %s in torch %s (%s); dequantizing instead",
                 name, x.device.type, x.dtype, torch.__version__, str(e).splitlines()[0][:120])
        return None


def _sz_table(s: torch.Tensor, z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The int4 kernels' (K/G, N, 2) table of [scale, zero], in the activations' dtype."""
    return torch.stack((s, z), -1).transpose(0, 1).contiguous().to(dtype)


def _int4_pack(nibbles: torch.Tensor, s: torch.Tensor, z: torch.Tensor, dtype: torch.dtype):
    """The kernel's packed weight and its table of [scale, zero], for this device."""
    K = nibbles.shape[1] * 2
    sz = _sz_table(s, z, dtype)                                                 # (K/G, N, 2)
    if nibbles.device.type == "cpu":   # the CPU packer's layout is ISA-specific: cpu_int4.py
        packed = pack(nibbles)
    else:                              # tinygemm tiles: inner K tiles of 16, as many as divide K
        tiles = next(t for t in (8, 4, 2) if K % (16 * t) == 0)
        packed = torch.ops.aten._convert_weight_to_int4pack(nibbles.contiguous(), tiles)
    return packed, sz


class QuantizedWeight(nn.Module):
    """What QuantizedLinear and QuantizedEmbedding share: a weight (N, K) held as buffers
    qweight + scale (+ zero for int4), its dequantization, and x · Wᵀ by the fast or the dense path.

    The buffers are the portable form a checkpoint stores. int8's kernel reads qweight as it is: 1 byte a
    weight. int4's kernel needs its own packed copy. On a CPU whose packed layout is known (cpu_int4.py)
    that copy is the only one: `_settle` swaps it in for the nibbles when the layer gets its weights (built,
    loaded, moved or cast; never on first use), so an int4 layer holds ~0.5 byte a weight. Elsewhere the
    packed copy is built on first use beside the nibbles: ~1 byte. The three state-dict hooks below are the
    only places that see the swap: a save writes the nibbles back, a load or a move starts from them."""

    def _init_buffers(self, scheme: str, group_size: int | None, buffers: dict) -> None:
        self.scheme, self.group_size = scheme, group_size
        self.kernel_rows = DECODE_MAX_ROWS[scheme]   # measured on this CPU at load: cpu/products.py
        N, k = buffers["qweight"].shape
        self.out_features, self.in_features = N, k * 2 if scheme == "int4" else k   # int4: two per byte
        for name, t in buffers.items():
            self.register_buffer(name, t)
        self.cpu_int4: CpuInt4 | None = None   # int4 on a CPU: the kernel's copy, held instead of qweight
        self._packed = {}   # (device, dtype) → the int4 kernel's (packed weight, [scale, zero] table)
        self._settle()

    @property
    def dtype(self) -> torch.dtype:
        """The float dtype the weight dequantizes to (the model's)."""
        return self.scale.dtype

    def dequantize(self, rows: slice | torch.Tensor = slice(None), dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float weight (or some of its rows): (N, K) in the model dtype."""
        dtype = dtype or self.dtype
        if self.scheme == "int8":
            return dequantize_int8(self.qweight[rows], self.scale[rows], dtype)
        if self.cpu_int4 is not None:
            s, z = self.scale[rows], self.zero[rows]
            q8 = self.cpu_int4.values(rows, dtype)                              # (n, K)
            return scale_groups(q8.view(s.shape[0], s.shape[1], -1), s, z).view(s.shape[0], -1)
        return dequantize_int4(self.qweight[rows], self.scale[rows], self.zero[rows], dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized (N, K) weight, for code written against nn.Linear / nn.Embedding. It
        materialises the whole float matrix; the forward paths never call it."""
        return self.dequantize()

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., K) → x · Wᵀ (..., N), in x's dtype (under autocast, in autocast's dtype when x needs a
        gradient, as nn.Linear would be)."""
        x2 = x.reshape(-1, x.shape[-1])                                         # (M, K)
        if x2.requires_grad and torch.is_grad_enabled():
            return self._frozen_matmul(x2).view(*x.shape[:-1], -1)
        y = self._fast(x2) if x2.shape[0] <= self.kernel_rows else None
        if y is None:
            y = self._dense(x2)
        return y.view(*x.shape[:-1], -1)

    def _frozen_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """Training through the frozen weight (QLoRA, train/qlora.py): differentiable w.r.t. x only.
        autocast does not reach a custom Function's backward, so x is cast to autocast's dtype here
        (as nn.Linear's inputs would be) and both passes run in it with autocast off."""
        device = x.device.type
        if torch.is_autocast_enabled(device):
            x = x.to(torch.get_autocast_dtype(device))
        with torch.autocast(device, enabled=False):
            return _FrozenMatmul.apply(x, self)

    def _chunks(self):
        """(n0, n1): the rows of W dequantized at a time, DENSE_CHUNK weights (whole blocks of 64 rows
        where the int4 weight is the CPU kernel's packed copy: they unpack on their own)."""
        step = max(1, DENSE_CHUNK // self.in_features)
        if self.cpu_int4 is not None:
            step = max(1, step // BLOCK) * BLOCK
        for n in range(0, self.out_features, step):
            yield n, min(n + step, self.out_features)

    def _weight_chunk(self, n0: int, n1: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rows n0:n1 of W for a dense product in `dtype`, in a buffer reused by the next chunk, as
        (w (n, K), column scale (n,) or None): W[n0:n1] = w · diag(scale) on the output side.
        int8 in bf16 / fp32 leaves its per-row scale to the product (|q| ≤ 127 is exact in both, so w is q
        converted, one pass, and the scale multiplies the (M, n) output instead of the (n, K) weight:
        1.0 against 3.4 ms for 8 M weights, 1 core of an AMD EPYC); fp16's range could not hold x · qᵀ, so
        there the weight is scaled first. int4 unpacks from the CPU kernel's layout (cpu_int4.py)."""
        w = _scratch("weight", (n1 - n0, self.in_features), dtype, self.scale.device)
        if self.scheme == "int8":
            if dtype in (torch.bfloat16, torch.float32):
                return w.copy_(self.qweight[n0:n1]), self.scale[n0:n1]
            return torch.mul(self.qweight[n0:n1], self.scale[n0:n1, None].to(dtype), out=w), None
        if self.cpu_int4 is not None:
            return self.cpu_int4.dequantize_into(n0, n1, self.scale, self.zero, w, _scratch_on(w.device)), None
        return dequantize_int4_into(self.qweight[n0:n1], self.scale[n0:n1], self.zero[n0:n1], w,
                                    _scratch_on(w.device)), None

    def _dense_t(self, g: torch.Tensor) -> torch.Tensor:
        """g (M, N) → g · W (M, K): the input gradient of x · Wᵀ, a chunk of W at a time. The chunks split
        N, so their products are summed in float32: the running sum is not rounded to a bf16 activation
        dtype at every chunk."""
        out = None
        for n0, n1 in self._chunks():
            w, scale = self._weight_chunk(n0, n1, g.dtype)
            gc = g[:, n0:n1] if scale is None else g[:, n0:n1] * scale.to(g.dtype)      # g · diag(s) · q
            if n1 - n0 == self.out_features:
                return gc @ w
            if out is None:
                out = torch.zeros(g.shape[0], self.in_features, dtype=torch.float32, device=g.device)
            out += gc @ w
        return out.to(g.dtype)

    def _dense(self, x: torch.Tensor) -> torch.Tensor:
        """x (M, K) → x · Wᵀ (M, N), a chunk of W dequantized at a time (prefill): the 257,216-row LM
        head never needs a float copy of itself, and the chunk's buffer is reused."""
        y = None
        for n0, n1 in self._chunks():
            w, scale = self._weight_chunk(n0, n1, x.dtype)
            part = F.linear(x, w)                                               # (M, n)
            if scale is not None:
                part.mul_(scale.to(part.dtype))
            if n1 - n0 == self.out_features:
                return part
            if y is None:   # filled in place: the chunks' products are never held beside their concatenation
                y = part.new_empty(x.shape[0], self.out_features)             # (M, N)
            y[:, n0:n1] = part
        return y

    def _fast(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.scheme == "int8":   # (x · qᵀ) · s; the scales must come in x's dtype
            return _try_kernel("_weight_int8pack_mm", x, lambda: torch.ops.aten._weight_int8pack_mm(
                x.contiguous(), self.qweight, self.scale.to(x.dtype)))
        if self.out_features % (16 if x.device.type == "cpu" else 8):
            return None     # the int4 packers' tile width (no real PaliGemma layer): dense path
        if x.device.type == "cpu":
            return _try_kernel("_weight_int4pack_mm_for_cpu", x, lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(
                x.contiguous(), *self._int4_packed(x.dtype)))
        return _try_kernel("_weight_int4pack_mm", x, lambda: torch.ops.aten._weight_int4pack_mm(
            x.contiguous(), *self._int4_packed(x.dtype)))

    def _int4_packed(self, dtype: torch.dtype):
        """The int4 kernel's operands for activations of `dtype`: (packed weight, group size, table)."""
        key = (self.scale.device, dtype)
        if key not in self._packed:
            if self.cpu_int4 is not None:            # the weight is packed already; the table is per dtype
                sz = _sz_table(self.scale, self.zero, dtype)
                if dtype == self.scale.dtype:        # scale and zero: views of the kernel's table, no second copy
                    self.scale, self.zero = sz[..., 0].t(), sz[..., 1].t()                # (N, K/G) each
                self._packed[key] = (self.cpu_int4.packed, sz)
            else:
                self._packed[key] = _int4_pack(self.qweight, self.scale, self.zero, dtype)
        packed, sz = self._packed[key]
        return packed, self.group_size, sz

    def _settle(self) -> None:
        """Hold an int4 weight on a CPU as the kernel's packed copy alone where cpu_int4 can (its layout is
        known, whole blocks of rows), with its [scale, zero] table in the layer's dtype. Scales and zeros
        that were views of a mapped file become views of that table, so nothing keeps the file's pages."""
        if self.scheme != "int4" or self.cpu_int4 is not None or self.qweight.is_meta:
            return
        self.cpu_int4 = CpuInt4.from_nibbles(self.qweight)
        if self.cpu_int4 is not None:
            self.qweight = None
            self._int4_packed(self.scale.dtype)

    def _unsettle(self) -> None:
        """Back to the portable nibbles, the kernel's copies dropped: what a move, a cast or a load starts from."""
        if self.cpu_int4 is not None:
            self.qweight, self.cpu_int4 = self.cpu_int4.nibbles(), None
        self._packed = {}

    def prepare(self, dtype: torch.dtype) -> None:
        """After a loader filled the buffers in place (formats/quantized.py, quant/convert.py): settle, and
        build the int4 kernel's table for activations of `dtype` now rather than at the first decode step,
        so that what a load leaves in memory is what decoding keeps (nothing freed later mid-heap)."""
        if self.scheme != "int4" or self.scale.device.type != "cpu" or self.out_features % BLOCK:
            return
        self._settle()
        self._int4_packed(dtype)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.cpu_int4 is not None:   # a checkpoint holds the portable nibbles, never a kernel's layout
            destination[prefix + "qweight"] = self.cpu_int4.nibbles()

    def _apply(self, fn, recurse=True):
        self._unsettle()
        out = super()._apply(fn, recurse)
        self._settle()
        return out

    def _load_from_state_dict(self, *args, **kwargs):
        self._unsettle()
        super()._load_from_state_dict(*args, **kwargs)
        self._settle()

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.scheme == "int4" else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.scheme}{g}, dtype={self.dtype}"


class _FrozenMatmul(torch.autograd.Function):
    """x · Wᵀ for a frozen quantized W, with dL/dx = dL/dy · W and no gradient for W. Only the layer is
    kept for backward, not a float W: backward dequantizes again, a chunk at a time, so no float copy of
    a whole weight outlives its chunk (the 257,216-row LM head would be 1.2 GB in bf16, per micro-batch)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: "QuantizedWeight") -> torch.Tensor:
        ctx.layer = layer
        return layer._dense(x)                                                  # (M, N)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return ctx.layer._dense_t(g.contiguous()), None                        # (M, K)


class QuantizedLinear(QuantizedWeight):
    """Drop-in for nn.Linear: y = x · Wᵀ + b with W held as int8 or int4 buffers (b stays float)."""

    def __init__(self, buffers: dict[str, torch.Tensor], scheme: str, group_size: int | None = None,
                 bias: torch.Tensor | None = None):
        super().__init__()
        self._init_buffers(scheme, group_size, buffers)
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: str, group_size: int | None = None, dtype=None):
        w = linear.weight.detach()
        b = None if linear.bias is None else linear.bias.detach().to(dtype or w.dtype)
        return cls(quantize_weight(w, scheme, group_size, dtype), scheme, group_size, b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matmul(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)


class QuantizedEmbedding(QuantizedWeight):
    """Drop-in for gemma.TiedEmbedding: E (V, D) quantized along D, read as rows and as the LM head."""

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, scheme: str, group_size: int | None = None, dtype=None):
        return cls(quantize_weight(emb.weight.detach(), scheme, group_size, dtype), scheme, group_size)

    def __init__(self, buffers: dict[str, torch.Tensor], scheme: str, group_size: int | None = None):
        super().__init__()
        self._init_buffers(scheme, group_size, buffers)

    @property
    def num_embeddings(self) -> int:
        return self.out_features

    @property
    def embedding_dim(self) -> int:
        return self.in_features

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (...) → rows (..., D), dequantizing only the rows looked up."""
        return self.dequantize(ids.reshape(-1)).view(*ids.shape, -1)

    def unembed(self, h: torch.Tensor) -> torch.Tensor:
        return self.matmul(h)                                                   # (..., V)
