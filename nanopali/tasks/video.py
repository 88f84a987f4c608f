"""Video as several images (PaliGemma paper §3.2 and Appendix: video captioning / QA over frames).

PaliGemma reads a video as frames sampled evenly in time, each encoded as its own image (256 tokens
at 224 px) and placed one after another before BOS, exactly like a multi-image prompt. The token budget
grows linearly: 16 frames at 224 px = 4096 image tokens; at 448 px 16384.

Sources: an animated GIF/WebP/PNG or a folder of images with PIL; any other file (mp4, webm, ...)
through PyAV, the optional `video` extra (`pip install -e ".[video]"`).
"""
from __future__ import annotations

import os
import warnings

from PIL import Image, ImageSequence

from ..processing import InputError, load_image

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
ANIMATED_EXTS = (".gif", ".webp", ".png", ".apng")


def sample_indices(total: int, num_frames: int) -> list[int]:
    """Centres of num_frames equal segments of [0, total): evenly spread, never the same frame twice.

    Fewer frames than asked: all of them, with a warning."""
    if num_frames < 1:
        raise InputError(f"num_frames must be ≥ 1, got {num_frames}")
    if total < num_frames:
        warnings.warn(f"the video has {total} frames, fewer than the {num_frames} asked for; using all of them")
        return list(range(total))
    return [int((i + 0.5) * total / num_frames) for i in range(num_frames)]


def video_frames(path: str, num_frames: int = 16) -> list[Image.Image]:
    """num_frames RGB frames of a video, in time order."""
    path = os.fspath(path)
    if os.path.isdir(path):
        files = sorted(f for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTS))
        if not files:
            raise InputError(f"No image files in the folder {path}")
        return [load_image(os.path.join(path, files[i])).convert("RGB") for i in sample_indices(len(files), num_frames)]
    if not os.path.isfile(path):
        raise InputError(f"Video not found: {path}")
    if path.lower().endswith(ANIMATED_EXTS):
        load_image(path)  # one clear error for a missing, unreadable or oversized file
        with Image.open(path) as im:  # not load_image's copy: a copy keeps only the first frame
            frames = [f.convert("RGB") for f in ImageSequence.Iterator(im)]
        return [frames[i] for i in sample_indices(len(frames), num_frames)]
    return _decode_with_pyav(path, num_frames)


def _decode_with_pyav(path: str, num_frames: int) -> list[Image.Image]:
    try:
        import av
    except ImportError:
        raise InputError(f"Reading {os.path.basename(path)} needs PyAV: pip install -e \".[video]\" "
                         "(or pass a folder of frames or an animated GIF)") from None
    try:
        with av.open(path) as container:
            frames = [f.to_image() for f in container.decode(video=0)]
    except (av.error.FFmpegError, ValueError) as e:  # noqa: F821 - av is imported above
        raise InputError(f"Cannot decode {path} as a video ({e})") from None
    if not frames:
        raise InputError(f"{path} has no video frames")
    return [frames[i].convert("RGB") for i in sample_indices(len(frames), num_frames)]
