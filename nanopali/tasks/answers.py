"""An answer's structure: the boxes and masks a task's text holds (paper §3.2; docs/boxes-and-masks.md).

The one rule `sample.py --json` and the server's native endpoint (nanopali/serve) share: a "segment ..."
answer, when a VQ-VAE mask decoder is loaded, is read as masks (segmentation.py); any other answer as
boxes (detection.py), so a detection, or a segment answer without the decoder, gives its boxes. Text
with no well-formed `<loc>` object gives neither.
"""
from __future__ import annotations

from .detection import Detection, parse_detections
from .segmentation import MaskDecoder, Segmentation, segment


def read_answer(prompt: str, text: str, width: int, height: int,
                mask_decoder: MaskDecoder | None = None) -> tuple[list[Detection], list[Segmentation]]:
    """(boxes, masks) of one answer on a width × height image; at most one of the two is non-empty."""
    segs = segment(text, mask_decoder, width, height) if mask_decoder and prompt.startswith("segment") else []
    return ([] if segs else parse_detections(text, width, height)), segs


def answer_fields(detections: list[Detection], segmentations: list[Segmentation]) -> dict:
    """The JSON fields of `sample.py --json` for them: "boxes" (label, box in pixels, <loc> bins) and
    "masks" (the same, the 16 codes, and the COCO RLE of the full-image mask), each only when present."""
    out = {}
    if detections:
        out["boxes"] = [d.to_dict() for d in detections]
    if segmentations:
        out["masks"] = [s.to_dict() for s in segmentations]
    return out
