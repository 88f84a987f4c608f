"""The oracle is what it claims: tests of tests/hf_reference.py, not of nanopali.

Parity tests trust these fixtures, so each property a parity test leans on is pinned here against
transformers 5.23 and sentencepiece themselves: the ids, the three key layouts, sharding, the weights
being non-trivial, and the Gemma 2 features (sliding window, soft-caps, query scale) actually biting.
"""

import json
import os

import numpy as np
import pytest
import sentencepiece as spm
import torch
from PIL import Image

import hf_reference as ref

PROMPTS = ["caption en", "answer en what color is the  circle?", "detect cat ; dog", "segment red square",
           "how many numbers: 12 345 6789", "  leading spaces", "trailing space ", "tab\there", "Ünïcödé ☃",
           "<loc0012><loc1023> cat", "line\nbreak", ""]
SUFFIXES = ["a red cat", "beach", " beach", "12 dogs.", "<loc0000><loc0010><loc0500><loc1023> dog ; "
            "<loc0001><loc0002><loc0003><loc0004> <seg000><seg127> cat", "two\n\nlines  spaced"]


def _image(seed, size=(50, 40)):
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls gain nothing from intra-op threads, and on a busy 2-core runner the thread pool's
    contention made this module 5x slower (61 s vs 12 s); restored for the modules that follow."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One directory per (generation, layout, shard), same seed: identical weights under different names."""
    root = tmp_path_factory.mktemp("hf")
    dirs = {}
    for gen in (1, 2):
        for layout in ref.LAYOUTS:
            dirs[gen, layout, False] = ref.make_hf_checkpoint(str(root / f"pg{gen}-{layout}"), gen, layout=layout)
        dirs[gen, "hub", True] = ref.make_hf_checkpoint(str(root / f"pg{gen}-hub-sharded"), gen, shard=True)
    return dirs


def _batch(processor, suffix="a red cat on the beach"):
    return processor(images=[_image(0)], text=["<image>answer en what color is the  circle?"], suffix=[suffix],
                     return_tensors="pt")


def test_tokenizer_has_gemma_special_ids_then_consecutive_loc_and_seg_pieces(tmp_path):
    sp = spm.SentencePieceProcessor(model_file=ref.train_tokenizer(tmp_path))
    assert [sp.id_to_piece(i) for i in range(6)] == ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "\n"]
    assert (sp.pad_id(), sp.eos_id(), sp.bos_id(), sp.unk_id()) == (0, 1, 2, 3)
    assert [sp.piece_to_id(t) for t in ref.LOC_TOKENS + ref.SEG_TOKENS] == list(range(ref.SP_BASE_SIZE, 1752))
    assert sp.get_piece_size() == ref.SP_VOCAB_SIZE == ref.IMAGE_TOKEN_ID == 1752
    assert sp.encode("\n") == [5] and sp.encode("a\n\nb")[1:3] == [5, 5]
    for text in PROMPTS + SUFFIXES:  # identity normalization: newlines and runs of spaces survive
        assert sp.decode(sp.encode(text)) == text


@pytest.mark.parametrize("source", ["tokenizer.model", "checkpoint"])
def test_hf_tokenizer_ids_equal_sentencepiece_ids(checkpoints, tmp_path, source):
    from transformers import GemmaTokenizer

    sp = spm.SentencePieceProcessor(model_file=ref.train_tokenizer(tmp_path))
    if source == "tokenizer.model":  # converted by transformers from the .model file alone
        tok = GemmaTokenizer.from_pretrained(str(tmp_path))
    else:  # what PaliGemmaProcessor uses: tokenizer.json saved next to the weights
        tok = ref.load_tf(checkpoints[1, "hub", False])[1].tokenizer
    for text in [p + "\n" for p in PROMPTS] + SUFFIXES:
        assert tok(text, add_special_tokens=False)["input_ids"] == sp.encode(text), repr(text)


def test_processor_row_is_image_bos_prompt_newline_suffix_eos(checkpoints):
    """The contract nanopali's processing reproduces with raw sentencepiece (docs/sequence.md#token-layout)."""
    sp = spm.SentencePieceProcessor(model_file=os.path.join(checkpoints[1, "hub", False], "tokenizer.model"))
    processor = ref.load_tf(checkpoints[1, "hub", False])[1]
    for prompt, suffix in zip(PROMPTS, SUFFIXES * 2):
        b = processor(images=[_image(0)], text=["<image>" + prompt], suffix=[suffix])
        prefix = [ref.IMAGE_TOKEN_ID] * 4 + [ref.BOS_ID] + sp.encode(prompt + "\n")
        target = sp.encode(suffix) + [ref.EOS_ID]
        assert b["input_ids"][0] == prefix + target, (prompt, suffix)
        assert b["token_type_ids"][0] == [0] * len(prefix) + [1] * len(target)


