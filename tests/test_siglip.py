"""SigLIP and SigLIP 2 as models of their own, against transformers on tiny checkpoints in the hub layout
(tests/siglip_reference.py): the two-tower logits and embeddings, the processors, the zero-shot pipeline,
the sigmoid loss, strict loading, and a PaliGemma whose image tower is a SigLIP 2 encoder."""
import copy
import json
import math
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import classify
import siglip_reference
from nanopali.siglip import checkpoint as siglip_checkpoint
from nanopali import CheckpointError
from nanopali.siglip import SIGLIP_PRESETS as PRESETS, SigLIPModel, sigmoid_loss
from nanopali.siglip import embed_images, zero_shot
from tolerance import assert_rounding_close

KINDS = ("siglip", "siglip2", "naflex")   # SigLIP; SigLIP 2 fixed resolution; SigLIP 2 NaFlex
TEXTS = ["This is a photo of a Cat.", "A RED  circle, on the beach!", "answer en where is the dog? " * 8]
LABELS = ["a Cat", "a red circle", "two dogs!", "Beach"]
TOL = 1e-4


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """pair(kind) -> (tf_model, tf_tokenizer, tf_image_processor, model, processor, checkpoint dir)."""
    root, cache = tmp_path_factory.mktemp("siglip"), {}

    def get(kind):
        if kind not in cache:
            path = siglip_reference.make_checkpoint(str(root / kind), kind)
            cache[kind] = (*siglip_reference.load_tf(path), *siglip_checkpoint.load_siglip(path), path)
        return cache[kind]

    return get


def images_for(kind, test_images):
    names = ["rgb-square", "rgb-wide", "rgb-tall"] if kind == "naflex" else ["rgb-square", "rgb-large", "rgba"]
    return [test_images[n] for n in names]


def with_settings(processor, **settings):
    """A copy of a shared processor with other settings (the cached one stays as loaded)."""
    processor = copy.copy(processor)
    for name, value in settings.items():
        setattr(processor, name, value)
    return processor


def ours_from_tf(batch: dict) -> dict:
    """transformers' tensor names → ours (NaFlex: pixel_attention_mask, spatial_shapes)."""
    names = {"pixel_attention_mask": "patch_mask", "spatial_shapes": "grid_hw"}
    return {names.get(k, k): v for k, v in batch.items()}


@pytest.mark.parametrize("kind", KINDS)
def test_logits_and_embeddings_equal_transformers(pair, test_images, record_parity, kind):
    tf, tok, ip, model, _, _ = pair(kind)
    batch = {**tok(TEXTS, padding="max_length", max_length=64, truncation=True, return_tensors="pt"),
             **ip(images=images_for(kind, test_images), return_tensors="pt")}
    with torch.no_grad():
        ref = tf(**batch)
        ours = ours_from_tf(batch)
        logits = model(**ours)
        img = model.encode_images(ours["pixel_values"], ours.get("patch_mask"), ours.get("grid_hw"))
        txt = model.encode_texts(ours["input_ids"])
    diffs = {"logits": (logits - ref.logits_per_image).abs().max().item(),
             "image embeds": (img - ref.vision_model_output.pooler_output).abs().max().item(),
             "text embeds": (txt - ref.text_model_output.pooler_output).abs().max().item()}
    for what, d in diffs.items():
        record_parity(f"{kind} {what}", d)
    assert max(diffs.values()) <= TOL, diffs


@pytest.mark.parametrize("kind, normalization", [("siglip", "siglip"), ("siglip2", "none"), ("naflex", "lower")])
def test_processor_gives_the_ids_and_pixels_of_transformers_processors(pair, test_images, kind, normalization):
    """siglip: SiglipTokenizer (lowercase, no punctuation); naflex: Siglip2Tokenizer (lowercase);
    siglip2 fixed resolution loads as GemmaTokenizer, which keeps case: our "none"."""
    _, tok, ip, _, processor, _ = pair(kind)
    processor = with_settings(processor, text_normalization=normalization)
    images = images_for(kind, test_images)
    ref = {**tok(TEXTS, padding="max_length", max_length=64, truncation=True, return_tensors="pt"),
           **ip(images=images, return_tensors="pt")}
    ours = processor(images=images, texts=TEXTS)
    assert set(ours) == set(ours_from_tf(ref))
    for name, value in ours_from_tf(ref).items():
        assert torch.equal(ours[name], value.to(ours[name].dtype)), name


def test_checkpoints_get_their_references_text_normalization(pair):
    assert [pair(kind)[4].text_normalization for kind in KINDS] == ["siglip", "lower", "lower"]


def test_a_text_attention_mask_hides_pads_as_transformers_does(pair):
    tf, tok, _, model, processor, _ = pair("siglip")
    enc = tok(TEXTS, padding="max_length", max_length=64, truncation=True, return_attention_mask=True,
              return_tensors="pt")
    ours = with_settings(processor, return_attention_mask=True).texts(TEXTS)
    assert torch.equal(ours["attention_mask"], enc["attention_mask"])
    with torch.no_grad():
        ref = tf.get_text_features(**enc).pooler_output
        masked, unmasked = model.encode_texts(**ours), model.encode_texts(ours["input_ids"])
    assert (masked - ref).abs().max() <= TOL
    assert (masked - unmasked).abs().max() > 1e-2  # the mask does change the features


