"""A static, preallocated KV cache (gpt-fast style) that serves a bidirectional prefix.

Every layer owns a (B, K, S_max, H) key and value buffer allocated once. The prefix (image + prompt)
is written in one prefill and then read by every generated token. A decode step writes its keys and
values in place at slot `pos` (a 0-d tensor on the device, gpt-fast's `input_pos`) and attends to all
slots, the mask hiding the unwritten ones: shapes never change between steps, so the step can be
compiled / CUDA-graphed. Rows are left-padded so every row writes at the same slot. Sliding-window
layers keep all slots and rely on the mask (masking.py), which gives the same answer as transformers'
rolling sliding cache with less bookkeeping.
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

    def prefill(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write a whole prompt's k/v (B, K, T, H) at slots 0..T-1; its attention reads them as given."""
        T = k.shape[2]
        if T > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; the prompt has {T}")
        self.k[layer, :, :, :T] = k
        self.v[layer, :, :, :T] = v
        return k, v

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor):
        """Write a decode step's k/v (B, K, T, H) at slots pos..pos+T-1 (pos a 0-d tensor on the device)
        and return all S slots (B, K, S, H): a fixed shape, so one compiled step serves every position;
        the mask hides the slots not written yet. The caller checked pos + T ≤ S before decoding."""
        idx = pos + torch.arange(k.shape[2], device=k.device)
        self.k[layer].index_copy_(2, idx, k)
        self.v[layer].index_copy_(2, idx, v)
        return self.k[layer], self.v[layer]