def test_processor_pads_left_and_resizes_to_the_checkpoint_image_size(tmp_path):
    processor = ref.load_tf(ref.make_hf_checkpoint(str(tmp_path), generation=1, image_size=56))[1]
    assert type(processor.image_processor).__name__ == "SiglipImageProcessorPil"
    assert processor.tokenizer.backend == "tokenizers" and processor.tokenizer.padding_side == "left"
    with open(tmp_path / "preprocessor_config.json") as f:
        assert json.load(f)["size"] == {"height": 56, "width": 56}
    b = processor(images=[_image(0), _image(1, (30, 70))], text=["<image>caption en", "<image>detect cat ; dog"],
                  suffix=["a cat", "<loc0001><loc0002><loc0003><loc0004> cat"], padding="longest", return_tensors="pt")
    assert sorted(b) == ["attention_mask", "input_ids", "labels", "pixel_values", "token_type_ids"]
    assert b["pixel_values"].shape == (2, 3, 56, 56)
    n_pad = int((b["attention_mask"][0] == 0).sum())
    assert n_pad > 0 and b["attention_mask"][0, :n_pad].eq(0).all() and b["input_ids"][0, :n_pad].eq(0).all()
    assert b["input_ids"][0, n_pad:n_pad + 16].eq(ref.IMAGE_TOKEN_ID).all()  # 56 / 14 = 4x4 image tokens
    assert torch.equal(b["labels"] == -100, b["token_type_ids"] == 0)


@pytest.mark.parametrize("gen", [1, 2])
def test_layouts_have_the_documented_key_names_and_the_same_tensors(checkpoints, gen):
    hub, tf, save = (ref.read_weights(checkpoints[gen, layout, False]) for layout in ("hub", "transformers", "save"))
    assert all(k.startswith(("language_model.model.", "vision_tower.vision_model.", "multi_modal_projector.linear."))
               for k in hub)
    assert all(k.startswith(("model.language_model.", "model.vision_tower.", "model.multi_modal_projector.linear."))
               or k == "lm_head.weight" for k in tf)
    assert not any("vision_model." in k for k in list(tf) + list(save)) and "lm_head.weight" in tf
    assert torch.equal(tf.pop("lm_head.weight"), tf["model.language_model.embed_tokens.weight"])
    as_save = {k.replace("vision_tower.vision_model.", "vision_tower."): v for k, v in hub.items()}
    to_hub = [("model.language_model.", "language_model.model."), ("model.vision_tower.", "vision_tower.vision_model."),
              ("model.multi_modal_projector.", "multi_modal_projector.")]
    as_hub = {}
    for k, v in tf.items():
        for old, new in to_hub:
            k = k.replace(old, new)
        as_hub[k] = v
    assert as_save.keys() == save.keys() and as_hub.keys() == hub.keys()
    assert all(torch.equal(as_save[k], save[k]) for k in save) and all(torch.equal(as_hub[k], hub[k]) for k in hub)


def test_save_pretrained_writes_the_save_layout_and_config_of_a_model_built_in_memory(checkpoints, tmp_path):
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

    ours = checkpoints[2, "save", False]
    built = PaliGemmaForConditionalGeneration(PaliGemmaConfig.from_pretrained(ours))
    built.load_state_dict(ref.load_tf(ours)[0].state_dict())
    built.save_pretrained(tmp_path)
    written, expected = ref.read_weights(tmp_path), ref.read_weights(ours)
    assert written.keys() == expected.keys() and all(torch.equal(written[k], expected[k]) for k in expected)
    for name in ("config.json", "generation_config.json"):
        with open(tmp_path / name) as a, open(os.path.join(ours, name)) as b:
            assert json.load(a) == json.load(b), name


@pytest.mark.parametrize("layout", ref.LAYOUTS)
def test_save_pretrained_writes_back_the_layout_a_model_was_loaded_from(checkpoints, tmp_path, layout):
    """5.23 records the renames it applied at load and reverts them at save (the tied head is dropped)."""
    ref.load_tf(checkpoints[1, layout, False])[0].save_pretrained(tmp_path)
    written, original = ref.read_weights(tmp_path), ref.read_weights(checkpoints[1, layout, False])
    original.pop("lm_head.weight", None)
    assert written.keys() == original.keys() and all(torch.equal(written[k], original[k]) for k in original)


