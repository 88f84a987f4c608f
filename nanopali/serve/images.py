"""Images in a request: `data:` URLs (base64), and `file://` URLs inside the one directory --allow-files names.

Each is opened as nanopali.formats.images.load_image opens a file (the pixel limit checked from the
header, before the pixels are decoded; the EXIF orientation applied), so the model sees what
`sample.py --image` shows it. Nothing is fetched from the network. An image is then squashed to the
model's S×S at once (`fit`), so a full queue holds S×S images, not photos.
"""
from __future__ import annotations

import base64
import binascii
import io
import os
from urllib.parse import unquote, urlparse

from PIL import Image, ImageOps, UnidentifiedImageError

from ..formats.images import InputError, load_image, to_rgb
from .errors import ApiError


def open_image(url: str, where: str, allow_dir: str | None = None) -> Image.Image:
    """A PIL image from a data: or file:// URL, or an ApiError(400) naming `where` and what is wrong."""
    try:
        if url.startswith("data:"):
            return _from_bytes(_data_url_bytes(url, where), where)
        if url.startswith("file:"):
            return load_image(_allowed_path(url, where, allow_dir))
    except InputError as e:
        raise ApiError(400, f"{where}: {e}", where) from None
    scheme = url.split(":", 1)[0][:20] if ":" in url else url[:20]
    raise ApiError(400, f"{where}: expected a data:image/...;base64,... URL (this server fetches nothing from "
                   f"the network), got a URL starting {scheme!r}", where)


def fit(image: Image.Image, processor) -> tuple[Image.Image, tuple[int, int]]:
    """(the image as the processor will see it, the original (width, height) that boxes refer to).

    With the processor's default bicubic resize the squash to S×S happens here; its own resize of an
    S×S image to S×S is then PIL's copy, so the pixels are those `sample.py` gives the model
    (tests/test_serve_api.py compares the answers). The big_vision resizes get the RGB image as it is."""
    size = image.size
    rgb = to_rgb(image)
    if processor.image_resize == "bicubic":
        rgb = rgb.resize((processor.image_size, processor.image_size), resample=Image.Resampling.BICUBIC)
    return rgb, size


def _data_url_bytes(url: str, where: str) -> bytes:
    head, comma, data = url.partition(",")
    if not comma or not head.endswith(";base64"):
        raise ApiError(400, f"{where}: a data: URL must read data:<type>;base64,<data>, got {head[:40]!r}", where)
    try:
        # Line breaks and spaces are allowed (MIME base64 wraps at 76 columns); any other stray character is not.
        return base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(400, f"{where}: the data: URL is not valid base64 ({e})", where) from None


def _from_bytes(data: bytes, where: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as im:
            load_image(im)  # the pixel limit, from the header alone
            im.load()
            return ImageOps.exif_transpose(im)
    except InputError:
        raise
    except Image.DecompressionBombError as e:
        raise InputError(f"the image is too large: {e}") from None
    except UnidentifiedImageError:
        raise InputError(f"the {len(data):,} bytes are not an image PIL can read (PNG, JPEG, WebP, GIF, ...)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(f"cannot read the image ({type(e).__name__}: {e})") from None


def _allowed_path(url: str, where: str, allow_dir: str | None) -> str:
    if allow_dir is None:
        raise ApiError(400, f"{where}: file:// URLs are off; start the server with --allow-files DIR to read "
                       "images from DIR, or send a data: URL", where)
    parts = urlparse(url)
    if parts.netloc not in ("", "localhost"):
        raise ApiError(400, f"{where}: a file:// URL must name a local path (file:///...), got host "
                       f"{parts.netloc[:40]!r}", where)
    root = os.path.realpath(allow_dir)
    path = os.path.realpath(unquote(parts.path))   # links and ".." resolved before the check
    if os.path.commonpath([root, path]) != root:
        raise ApiError(400, f"{where}: {unquote(parts.path)[:200]} is outside the --allow-files directory", where)
    return path
