"""The oracle: transformers' own PaliGemma / PaliGemma 2, built as tiny random checkpoints on disk.

Parity tests compare nanopali with `transformers.PaliGemmaForConditionalGeneration` (v5.23) on checkpoints
made here, so they need no network and no 3B download. Every checkpoint is a real HF directory
(config.json, safetensors, tokenizer, preprocessor_config.json) that nanopali must load exactly as it
would load one from the hub; the weights can be written in each of the three key layouts in
circulation (docs/checkpoints.md#key-layouts). Facts each fixture relies on are pinned by
tests/test_reference_fixtures.py.

Shapes: B batch, T sequence length, V text vocabulary (rows of the embedding, = logits columns).
"""

import io
import itertools
import json
import math
import os
import random
from functools import lru_cache

import sentencepiece as spm
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

SP_BASE_SIZE = 600  # learned BPE pieces incl. the 4 specials, <mask>, "\n" and 256 byte pieces
LOC_TOKENS = [f"<loc{i:04d}>" for i in range(1024)]
SEG_TOKENS = [f"<seg{i:03d}>" for i in range(128)]
SP_VOCAB_SIZE = SP_BASE_SIZE + len(LOC_TOKENS) + len(SEG_TOKENS)  # 1752
IMAGE_TOKEN_ID = SP_VOCAB_SIZE  # `<image>`: not in tokenizer.model, the processor appends it (docs/files.md#token-ids)
TEXT_VOCAB_SIZE = SP_VOCAB_SIZE + 64  # released checkpoints add 64 padding rows (docs/variants.md#vocabulary-size)
PAD_ID, EOS_ID, BOS_ID = 0, 1, 2
LAYOUTS = ("hub", "transformers", "save")


def _corpus():
    """A few hundred PaliGemma-flavoured English lines (tasks, colours, shapes, numbers, double spaces)."""
    rng = random.Random(0)
    colors = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple"]
    shapes = ["circle", "square", "triangle", "star", "line"]
    things = ["cat", "dog", "car", "bird", "cow", "person", "tree", "house", "shoe", "ball"]
    places = ["beach", "field", "street", "table", "room", "park"]
    lines = []
    for c, s in itertools.product(colors, shapes):
        lines += [f"caption en a {c} {s} on a white background", f"answer en what color is the {s}?",
                  f"the {s} is {c}."]
    for t, p in itertools.product(things, places):
        lines += [f"answer en where is the {t}? the {t} is on the {p}", f"detect {t} ; {rng.choice(things)}",
                  f"segment {t}", f"how many {t}s are there? there are {rng.randint(0, 99)} {t}s"]
    for i in range(60):
        lines += [f"numbers {i} {i * 7} {rng.randint(100, 99999)}, and {rng.random():.3f}",
                  f"Question: Is the {rng.choice(things)} {rng.choice(colors)}?  Yes, it is."]
    return lines


