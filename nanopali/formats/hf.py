"""Loading and saving Hugging Face PaliGemma checkpoints, strictly (docs/checkpoints.md).

A checkpoint directory holds config.json, tokenizer.model and the weights as model.safetensors or
shards listed in model.safetensors.index.json. Three key layouts are in circulation (docs/checkpoints.md#key-layouts):
Google's hub files (`language_model.model.*`, `vision_tower.vision_model.*`), transformers' in-memory
names (`model.language_model.*`, `lm_head.weight`), and what transformers 5 `save_pretrained` writes
(`vision_tower.*` without `vision_model.`). All are canonicalised, then renamed to nanopali's modules
by the table in `_RENAMES`: the one place that says which HF tensor is which of ours.

Loading is strict: one error lists every missing, unexpected and mis-shaped tensor. The model is
built on the meta device and each tensor is read from the file straight into its parameter
(files.py), so peak RAM is the model plus a 64 MiB piece. No pickle anywhere.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import replace

import torch

from ..config import PaliGemmaConfig
from ..model import PaliGemma
from ..vit import resample_pos_embed
from .files import CheckpointError, atomic_write, read_safetensors_header, resolve_device, resolve_dtype, weight_files
from .hf_config import LIMITS, read_paligemma_config, to_hf_config
from .quantized import load_quantized, quantized_contents, read_quantization
from .strict import SKIP, assign, load_strict, safetensors_sources


# HF name (canonical hub layout, `vision_model.` dropped) → nanopali name, or {generation: nanopali name}
# where the generations differ: PaliGemma 1 calls its pre-MLP norm `post_attention_layernorm`; Gemma 2 uses
# that name for the real post-attention norm.
_RENAMES = [
    (r"vision_tower\.embeddings\.patch_embedding\.", "vision_tower.patch_embed."),
    (r"vision_tower\.embeddings\.position_embedding\.weight", "vision_tower.pos_embed"),
    (r"vision_tower\.encoder\.layers\.(\d+)\.layer_norm([12])\.", r"vision_tower.blocks.\1.norm\2."),
    (r"vision_tower\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.", r"vision_tower.blocks.\1.attn.\2."),
    (r"vision_tower\.encoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"vision_tower.blocks.\1.attn.o."),
    (r"vision_tower\.encoder\.layers\.(\d+)\.mlp\.(fc[12])\.", r"vision_tower.blocks.\1.mlp.\2."),
    (r"vision_tower\.post_layernorm\.", "vision_tower.norm."),
    (r"multi_modal_projector\.linear\.", "projector.linear."),
    (r"language_model\.model\.embed_tokens\.weight", "language_model.embed.weight"),
    (r"language_model\.model\.norm\.weight", "language_model.final_norm.weight"),
    (r"language_model\.model\.layers\.(\d+)\.input_layernorm\.", r"language_model.layers.\1.pre_attn_norm."),
    (r"language_model\.model\.layers\.(\d+)\.post_attention_layernorm\.",
     {1: r"language_model.layers.\1.pre_ffw_norm.", 2: r"language_model.layers.\1.post_attn_norm."}),
    (r"language_model\.model\.layers\.(\d+)\.pre_feedforward_layernorm\.", r"language_model.layers.\1.pre_ffw_norm."),
    (r"language_model\.model\.layers\.(\d+)\.post_feedforward_layernorm\.", r"language_model.layers.\1.post_ffw_norm."),
    (r"language_model\.model\.layers\.(\d+)\.self_attn\.([qkvo])_proj\.", r"language_model.layers.\1.attn.\2."),
    (r"language_model\.model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.", r"language_model.layers.\1.mlp.\2."),
]
LM_HEAD = "language_model.lm_head.weight"  # tied to the embedding: checked, never stored twice


def canonical_hf_name(key: str) -> str:
    """Any of the three layouts → the hub layout without `vision_model.`."""
    key = re.sub(r"^model\.language_model\.", "language_model.model.", key)
    key = re.sub(r"^lm_head\.", "language_model.lm_head.", key)
    key = re.sub(r"^model\.(vision_tower|multi_modal_projector)\.", r"\1.", key)
    return key.replace("vision_tower.vision_model.", "vision_tower.")


def paligemma_name(key: str, generation: int) -> str | None:
    key = canonical_hf_name(key)
    for pattern, repl in _RENAMES:
        m = re.fullmatch(pattern + r"(.*)", key)
        if m:
            repl = repl[generation] if isinstance(repl, dict) else repl
            return m.expand(repl + r"\g<%d>" % (m.re.groups))
    return None


def hub_names(cfg: PaliGemmaConfig) -> list[str]:
    """Every tensor name of a released checkpoint in Google's hub layout (603 for PaliGemma 1 3B,
    727 for PaliGemma 2 3B: docs/checkpoints.md#key-layouts), lm_head excluded."""
    v = "vision_tower.vision_model."
    names = [v + "embeddings.patch_embedding.weight", v + "embeddings.patch_embedding.bias",
             v + "embeddings.position_embedding.weight", v + "post_layernorm.weight", v + "post_layernorm.bias",
             "multi_modal_projector.linear.weight", "multi_modal_projector.linear.bias",
             "language_model.model.embed_tokens.weight", "language_model.model.norm.weight"]
    for i in range(cfg.vision.depth):
        for m in ("layer_norm1", "layer_norm2", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                  "self_attn.out_proj", "mlp.fc1", "mlp.fc2"):
            names += [f"{v}encoder.layers.{i}.{m}.weight", f"{v}encoder.layers.{i}.{m}.bias"]
    norms = ["input_layernorm", "post_attention_layernorm"]
    if cfg.generation == 2:
        norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
    for i in range(cfg.text.depth):
        for m in norms + [f"self_attn.{p}_proj" for p in "qkvo"] + [f"mlp.{p}_proj" for p in ("gate", "up", "down")]:
            names.append(f"language_model.model.layers.{i}.{m}.weight")
    return names


