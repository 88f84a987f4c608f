"""The prefix-LM attention mask (PaliGemma paper §3.2, "prefix-LM"; PaliGemma 2 keeps it).

A row is laid out as  [pad ...] [image tokens] [BOS prefix \n] [suffix EOS]: pads on the left, as
transformers' processor does, so that every row of a batch ends at the same index and generation
appends new tokens at one shared cache position. Image + BOS + prefix + "\n" form one block that
attends to itself fully; suffix tokens are causal; pads are seen by nobody.

The whole mask of a row is therefore two integers: `start` (index of the first real token = number
of left pads) and `prefix_end` (index of the first suffix token, = T when there is no suffix). The
same two numbers drive the dense boolean mask, the fused kernel's tile skipping, the loss mask and
the RoPE positions. Reference: big_vision `paligemma.make_attn_mask` (mask_ar cumsum) and
transformers `PaliGemmaModel` (token_type_ids → block 0 bidirectional, OR-ed with causal).

Gemma 2's sliding window (even layers, transformers `masking_utils`) limits only the causal part:
a query in the prefix still sees the whole prefix however long it is; a suffix query sees the last
`window` keys, itself included.

One deliberate extension: every query also sees itself. For real tokens this changes nothing (they
already do); for a pad it keeps the softmax row finite instead of 0/0, so no NaN can leak through
0 * NaN into real rows. Pad outputs are never used.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# Letters: B batch, T query length, S key length.


@dataclass
class PrefixLMMask:
    start: torch.Tensor       # (B,) int64: first real token of each row (= number of left pads)
    prefix_end: torch.Tensor  # (B,) int64: first suffix token of each row (= length if none)
    length: int               # T of the batch the mask was built for

    @classmethod
    def from_batch(cls, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> "PrefixLMMask":
        """From the processor's tensors: attention_mask 1 = real token; token_type_ids 1 = suffix.

        Without token_type_ids every real token is in the prefix (a prompt with no suffix)."""
        if attention_mask.dim() != 2:
            raise ValueError(f"attention_mask must be (batch, length), got shape {tuple(attention_mask.shape)}")
        if token_type_ids is not None and token_type_ids.shape != attention_mask.shape:
            raise ValueError(f"token_type_ids has shape {tuple(token_type_ids.shape)} but attention_mask has "
                             f"{tuple(attention_mask.shape)}")
        valid = attention_mask.bool()                                          # (B, T)
        B, T = valid.shape
        suffix = token_type_ids.bool() & valid if token_type_ids is not None else torch.zeros_like(valid)
        start = T - valid.sum(1)
        n_suffix = suffix.sum(1)
        prefix_end = T - n_suffix
        idx = torch.arange(T, device=valid.device)
        want_valid = idx[None] >= start[:, None]
        want_suffix = idx[None] >= prefix_end[:, None]
        if not torch.equal(valid, want_valid) or not torch.equal(suffix, want_suffix):
            raise ValueError(
                "nanopali expects each row laid out as [left pads][image + BOS prefix \\n][suffix EOS]: "
                "attention_mask must be 0...0 1...1 and token_type_ids 0...0 1...1 within the real tokens."
            )
        return cls(start.long(), prefix_end.long(), T)

    @classmethod
    def full(cls, batch: int, length: int, device=None) -> "PrefixLMMask":
        """Everything sees everything (SigLIP's encoder, or a prompt with no pads and no suffix)."""
        z = torch.zeros(batch, dtype=torch.long, device=device)
        return cls(z, torch.full_like(z, length), length)

    @property
    def batch(self) -> int:
        return self.start.shape[0]

    def allowed(self, slot=0, q_len: int | None = None, kv_len: int | None = None,
                window: int | None = None) -> torch.Tensor:
        """Boolean (B, 1, T, S) mask: may the query at absolute index slot + t read key s?

        slot is the cache slot of the first query: 0 for a whole sequence, the step's slot in decoding,
        an int or a 0-d tensor on the device (one compiled step then serves every slot). q_len is the
        number of queries (given whenever slot is a tensor), kv_len the number of keys (a static cache
        may hold more slots than are written)."""
        q_len = self.length - slot if q_len is None else q_len
        kv_len = self.length if kv_len is None else kv_len
        i = (slot + torch.arange(q_len, device=self.start.device))[None, :, None]   # (1, T, 1)
        j = torch.arange(kv_len, device=self.start.device)[None, None, :]           # (1, 1, S)
        start = self.start[:, None, None]
        pe = self.prefix_end[:, None, None]
        causal = j <= i
        if window is not None:
            causal = causal & (i - j < window)
        both_prefix = (i < pe) & (j < pe)
        real = (i >= start) & (j >= start)
        return ((real & (both_prefix | causal)) | (i == j))[:, None]               # (B, 1, T, S)

    def positions(self, base: int = 1) -> torch.Tensor:
        """RoPE position of every token, (B, T): 0 or 1 for the first real token (see `base`)."""
        return self.positions_at(torch.arange(self.length, device=self.start.device), base)

    def positions_at(self, index: torch.Tensor, base: int = 1) -> torch.Tensor:
        """RoPE positions (B, len(index)) of the tokens at these absolute indices (cache slots).

        The one position rule: a token's position counts the real tokens of its row before it, so left
        pads shift nothing. transformers counts from 1 (cumsum(attention_mask) in generate, then +1);
        big_vision from 0. RoPE is relative, so the base only changes rounding; pads get `base` (they
        are never read)."""
        return (index.reshape(1, -1) - self.start[:, None]).clamp(min=0) + base

    def loss_mask(self) -> torch.Tensor:
        """(B, T) bool: tokens that are targets of the loss (suffix + EOS; never image/prefix/pads).

        The logit at index t-1 predicts token t, so train on logits[:, :-1][mask[:, 1:]]."""
        t = torch.arange(self.length, device=self.start.device)[None]
        return t >= self.prefix_end[:, None]

    def extend(self, n: int) -> "PrefixLMMask":
        """The same rows with n generated (suffix, causal) tokens appended on the right."""
        return PrefixLMMask(self.start, self.prefix_end, self.length + n)

    def __str__(self) -> str:
        """A block picture per row: row = query, column = key; '#' may attend, '.' may not.

        Left letters: P pad, p prefix (image, BOS, prompt, \\n), s suffix."""
        m = self.allowed()[:, 0]
        out = []
        for b in range(self.batch):
            out.append(f"row {b}: start={int(self.start[b])} prefix_end={int(self.prefix_end[b])}")
            for i in range(self.length):
                kind = "P" if i < self.start[b] else ("p" if i < self.prefix_end[b] else "s")
                out.append(f"  {kind} " + "".join("#" if x else "." for x in m[b, i].tolist()))
        return "\n".join(out)