@lru_cache(maxsize=1)
def _tokenizer_bytes():
    """Train once per process; single-threaded SentencePiece training is byte-for-byte deterministic."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()), model_writer=buf, model_type="bpe", vocab_size=SP_BASE_SIZE,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
        unk_piece="<unk>", user_defined_symbols=["<mask>", "\n"], byte_fallback=True, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        allow_whitespace_only_pieces=True, character_coverage=1.0, num_threads=1, minloglevel=2)
    proto = sp_pb2.ModelProto()
    proto.ParseFromString(buf.getvalue())
    # Like big_vision's `_add_pieces`: loc then seg appended after the learned pieces, as user-defined
    # (atomic, non-special) pieces, so <loc0000> = base size and <image> = the full size.
    for name in LOC_TOKENS + SEG_TOKENS:
        proto.pieces.add(piece=name, score=0.0, type=sp_pb2.ModelProto.SentencePiece.USER_DEFINED)
    return proto.SerializeToString()


def train_tokenizer(out_dir) -> str:
    """Write a small Gemma-shaped SentencePiece model to out_dir/tokenizer.model and return its path.

    Gemma's conventions, at 1752 pieces instead of 257152: BPE; <pad>=0 <eos>=1 <bos>=2 <unk>=3 <mask>=4;
    "\\n"=5 as its own atomic piece; identity normalization, no dummy prefix and no whitespace collapsing
    (so "\\n" and runs of spaces survive); digits split; byte fallback; <loc0000..1023> = 600..1623 and
    <seg000..127> = 1624..1751. transformers' GemmaTokenizer converted from this file gives the same ids
    as `sentencepiece.SentencePieceProcessor.encode` for prompts, prompt + "\\n" and suffixes
    (test_hf_tokenizer_ids_equal_sentencepiece_ids). Unlike Gemma, "\\n\\n" is two pieces, not one.
    """
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "tokenizer.model")
    with open(path, "wb") as f:
        f.write(_tokenizer_bytes())
    return path


def _configs(generation, image_size, patch_size, real_widths, text_overrides):
    """Tiny (or 1-layer real-width) text and vision config dicts; text soft-caps and scale as in PG2."""
    if real_widths:
        vision = dict(hidden_size=1152, intermediate_size=4304, num_attention_heads=16, num_hidden_layers=1)
        text = dict(num_hidden_layers=1, num_attention_heads=8, head_dim=256, vocab_size=257216)
        if generation == 1:
            text.update(hidden_size=2048, intermediate_size=16384, num_key_value_heads=1)
        else:
            text.update(hidden_size=2304, intermediate_size=9216, num_key_value_heads=4, query_pre_attn_scalar=256,
                        sliding_window=4096)
    else:
        vision = dict(hidden_size=32, intermediate_size=48, num_attention_heads=2, num_hidden_layers=2)
        text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    head_dim=16, vocab_size=TEXT_VOCAB_SIZE)
        if generation == 1:
            text.update(num_key_value_heads=1)  # MQA, as Gemma 2B
        else:
            # query_pre_attn_scalar != head_dim so that a head_dim**-0.5 bug shows; a window of 8 bites on
            # suffixes longer than 8 - 1 tokens; transformers' default layer_types: sliding, full, ...
            text.update(num_key_value_heads=2, query_pre_attn_scalar=24, sliding_window=8)
    if generation == 2:
        text.update(attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
    text.update(model_type="gemma" if generation == 1 else "gemma2", **text_overrides)
    vision.update(model_type="siglip_vision_model", patch_size=patch_size, image_size=image_size,
                  vision_use_head=False)
    return text, vision


@torch.no_grad()
def _perturb_(model, seed):
    """Overwrite every parameter in place with seeded random values: no exact 0 or 1 anywhere.

    HF init leaves RMSNorm offsets at 0, LayerNorms at 1/0 and biases at 0, where a missing (1 + w), a
    dropped bias or a skipped final norm would be invisible. Matrices get std 1/sqrt(fan_in) so activations
    stay O(1) at any width; q/k get gain 2 so attention logits are O(3), where a missing soft-cap or a wrong
    scale moves the output. With tied weights a random model predicts its own input token: that token's
    logit grows like sqrt(D) * r**2 against ~r for the others (r = norm of an embedding row). So rows are
    short, r = 2.4/sqrt(D), the blocks dominate the residual stream, and the final norm's scale 2/r brings
    logits back to std ~2 (max ~10: clear argmax margins, well inside the 30 soft-cap).
    Rows past the SentencePiece vocab (<image> and the padding rows) sit at the mean row, as the PaliGemma
    converter made them (docs/variants.md#vocabulary-size), so greedy decoding never emits an id the
    tokenizer cannot decode.
    """
    g = torch.Generator().manual_seed(seed)
    d = model.config.text_config.hidden_size
    r = 2.4 / math.sqrt(d)
    for name, p in model.named_parameters():  # the tied lm_head is the embedding: listed once
        p.normal_(generator=g)  # in place: a 257216-row embedding is 2.4 GB
        if p.ndim == 1 and "language_model" in name:  # Gemma RMSNorm: scale is 1 + w
            p.mul_(0.2).add_(2.0 / r - 1.0 if name.endswith("language_model.norm.weight") else 0.0)
        elif p.ndim == 1 and name.endswith(".weight"):  # SigLIP LayerNorm
            p.mul_(0.2).add_(1.0)
        elif p.ndim == 1:  # biases (SigLIP, projector)
            p.mul_(0.1)
        elif "embed_tokens" in name:
            p.mul_(r / math.sqrt(d))
            p[SP_VOCAB_SIZE:].mul_(1e-3).add_(p[:SP_VOCAB_SIZE].mean(0))
        else:
            gain = 2.0 if name.endswith(("q_proj.weight", "k_proj.weight")) else 1.0
            p.mul_(gain / math.sqrt(p[0].numel()))


def _layout_state_dict(model, layout):
    """In-memory names (model.*, lm_head.weight) -> the requested on-disk layout (docs/checkpoints.md#key-layouts)."""
    renames = {
        "hub": [("model.language_model.", "language_model.model."),
                ("model.vision_tower.", "vision_tower.vision_model."),
                ("model.multi_modal_projector.", "multi_modal_projector.")],
        # What save_pretrained in 5.23 writes for a model built in memory: the hub layout minus
        # `vision_model.`. A model loaded from files is written back in the layout it was read from.
        "save": [("model.language_model.", "language_model.model."), ("model.vision_tower.", "vision_tower."),
                 ("model.multi_modal_projector.", "multi_modal_projector.")],
        "transformers": [],
    }[layout]
    out = {}
    for key, t in model.state_dict().items():
        if key == "lm_head.weight" and layout != "transformers":
            continue  # tied to the embedding; the hub files and save_pretrained omit it
        for old, new in renames:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = t.clone() if key == "lm_head.weight" else t  # safetensors refuses shared storage
    return out


def _write_weights(state, out_dir, max_shard_bytes):
    """model.safetensors, or model-0000i-of-0000N.safetensors + model.safetensors.index.json."""
    shards, size = [{}], 0
    for key in sorted(state):
        nbytes = state[key].numel() * state[key].element_size()
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = state[key]
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(out_dir, name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    n_params = sum(t.numel() for t in state.values())
    index = {"metadata": {"total_parameters": n_params, "total_size": total}, "weight_map": weight_map}
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)


def weight_files(out_dir):
    """The safetensors files of a checkpoint directory, sorted."""
    return sorted(f for f in os.listdir(out_dir) if f.endswith(".safetensors"))


def read_weights(out_dir):
    """All tensors of a checkpoint directory as one {key: tensor} dict (for tests)."""
    state = {}
    for name in weight_files(out_dir):
        with safe_open(os.path.join(out_dir, name), "pt") as f:
            state.update({k: f.get_tensor(k) for k in f.keys()})
    return state


def make_hf_checkpoint(out_dir, generation=1, image_size=28, patch_size=14, layout="hub", shard=False,
                       real_widths=False, seed=0, **text_overrides):
    """Build a random transformers PaliGemma (generation 1) or PaliGemma 2 (generation 2) in out_dir.

    Writes config.json and generation_config.json (save_pretrained), the weights in `layout` ("hub",
    "transformers" or "save", see `_layout_state_dict`), sharded into >= 2 files with an index when `shard`,
    tokenizer.model plus transformers' tokenizer files, and preprocessor_config.json (SigLIP: bicubic
    resize to image_size, mean = std = 0.5). `<image>` = 1752 = the SentencePiece size. Text vocab is
    1752 + 64 rows, or 257216 with `real_widths` (1 layer per tower at the released widths, to catch
    width-dependent bugs such as N*H != D in PG2). `text_overrides` replace text_config fields, e.g.
    `sliding_window=4096`. Same seed and same shapes give the same weights, whatever the overrides.
    """
    from transformers import GemmaTokenizer, PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor
    from transformers.initialization import no_init_weights
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    if generation not in (1, 2) or layout not in LAYOUTS:
        raise ValueError(f"generation must be 1 or 2 and layout one of {LAYOUTS}, got {generation!r}, {layout!r}")
    text, vision = _configs(generation, image_size, patch_size, real_widths, text_overrides)
    config = PaliGemmaConfig(
        text_config=text, vision_config=vision, image_token_index=IMAGE_TOKEN_ID, projection_dim=text["hidden_size"],
        hidden_size=text["hidden_size"], vocab_size=text["vocab_size"], pad_token_id=PAD_ID, bos_token_id=BOS_ID,
        eos_token_id=EOS_ID)
    with no_init_weights():  # _perturb_ sets every parameter; HF's init would cost ~30 s at real widths
        model = PaliGemmaForConditionalGeneration(config).eval()
    model.tie_weights()  # normally done by the skipped init: lm_head becomes the embedding
    _perturb_(model, seed)

    os.makedirs(out_dir, exist_ok=True)
    model.config.dtype, model.config.architectures = "float32", [type(model).__name__]  # as save_pretrained
    model.config.save_pretrained(out_dir)
    model.generation_config.save_pretrained(out_dir)
    state = _layout_state_dict(model, layout)
    total = sum(t.numel() * t.element_size() for t in state.values())
    _write_weights(state, out_dir, max_shard_bytes=math.ceil(total / 3) if shard else None)

    tokenizer = GemmaTokenizer.from_pretrained(os.path.dirname(train_tokenizer(out_dir)))
    n_image_tokens = (image_size // patch_size) ** 2
    image_processor = SiglipImageProcessorPil(
        size={"height": image_size, "width": image_size}, resample=3, image_mean=[0.5] * 3, image_std=[0.5] * 3,
        image_seq_length=n_image_tokens)
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    if processor.image_token_id != IMAGE_TOKEN_ID:
        raise AssertionError(f"processor gave <image> id {processor.image_token_id}, expected {IMAGE_TOKEN_ID}")
    processor.save_pretrained(out_dir)  # 5.23 writes processor_config.json with the image processor inside
    image_processor.save_pretrained(out_dir)  # hub repos carry preprocessor_config.json instead: write both
    return out_dir


def load_tf(out_dir):
    """(transformers model in eval mode, fp32, eager attention; its processor on the PIL image backend).

    Eager everywhere: PG2 text defaults to it anyway, and transformers' SDPA path ignores the soft-cap.
    backend="pil": with torchvision installed AutoProcessor would switch to torchvision's resize
    (docs/files.md#image-preprocessing).
    It is given to the image processor alone: PaliGemmaProcessor.from_pretrained(..., backend="pil") also
    hands it to the tokenizer, overwriting its `backend` ("tokenizers") with "pil".
    Raises if transformers reports any missing, unexpected or mismatched key, so every fixture that loads
    is also a proof that its layout is one transformers accepts.
    """
    from transformers import AutoImageProcessor, PaliGemmaForConditionalGeneration, PaliGemmaProcessor

    model, info = PaliGemmaForConditionalGeneration.from_pretrained(
        out_dir, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}  # missing/unexpected/mismatched keys, error_msgs
    if problems:
        raise AssertionError(f"transformers loaded {out_dir} with problems: {problems}")
    image_processor = AutoImageProcessor.from_pretrained(out_dir, backend="pil")
    return model.eval(), PaliGemmaProcessor.from_pretrained(out_dir, image_processor=image_processor)


@torch.no_grad()
def tf_forward_logits(tf_model, tf_batch) -> torch.Tensor:
    """Logits (B, T, V) in fp32 for a processor batch. token_type_ids are required: without them
    transformers builds a causal or fully bidirectional mask depending on the backend
    (docs/sequence.md#attention-mask)."""
    if "token_type_ids" not in tf_batch:
        raise ValueError("tf_batch has no token_type_ids: call the processor, which always returns them")
    out = tf_model(input_ids=tf_batch["input_ids"], pixel_values=tf_batch["pixel_values"],
                   attention_mask=tf_batch["attention_mask"], token_type_ids=tf_batch["token_type_ids"])
    return out.logits.float()


@torch.no_grad()
def tf_generate(tf_model, tf_processor, images, prompts, max_new_tokens):
    """Greedy generate() on a batch (one image per prompt, left-padded by the processor).

    Returns the new token ids per row, up to and including the first <eos>: transformers fills finished
    rows with <pad> (0) until the longest row is done, which is bookkeeping, not output.
    """
    # "<image>" up front avoids the processor's warning; it then inserts <bos> after it and appends "\n".
    batch = tf_processor(images=list(images), text=["<image>" + p for p in prompts], return_tensors="pt",
                         padding="longest")
    out = tf_model.generate(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                            attention_mask=batch["attention_mask"], token_type_ids=batch["token_type_ids"],
                            max_new_tokens=max_new_tokens, do_sample=False)
    rows = []
    for row in out[:, batch["input_ids"].shape[1]:].tolist():
        rows.append(row[: row.index(EOS_ID) + 1] if EOS_ID in row else row)
    return rows
