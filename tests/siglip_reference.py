"""The oracle for SigLIP / SigLIP 2: transformers' own models, tokenizers and image processors, saved as
tiny random checkpoints in the hub layout (save_pretrained), so the tests need no network.

Three kinds, as on the hub:
  "siglip"   SiglipModel + SiglipTokenizer (spiece.model, T5 conventions: pad = EOS = </s>) + bicubic resize
  "siglip2"  SiglipModel + Gemma tokenizer.model (no BOS, EOS appended, right padding: the SigLIP 2
             conversion script's settings) + bilinear resize: SigLIP 2 at a fixed resolution
  "naflex"   Siglip2Model + the same tokenizer + Siglip2ImageProcessor (patches, mask, spatial shapes)
The tokenizers save model_input_names ["input_ids"], as the conversion scripts do (no attention mask).
Text and image towers differ in width and the text head projects to the image width, as SigLIP 2
g-opt does, so a width mix-up shows.
"""
import io
import math
import os
from functools import lru_cache

import sentencepiece as spm
import torch

import hf_reference

VISION = dict(hidden_size=40, intermediate_size=56, num_attention_heads=2, num_hidden_layers=2, patch_size=8)
TEXT = dict(hidden_size=32, intermediate_size=48, num_attention_heads=2, num_hidden_layers=2,
            max_position_embeddings=64, projection_size=40)
IMAGE_SIZE = 32           # fixed resolution: 4×4 patches
NAFLEX_TABLE = 16         # 4×4 learned positions
NAFLEX_MAX_PATCHES = 24   # the patch budget the processor pads to
T5_VOCAB = 300


@lru_cache(maxsize=1)
def _t5_tokenizer_bytes():
    """A unigram model with T5's conventions (pad 0, </s> 1, <unk> 2, no BOS; nmt_nfkc normalisation,
    dummy prefix), as SigLIP's spiece.model; trained on mixed-case text so lowercasing matters."""
    lines = [s.upper() if i % 3 == 0 else s.capitalize() for i, s in enumerate(hf_reference._corpus())]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, model_type="unigram", vocab_size=T5_VOCAB,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
        character_coverage=1.0, num_threads=1, minloglevel=2)
    return buf.getvalue()


@torch.no_grad()
def _perturb_(model, seed):
    """Seeded random values everywhere (no exact 0 or 1): LayerNorm scales near 1, biases small, matrices
    1/sqrt(fan_in) (q/k gain 2, so attention is far from uniform), temperature and bias moderate so the
    sigmoid probabilities are not saturated."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        p.normal_(generator=g)
        if name == "logit_scale":
            p.mul_(0.1).add_(math.log(4.0))
        elif name == "logit_bias":
            p.mul_(0.1).add_(-0.5)
        elif p.ndim == 1 and ("norm" in name) and name.endswith("weight"):
            p.mul_(0.2).add_(1.0)
        elif p.ndim == 1:
            p.mul_(0.1)
        elif "embedding" in name or "probe" in name:
            p.mul_(0.5)
        else:
            gain = 2.0 if ("q_proj" in name or "k_proj" in name or "in_proj" in name) else 1.0
            p.mul_(gain / math.sqrt(p[0].numel()))


def make_checkpoint(out_dir, kind="siglip", seed=0):
    from transformers import GemmaTokenizer, Siglip2Config, Siglip2Model, SiglipConfig, SiglipModel, SiglipTokenizer
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
    from transformers.models.siglip2.image_processing_pil_siglip2 import Siglip2ImageProcessorPil

    os.makedirs(out_dir, exist_ok=True)
    if kind == "siglip":
        path = os.path.join(out_dir, "spiece.model")
        with open(path, "wb") as f:
            f.write(_t5_tokenizer_bytes())
        tokenizer = SiglipTokenizer(path, model_input_names=["input_ids"])
        vocab = T5_VOCAB
    else:
        hf_reference.train_tokenizer(out_dir)
        tokenizer = GemmaTokenizer.from_pretrained(out_dir, add_bos_token=False, add_eos_token=True,
                                                   padding_side="right", model_input_names=["input_ids"])
        vocab = hf_reference.SP_VOCAB_SIZE
    text = dict(TEXT, vocab_size=vocab)
    if kind == "naflex":
        vision = dict(VISION, num_patches=NAFLEX_TABLE)
        model = Siglip2Model(Siglip2Config(text_config=text, vision_config=vision))
        image_processor = Siglip2ImageProcessorPil(patch_size=VISION["patch_size"], max_num_patches=NAFLEX_MAX_PATCHES)
    else:
        model = SiglipModel(SiglipConfig(text_config=text, vision_config=dict(VISION, image_size=IMAGE_SIZE)))
        image_processor = SiglipImageProcessorPil(
            size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, resample=3 if kind == "siglip" else 2,
            image_mean=[0.5] * 3, image_std=[0.5] * 3)
    _perturb_(model.eval(), seed)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    image_processor.save_pretrained(out_dir)
    return out_dir


def load_tf(out_dir):
    """(model in eval mode with eager attention, tokenizer as AutoTokenizer picks it, PIL image processor)."""
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    model, info = AutoModel.from_pretrained(out_dir, dtype=torch.float32, attn_implementation="eager",
                                            output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    if problems:
        raise AssertionError(f"transformers loaded {out_dir} with problems: {problems}")
    image_processor = AutoImageProcessor.from_pretrained(out_dir, backend="pil")
    return model.eval(), AutoTokenizer.from_pretrained(out_dir), image_processor
