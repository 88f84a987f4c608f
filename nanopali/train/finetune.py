"""Fine-tuning: which weights train, the optimizer, the prefix-LM loss and one optimizer step.

PaliGemma is built for transfer (both papers' titles say so): the whole model, or a part of it, is
fine-tuned on (image, prefix, suffix) examples with the loss on suffix + EOS only
(docs/sequence.md#loss). This file is the reusable core that train.py and a notebook share:

  set_trainable   named presets: all, llm, attn, projector, lora (lora.py adds the adapters)
  make_optimizer  AdamW, weight decay on matrices only; lr_at: linear warmup then cosine
  loss_terms      cross-entropy at the loss positions only, logits in float32, two normalisations
  Objective       model + loss as one module, so DDP / FSDP see the whole step as one forward
  train_step      micro-batches (gradient accumulation, data-parallel ranks) → one AdamW update
Letters: B batch, T tokens, D width, V vocabulary, M supervised tokens of a batch.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# Which parameters train, by name. `attn` is big_vision's recipe for a 16 GB GPU (finetune_paligemma
# notebook: only `llm/layers/attn/`); `llm` freezes the image encoder and the projector, which
# big_vision keeps under `img/` and the transformers fine-tuning blog freezes with it.
TRAINABLE = {
    "all": lambda name: True,
    "llm": lambda name: name.startswith("language_model."),
    "attn": lambda name: name.startswith("language_model.layers.") and ".attn." in name,
    "projector": lambda name: name.startswith("projector."),
    "lora": lambda name: ".lora_" in name,
}
LOSS_NORMALIZATIONS = ("tokens", "examples")
AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Matrices that act as lookup tables, not as linear maps: the token embedding (tied to the LM head) gets
# a gradient only on the rows of tokens in the batch, so decay would shrink every unseen row, the 1024
# <loc> and 128 <seg> rows included, at every step; the position embedding is added like a bias.
NO_DECAY = ("language_model.embed.weight", "vision_tower.pos_embed")


def set_trainable(model: nn.Module, preset: str) -> int:
    """requires_grad by preset (see TRAINABLE); returns the number of trainable parameters."""
    if preset not in TRAINABLE:
        raise ValueError(f"Unknown trainable preset {preset!r}; choose one of {', '.join(TRAINABLE)}")
    if preset == "lora" and getattr(model, "lora_config", None) is None:
        raise ValueError("trainable preset 'lora' needs adapters: call "
                         "nanopali.train.lora.apply_lora(model, cfg) first")
    if preset != "lora" and getattr(model, "quantization", None) is not None:
        raise ValueError(f"trainable preset {preset!r} on a {model.quantization['scheme']} base: its quantized "
                         "weights are frozen buffers; train adapters on it with preset 'lora' (QLoRA)")
    n = 0
    for name, p in model.named_parameters():
        p.requires_grad_(TRAINABLE[preset](name))
        n += p.numel() if p.requires_grad else 0
    return n


@torch.no_grad()
def cast_params(model: nn.Module, trainable: torch.dtype, frozen: torch.dtype) -> None:
    """Hold trainable and frozen weights in their own dtypes (e.g. fp32 master weights, bf16 frozen tower).
    Parameters only: a quantized base's int8 / int4 buffers and their scales keep the dtypes they were
    quantized with (train/qlora.py), so their bytes never change during training."""
    for p in model.parameters():
        p.data = p.data.to(trainable if p.requires_grad else frozen)


@torch.no_grad()
def init_random(model: nn.Module, seed: int, std: float = 0.02) -> nn.Module:
    """Fresh weights for training from scratch: every matrix, convolution and embedding N(0, std²)
    (std = transformers' default initializer_range, 0.02), biases 0, LayerNorm scales 1, Gemma
    RMSNorm offsets 0 (scale 1 + w = 1). Seeded by its own generator, independent of the global RNG."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.ndim >= 2:
            value = torch.randn(p.shape, generator=g) * std
        elif name.startswith("vision_tower") and name.endswith("weight"):
            value = torch.ones(p.shape)
        else:
            value = torch.zeros(p.shape)
        p.copy_(value)
    return model


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decay for matrices (linear and conv weights, LoRA A/B), none for vectors
    (biases, norms) and for the lookup tables in NO_DECAY (nanoGPT's `configure_optimizers` split)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        table = any(name == t or name.endswith("." + t) for t in NO_DECAY)   # also under Objective / DDP
        if p.requires_grad:
            (decay if p.ndim >= 2 and not table else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999),
                   eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; the fused kernel where every parameter is a plain CPU or
    CUDA tensor (not a DTensor shard of FSDP, where the foreach path is used)."""
    groups = param_groups(model, weight_decay)
    params = [p for g in groups for p in g["params"]]
    if not params:
        raise ValueError("No trainable parameters: check the trainable preset")
    plain = all(type(p.data) is torch.Tensor and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=plain or None)


def lr_at(step: int, lr: float, max_steps: int, warmup_steps: int = 0, min_lr: float = 0.0) -> float:
    """Learning rate of optimizer step `step` (1-based): linear warmup from lr/warmup to lr over
    warmup_steps, then half a cosine from lr down towards min_lr, reached one step after the last
    (nanoGPT's get_lr; big_vision's decay_type='cosine' with warmup). A pure function of the step,
    so the schedule has no state to save."""
    it = step - 1
    if it < warmup_steps:
        return lr * (it + 1) / warmup_steps
    progress = (it - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def loss_terms(model: nn.Module, batch: dict, normalization: str = "tokens") -> tuple[torch.Tensor, torch.Tensor]:
    """(sum, count) of the prefix-LM cross-entropy of one batch; the batch loss is sum / count.

    Only suffix + EOS tokens are targets; the logit at t-1 predicts token t. The tied 257k-row head
    runs only at those M positions, and the cross-entropy is taken on float32 logits (transformers
    upcasts in ForCausalLMLoss, big_vision trains in float32). Two normalisations (docs/disagreements.md #13):
      "tokens"    every supervised token of the batch weighs the same: sum = Σ CE, count = M
                  (transformers' ForCausalLMLoss: mean over all non-ignored labels);
      "examples"  every example weighs the same: sum = Σ_rows (row's CE sum / max(row's count, 1)),
                  count = B (big_vision trainers/proj/paligemma/train.py).
    Returning the two parts lets micro-batches and ranks add their sums and divide once by the count
    of the whole optimizer step, so accumulated and data-parallel steps equal one big batch.
    """
    if normalization not in LOSS_NORMALIZATIONS:
        raise ValueError(f"loss normalization must be one of {LOSS_NORMALIZATIONS}, got {normalization!r}")
    ids = batch["input_ids"]
    h, mask = model.hidden_states(ids, batch.get("pixel_values"), batch["attention_mask"], batch["token_type_ids"])
    sel = mask.loss_mask()[:, 1:]                                                  # (B, T-1)
    logits = model.logits(h[:, :-1][sel]).float()                                  # (M, V)
    ce = F.cross_entropy(logits, ids[:, 1:][sel], reduction="none")                # (M,)
    if normalization == "tokens":
        return ce.sum(), sel.sum()
    per_row = torch.zeros(ids.shape[0], device=ce.device).index_add_(0, sel.nonzero()[:, 0], ce)  # (B,)
    return (per_row / sel.sum(1).clamp(min=1)).sum(), torch.tensor(ids.shape[0], device=ce.device)


class Objective(nn.Module):
    """The model and its loss as one module. DDP and FSDP act in forward hooks, so the training
    forward (hidden states, then the head at the loss positions only) must be one module's forward."""

    def __init__(self, model: nn.Module, normalization: str = "tokens"):
        super().__init__()
        self.model, self.normalization = model, normalization

    def forward(self, input_ids, attention_mask, token_type_ids, pixel_values=None):
        batch = dict(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                     pixel_values=pixel_values)
        return loss_terms(self.model, batch, self.normalization)


def autocast(precision: str, device: torch.device):
    dtype = AUTOCAST_DTYPES[precision]
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _grad_sync(objective: nn.Module, on: bool):
    """Skip the gradient all-reduce on all but the last micro-batch (DDP no_sync, FSDP2's switch)."""
    if hasattr(objective, "set_requires_gradient_sync"):       # FSDP2 (fully_shard)
        objective.set_requires_gradient_sync(on)
        return contextlib.nullcontext()
    if hasattr(objective, "no_sync") and not on:               # DDP
        return objective.no_sync()
    return contextlib.nullcontext()


@dataclass
class StepResult:
    loss: float              # the step's loss: sum over every micro-batch and rank / count
    grad_norm: float | None  # before clipping; None when the step was not taken
    tokens: int              # real (non-pad) positions processed, image tokens included, all ranks
    finite: bool


def train_step(objective: nn.Module, optimizer, micro_batches: list[dict], count: float, *,
               precision: str = "fp32", scaler=None, grad_clip: float | None = None) -> StepResult:
    """One AdamW update from this rank's micro-batches of a step.

    count is the loss denominator of the whole step, all micro-batches of all ranks together
    (supervised tokens, or examples; see loss_terms). Each micro-batch backpropagates
    sum · world / count: the data-parallel wrappers average gradients over the world, so the update
    equals that of one process on the combined batch. A non-finite loss leaves the weights
    untouched (grads dropped) and returns finite=False: the caller stops or skips.
    """
    world = dist.get_world_size() if dist.is_initialized() else 1
    device = next(objective.parameters()).device
    stats = torch.zeros(2, dtype=torch.float64, device=device)                     # (loss sum, tokens)
    for k, batch in enumerate(micro_batches):
        batch = {name: t.to(device, non_blocking=True) for name, t in batch.items()}
        with _grad_sync(objective, k == len(micro_batches) - 1):
            with autocast(precision, device):
                s, _ = objective(**batch)
            loss = s * (world / count)
            (scaler.scale(loss) if scaler is not None else loss).backward()
        stats[0] += s.detach().double()
        stats[1] += batch["attention_mask"].sum()
    if world > 1:
        dist.all_reduce(stats)
    loss, tokens = stats[0].item() / count, int(stats[1].item())
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if not math.isfinite(loss):
        optimizer.zero_grad(set_to_none=True)
        return StepResult(loss, None, tokens, False)
    if scaler is not None:
        scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip else float("inf"))
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm             # FSDP: a DTensor
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss, float(norm), tokens, True)


@torch.no_grad()
def evaluate_loss(objective: nn.Module, batches, precision: str = "fp32") -> float:
    """Loss over a held-out set: Σ sums / Σ counts over every batch and rank (one number, not a
    mean of batch means). A batch with weight 0 (see train.py's eval sharding) only keeps ranks in step."""
    device = next(objective.parameters()).device
    stats = torch.zeros(2, dtype=torch.float64, device=device)
    for batch, weight in batches:
        batch = {name: t.to(device) for name, t in batch.items()}
        with autocast(precision, device):
            s, n = objective(**batch)
        stats += weight * torch.stack([s.double(), torch.as_tensor(n, device=device).double()])
    if dist.is_initialized():
        dist.all_reduce(stats)
    return (stats[0] / stats[1]).item()
