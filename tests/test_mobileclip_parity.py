"""MobileCLIP2 loaded by nanopali computes what open_clip + timm compute, in both block layouts.

Each case of tests/mobileclip_reference.py is a released variant at its real widths (S0 whole, the
others with fewer blocks; S2, S4 and S0 fused from their fixtures with NANOPALI_SLOW=1, and every
whole released depth live, with NANOPALI_SLOW=1 where the oracle imports). The weights are written in
open_clip's names as safetensors and read through
nanopali's strict loader; image features, text features and logits are compared with the oracle's.
"""
import copy
import json
import os
from dataclasses import replace

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

import mobileclip_reference as ref
from nanopali.mobileclip import load_mobileclip_model, reparameterize
from nanopali.formats.files import CheckpointError
from nanopali.mobileclip.checkpoint import config_from_open_clip, nanopali_name
from tolerance import assert_rounding_close, module_terms



def write_checkpoint(folder: str, keys: list, seed: int, config: dict) -> str:
    os.makedirs(folder, exist_ok=True)
    state = ref.deterministic_state(keys, seed)
    safetensors.torch.save_file(state, os.path.join(folder, "open_clip_model.safetensors"))
    with open(os.path.join(folder, "open_clip_config.json"), "w") as f:
        json.dump(config, f)
    return folder


def case_config(fx: dict):
    """The config of a case: the released one (from its open_clip_config.json) with the case's depths."""
    cfg = config_from_open_clip(fx["config"], fx["model_name"])
    kw, layers = fx["trunk_kwargs"], fx["text_layers"]
    if kw:
        cfg = replace(cfg, image=replace(cfg.image, **({"depths": tuple(kw["layers"])} if "layers" in kw
                                                      else {"depth": kw["depth"]})))
    return replace(cfg, text=replace(cfg.text, depth=layers)) if layers else cfg


@torch.no_grad()
def outputs(model, size: int) -> dict:
    x = model.encode_images(ref.pixel_batch(size))
    y = model.encode_texts(ref.token_rows())
    return {"image_features": x, "text_features": y,
            "logits": model.logits(F.normalize(x, dim=-1), F.normalize(y, dim=-1))}


def compare(ours: dict, theirs: dict, case: str, record_parity, model) -> None:
    """fp32 both sides; the image towers agree to the bit, the text towers to ~3e-6 (SDPA against
    torch's MHA): rounding only, over each output's chain (tests/tolerance.py)."""
    image, text = module_terms(model.image_tower), module_terms(model.text_tower) + model.cfg.text.context_length
    terms = {"image_features": image, "text_features": text, "logits": image + text}
    for name, value in ours.items():
        diff = assert_rounding_close(value, torch.tensor(theirs[name]), torch.float32, terms[name], f"{case} {name}")
        record_parity(f"mobileclip2 {case} {name}", diff)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """case, layout → (nanopali model, fixture part, image size, checkpoint folder), built once per module."""
    cache = {}

    def get(case: str, layout: str = "train"):
        if (case, layout) not in cache:
            fx = ref.load_fixture(case)
            part = fx if layout == "train" else fx["fused"]
            folder = write_checkpoint(str(tmp_path_factory.mktemp(f"{case}-{layout}")), part["keys"],
                                      0 if layout == "train" else 1, fx["config"])
            # S0 is whole: its open_clip_config.json alone says what to build.
            cfg = None if fx["trunk_kwargs"] is None and fx["text_layers"] is None else case_config(fx)
            cache[case, layout] = (load_mobileclip_model(folder, cfg=cfg), part, fx["image_size"], folder)
        return cache[case, layout]

    return get


def _slow(case: str):
    """A case CI skips for time (its family is covered by another case); NANOPALI_SLOW=1 runs it from the
    same fixtures."""
    return pytest.param(case, marks=[pytest.mark.slow, pytest.mark.skipif(
        not os.environ.get("NANOPALI_SLOW"), reason=f"{case}: set NANOPALI_SLOW=1")])


@pytest.mark.parametrize("case", ["s0", "s3-short", "b-short", "l14-short", _slow("s2-short"), _slow("s4-short")])
def test_train_time_checkpoint_matches_open_clip(loaded, case, record_parity):
    model, part, size, _ = loaded(case)
    compare(outputs(model, size), part, case, record_parity, model)


@pytest.mark.parametrize("case", ["s3-short", _slow("s0")])
def test_reparameterised_checkpoint_matches_open_clip(loaded, case, record_parity):
    model, part, size, _ = loaded(case, "fused")
    assert model.cfg.image.fused and not any(".conv_kxk." in k for k in model.state_dict())
    compare(outputs(model, size), part, f"{case} fused", record_parity, model)