def nanopali_names(cfg: PaliGemmaConfig) -> dict[str, str]:
    """nanopali parameter name → hub name, for saving in the layout the released files use."""
    return {paligemma_name(k, cfg.generation): k for k in hub_names(cfg)}


_LAYER = {"text": re.compile(r"language_model\.(?:model\.)?layers\.(\d+)\."),
          "vision": re.compile(r"vision_tower\.(?:encoder\.layers|blocks)\.(\d+)\.")}
_EMBEDDING = ("language_model.model.embed_tokens.weight", "language_model.embed.weight")


def check_config_against_headers(cfg: PaliGemmaConfig, files: list[str], config_path: str) -> None:
    """Refuse a config.json whose sizes the weights contradict, from the files' headers alone (no tensor
    is read, nothing is built): the layer counts of both towers and the embedding's rows and width.
    Without it a config of 100,000 layers is found out only after the model is built on the meta
    device (minutes, gigabytes of module objects); the strict loader would then name every tensor.
    A layer that holds only some of the tensors the file's other layers hold (a stray tensor past the
    last layer) is not counted as a layer: what it has and what it lacks are named instead."""
    layers = {"text": {}, "vision": {}}  # tower → {layer: {name within the layer: name in the file}}
    embedding = None
    for path in files:
        for stored, info in read_safetensors_header(path)[0].items():
            key = canonical_hf_name(stored)
            for tower, pattern in _LAYER.items():
                if m := pattern.match(key):
                    layers[tower].setdefault(int(m.group(1)), {})[key[m.end():]] = stored
            if key in _EMBEDDING and len(info["shape"]) == 2:
                embedding = info["shape"]
    problems = [problem for tower, field, want in (("text", "text_config.num_hidden_layers", cfg.text.depth),
                                                   ("vision", "vision_config.num_hidden_layers", cfg.vision.depth))
                if (problem := _layer_count_problem(layers[tower], tower, field, want))]
    if embedding is not None and tuple(embedding) != (cfg.text.vocab_size, cfg.text.width):
        problems.append(f"text_config vocab_size x hidden_size is {cfg.text.vocab_size} x {cfg.text.width}; the "
                        f"token embedding is {embedding[0]} x {embedding[1]}")
    if problems:
        raise CheckpointError(f"{config_path} does not match the weights in {', '.join(files)}: " + "; ".join(problems))


