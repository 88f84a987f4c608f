"""Loading Google's original big_vision checkpoints (Kaggle `.npz`), strictly (docs/checkpoints.md#big_vision-npz).

A big_vision checkpoint is a flat `np.savez` of "/"-joined flax paths (`img/...` SigLIP and projector,
`llm/...` Gemma), optionally under `params/`. Per-layer arrays are stacked on a leading layer axis
(flax `nn.scan`), attention weights keep their einsum shapes (`q_einsum/w` is (N, D, H), not a Linear's
(N·H, D)), and bf16 arrays are stored as raw 2-byte voids (`|V2`). `_mapping` is the one place that
says which array becomes which of our parameters and how its axes move (big_vision `models/vit.py`,
`models/ppp/gemma.py`; transformers' former `convert_paligemma_weights_to_hf.py`).

The embedding keeps big_vision's 257152 rows (256000 Gemma pieces + 1024 `<loc>` + 128 `<seg>`), so
the logits are 257152 wide, as big_vision's are; Hugging Face files carry 64 extra padding rows that no
real token uses (docs/variants.md#vocabulary-size). Compare the two with `logits[..., :257152]`.

Memory: the headers are read first (names, shapes, dtypes: enough for strict accounting and for
inferring the variant); then each parameter is read on its own, and from an uncompressed `.npz` (what
`np.savez` writes) only the bytes of one layer are read, so peak RAM is the model plus one layer slice.
Nothing is ever unpickled: object arrays are refused from their header.
"""
from __future__ import annotations

import os
import struct
import zipfile
from dataclasses import replace

import numpy as np
import torch

from ..config import PRESETS, PaliGemmaConfig, preset
from ..model import PaliGemma
from ..vit import resample_pos_embed
from .files import CheckpointError, resolve_device, resolve_dtype
from .hf import at_image_size, check_quantize_arguments
from .strict import all_finite, assign, mismatch_error

# Letters: W SigLIP width, P patches, p patch side, D Gemma width, L layers, N heads, K kv heads,
# H head dim, F MLP width, V vocab rows.

NPZ_VOCAB = 257152  # rows of `llm/embedder/input_embedding` in every released .npz (docs/variants.md#decoder-sizes)
_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.float64))
_BF16 = np.dtype("V2")  # how np.save writes bfloat16 (big_vision `utils.recover_dtype`)


