"""A static, preallocated KV cache (gpt-fast style) that serves a bidirectional prefix.

Every layer owns a (B, K, S, H) key and value buffer allocated once. One `update` serves the prefill
and every decode step, as gpt-fast's `KVCache.update(input_pos, k, v)` does: it writes T new keys and
values in place at slots slot..slot+T-1 (slot a 0-d tensor on the device: 0 for the prompt, the step's
slot after it) and returns all S slots; the prefix-LM mask, sliced by the same slot, hides the ones not
written yet. Shapes never change between steps, so the step can be compiled / CUDA-graphed. Rows are
left-padded so every row writes at the same slot. Sliding-window layers keep all slots and rely on the
mask (masking.py), which gives the same answer as transformers' rolling sliding cache with less
bookkeeping.
"""
from __future__ import annotations

import torch

# Letters: L layers, B batch, K kv heads, S slots, H head dim, T tokens written.


class StaticKVCache:
    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (num_layers, batch, num_kv_heads, max_len, head_dim)          # (L, B, K, S, H)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len

    def update(self, layer: int, slot: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write k/v (B, K, T, H) at slots slot..slot+T-1 and return this layer's S slots (B, K, S, H),
        read in place. The caller checked slot + T ≤ S (a tensor slot is not read back from the device)."""
        idx = slot + torch.arange(k.shape[2], device=k.device)
        self.k[layer].index_copy_(2, idx, k)
        self.v[layer].index_copy_(2, idx, v)
        return self.k[layer], self.v[layer]