def _layer_count_problem(found: dict[int, dict[str, str]], tower: str, field: str, want: int) -> str | None:
    """What is wrong with `want` layers, given {layer: {name within the layer: name in the file}}, or None."""
    if not found or max(found) + 1 == want:
        return None  # the strict loader names any tensor missing from a layer within the config's depth
    full = set().union(*found.values())
    partial = [i for i in sorted(found) if found[i].keys() != full]
    if not partial:
        return f"{field} is {want}; the weights hold {max(found) + 1} {tower} layers"

    def names(i, within):  # a layer's tensors named as the file names them (its own layout)
        has = next(iter(found[i].items()))
        prefix = has[1][: len(has[1]) - len(has[0])]
        return ", ".join(prefix + n for n in sorted(within))

    return f"{field} is {want}; the weights hold {len(found) - len(partial)} complete {tower} layers, and " + \
        "; ".join(f"{tower} layer {i} is incomplete: it has {names(i, found[i])} and lacks "
                  f"{len(full - found[i].keys())} tensor(s): {names(i, full - found[i].keys())}" for i in partial)


def load_state(model: PaliGemma, files: list[str], dtype: torch.dtype, device, resample_pos: bool = False,
               place=assign) -> None:
    """Fill a meta-device model from safetensors files through the strict loader (strict.py).

    resample_pos: a SigLIP position table of another resolution is resampled to the model's grid
    (`vit.resample_pos_embed`) instead of being reported as mis-shaped. A stored lm_head must equal
    the embedding it is tied to: it is compared when the embedding is read, before `place` (which may
    quantize it), and never kept."""
    sources = list(safetensors_sources(files))              # headers only: nothing is read yet
    heads = [src for src in sources if canonical_hf_name(src.key) == LM_HEAD]

    def rename(key: str):
        return SKIP if canonical_hf_name(key) == LM_HEAD else paligemma_name(key, model.cfg.generation)

    def place_checking_the_head(model, name, tensor):
        for src in heads if name == "language_model.embed.weight" else ():
            same = tuple(src.shape) == tuple(tensor.shape)
            if not same or not torch.equal(src.read(tensor.dtype, tensor.device), tensor):
                raise CheckpointError(f"{', '.join(files)}: {src.key} differs from the token embedding; "
                                      "PaliGemma ties them")
        place(model, name, tensor)

    to_hf = nanopali_names(model.cfg)
    load_strict(model, sources, rename, dtype=dtype, device=device, place=place_checking_the_head,
                where=f"Checkpoint {', '.join(files)} cannot be loaded as its config.json describes",
                adapt={"vision_tower.pos_embed": _resampled} if resample_pos else None,
                file_name=lambda n: to_hf.get(n, n))


def _resampled(src, shape, dtype, device):
    """A position table read in fp32 and resampled to `shape`'s grid (`vit.resample_pos_embed`)."""
    return resample_pos_embed(src.read(torch.float32, device), shape[0]).to(dtype)


def at_image_size(cfg: PaliGemmaConfig, image_size) -> PaliGemmaConfig:
    """cfg run at image_size (the paper's stage 2, 224 → 448 → 896); None or the native size: cfg itself."""
    p = cfg.vision.patch_size
    if image_size is None:
        return cfg
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0 or image_size % p:
        raise CheckpointError(f"image_size={image_size!r} is not a positive multiple of the patch size {p}")
    if image_size > LIMITS["image_size"]:   # before a position table of (size/patch)² rows is allocated
        raise CheckpointError(f"image_size={image_size} is past {LIMITS['image_size']} px: not a PaliGemma resolution")
    return replace(cfg, vision=replace(cfg.vision, image_size=image_size))


