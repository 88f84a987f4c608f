"""Zero-shot image classification with SigLIP / SigLIP 2 / MobileCLIP2: which of your labels fit an image?

    python classify.py --checkpoint DIR --image cat.jpg --labels "a cat,a dog,a car"
    python classify.py --checkpoint DIR --image cat.jpg --labels-file labels.txt --top 5 --json

DIR is a Hugging Face SigLIP or SigLIP 2 directory (google/siglip-*, google/siglip2-*, NaFlex too), or
an open_clip MobileCLIP / MobileCLIP2 directory (open_clip_config.json, docs/mobileclip.md), or the
hub name of either (timm/MobileCLIP2-S0-OpenCLIP: docs/checkpoints.md#by-hub-name).
Each label goes into --template ("This is a photo of {}.", transformers' pipeline default). SigLIP gives
each its own probability sigmoid(logit): they do not sum to 1, and an image can fit several labels or
none. MobileCLIP2, trained with a softmax over candidates, gives a softmax over the labels.
"""
from __future__ import annotations

import argparse
import json
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="SigLIP / SigLIP 2 / MobileCLIP2 directory, or hub name "
                   "(google/siglip2-base-patch16-224, timm/MobileCLIP2-S0-OpenCLIP)")
    p.add_argument("--revision", default=None, help="branch, tag or commit of a hub --checkpoint (default main)")
    p.add_argument("--image", required=True, action="append", help="image path (repeatable)")
    p.add_argument("--labels", help="comma-separated labels")
    p.add_argument("--labels-file", help="one label per line (for labels with commas)")
    p.add_argument("--template", default="This is a photo of {}.", help="one '{}' marks where the label goes "
                   "(a literal brace is written '{{' or '}}'); '{}' alone uses the labels as they are")
    p.add_argument("--top", type=int, default=5, help="how many labels to print per image")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 (auto: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (auto: cuda if available)")
    p.add_argument("--json", action="store_true", help="print one JSON object per image")
    return p.parse_args(argv)


def read_labels(args) -> list[str]:
    from nanopali.processing import InputError

    if (args.labels is None) == (args.labels_file is None):
        raise InputError("Give the labels with exactly one of --labels \"a,b,c\" or --labels-file FILE")
    if args.labels is not None:
        labels = [s.strip() for s in args.labels.split(",")]
    else:
        labels = read_labels_file(args.labels_file)
    labels = [s for s in labels if s]
    if not labels:
        raise InputError("No labels: --labels / --labels-file gave only empty entries")
    if len(set(labels)) != len(labels):
        raise InputError(f"Labels repeat: {', '.join(sorted({s for s in labels if labels.count(s) > 1}))}")
    return labels


def read_labels_file(path: str) -> list[str]:
    """One label a line, stripped. Bytes, decoded line by line, so that a bad byte is named with its line."""
    from nanopali.processing import InputError

    try:
        with open(path, "rb") as f:
            raw_lines = f.read().splitlines()
    except OSError as e:
        raise InputError(f"Cannot read --labels-file {path} ({e.strerror})") from None
    labels = []
    for i, raw in enumerate(raw_lines, 1):
        try:
            labels.append(raw.decode("utf-8").strip())
        except UnicodeDecodeError as e:
            raise InputError(f"--labels-file {path}:{i}: not valid UTF-8 (byte {raw[e.start]:#04x} at column "
                             f"{e.start + 1})") from None
    return labels


def main(argv=None) -> int:
    args = parse_args(argv)
    from nanopali.formats.files import resolve_device
    from nanopali.formats.hub import local_path
    from nanopali.processing import InputError
    from nanopali.mobileclip import is_mobileclip_dir, load_mobileclip
    from nanopali.siglip import load_siglip, zero_shot
    from nanopali.siglip.processing import check_template

    labels = read_labels(args)
    check_template(args.template, "--template")     # before the model loads, not at its first label
    if args.top < 1:
        raise InputError(f"--top must be ≥ 1, got {args.top}")
    device = resolve_device(args.device)
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    ckpt = local_path(args.checkpoint, "classify", args.revision)  # a hub name: its snapshot in the hub cache
    load = load_mobileclip if is_mobileclip_dir(ckpt) else load_siglip
    model, processor = load(ckpt, dtype=dtype, device=device)
    for path in args.image:
        ranked = zero_shot(model, processor, path, labels, args.template)[: args.top]
        if args.json:
            print(json.dumps({"image": path, "labels": [{"label": s, "probability": p} for s, p in ranked]}))
            continue
        if len(args.image) > 1:
            print(f"[{path}]")
        for label, prob in ranked:
            print(f"{prob:7.2%}  {label}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    # InputError and CheckpointError are ValueErrors; an ImportError names the extra MobileCLIP's tokenizer needs.
    except (ValueError, OSError, ImportError) as e:
        from nanopali.formats.files import printable
        print(f"error: {printable(str(e))}", file=sys.stderr)
        sys.exit(2)
