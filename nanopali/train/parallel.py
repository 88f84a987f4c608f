"""Several devices under torchrun: the process group, and PyTorch's own DDP or FSDP2 around the objective.

  ddp   every process holds the whole model; gradients are averaged across processes in backward
        (torch.nn.parallel.DistributedDataParallel). Enough for PaliGemma 3B on 80 GB GPUs.
  fsdp  weights, gradients and AdamW state are sharded across processes; each transformer block of
        both towers is one `fully_shard` unit (FSDP2), gathered just before it runs and freed after,
        so 10B / 28B models fit. Rank 0 reads the checkpoint and the others receive their shards.
Both average gradients over processes; train_step scales each rank's loss by the world size so the
update equals one process on the combined batch (finetune.train_step).
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn as nn

from ..formats.files import resolve_device
from .finetune import AUTOCAST_DTYPES


def setup(device_flag: str = "auto") -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun (WORLD_SIZE > 1) joins the process group: nccl with
    one GPU per process (cuda:LOCAL_RANK), gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 1, resolve_device(device_flag)
    cuda = torch.cuda.is_available() and device_flag != "cpu"
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), world, device


def wrap(objective: nn.Module, mode: str, precision: str, device: torch.device) -> nn.Module:
    """DDP, or FSDP2 with one unit per transformer block (weights gathered in the autocast dtype,
    gradients reduced in float32)."""
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        # Every rank loads the same weights and training updates no buffer, so DDP's default broadcast of
        # the buffers before each forward would only resend the quantized base of a QLoRA run every step.
        return DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None,
                                       gradient_as_bucket_view=True, broadcast_buffers=False)
    if mode != "fsdp":
        raise ValueError(f"parallel mode must be 'ddp' or 'fsdp', got {mode!r}")
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=AUTOCAST_DTYPES[precision], reduce_dtype=torch.float32)
    for block in [*objective.model.vision_tower.blocks, *objective.model.language_model.layers]:
        fully_shard(block, mp_policy=mp)
    return fully_shard(objective, mp_policy=mp)