def check_quantize_arguments(quantize, group_size) -> None:
    """Refuse a bad quantize= / group_size= before anything is read (quant.check_scheme says why)."""
    if quantize is None and group_size is None:   # a float load: quant/ stays unimported
        return
    from ..quant import check_scheme
    check_scheme(quantize, group_size)


def save_checkpoint(model: PaliGemma, out_dir: str, tokenizer_path: str | None = None) -> None:
    """Write config.json + model.safetensors (hub layout, no lm_head) atomically; copy the tokenizer.
    A quantized model is written in nanopali's quantized format (formats/quantized.py), which `load` reads."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    if getattr(model, "quantization", None) is not None:
        tensors, entry = quantized_contents(model)
    else:
        to_hf = nanopali_names(model.cfg)
        tensors, entry = {to_hf[n]: p.detach().contiguous().cpu() for n, p in model.named_parameters()}, {}
    meta = {"format": "pt", **{k: json.dumps(v) for k, v in entry.items()}}
    atomic_write(os.path.join(out_dir, "model.safetensors"), lambda tmp: save_file(tensors, tmp, meta))
    cfg = json.dumps({**to_hf_config(model.cfg), **entry}, indent=2)
    atomic_write(os.path.join(out_dir, "config.json"), lambda tmp: open(tmp, "w").write(cfg))
    if tokenizer_path is not None and os.path.abspath(tokenizer_path) != os.path.abspath(
            os.path.join(out_dir, "tokenizer.model")):
        data = open(tokenizer_path, "rb").read()
        atomic_write(os.path.join(out_dir, "tokenizer.model"), lambda tmp: open(tmp, "wb").write(data))


def refuse_unmerged_qlora(path: str) -> None:
    """Refuse a quantized base saved beside LoRA adapters it does not hold (qlora.export_quantized's
    directory): loaded alone it would answer as the base. train.py's own exports hold merged weights
    (their lora/ is a copy of the adapters), and those load as any directory."""
    if os.path.isfile(os.path.join(path, "lora", "adapter_config.json")) and read_quantization(path):
        raise CheckpointError(f"{path} holds a quantized base with its LoRA adapters unmerged in {path}/lora: load "
                              "both with nanopali.train.qlora.load_quantized(path)")


def load_paligemma_model(path: str, dtype=torch.float32, device="cpu", attn_impl: str = "auto",
                         image_size: int | None = None, quantize: str | None = None,
                         group_size: int | None = None) -> PaliGemma:
    """The model alone from a Hugging Face checkpoint directory (config.json + safetensors).

    image_size: run at another resolution than the checkpoint's (the paper's stage 2, 224 → 448 → 896):
    SigLIP's position table is resampled bilinearly on its grid. The native size never resamples.
    quantize "int8" / "int4" (groups of `group_size`): weight-only quantization while loading, one
    tensor at a time (nanopali/quant). A directory nanopali saved quantized loads as it was saved."""
    dtype, device = resolve_dtype(dtype, device), resolve_device(device)
    check_quantize_arguments(quantize, group_size)
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"Checkpoint path does not exist: {path}")
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is a file; pass the checkpoint directory (config.json, tokenizer.model, "
                              "*.safetensors)")
    cfg = read_paligemma_config(path)
    native = cfg.vision.image_size
    cfg = at_image_size(cfg, image_size)
    files = weight_files(path)
    check_config_against_headers(cfg, files, os.path.join(path, "config.json"))
    saved = read_quantization(path)
    if saved is not None:
        adapt = {"vision_tower.pos_embed": _resampled} if cfg.vision.image_size != native else None
        model = load_quantized(path, cfg, files, saved, dtype, device, quantize, group_size, adapt)
    else:
        with torch.device("meta"):
            model = PaliGemma(cfg)
        place = assign
        if quantize is not None:
            from ..quant import quantizing_place
            place = quantizing_place(model, quantize, group_size, dtype)
        load_state(model, files, dtype, device, resample_pos=cfg.vision.image_size != native, place=place)
    model.eval()
    model.attn_impl = attn_impl
    return model
