"""`<loc>` answers → boxes on the original image, and drawing them (paper §3.2, docs/boxes-and-masks.md#detection).

A detection answer is objects joined by " ; ", each `<locY1><locX1><locY2><locX2> label` — y before x,
coordinates in 1024 bins of the (squashed, so aspect-free) image. Two decodings are in use:
  divisor=1024 (default): pixel = round(bin / 1024 · side), as the Hugging Face blog and the
                          big_vision-based Space do;
  divisor=1023:           pixel = int(bin / 1023 · side), big_vision's evaluator (whose encoder
                          rounds coord · 1023).
They differ by at most 0.1 % of the side. Malformed or truncated objects are skipped, never fatal.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

_OBJECT = re.compile(r"((?:<loc\d{4}>){4})\s*([^;<]*)")
_BIN = re.compile(r"<loc(\d{4})>")

PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60), (250, 190, 190), (0, 128, 128)]


@dataclass
class Detection:
    label: str
    box: tuple[float, float, float, float]   # (x0, y0, x1, y1) in pixels of the original image
    bins: tuple[int, int, int, int]          # (y0, x0, y1, x1) as the model wrote them

    def to_dict(self) -> dict:
        return {"label": self.label, "box": list(self.box), "bins": list(self.bins)}


def loc_bin(coord: float, side: int) -> int:
    """Pixel coordinate → one of 1024 bins, the inverse of the default decoding round(bin/1024·side):
    decoding gives the pixel back exactly, except at the far edge (bin 1023 decodes to side·1023/1024,
    under one pixel short for side ≤ 1024). big_vision encodes round(coord/side·1023) and decodes with
    /1023: the same pairing idea, 0.1 % apart (docs/boxes-and-masks.md#detection)."""
    return min(1023, max(0, round(coord / side * 1024)))


def box_to_locs(box, width: int, height: int) -> str:
    """(x0, y0, x1, y1) pixels → "<locY0><locX0><locY1><locX1>": y first, as the model writes boxes."""
    x0, y0, x1, y1 = box
    return "".join(f"<loc{loc_bin(c, side):04d}>" for c, side in ((y0, height), (x0, width), (y1, height),
                                                                    (x1, width)))


def bins_to_box(bins, width: int, height: int, divisor: int = 1024):
    """(y0, x0, y1, x1) bins → (x0, y0, x1, y1) pixels."""
    y0, x0, y1, x1 = bins
    if divisor == 1024:
        f = lambda b, side: round(b / 1024 * side)  # noqa: E731
    elif divisor == 1023:
        f = lambda b, side: int(b / 1023 * side)  # noqa: E731
    else:
        raise ValueError(f"divisor must be 1024 (HF blog) or 1023 (big_vision evaluator), got {divisor}")
    return (f(x0, width), f(y0, height), f(x1, width), f(y1, height))


def parse_detections(text: str, width: int, height: int, divisor: int = 1024) -> list[Detection]:
    """All well-formed objects of a detection answer; anything malformed is skipped.

    A box is kept only if all bins are in 0..1023 and y1 > y0, x1 > x0 (big_vision's validity rule)."""
    out = []
    for m in _OBJECT.finditer(text):
        bins = tuple(int(b) for b in _BIN.findall(m.group(1)))
        y0, x0, y1, x1 = bins
        if max(bins) > 1023 or y1 <= y0 or x1 <= x0:
            continue
        out.append(Detection(m.group(2).strip(), bins_to_box(bins, width, height, divisor), bins))
    return out


def draw_detections(image: Image.Image, detections: list[Detection], width: int | None = None) -> Image.Image:
    """A copy of the image with each box outlined in its colour and labelled above its top-left corner."""
    im = image.convert("RGB").copy()
    d = ImageDraw.Draw(im)
    lw = width or max(2, round(min(im.size) / 150))
    size = max(11, round(min(im.size) / 28))   # ~17 px on a 640x480 photo: readable at a glance
    try:
        font = ImageFont.load_default(size=size)
    except (TypeError, OSError):               # Pillow < 10.1 or without FreeType: the fixed small font
        font, size = ImageFont.load_default(), 11
    for i, det in enumerate(detections):
        colour = PALETTE[i % len(PALETTE)]
        x0, y0, x1, y1 = det.box
        d.rectangle((x0, y0, x1, y1), outline=colour, width=lw)
        if det.label:
            tx, ty = x0 + lw, max(0, y0 - size - 2 * lw) if y0 >= size + 2 * lw else y0 + lw
            left, top, right, bottom = d.textbbox((tx, ty), det.label, font=font)
            d.rectangle((left - 2, top - 2, right + 2, bottom + 2), fill=colour)
            d.text((tx, ty), det.label, fill=(255, 255, 255), font=font)
    return im