@pytest.mark.parametrize("case", ["s0", "s3-short"])
def test_reparameterize_keeps_the_outputs(loaded, case, record_parity):
    model, _, _, _ = loaded(case)
    x = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(3))   # any size a multiple of 64
    with torch.no_grad():
        before = model.image_tower(x)
        folded = reparameterize(copy.deepcopy(model.image_tower))
        after = folded(x)
    branches = (".conv_kxk.", ".conv_scale.", ".identity.", ".large_conv.", ".small_conv.", ".pos_enc.", ".mixer.")
    assert [k for k in folded.state_dict() if any(b in k for b in branches)] == []
    fused_keys = [k for k, _, _ in ref.load_fixture(case)["fused"]["keys"]]       # timm's fused layout
    assert ["image_tower." + k for k in folded.state_dict()] == [n for n in map(nanopali_name, fused_keys)
                                                                if n.startswith("image_tower.")]
    # the folded kernels sum the branches' weights before the convolution, not its outputs after
    diff = assert_rounding_close(after, before, torch.float32, module_terms(model.image_tower), "folded")
    record_parity(f"mobileclip2 {case} reparameterize vs train-time", diff)


# ---- live: where open_clip and timm import (not in CI; see docs/mobileclip.md) ----

def _live_case(model_name, trunk_kwargs, text_layers):
    pytest.importorskip("open_clip", reason="open_clip + timm are the oracle; see tests/mobileclip_reference.py")
    return ref.record_case("live", model_name, trunk_kwargs, text_layers)


def test_reparameterize_folds_as_timm_does():
    """Same train-time weights → timm's `reparameterize_model` and ours give the same fused tensors."""
    pytest.importorskip("open_clip", reason="open_clip + timm are the oracle; see tests/mobileclip_reference.py")
    from timm.utils.model import reparameterize_model

    oracle = ref.build_oracle("MobileCLIP2-S0", dict(layers=(1, 1, 1, 1)), 1)
    keys = ref.layout(oracle)
    state = ref.deterministic_state(keys)
    oracle.load_state_dict(state)
    fx = {"config": ref.open_clip_config("MobileCLIP2-S0"), "model_name": "MobileCLIP2-S0",
          "trunk_kwargs": {"layers": (1, 1, 1, 1)}, "text_layers": 1}
    from nanopali.mobileclip import MobileCLIP

    ours = MobileCLIP(case_config(fx)).eval()
    ours.load_state_dict({nanopali_name(k): v for k, v in state.items()})
    theirs = {nanopali_name(k): v for k, v in reparameterize_model(oracle).state_dict().items()}
    folded = reparameterize(ours).state_dict()
    assert set(folded) == set(theirs)
    for k in folded:   # each folded tensor sums a few branches' weights and scales: rounding only
        if folded[k].is_floating_point():
            assert_rounding_close(folded[k], theirs[k], torch.float32, 8, k)


@pytest.mark.skipif(not os.environ.get("NANOPALI_SLOW"), reason="whole released depths (minutes): NANOPALI_SLOW=1")
@pytest.mark.parametrize("model_name", list(ref.SLOW_CASES))
def test_released_depths_match_open_clip_live(model_name, tmp_path, record_parity):
    fx = _live_case(model_name, None, None)
    for layout, part, seed in (("train", fx, 0), ("fused", fx.get("fused"), 1)):
        if part is None:
            continue
        model = load_mobileclip_model(write_checkpoint(str(tmp_path / layout), part["keys"], seed, fx["config"]))
        compare(outputs(model, fx["image_size"]), part, f"{model_name} {layout}", record_parity, model)


@pytest.mark.parametrize("case", ["s3-short", "b-short"])
@pytest.mark.parametrize("form", ["module-prefixed", "open_clip training checkpoint"])
def test_a_pt_file_keyed_as_distributed_training_saves_it_matches_open_clip(loaded, case, form, tmp_path,
                                                                            record_parity):
    """Apple's MobileCLIP2 .pt files key every tensor `module.…` (the DistributedDataParallel wrapper; timm's
    fastvit loader and open_clip's `load_checkpoint` strip it), and open_clip's training checkpoints hold
    them under "state_dict" beside the epoch and the optimizer."""
    _, part, size, folder = loaded(case)
    plain = safetensors.torch.load_file(os.path.join(folder, "open_clip_model.safetensors"))   # open_clip's names
    state = {"module." + k: v for k, v in plain.items()}
    if form != "module-prefixed":
        state = {"epoch": 3, "name": "mobileclip2", "state_dict": state,
                 "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0, 1]}]}}
    path = str(tmp_path / "epoch_3.pt")
    torch.save(state, path)
    model = load_mobileclip_model(path, cfg=case_config(ref.load_fixture(case)))
    compare(outputs(model, size), part, f"{case} {form} .pt", record_parity, model)


def test_a_vit_file_given_an_mci_preset_is_named_in_one_line(loaded):
    folder = loaded("b-short")[3]
    with pytest.raises(CheckpointError, match=r"holds a ViT image tower \(visual\.trunk\.blocks\.\*\); its "
                                              r"configuration asks for an MCi"):
        load_mobileclip_model(os.path.join(folder, "open_clip_model.safetensors"), preset="mobileclip2-s0")