class NpzArrays:
    """A read-only `.npz`: names, shapes and dtypes from the .npy headers; data one array, or one
    leading-axis slice of it, at a time. Use as a context manager."""

    def __init__(self, path: str):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise CheckpointError(f"Checkpoint file does not exist: {self.path}")
        try:
            self._zip = zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, OSError) as e:
            raise CheckpointError(f"{self.path} is not an .npz file (a zip of .npy arrays): {e}") from None
        self._whole = (None, None)  # (key, array): last array read whole (compressed members)
        self.headers = {}            # key -> (shape, dtype, fortran_order, ZipInfo, byte offset of data in member)
        self.others = []             # members that are not .npy arrays
        try:
            for info in self._zip.infolist():
                if not info.filename.endswith(".npy"):
                    self.others.append(info.filename)
                    continue
                key = info.filename[: -len(".npy")]
                key = key[len("params/"):] if key.startswith("params/") else key
                if key in self.headers:
                    raise CheckpointError(f"{self.path} holds array {key} twice (with and without params/)")
                self.headers[key] = self._read_header(key, info)
        except CheckpointError:
            self._zip.close()
            raise
        self._file = open(self.path, "rb")

    def _read_header(self, key: str, info: zipfile.ZipInfo):
        try:
            with self._zip.open(info) as f:
                version = np.lib.format.read_magic(f)
                read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
                shape, fortran, dtype = read[version](f)
                offset = f.tell()
        except (KeyError, ValueError, OSError, zipfile.BadZipFile) as e:
            raise CheckpointError(f"{self.path}: array {key} has no valid .npy header ({e})") from None
        if dtype.hasobject:
            raise CheckpointError(f"{self.path}: array {key} holds Python objects (dtype {dtype}); loading it would "
                                  "mean unpickling code from the file, which nanopali never does")
        if dtype not in _FLOAT_DTYPES and dtype != _BF16:
            raise CheckpointError(f"{self.path}: array {key} has dtype {dtype}; weights must be float32, float16, "
                                  "float64 or bfloat16 (stored as |V2)")
        if info.file_size != offset + int(np.prod(shape)) * dtype.itemsize:
            raise CheckpointError(f"{self.path} is truncated or corrupt: array {key} {dtype}{list(shape)} does not "
                                  f"fit its {info.file_size} bytes")
        return tuple(shape), dtype, fortran, info, offset

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: h[0] for k, h in self.headers.items()}

    def read(self, key: str, index: tuple[int, ...] = ()) -> np.ndarray:
        """array[index] for an index into the leading axes (e.g. (layer,) or (layer, 0))."""
        shape, dtype, fortran, info, offset = self.headers[key]
        if info.compress_type != zipfile.ZIP_STORED or fortran:
            if self._whole[0] != key:  # compressed: inflate once, serve every layer from it
                self._whole = (None, None)
                with self._zip.open(info) as f:
                    self._whole = (key, np.lib.format.read_array(f, allow_pickle=False))
            return self._whole[1][index]
        sub = shape[len(index):]
        flat = int(np.ravel_multi_index(index, shape[: len(index)])) if index else 0
        out = np.empty(sub, dtype)
        self._file.seek(self._member_start(info) + offset + flat * out.nbytes)
        if self._file.readinto(out.reshape(-1).view(np.uint8)) != out.nbytes:
            raise CheckpointError(f"{self.path} is truncated: array {key} ends early")
        return out

    def _member_start(self, info: zipfile.ZipInfo) -> int:
        """File offset of a stored member's bytes: after its local header, name and extra field."""
        self._file.seek(info.header_offset)
        head = self._file.read(30)
        if head[:4] != b"PK\x03\x04":
            raise CheckpointError(f"{self.path} is corrupt: bad zip header for {info.filename}")
        name_len, extra_len = struct.unpack("<HH", head[26:30])
        return info.header_offset + 30 + name_len + extra_len

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._file.close()
        self._zip.close()


def npz_shapes(cfg: PaliGemmaConfig) -> dict[str, tuple[int, ...]]:
    """Every array of a big_vision checkpoint of this config and its shape (32 for PaliGemma 1,
    34 for PaliGemma 2: the einsum shapes of docs/checkpoints.md#tensor-table)."""
    v, t = cfg.vision, cfg.text
    W, Lv, Fv, Nv, Hv, p = v.width, v.depth, v.mlp_dim, v.num_heads, v.head_dim, v.patch_size
    D, L, F, N, K, H = t.width, t.depth, t.mlp_dim, t.num_heads, t.num_kv_heads, t.head_dim
    enc, att = "img/Transformer/encoderblock/", "img/Transformer/encoderblock/MultiHeadDotProductAttention_0/"
    s = {"img/embedding/kernel": (p, p, 3, W), "img/embedding/bias": (W,), "img/pos_embedding": (1, v.num_patches, W),
         "img/Transformer/encoder_norm/scale": (W,), "img/Transformer/encoder_norm/bias": (W,),
         "img/head/kernel": (W, D), "img/head/bias": (D,)}
    for n in ("LayerNorm_0", "LayerNorm_1"):
        s[f"{enc}{n}/scale"] = s[f"{enc}{n}/bias"] = (Lv, W)
    for n in ("query", "key", "value"):
        s[f"{att}{n}/kernel"], s[f"{att}{n}/bias"] = (Lv, W, Nv, Hv), (Lv, Nv, Hv)
    s[att + "out/kernel"], s[att + "out/bias"] = (Lv, Nv, Hv, W), (Lv, W)
    s[enc + "MlpBlock_0/Dense_0/kernel"], s[enc + "MlpBlock_0/Dense_0/bias"] = (Lv, W, Fv), (Lv, Fv)
    s[enc + "MlpBlock_0/Dense_1/kernel"], s[enc + "MlpBlock_0/Dense_1/bias"] = (Lv, Fv, W), (Lv, W)
    s.update({"llm/embedder/input_embedding": (t.vocab_size, D), "llm/final_norm/scale": (D,),
              "llm/layers/attn/q_einsum/w": (L, N, D, H), "llm/layers/attn/kv_einsum/w": (L, 2, K, D, H),
              "llm/layers/attn/attn_vec_einsum/w": (L, N, H, D),
              "llm/layers/mlp/gating_einsum": (L, 2, D, F), "llm/layers/mlp/linear": (L, F, D)})
    for n in _norms(cfg):
        s[f"llm/layers/{n}/scale"] = (L, D)
    return s