@pytest.mark.parametrize("gen", [1, 2])
def test_every_layout_reloads_in_transformers_with_identical_logits(checkpoints, gen):
    logits = {}
    for layout, shard in [("hub", False), ("transformers", False), ("save", False), ("hub", True)]:
        model, processor = ref.load_tf(checkpoints[gen, layout, shard])  # raises on missing/unexpected keys
        logits[layout, shard] = ref.tf_forward_logits(model, _batch(processor))
    first = logits["hub", False]
    assert first.shape[-1] == ref.TEXT_VOCAB_SIZE and first.isfinite().all()
    assert all(torch.equal(first, other) for other in logits.values())


def test_sharded_index_names_every_tensor_in_its_file(checkpoints):
    d = checkpoints[1, "hub", True]
    files = ref.weight_files(d)
    assert len(files) >= 2 and "model.safetensors" not in files
    assert files == [f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)]
    with open(os.path.join(d, "model.safetensors.index.json")) as f:
        index = json.load(f)
    state = ref.read_weights(d)
    assert index["weight_map"].keys() == state.keys() and set(index["weight_map"].values()) == set(files)
    assert index["metadata"] == {"total_parameters": sum(t.numel() for t in state.values()),
                                 "total_size": sum(t.numel() * t.element_size() for t in state.values())}
    for name in files:
        from safetensors import safe_open

        with safe_open(os.path.join(d, name), "pt") as f:
            assert all(index["weight_map"][k] == name for k in f.keys())


@pytest.mark.parametrize("gen", [1, 2])
def test_no_tensor_is_left_at_an_init_constant(checkpoints, gen):
    for key, t in ref.read_weights(checkpoints[gen, "hub", False]).items():
        assert t.dtype == torch.float32 and not (t == 0).any() and not (t == 1).any(), key
        assert t.numel() < 2 or t.std() > 1e-6, key  # the padding rows are near the mean, not a constant


def test_pg2_sliding_window_changes_suffix_logits_and_leaves_the_prefix_alone(checkpoints, tmp_path):
    """Window 8 vs 4096, same weights; every suffix token sits past position 8 (docs/sequence.md#attention-mask)."""
    short = ref.load_tf(checkpoints[2, "hub", False])
    full = ref.load_tf(ref.make_hf_checkpoint(str(tmp_path), generation=2, sliding_window=4096))
    assert short[0].config.text_config.layer_types == ["sliding_attention", "full_attention"]
    b = _batch(short[1], suffix="a red cat on the beach with 12 dogs")
    n_prefix = int((b["token_type_ids"][0] == 0).sum())
    assert b["input_ids"].shape[1] - n_prefix > 8
    a, c = ref.tf_forward_logits(short[0], b), ref.tf_forward_logits(full[0], b)
    assert torch.equal(a[:, :n_prefix], c[:, :n_prefix])  # the prefix block ignores the window
    assert ((a[:, n_prefix:] - c[:, n_prefix:]).abs().amax(-1) > 1e-2).all()


@pytest.mark.parametrize("override", [{"attn_logit_softcapping": None}, {"final_logit_softcapping": None},
                                      {"query_pre_attn_scalar": 16}])
def test_pg2_weights_are_large_enough_for_softcaps_and_query_scale_to_matter(checkpoints, tmp_path, override):
    base = ref.load_tf(checkpoints[2, "hub", False])
    changed = ref.load_tf(ref.make_hf_checkpoint(str(tmp_path), generation=2, **override))[0]
    b = _batch(base[1])
    assert (ref.tf_forward_logits(base[0], b) - ref.tf_forward_logits(changed, b)).abs().max() > 1e-2


@pytest.mark.parametrize("gen", [1, 2])
def test_batched_greedy_generation_equals_one_prompt_at_a_time(checkpoints, gen):
    model, processor = ref.load_tf(checkpoints[gen, "hub", False])
    images, prompts = [_image(0), _image(1)], ["caption en", "answer en what color is the  circle?"]
    batched = ref.tf_generate(model, processor, images, prompts, max_new_tokens=8)
    single = [ref.tf_generate(model, processor, [i], [p], max_new_tokens=8)[0] for i, p in zip(images, prompts)]
    assert batched == single
    assert all(0 < len(row) <= 8 and max(row) < ref.SP_VOCAB_SIZE for row in batched)
    assert len({t for row in batched for t in row}) > 2  # not a model that repeats one token forever