@pytest.mark.parametrize("kind", KINDS)
def test_zero_shot_probabilities_equal_the_transformers_pipeline(pair, test_images, record_parity, kind):
    from transformers import pipeline

    tf, tok, ip, model, processor, _ = pair(kind)
    if kind == "siglip2":
        processor = with_settings(processor, text_normalization="none")  # transformers' GemmaTokenizer keeps case
    image = test_images["rgb-wide"]
    ref = pipeline("zero-shot-image-classification", model=tf, tokenizer=tok, image_processor=ip)(
        image, candidate_labels=LABELS)
    ours = zero_shot(model, processor, image, LABELS)
    assert [label for label, _ in ours] == [r["label"] for r in ref]
    diff = max(abs(p - r["score"]) for (_, p), r in zip(ours, ref))
    record_parity(f"{kind} zero-shot probabilities", diff)
    assert diff <= TOL


def test_a_naflex_image_embeds_the_same_alone_and_in_a_batch(pair, test_images):
    _, _, _, model, processor, _ = pair("naflex")
    images = images_for("naflex", test_images)
    batch = embed_images(model, processor, images)
    alone = torch.cat([embed_images(model, processor, [im]) for im in images])
    # the same sums blocked for another batch size: rounding only, over the tower's chain (tests/tolerance.py)
    v = model.cfg.vision
    terms = 3 * v.patch_size ** 2 + v.depth * (v.width + v.mlp_dim + v.num_patches) + v.width
    assert_rounding_close(batch, alone, torch.float32, terms, "batched vs alone")


def test_sigmoid_loss_equals_a_hand_computed_case():
    # -1/2 · [log σ(2) + log σ(1) + log σ(-0.5) + log σ(3)]: pairs (0,0), (1,1) match; (0,1), (1,0) do not
    logits = torch.tensor([[2.0, -1.0], [0.5, 3.0]])
    # fp32 softplus of four O(1) logits, averaged: a few eps of the value
    assert_rounding_close(sigmoid_loss(logits).item(), 0.7314270171575221, torch.float32, 8, "loss")
    labels = torch.tensor([[1.0, 1.0], [0.0, 1.0]])  # text 1 also describes image 0
    want = (math.log1p(math.exp(-2)) + math.log1p(math.exp(1)) + math.log1p(math.exp(0.5))
            + math.log1p(math.exp(-3))) / 2
    assert_rounding_close(sigmoid_loss(logits, labels).item(), want, torch.float32, 8, "loss")


def test_sigmoid_loss_equals_transformers_return_loss(pair, test_images):
    tf, tok, ip, model, _, _ = pair("siglip")
    batch = {**tok(TEXTS, padding="max_length", max_length=64, truncation=True, return_tensors="pt"),
             **ip(images=images_for("siglip", test_images), return_tensors="pt")}
    with torch.no_grad():
        assert sigmoid_loss(model(**batch)).item() == pytest.approx(tf(**batch, return_loss=True).loss.item(), abs=TOL)


def test_loading_is_strict_and_names_the_tensors(pair, tmp_path):
    src = pair("siglip")[5]
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    state = load_file(str(bad / "model.safetensors"))
    del state["vision_model.head.probe"]
    state["text_model.extra.weight"] = torch.zeros(2)
    state["logit_bias"] = torch.zeros(2)
    save_file(state, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError) as e:
        siglip_checkpoint.load_siglip(bad)
    msg = str(e.value)
    assert "vision_head.probe" in msg and "text_model.extra.weight" in msg and "logit_bias: expected [1]" in msg
    os.remove(bad / "spiece.model")
    with pytest.raises(CheckpointError, match="No spiece.model"):
        siglip_checkpoint.load_siglip_processor(bad, siglip_checkpoint.read_siglip_config(src))
    (bad / "config.json").write_text(json.dumps({"model_type": "paligemma"}))
    with pytest.raises(CheckpointError, match="model_type 'paligemma'"):
        siglip_checkpoint.load_siglip(bad)


def test_presets_have_the_released_models_sizes():
    """Parameter counts on the Hugging Face model cards; and SigLIP So400m/14 is PaliGemma's encoder."""
    import nanopali

    card = {"siglip-b16-224": 203e6, "siglip-l16-256": 652e6, "siglip-so400m14-384": 878e6,
            "siglip2-b16-224": 375e6, "siglip2-so400m14-384": 1.14e9, "siglip2-g16-256": 1.87e9,
            "siglip2-b16-naflex": 375e6}
    for name, size in card.items():
        with torch.device("meta"):
            n = sum(p.numel() for p in SigLIPModel(PRESETS[name]).parameters())
        assert abs(n - size) / size < 0.005, (name, n)
    assert PRESETS["siglip-so400m14-224"].vision == nanopali.preset("pg1-3b-224").vision


