"""Image files in: one strict loader and one RGB conversion, shared by every processor of the package.

PaliGemma's processor (nanopali/processing.py), SigLIP's (nanopali/siglip) and MobileCLIP's
(nanopali/mobileclip) each resize and normalise as their own reference does; before that they all
open an image the same way, here: a path or a PIL image → a PIL image the size limit accepts, turned
as its EXIF tag says, or one clear `InputError` naming the file and what is wrong with it. `to_rgb` is
transformers' colour conversion (docs/files.md#image-preprocessing), with 16-bit greyscale made exact.
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_IMAGE_PIXELS = 100_000_000  # refuse larger images (PIL's own bomb limit is ~179 MP)


class InputError(ValueError):
    """Bad user input (image, prompt, argument), with a message naming what is wrong.

    Defined here, where the first input (an image file) is read; `nanopali.InputError` is this class."""


def load_image(image) -> Image.Image:
    """A PIL image from a path or a PIL image, with one clear error for every way it can be bad.

    A file is turned as its EXIF orientation says (a phone's portrait JPEG is stored sideways with a tag
    saying so), as every image viewer and transformers' `load_image` do, so the model sees, and boxes
    are drawn on, what a person sees. A PIL image passed in is used as given, pixels as stored (as
    transformers' processor does): open it with `load_image(path)`, or apply `PIL.ImageOps.exif_transpose`."""
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if not os.path.isfile(path):
            raise InputError(f"Image file not found: {path}")
        try:
            with Image.open(path) as im:
                _check_size(im, path)
                im.load()
                return ImageOps.exif_transpose(im)  # a copy, turned when the file says so
        except Image.DecompressionBombError as e:
            raise InputError(f"Image {path} is too large: {e}") from None
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise InputError(f"Cannot read {path} as an image ({type(e).__name__}: {e})") from None
    if isinstance(image, Image.Image):
        _check_size(image, "image")
        return image
    raise InputError(f"Expected a PIL image or a path, got {type(image).__name__}")


def _check_size(im: Image.Image, name: str) -> None:
    w, h = im.size
    if w == 0 or h == 0:
        raise InputError(f"{name} has zero size ({w}x{h})")
    if w * h > MAX_IMAGE_PIXELS:
        raise InputError(f"{name} is {w}x{h} = {w * h:,} pixels; the limit is {MAX_IMAGE_PIXELS:,}")


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB as transformers' `convert_to_rgb`: alpha (RGBA, LA, P with transparency) over white.

    16-bit greyscale (I;16*, and I, which is how PIL opens 16-bit PNGs) is mapped to 8 bits by
    value/257 (0..65535 → 0..255; PIL's own convert would clip at 255, turning most 16-bit images
    white). Float greyscale (F) is taken as already in 0..255 and clipped."""
    if im.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        a = np.asarray(im, dtype=np.float64)
        a = a if im.mode == "F" else a / 257.0
        im = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    if im.mode == "RGB":
        return im
    if "A" in im.getbands() or im.info.get("transparency") is not None:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


__all__ = ["MAX_IMAGE_PIXELS", "InputError", "load_image", "to_rgb"]
