"""Our processor gives transformers' PaliGemmaProcessor's tensors (docs/sequence.md#token-layout,
docs/files.md#image-preprocessing, docs/checkpoints.md#what-transformers-does).

Same images and prompts into both: input_ids, attention_mask, token_type_ids must be equal and
pixel_values bit-identical (transformers on its PIL backend: RGB conversion with transparency over
white, PIL bicubic on uint8, /255, (x - 0.5) / 0.5). 16-bit images are our own documented mapping
(value / 257 to 8 bits), so there the expectation is transformers on the equivalent 8-bit image.
"""
import numpy as np
import pytest
import torch
from PIL import Image

IMAGE_NAMES = ["rgb-square", "rgb-wide", "rgb-tall", "rgb-large", "rgba", "la", "l", "cmyk", "p-transparency"]


def _both(pair, images, prompts, suffixes=None):
    ours = pair.processor(images=images, prompts=prompts, suffixes=suffixes)
    theirs = pair.tf_processor(images=images, text=["<image>" + p for p in prompts], suffix=suffixes,
                               return_tensors="pt", padding="longest")
    return ours, theirs


@pytest.mark.parametrize("checkpoint", ["pg1", "pg2-56px"])
@pytest.mark.parametrize("image_name", IMAGE_NAMES)
def test_pixel_values_equal_transformers(model_pair, test_images, checkpoint, image_name):
    pair = model_pair(checkpoint)
    ours, theirs = _both(pair, [test_images[image_name]], ["caption en"])
    assert ours["pixel_values"].dtype == torch.float32
    assert torch.equal(ours["pixel_values"], theirs["pixel_values"])


def test_transparent_pixels_become_white(model_pair):
    """Independent of transformers: a fully transparent image is white, whatever its colour."""
    pair = model_pair("pg1")
    clear_black = Image.new("RGBA", (30, 20), (0, 0, 0, 0))
    out = pair.processor(images=[clear_black], prompts=["caption en"])["pixel_values"]
    assert torch.equal(out, torch.ones_like(out))


def test_image_paths_give_the_same_pixel_values_as_pil_images(model_pair, test_images, tmp_path):
    pair = model_pair("pg1")
    path = tmp_path / "p.png"
    test_images["p-transparency"].save(path)
    from_path = pair.processor(images=[str(path)], prompts=["caption en"])["pixel_values"]
    from_pil = pair.processor(images=[test_images["p-transparency"]], prompts=["caption en"])["pixel_values"]
    assert torch.equal(from_path, from_pil)


PROMPT_CASES = {
    "empty-prompt": ([""], None),
    "prompt": (["caption en"], None),
    "prompt-with-suffix": (["answer en where is the cow?"], ["the cow is on the beach"]),
    "loc-tokens": (["detect cat ; dog"], ["<loc0012><loc0345><loc0678><loc1000> cat ; <loc0001><loc0002><loc0003><loc0004> dog"]),
    "seg-tokens": (["segment cat"], ["<loc0001><loc0002><loc0003><loc0004><seg000><seg017><seg127> cat"]),
    "double-spaces-and-digits": (["Question: Is the cow  red?  123"], ["Yes,  it is 4567."]),
    "padded-batch-no-suffix": (["caption en", "answer en what color is the star? the star is red.", "ocr"], None),
    "padded-batch-with-suffix": (["caption en", "answer en what color is the star?", "detect car"],
                                 ["a red circle on a white background", "red", "<loc0100><loc0200><loc0300><loc0400> car"]),
}


@pytest.mark.parametrize("checkpoint", ["pg1", "pg2-56px"])
@pytest.mark.parametrize("case", list(PROMPT_CASES))
def test_token_ids_and_masks_equal_transformers(model_pair, test_images, checkpoint, case):
    pair = model_pair(checkpoint)
    prompts, suffixes = PROMPT_CASES[case]
    images = [test_images["rgb-square"]] * len(prompts)
    ours, theirs = _both(pair, images, prompts, suffixes)
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert ours[key].tolist() == theirs[key].tolist(), key


def test_processor_returns_integer_ids_and_masks(model_pair, test_images):
    pair = model_pair("pg1")
    ours = pair.processor(images=[test_images["rgb-square"]], prompts=["caption en"], suffixes=["a cat"])
    assert {k: ours[k].dtype for k in ("input_ids", "attention_mask", "token_type_ids")} == dict.fromkeys(
        ("input_ids", "attention_mask", "token_type_ids"), torch.int64)


def _i16(values_8bit: np.ndarray, scale: int) -> Image.Image:
    im = Image.fromarray((values_8bit.astype(np.uint16) * scale))
    assert im.mode == "I;16"
    return im


def test_16bit_image_is_mapped_to_8_bits_by_value_over_257(model_pair, test_images):
    """A 16-bit image holding v * 257 gives what transformers gives for the 8-bit image v."""
    pair = model_pair("pg1")
    v = np.asarray(test_images["l"])
    ours = pair.processor(images=[_i16(v, 257)], prompts=["caption en"])["pixel_values"]
    expected = pair.tf_processor(images=[Image.fromarray(v, "L")], text=["<image>caption en"],
                                 return_tensors="pt")["pixel_values"]
    assert torch.equal(ours, expected)


def test_dark_16bit_image_stays_dark(model_pair):
    """value / 257 whatever the image's brightness: a 16-bit image with every value <= 255 (at most
    0.4% of full scale) is near black, not read as if it were an 8-bit image."""
    pair = model_pair("pg1")
    v = np.tile(np.arange(0, 256, 8, dtype=np.uint8), (32, 1))  # 16-bit values 0..248
    ours = pair.processor(images=[_i16(v, 1)], prompts=["caption en"])["pixel_values"]
    expected_8bit = np.rint(v / 257.0).astype(np.uint8)            # all 0 or 1
    expected = pair.tf_processor(images=[Image.fromarray(expected_8bit, "L")], text=["<image>caption en"],
                                 return_tensors="pt")["pixel_values"]
    assert torch.equal(ours, expected)