def _norms(cfg: PaliGemmaConfig) -> dict[str, str]:
    """big_vision norm name → ours. Gemma 1 has two norms per block, Gemma 2 four."""
    names = {"pre_attention_norm": "pre_attn_norm", "pre_ffw_norm": "pre_ffw_norm"}
    if cfg.generation == 2:
        names.update(post_attention_norm="post_attn_norm", post_ffw_norm="post_ffw_norm")
    return names


def _mapping(cfg: PaliGemmaConfig):
    """(our parameter, .npz key, index into its leading axes, array → our layout) for every parameter.

    Grouped by key, so a compressed .npz inflates each array once. torch Linear weights are (out, in);
    flax kernels are (in, ..., out), hence the transposes."""
    W, D = cfg.vision.width, cfg.text.width
    enc, att = "img/Transformer/encoderblock/", "img/Transformer/encoderblock/MultiHeadDotProductAttention_0/"
    same = lambda a: a                                              # noqa: E731
    t = lambda a: a.T                                               # noqa: E731  (in, out) → (out, in)
    conv = lambda a: a.transpose(3, 2, 0, 1)                        # noqa: E731  (p, p, 3, W) → (W, 3, p, p)
    vit_in = lambda a: a.reshape(W, -1).T                           # noqa: E731  (W, N, H) → (N·H, W)
    vit_out = lambda a: a.reshape(-1, W).T                          # noqa: E731  (N, H, W) → (W, N·H)
    heads_first = lambda a: a.transpose(0, 2, 1).reshape(-1, D)     # noqa: E731  (N, D, H) → (N·H, D)
    lm_out = lambda a: a.reshape(-1, D).T                           # noqa: E731  (N, H, D) → (D, N·H)
    m = [("vision_tower.patch_embed.weight", "img/embedding/kernel", (), conv),
         ("vision_tower.patch_embed.bias", "img/embedding/bias", (), same),
         ("vision_tower.pos_embed", "img/pos_embedding", (), lambda a: a.reshape(-1, W)),  # (1, P, W) → (P, W)
         ("vision_tower.norm.weight", "img/Transformer/encoder_norm/scale", (), same),
         ("vision_tower.norm.bias", "img/Transformer/encoder_norm/bias", (), same),
         ("projector.linear.weight", "img/head/kernel", (), t),
         ("projector.linear.bias", "img/head/bias", (), same),
         ("language_model.embed.weight", "llm/embedder/input_embedding", (), same),        # (V, D), rows as stored
         ("language_model.final_norm.weight", "llm/final_norm/scale", (), same)]

    def vit(name, key, f):  # one entry per SigLIP layer i: blocks.i.<name> ← key[i]
        m.extend((f"vision_tower.blocks.{i}.{name}", key, (i,), f) for i in range(cfg.vision.depth))

    def llm(name, key, f, tail=()):  # one entry per Gemma layer i: layers.i.<name> ← key[i, *tail]
        m.extend((f"language_model.layers.{i}.{name}", key, (i, *tail), f) for i in range(cfg.text.depth))

    for ours, theirs in (("norm1", "LayerNorm_0"), ("norm2", "LayerNorm_1")):
        vit(ours + ".weight", f"{enc}{theirs}/scale", same)
        vit(ours + ".bias", f"{enc}{theirs}/bias", same)
    for ours, theirs in (("q", "query"), ("k", "key"), ("v", "value")):
        vit(f"attn.{ours}.weight", f"{att}{theirs}/kernel", vit_in)
        vit(f"attn.{ours}.bias", f"{att}{theirs}/bias", lambda a: a.reshape(-1))     # (N, H) → (N·H,)
    vit("attn.o.weight", att + "out/kernel", vit_out)
    vit("attn.o.bias", att + "out/bias", same)
    for ours, theirs in (("fc1", "Dense_0"), ("fc2", "Dense_1")):
        vit(f"mlp.{ours}.weight", f"{enc}MlpBlock_0/{theirs}/kernel", t)
        vit(f"mlp.{ours}.bias", f"{enc}MlpBlock_0/{theirs}/bias", same)
    for theirs, ours in _norms(cfg).items():
        llm(ours + ".weight", f"llm/layers/{theirs}/scale", same)  # both store the w of (1 + w)
    llm("attn.q.weight", "llm/layers/attn/q_einsum/w", heads_first)
    llm("attn.k.weight", "llm/layers/attn/kv_einsum/w", heads_first, tail=(0,))  # [i, 0] = K
    llm("attn.v.weight", "llm/layers/attn/kv_einsum/w", heads_first, tail=(1,))  # [i, 1] = V
    llm("attn.o.weight", "llm/layers/attn/attn_vec_einsum/w", lm_out)
    llm("mlp.gate.weight", "llm/layers/mlp/gating_einsum", t, tail=(0,))         # [i, 0] = gate, (D, F)
    llm("mlp.up.weight", "llm/layers/mlp/gating_einsum", t, tail=(1,))           # [i, 1] = up
    llm("mlp.down.weight", "llm/layers/mlp/linear", t)                           # (F, D)
    return m


