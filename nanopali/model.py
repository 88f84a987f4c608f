"""PaliGemma: SigLIP image tokens + a Gemma decoder run as a prefix-LM (PaliGemma paper §3, Fig. 1).

    image → SigLIP → projector → image tokens ┐
    [<image>×P BOS prompt \\n suffix EOS] ids → embed·√D ┴→ one sequence → Gemma under the prefix-LM
    mask → final norm → tied LM head → logits at the text positions

The image tokens replace the `<image>` placeholder ids in order, as transformers' `masked_scatter`
does (`PaliGemmaModel.get_placeholder_mask`), so one code path serves one or several images a row.
Reference: transformers `PaliGemmaForConditionalGeneration`, big_vision `proj/paligemma/paligemma.Model`.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .attention import choose, log_choice
from .config import PaliGemmaConfig
from .gemma import Gemma
from .kv_cache import StaticKVCache
from .masking import PrefixLMMask
from .projector import Projector
from .vit import SigLIPEncoder

# Letters: B batch, T tokens, P image tokens per image, I images, D width, V vocab.


class PaliGemma(nn.Module):
    def __init__(self, cfg: PaliGemmaConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_tower = SigLIPEncoder(cfg.vision)
        self.projector = Projector(cfg.vision.width, cfg.text.width)
        self.language_model = Gemma(cfg.text)

    @property
    def device(self) -> torch.device:
        return self.language_model.final_norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (the norms' weights, which quantization never touches)."""
        return self.language_model.final_norm.weight.dtype

    @property
    def attn_impl(self) -> str:
        """The attention implementation the decoder runs: attention.choose's answer for its calls."""
        t = self.cfg.text
        return choose(self.language_model.attn_impl, self.device, self.dtype, t.head_dim,
                      t.num_heads // t.num_kv_heads, t.attn_softcap)

    @attn_impl.setter
    def attn_impl(self, impl: str) -> None:
        t = self.cfg.text
        chosen = choose(impl, self.device, self.dtype, t.head_dim, t.num_heads // t.num_kv_heads,
                        t.attn_softcap)                                      # refuses an unknown name
        self.vision_tower.attn_impl = self.language_model.attn_impl = impl
        if self.device.type != "meta":
            log_choice(impl, chosen, self.device, t.attn_softcap)

    def set_gradient_checkpointing(self, on: bool = True) -> None:
        self.vision_tower.gradient_checkpointing = self.language_model.gradient_checkpointing = on

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with the projected image tokens in place of `<image>` ids: (B, T, D)."""
        is_image = input_ids == self.cfg.image_token_id                               # (B, T)
        # `<image>` may lie beyond the embedding table; its row is never used, so look up id 0.
        x = self.language_model.embed_tokens(input_ids.masked_fill(is_image, 0))      # (B, T, D)
        n = int(is_image.sum())
        if n == 0:
            return x
        if pixel_values is None:
            raise ValueError(f"input_ids hold {n} <image> tokens but no pixel_values were given")
        feats = self.projector(self.vision_tower(pixel_values))                       # (I, P, D)
        if feats.shape[0] * feats.shape[1] != n:
            raise ValueError(f"{feats.shape[0]} images give {feats.shape[0] * feats.shape[1]} image tokens, "
                             f"but input_ids hold {n} <image> placeholders")
        x = x.clone() if x.requires_grad else x
        x[is_image] = feats.reshape(-1, feats.shape[-1]).to(x.dtype)                  # not scaled by √D
        return x

    def hidden_states(self, input_ids, pixel_values=None, attention_mask=None, token_type_ids=None,
                      cache=None) -> tuple[torch.Tensor, PrefixLMMask]:
        """The decoder's final-normed hidden states (B, T, D) for a whole prompt, and its mask.

        The prompt is at slots 0..T-1; with a cache, its keys/values are written there (the prefill)."""
        if input_ids.shape[1] > self.cfg.text.max_positions:
            raise ValueError(f"input_ids hold {input_ids.shape[1]} tokens; the decoder has "
                             f"{self.cfg.text.max_positions} positions (text_config.max_position_embeddings)")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        mask = PrefixLMMask.from_batch(attention_mask, token_type_ids)
        x = self.embed(input_ids, pixel_values)
        slot = torch.zeros((), dtype=torch.long, device=input_ids.device)
        h = self.language_model(x, mask, mask.positions(self.cfg.position_base), slot, cache)
        return h, mask

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The tied LM head (with Gemma 2's final soft-cap) at the hidden states given: (..., D) → (..., V).
        Callers pass only the positions they need (the last one in decoding, the targets in training)."""
        return self.language_model.logits(h)

    # ---- generation: a static cache, one prefill, then one token per step (generate.py drives these) ----

    def new_cache(self, batch: int, max_len: int) -> StaticKVCache:
        t = self.cfg.text
        return StaticKVCache(t.depth, batch, t.num_kv_heads, max_len, t.head_dim, self.dtype, self.device)

    def prefill(self, input_ids, pixel_values=None, attention_mask=None, token_type_ids=None, *,
                cache: StaticKVCache) -> tuple[torch.Tensor, PrefixLMMask]:
        """Run the whole prompt once, filling cache slots 0..T-1: next-token logits (B, V) and the mask,
        extended to the cache's length (a generated token is a causal suffix token)."""
        if input_ids.shape[1] > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} tokens; the prompt has {input_ids.shape[1]}")
        h, mask = self.hidden_states(input_ids, pixel_values, attention_mask, token_type_ids, cache=cache)
        return self.logits(h[:, -1]), mask.extend(cache.max_len - mask.length)

    def decode_step(self, tokens: torch.Tensor, slot: torch.Tensor, cache: StaticKVCache,
                    mask: PrefixLMMask) -> torch.Tensor:
        """One token per row, (B,) ids at cache slot `slot` (a 0-d tensor) → next-token logits (B, V).

        Everything is a tensor on the device and every shape is fixed, so this one function serves every
        step, eager or compiled (torch.compile / CUDA graphs)."""
        positions = mask.positions_at(slot[None], self.cfg.position_base)                 # (B, 1)
        x = self.language_model.embed_tokens(tokens[:, None])                             # (B, 1, D)
        h = self.language_model(x, mask, positions, slot, cache)
        return self.logits(h[:, -1])

    def forward(self, input_ids, pixel_values=None, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        """Logits (B, T_text, V) at the text positions (every position that is not an image token).

        With a different number of images per row, each row's text positions are right-aligned and
        the rows with fewer are padded at the front with zeros."""
        h, _ = self.hidden_states(input_ids, pixel_values, attention_mask, token_type_ids)
        is_text = input_ids != self.cfg.image_token_id                                # (B, T)
        T_text = int(is_text.sum(1).max())
        # A stable sort moves each row's image tokens to the front, text after in order: the last T_text
        # columns are the text positions, right-aligned. Only a row with more images than another still
        # holds image tokens there; they become zero vectors, whose logits are 0, like the input's pads.
        idx = is_text.int().sort(dim=1, stable=True).indices[:, is_text.shape[1] - T_text:]   # (B, T_text)
        h = h.gather(1, idx[..., None].expand(-1, -1, h.shape[-1])) * is_text.gather(1, idx)[..., None]
        return self.logits(h)                                                          # (B, T_text, V)
