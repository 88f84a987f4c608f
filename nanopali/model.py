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

from .attention import log_choice, resolve_impl
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
        """The attention implementation the decoder runs on its device ("auto" resolved)."""
        return resolve_impl(self.language_model.attn_impl, self.device, self.cfg.text.attn_softcap)

    @attn_impl.setter
    def attn_impl(self, impl: str) -> None:
        resolve_impl(impl, torch.device("cpu"), None)  # validates the name
        self.vision_tower.attn_impl = self.language_model.attn_impl = impl
        if self.device.type != "meta":
            log_choice(impl, self.device, self.cfg.text.attn_softcap)

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

        With a cache, keys/values are written to slots 0..T-1 (the prefill of generation)."""
        if input_ids.shape[1] > self.cfg.text.max_positions:
            raise ValueError(f"input_ids hold {input_ids.shape[1]} tokens; the decoder has "
                             f"{self.cfg.text.max_positions} positions (text_config.max_position_embeddings)")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        mask = PrefixLMMask.from_batch(attention_mask, token_type_ids)
        x = self.embed(input_ids, pixel_values)
        h = self.language_model(x, mask, mask.positions(self.cfg.position_base), cache=cache)
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
        h, mask = self.hidden_states(input_ids, pixel_values, attention_mask, token_type_ids, cache=cache)
        return self.logits(h[:, -1]), mask.extend(cache.max_len - mask.length)

    def decode_step(self, tokens: torch.Tensor, pos: torch.Tensor, cache: StaticKVCache,
                    mask: PrefixLMMask) -> torch.Tensor:
        """One token per row, (B,) ids at cache slot `pos` (a 0-d tensor) → next-token logits (B, V).

        Everything is a tensor on the device and every shape is fixed, so this one function serves every
        step, eager or compiled (torch.compile / CUDA graphs)."""
        positions = mask.positions_at(pos[None], self.cfg.position_base)                  # (B, 1)
        x = self.language_model.embed_tokens(tokens[:, None])                             # (B, 1, D)
        h = self.language_model(x, mask, positions, cache=cache, pos=pos)
        return self.logits(h[:, -1])

    def forward(self, input_ids, pixel_values=None, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        """Logits (B, T_text, V) at the text positions (every position that is not an image token).

        With a different number of images per row, each row's text positions are right-aligned and
        the rows with fewer are padded at the front with zeros."""
        h, _ = self.hidden_states(input_ids, pixel_values, attention_mask, token_type_ids)
        is_text = input_ids != self.cfg.image_token_id                                # (B, T)
        counts = is_text.sum(1)
        T_text = int(counts.max())
        if bool((counts == T_text).all()):
            h = h[is_text].view(h.shape[0], T_text, h.shape[-1])                      # (B, T_text, D)
            return self.logits(h)
        # Rows with more images have fewer text positions: right-align each row's text positions
        # (as its tokens are) and fill the front with zeros, like the pads of the input.
        logits = self.logits(h[is_text])                              # (sum T_text, V)
        out = logits.new_zeros(h.shape[0], T_text, logits.shape[-1])
        col = torch.cumsum(is_text, 1) - 1 + (T_text - counts)[:, None]               # (B, T)
        out[torch.nonzero(is_text, as_tuple=True)[0], col[is_text]] = logits
        return out
