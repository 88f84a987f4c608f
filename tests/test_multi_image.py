"""Several images in one prompt (NLVR2-style pairs, video frames) and loading at another resolution."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import nanopali
from nanopali.train.data import collate, load_examples
from nanopali.train.finetune import loss_terms
from nanopali.generate import generate
from hf_reference import tf_forward_logits
from tolerance import paligemma_terms, rounding_bound


def _images(n, seed=0):
    rng = np.random.RandomState(seed)
    return [Image.fromarray(rng.randint(0, 255, (30 + 3 * i, 40 - 2 * i, 3), dtype=np.uint8)) for i in range(n)]


def _tf_batch(tf_processor, images, prompts, suffixes=None):
    text = ["<image>" * len(imgs) + p for imgs, p in zip(images, prompts)]
    kw = {"suffix": suffixes} if suffixes else {}
    return tf_processor(images=images, text=text, return_tensors="pt", padding="longest", **kw)


def _text_logits_diff(model, batch, ours, ref):
    """Max |ours - transformers| at real text positions, row by row (rows may differ in image count)."""
    is_text = batch["input_ids"] != model.cfg.image_token_id
    worst = 0.0
    for r in range(ours.shape[0]):
        rt = ref[r][is_text[r]]
        real = batch["attention_mask"][r][is_text[r]].bool()
        worst = max(worst, (ours[r][-rt.shape[0]:] - rt)[real].abs().max().item())
    return worst


@pytest.mark.parametrize("name", ["pg1", "pg2"])
def test_two_images_in_one_prompt_give_transformers_logits(model_pair, name, record_parity):
    pair = model_pair(name)
    images, prompts, suffixes = [_images(2)], ["answer en are these the same"], ["yes"]
    batch = pair.processor(images, prompts, suffixes)
    tf_batch = _tf_batch(pair.tf_processor, images, prompts, suffixes)
    assert torch.equal(batch["input_ids"], tf_batch["input_ids"])
    with torch.no_grad():
        ours = pair.model(**batch)
        diff = _text_logits_diff(pair.model, batch, ours, tf_forward_logits(pair.tf_model, tf_batch))
    record_parity(f"{name}-two-images", diff)
    # fp32 both sides, the same math in other kernels: rounding only (tests/tolerance.py)
    assert diff <= rounding_bound(torch.float32, ours.abs().max().item(),
                                  paligemma_terms(pair.model.cfg, batch["input_ids"].shape[1]))


def test_a_padded_batch_of_rows_with_one_and_two_images_gives_transformers_logits(model_pair, record_parity):
    pair = model_pair("pg2")
    images = [_images(2, seed=1), _images(1, seed=2)]
    prompts, suffixes = ["answer en which is brighter", "caption en"], ["the left one", "a cat"]
    batch = pair.processor(images, prompts, suffixes)
    tf_batch = _tf_batch(pair.tf_processor, images, prompts, suffixes)
    for key in ("input_ids", "attention_mask", "token_type_ids", "pixel_values"):
        assert torch.equal(batch[key].float(), tf_batch[key].float()), key
    with torch.no_grad():
        ours = pair.model(**batch)
        diff = _text_logits_diff(pair.model, batch, ours, tf_forward_logits(pair.tf_model, tf_batch))
    record_parity("pg2-one-and-two-images-padded", diff)
    assert diff <= rounding_bound(torch.float32, ours.abs().max().item(),
                                  paligemma_terms(pair.model.cfg, batch["input_ids"].shape[1]))
    # the row with two images has fewer text positions: right-aligned, zeros in front
    n_text_row0 = int((batch["input_ids"][0] != pair.model.cfg.image_token_id).sum())
    assert ours.shape[1] > n_text_row0 and ours[0, : ours.shape[1] - n_text_row0].abs().max() == 0


@pytest.mark.parametrize("name", ["pg1", "pg2"])
def test_greedy_generation_with_one_and_two_images_equals_transformers(model_pair, name):
    pair = model_pair(name)
    images, prompts = [_images(2, seed=3), _images(1, seed=4)], ["answer en are these the same", "caption en"]
    _, ours = generate(pair.model, pair.processor, images, prompts, max_new_tokens=8, return_ids=True)
    tf_batch = _tf_batch(pair.tf_processor, images, prompts)
    out = pair.tf_model.generate(**{k: v for k, v in tf_batch.items() if k != "labels"}, max_new_tokens=8,
                                 do_sample=False)
    theirs = []
    for row in out[:, tf_batch["input_ids"].shape[1]:].tolist():
        theirs.append(row[: row.index(1) + 1] if 1 in row else row)
    assert ours == theirs


def test_a_row_without_images_is_refused_unless_allowed(model_pair):
    pair = model_pair("pg2")
    with pytest.raises(nanopali.InputError, match="no image"):
        pair.processor([[]], ["caption en"])


def test_training_examples_with_an_image_list_build_one_block_per_image(model_pair, tmp_path):
    pair = model_pair("pg2")
    for i, im in enumerate(_images(3)):
        im.save(tmp_path / f"{i}.png")
    lines = [{"image": ["0.png", "1.png"], "prefix": "answer en same?", "suffix": "no"},
             {"image": "2.png", "prefix": "caption en", "suffix": "a cat"}]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    ds = load_examples(str(tmp_path / "train.jsonl"), pair.processor)
    batch = collate(ds.examples, pair.processor)
    n_img = (batch["input_ids"] == pair.model.cfg.image_token_id).sum(1).tolist()
    assert n_img == [2 * pair.processor.num_image_tokens, pair.processor.num_image_tokens]
    total, count = loss_terms(pair.model, batch)
    assert torch.isfinite(total) and int(count) == len(pair.processor.suffix_ids("no")) + len(
        pair.processor.suffix_ids("a cat"))


def test_a_checkpoint_loaded_at_twice_its_resolution_runs_end_to_end(hf_checkpoint):
    model, proc = nanopali.load(hf_checkpoint("pg2"), image_size=56)
    assert proc.image_size == 56 and proc.num_image_tokens == 16
    assert model.vision_tower.pos_embed.shape == (16, model.cfg.vision.width)
    (text,) = generate(model, proc, _images(1), ["caption en"], max_new_tokens=4)
    assert isinstance(text, str)


def test_loading_at_the_native_resolution_never_resamples(hf_checkpoint):
    a, _ = nanopali.load(hf_checkpoint("pg2"))
    b, _ = nanopali.load(hf_checkpoint("pg2"), image_size=a.cfg.vision.image_size)
    assert torch.equal(a.vision_tower.pos_embed, b.vision_tower.pos_embed)


def test_an_image_size_that_is_not_a_multiple_of_the_patch_is_refused(hf_checkpoint):
    with pytest.raises(nanopali.CheckpointError, match="multiple of the patch size 14"):
        nanopali.load(hf_checkpoint("pg2"), image_size=30)