def test_a_paligemma_with_a_siglip2_tower_runs_forward_generate_and_a_training_step(
        pair, hf_checkpoint, test_images, tmp_path):
    import nanopali
    from nanopali.train import finetune
    from nanopali.formats.hf_config import read_paligemma_config as read_config
    from nanopali.generate import generate
    from nanopali.processing import Processor

    tf, _, ip, _, _, path = pair("siglip2")
    pg2 = hf_checkpoint("pg2")  # its Gemma 2 decoder; its image tower (SigLIP, 28 px) is not read
    model = siglip_checkpoint.paligemma_with_siglip(path, read_config(pg2), language_model_from=pg2)
    image = test_images["rgb-square"]
    pixels = ip(images=[image], return_tensors="pt")["pixel_values"]
    donor, _ = nanopali.load(pg2)
    with torch.no_grad():  # the image tower is the SigLIP 2 encoder, the decoder the PaliGemma 2 one
        assert (model.vision_tower(pixels) - tf.vision_model(pixel_values=pixels).last_hidden_state).abs().max() <= TOL
    for name, p in donor.language_model.state_dict().items():
        assert torch.equal(model.language_model.state_dict()[name], p), name

    cfg = model.cfg
    assert (cfg.vision.patch_size, cfg.num_image_tokens) == (siglip_reference.VISION["patch_size"], 16)
    processor = Processor(os.path.join(pg2, "tokenizer.model"), cfg.vision.image_size, cfg.num_image_tokens,
                          cfg.image_token_id)
    batch = processor([image, image], ["caption en", "detect cat"], suffixes=["a red circle", "<loc0001> cat"])
    with torch.no_grad():
        logits = model(**batch)
    assert logits.shape[-1] == cfg.text.vocab_size and torch.isfinite(logits).all()
    assert len(generate(model, processor, [image], ["caption en"], max_new_tokens=3, return_ids=True)[1][0]) >= 1

    model.train()
    objective = finetune.Objective(model)
    optimizer = finetune.make_optimizer(model, lr=1e-3)
    before = model.vision_tower.blocks[0].attn.q.weight.detach().clone()
    result = finetune.train_step(objective, optimizer, [batch], float(finetune.loss_terms(model, batch)[1]))
    assert result.finite and result.grad_norm > 0
    assert not torch.equal(before, model.vision_tower.blocks[0].attn.q.weight)

    model.eval()
    nanopali.save_checkpoint(model, str(tmp_path / "pg"), os.path.join(pg2, "tokenizer.model"))
    reloaded, _ = nanopali.load(str(tmp_path / "pg"))  # what train.py --init reads
    with torch.no_grad():
        assert torch.equal(reloaded(**batch), model(**batch))


def test_classify_prints_the_top_labels(pair, test_images, tmp_path, capsys):
    _, _, _, model, processor, path = pair("naflex")
    image = tmp_path / "wide.png"
    test_images["rgb-wide"].save(image)
    assert classify.main(["--checkpoint", path, "--image", str(image), "--labels", ",".join(LABELS),
                          "--top", "2", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    want = zero_shot(model, processor, str(image), LABELS)[:2]
    assert [(r["label"], pytest.approx(r["probability"], abs=1e-6)) for r in printed["labels"]] == want


@pytest.mark.parametrize("args, message", [
    (["--labels", "a, ,b,a"], "Labels repeat: a"),
    ([], "exactly one of --labels"),
    (["--labels", "a", "--top", "0"], "--top must be"),
])
def test_classify_rejects_bad_arguments_with_a_clear_message(pair, args, message):
    path = pair("siglip")[5]
    with pytest.raises(ValueError, match=message):
        classify.main(["--checkpoint", path, "--image", "x.png", *args])


def test_classify_names_a_missing_checkpoint_and_image(pair, tmp_path):
    from nanopali.processing import InputError

    with pytest.raises(CheckpointError, match="does not exist"):
        classify.main(["--checkpoint", str(tmp_path / "nope"), "--image", "x.png", "--labels", "a"])
    with pytest.raises(InputError, match="Image file not found"):
        classify.main(["--checkpoint", pair("siglip")[5], "--image", str(tmp_path / "x.png"), "--labels", "a"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["siglip", "naflex"])
def test_bf16_on_cuda_gives_the_probabilities_of_fp32_on_cpu(pair, test_images, kind):
    _, _, _, model, processor, path = pair(kind)
    gpu, _ = siglip_checkpoint.load_siglip(path, dtype="bfloat16", device="cuda")  # attn "auto": the fused kernel
    image = test_images["rgb-wide"]
    want = dict(zero_shot(model, processor, image, LABELS))
    got = dict(zero_shot(gpu, processor, image, LABELS))
    assert max(abs(got[label] - want[label]) for label in LABELS) <= 2e-2