def npz_config(name: str) -> PaliGemmaConfig:
    """A preset as big_vision stores it: the embedding has 257152 rows, not the HF files' 257216."""
    cfg = preset(name)
    return replace(cfg, text=replace(cfg.text, vocab_size=NPZ_VOCAB))


def infer_variant(shapes: dict[str, tuple[int, ...]]) -> str | None:
    """The preset (e.g. "pg2-3b-448") whose .npz layout has exactly these array shapes, or None.

    The shapes fix everything that tells the variants apart: PaliGemma 1 vs 2 (two or four norms,
    1 or 4+ KV heads), the size (widths, depth) and the resolution (rows of `img/pos_embedding`)."""
    return next((name for name in PRESETS if npz_shapes(npz_config(name)) == shapes), None)


def _describe(shapes: dict) -> str:
    keys = ("llm/embedder/input_embedding", "llm/layers/attn/q_einsum/w", "llm/layers/attn/kv_einsum/w",
            "llm/layers/mlp/linear", "img/pos_embedding", "img/Transformer/encoderblock/MlpBlock_0/Dense_0/kernel")
    return ", ".join(f"{k} {list(shapes[k])}" for k in keys if k in shapes)


def resolve_variant(variant, npz: NpzArrays) -> PaliGemmaConfig:
    """variant: a preset name, a PaliGemmaConfig, or None to infer it from the arrays' shapes; then
    check every array against it (one error naming all missing, unexpected and mis-shaped arrays)."""
    shapes = npz.shapes()
    if variant is None:
        name = infer_variant(shapes)
        if name is None:
            raise CheckpointError(f"{npz.path} matches no released PaliGemma variant ({_describe(shapes)}); "
                                  "pass variant=PaliGemmaConfig(...) describing it")
        return npz_config(name)
    if isinstance(variant, str):
        cfg, label = npz_config(variant), f"variant {variant!r}"
    elif isinstance(variant, PaliGemmaConfig):
        cfg, label = variant, "the given PaliGemmaConfig"
    else:
        raise TypeError(f"variant must be a preset name or a PaliGemmaConfig, got {type(variant).__name__}")
    want = npz_shapes(cfg)
    guess = infer_variant(shapes)
    error = mismatch_error(f"{npz.path} does not match {label}", [k for k in want if k not in shapes],
                           [k for k in shapes if k not in want] + npz.others,
                           [f"{k}: expected {list(want[k])}, found {list(shapes[k])}"
                            for k in want if k in shapes and want[k] != shapes[k]],
                           noun="array", hint=f"\nThe arrays match variant {guess!r}." if guess else "")
    if error is not None:
        raise error
    return cfg


def to_tensor(a: np.ndarray, dtype: torch.dtype, device) -> torch.Tensor:
    """A numpy array read from an .npz (bfloat16 as |V2 included) as a torch tensor of dtype on device."""
    a = np.ascontiguousarray(a)
    t = torch.from_numpy(a.view(np.int16)).view(torch.bfloat16) if a.dtype == _BF16 else torch.from_numpy(a)
    return t.to(dtype=dtype, device=device)


