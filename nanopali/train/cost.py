"""What a fine-tuning step costs: memory and FLOPs known before anything is allocated, and the
FLOPs that the progress line (train/progress.py) turns into MFU.

Parameter counts are exact: the model is built on the meta device (no memory) with the run's
trainable preset and LoRA applied. Activation memory is an estimate of what autograd keeps per token
and layer (listed in `_decoder_activations` / `_vision_activations`): within 10 % of transformers'
measured peak for a full fine-tune (tests/test_finetune_cost.py), an upper bound for partial presets
(a frozen matmul does not keep its input). It tells a user whether a run fits a 16, 24, 40 or 80 GB
GPU, not the last MiB. A quantized frozen base (QLoRA, qlora.py) is counted as the buffers the
quantized model holds (int8 / int4 weights, scales and zeros per row or group), read off the same meta
model, so those bytes are exact too (docs/qlora.md).

FLOPs follow the PaLM / Chinchilla convention: forward = 2 · (matmul parameters) per token that
passes them + attention scores (4 · T² · N·H per layer and row, the full square), training step =
3 × forward (backward = 2 × forward). The image encoder counts its patches, the decoder every real
token (image tokens included), the 257k-row head only the supervised tokens. With frozen weights
the backward does less than 2 × forward, so MFU is then a slight overstatement; it is the number
to compare with the transformers anchor (full fine-tune) either way.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import PaliGemmaConfig

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Dense bf16/fp16 tensor-core peaks (vendor data sheets, SXM parts), for MFU.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12,
              "L4": 121e12, "A10G": 125e12, "A10": 125e12, "V100": 125e12, "RTX 4090": 165e12, "RTX 3090": 71e12}
GiB = 2 ** 30


def _matmul_params(cfg: PaliGemmaConfig) -> tuple[int, int, int]:
    """(image encoder per patch, projector per patch, decoder per token) parameters used in matmuls."""
    v, t = cfg.vision, cfg.text
    vit = 3 * v.patch_size ** 2 * v.width + v.depth * (4 * v.width ** 2 + 2 * v.width * v.mlp_dim)
    dec = t.depth * (t.width * (2 * t.num_heads + 2 * t.num_kv_heads) * t.head_dim + 3 * t.width * t.mlp_dim)
    return vit, v.width * t.width, dec


def forward_flops(cfg: PaliGemmaConfig, num_tokens: int, num_images: int, num_targets: int) -> float:
    """Forward FLOPs of one example: num_tokens real positions, num_images images, num_targets supervised."""
    v, t = cfg.vision, cfg.text
    vit, proj, dec = _matmul_params(cfg)
    P = v.num_patches
    image = num_images * (2 * (vit + proj) * P + 4 * P * P * v.width * v.depth)
    text = 2 * dec * num_tokens + 4 * num_tokens ** 2 * t.num_heads * t.head_dim * t.depth
    return image + text + 2 * t.vocab_size * t.width * num_targets


def train_flops(cfg: PaliGemmaConfig, num_tokens: int, num_images: int, num_targets: int) -> float:
    return 3 * forward_flops(cfg, num_tokens, num_images, num_targets)


def peak_flops(device: torch.device, precision: str) -> float | None:
    """The device's dense peak for the run's precision, if known (bf16/fp16 GPUs of the table)."""
    if device.type != "cuda" or precision == "fp32":
        return None
    name = torch.cuda.get_device_name(device)
    return next((f for key, f in PEAK_FLOPS.items() if key in name), None)


@dataclass
class MemoryEstimate:
    weights: float           # parameters, trainable and frozen, in their dtypes
    grads: float
    optimizer: float
    autocast_copies: float
    activations: float
    logits: float
    trainable: int
    frozen: int              # frozen weights, the quantized base's included
    quantized: float = 0.0   # a quantized base: int8 / int4 weights, scales, zeros, biases (buffers)
    scheme: str | None = None

    @property
    def total(self) -> float:
        return (self.weights + self.quantized + self.grads + self.optimizer + self.autocast_copies
                + self.activations + self.logits)

    def table(self) -> str:
        rows = [("weights", self.weights)]
        rows += [(f"quantized base ({self.scheme})", self.quantized)] if self.scheme else []
        rows += [("gradients", self.grads), ("AdamW state", self.optimizer),
                ("autocast weight copies", self.autocast_copies), ("activations", self.activations),
                ("logits + loss", self.logits), ("total (expected peak)", self.total)]
        lines = [f"parameters: {self.trainable:,} trainable, {self.frozen:,} frozen"]
        lines += [f"  {name:<24}{b / GiB:9.2f} GiB" for name, b in rows]
        fits = [f"{gb} GB: {'fits' if self.total * 1.1 < gb * GiB else 'does not fit'}" for gb in (16, 24, 40, 80)]
        return "\n".join(lines + ["  " + ", ".join(fits) + " (with 10% for the allocator and the CUDA context)"])


def _decoder_activations(cfg: PaliGemmaConfig, seq_len: int, act_bytes: int, scores: bool) -> float:
    """Bytes kept per token per decoder layer: ~10·D (residual, norm inputs and outputs), q and the
    attention output 2·N·H, k and v 2·K·H, the MLP's gate, up, gelu and product 4·F; plus the
    softmax probabilities N·T in float32 and in the activation dtype when attention is not fused."""
    t = cfg.text
    per = (10 * t.width + 2 * t.num_heads * t.head_dim + 2 * t.num_kv_heads * t.head_dim + 4 * t.mlp_dim) * act_bytes
    return per + (t.num_heads * seq_len * (4 + act_bytes) if scores else 0)


def _lora_dropout_activations(cfg: PaliGemmaConfig, lora, act_bytes: int) -> float:
    """Bytes kept per token per decoder layer by LoRA's dropout (lora.py applies it to each target's
    input on its own): the dropped-out input in the activation dtype and its 1-byte mask, per target."""
    if lora is None or lora.dropout == 0:
        return 0
    t = cfg.text
    width = {"o": t.num_heads * t.head_dim, "down": t.mlp_dim}                # the others read the residual width
    return sum(width.get(name, t.width) for name in lora.targets) * (act_bytes + 1)


def _vision_activations(cfg: PaliGemmaConfig, act_bytes: int, scores: bool) -> float:
    """Bytes kept per patch per encoder layer: ~10·W (residual, LayerNorms), q, k, v, output 4·W,
    fc1 and gelu 2·F; plus the softmax probabilities N·P as above."""
    v = cfg.vision
    per = (14 * v.width + 2 * v.mlp_dim) * act_bytes
    return per + (v.num_heads * v.num_patches * (4 + act_bytes) if scores else 0)


def estimate_memory(cfg: PaliGemmaConfig, preset: str, *, batch: int, seq_len: int, images_per_example: int = 1,
                    precision: str = "bf16", trainable_dtype: str = "fp32", frozen_dtype: str = "fp32",
                    lora=None, grad_checkpointing: bool = False, fused_attention: bool = False,
                    shards: int = 1, quantize_base: str | None = None,
                    group_size: int | None = None) -> MemoryEstimate:
    """Expected peak memory of one device for a training step (see MemoryEstimate.table).

    seq_len is the padded length of a row; every text position is counted as supervised (an upper
    bound on the logits). shards > 1 (FSDP) divides weights, gradients and AdamW state.
    quantize_base "int8" / "int4" (groups of group_size): the base quantized as qlora.quantize_base
    does, scales and zeros in frozen_dtype; the quantized buffers are not sharded."""
    from .finetune import set_trainable
    from .lora import apply_lora
    from ..model import PaliGemma
    from ..quant import quantize_model
    from ..quant.modules import QuantizedWeight

    with torch.device("meta"):
        model = PaliGemma(cfg)
        if quantize_base is not None:
            quantize_model(model, quantize_base, group_size, DTYPES[frozen_dtype])
        if lora is not None:
            apply_lora(model, lora)
    set_trainable(model, preset)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    # the quantized base's weights (and Linear biases) are buffers: counted as frozen weights, sized as buffers
    base = sum(m.out_features * m.in_features + (0 if getattr(m, "bias", None) is None else m.bias.numel())
               for m in model.modules() if isinstance(m, QuantizedWeight))
    vision_trains = any(p.requires_grad for p in model.vision_tower.parameters())
    tb, fb = BYTES[trainable_dtype], BYTES[frozen_dtype]
    ab = BYTES[precision]                                   # activations in the autocast dtype
    # autocast keeps a low-precision copy of each fp32 leaf that requires grad for the whole step
    # (frozen weights are re-cast per use, transiently)
    cached_casts = trainable if tb == 4 else 0

    t, v = cfg.text, cfg.vision
    tokens = batch * seq_len
    patches = batch * images_per_example * v.num_patches
    dec_layer = (_decoder_activations(cfg, seq_len, ab, not fused_attention)
                 + _lora_dropout_activations(cfg, lora, ab)) * tokens
    vit_layer = _vision_activations(cfg, ab, not fused_attention) * patches if vision_trains else 0
    if grad_checkpointing:  # every layer keeps its input; one layer is recomputed at a time
        acts = t.depth * t.width * ab * tokens + dec_layer
        acts += (v.depth * v.width * ab * patches + vit_layer) if vision_trains else 0
    else:
        acts = t.depth * dec_layer + v.depth * vit_layer
    text_positions = batch * max(seq_len - images_per_example * v.num_patches, 1)
    return MemoryEstimate(
        weights=(trainable * tb + frozen * fb) / shards, grads=trainable * tb / shards,
        optimizer=2 * trainable * tb / shards,
        autocast_copies=cached_casts * ab if precision != "fp32" else 0,
        activations=acts, logits=text_positions * t.vocab_size * (2 * ab + 8),
        trainable=trainable, frozen=frozen + base, quantized=sum(b.numel() * b.element_size() for b in model.buffers()),
        scheme=quantize_base)
