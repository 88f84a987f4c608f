"""A static, preallocated KV cache (gpt-fast style) that serves a bidirectional prefix.

Every layer owns a (B, K, S_max, H) key and value buffer allocated once. A forward pass writes its
keys/values in place at [q_start, q_start + T) and attends to [0, q_start + T): shapes never change
between decode steps, so the step can be compiled / CUDA-graphed. The prefix (image + prompt) is
written in one prefill and then read by every generated token; rows are left-padded so every row
writes at the same index. Sliding-window layers keep all slots and rely on the mask (masking.py),
which gives the same answer as transformers' rolling sliding cache with less bookkeeping.
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

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, q_start):
        """Write k/v (B, K, T, H) at slots q_start..q_start+T-1 and return what attention reads.

        q_start an int: the filled slots (B, K, q_start+T, H). q_start a 0-d tensor (compiled
        decode): all S slots, fixed shape; the mask hides the slots not yet written."""
        if isinstance(q_start, torch.Tensor):
            idx = q_start + torch.arange(k.shape[2], device=k.device)
            self.k[layer].index_copy_(2, idx, k)
            self.v[layer].index_copy_(2, idx, v)
            return self.k[layer], self.v[layer]
        end = q_start + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; writing up to {end}")
        self.k[layer, :, :, q_start:end] = k
        self.v[layer, :, :, q_start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]