def _build(npz: NpzArrays, cfg: PaliGemmaConfig, dtype, device, attn_impl: str, quantize: str | None = None,
           group_size: int | None = None) -> PaliGemma:
    """The model on the meta device, then each parameter read from the file straight into place
    (quantized as it arrives with `quantize`, as for Hugging Face directories). A position table of
    another grid than cfg's (cfg at another image size) is resampled as for Hugging Face directories.
    One error names every array (and layer) that holds a NaN or an inf."""
    with torch.device("meta"):
        model = PaliGemma(cfg)
    place = assign
    if quantize is not None:
        from ..quant import quantizing_place
        place = quantizing_place(model, quantize, group_size, dtype)
    nonfinite = []
    for name, key, index, f in _mapping(cfg):
        a = f(npz.read(key, index))
        if name == "vision_tower.pos_embed" and a.shape[0] != cfg.num_image_tokens:      # (P, W) → (P', W)
            t = resample_pos_embed(to_tensor(a, torch.float32, device), cfg.num_image_tokens).to(dtype)
        else:
            t = to_tensor(a, dtype, device)
        if all_finite(t):
            place(model, name, t)
        elif (where := key + "".join(f"[{i}]" for i in index[:1])) not in nonfinite:   # the layer, not K / V
            nonfinite.append(where)
    if nonfinite:
        raise mismatch_error(npz.path, [], [], [], noun="array", nonfinite=nonfinite)
    unset = [n for n, t in model.state_dict(keep_vars=True).items() if t.is_meta]
    if unset:
        raise RuntimeError(f"nanopali bug: the .npz mapping does not fill {', '.join(unset)}")
    model.eval()
    model.attn_impl = attn_impl
    return model


def load_npz_model(path: str, variant=None, dtype=torch.float32, device="cpu", attn_impl: str = "auto", *,
                   image_size: int | None = None, quantize: str | None = None,
                   group_size: int | None = None) -> PaliGemma:
    """The model alone from a big_vision .npz (see `load_npz`)."""
    dtype, device = resolve_dtype(dtype, device), resolve_device(device)
    check_quantize_arguments(quantize, group_size)
    with NpzArrays(path) as npz:
        cfg = at_image_size(resolve_variant(variant, npz), image_size)
        return _build(npz, cfg, dtype, device, attn_impl, quantize, group_size)


def load_npz(path: str, variant=None, tokenizer: str | None = None, dtype=torch.float32, device="cpu",
             attn_impl: str = "auto", *, image_size: int | None = None, quantize: str | None = None,
             group_size: int | None = None):
    """(model, processor) from a big_vision PaliGemma / PaliGemma 2 `.npz`.

        nanopali.load("paligemma2-3b-pt-224.b16.npz", variant="pg2-3b-224",
                      tokenizer="paligemma_tokenizer.model")

    variant: a preset name, a PaliGemmaConfig, or None to infer the preset from the arrays' shapes; the
    arrays are checked against it at its own image size, then `image_size` (if another) resamples the
    position table as for a Hugging Face directory.
    tokenizer: the SentencePiece file (big_vision's `paligemma_tokenizer.model`, or `tokenizer.model`
    of any Hugging Face PaliGemma repo: PaliGemma 2 uses PaliGemma 1's); an .npz holds weights only.
    The reference switches keep transformers' defaults; see docs/big_vision.md for big_vision's settings."""
    from ..processing import Processor

    dtype, device = resolve_dtype(dtype, device), resolve_device(device)
    check_quantize_arguments(quantize, group_size)
    if tokenizer is None:
        raise CheckpointError(f"{path} is a big_vision .npz, which holds weights only: pass tokenizer= the "
                              "SentencePiece file (paligemma_tokenizer.model from big_vision, or the "
                              "tokenizer.model of a Hugging Face PaliGemma repo)")
    with NpzArrays(path) as npz:
        cfg = at_image_size(resolve_variant(variant, npz), image_size)
        processor = Processor.for_model(os.fspath(tokenizer), cfg)
        if cfg.image_token_id < processor.sp.get_piece_size():
            raise CheckpointError(f"image_token_id {cfg.image_token_id} is a real piece of {tokenizer} "
                                  f"({processor.sp.get_piece_size()} pieces); <image> must lie past the tokenizer")
        return _build(npz, cfg, dtype, device, attn_impl, quantize, group_size), processor
