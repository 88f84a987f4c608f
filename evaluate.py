"""Score a checkpoint with the papers' transfer metrics, or score predictions made elsewhere.

    python evaluate.py --checkpoint DIR --data val.jsonl --task caption
    python evaluate.py --checkpoint DIR --data captions_val2017.json --task caption --limit 500 --quantize int8
    python evaluate.py --checkpoint DIR --data refcoco_val.json --task refcoco --out runs/eval-refcoco
    python evaluate.py score --task vqa --predictions runs/eval/predictions.jsonl

Tasks and what they report (docs/metrics.md: each metric's reference and the agreement measured):
caption: BLEU-1..4, CIDEr-D (pycocoevalcap); vqa: VQA accuracy (the official VQA evaluation); anls:
ANLS (DocVQA / InfographicVQA / ST-VQA); refcoco: accuracy at IoU >= 0.5 and mean IoU (big_vision);
detect: mAP@[.5:.95], mAP@.5 (pycocotools' COCOeval).

Generation answers every example's prefix greedily, batched and left-padded as nanopali.generate does,
and writes <out>/predictions.jsonl (one {"where", "prefix", "prediction", "references"} object a line,
with the image's "width" and "height" for box tasks: `evaluate.py score` reads it back) and
<out>/scores.json, each atomically; the last line of stdout is a Markdown row:
| checkpoint | task | n | metric value | ... |. References are each example's "references" (all
captions, all answers, the box: docs/datasets.md), else its suffix. `score` reads lines of
{"prediction", "references"} and prints a JSON object of metric → value. Bad input (an unknown task,
a line without "references", a box that is not [x0, y0, x1, y1]) stops with one message and exit code
2, before any model is loaded.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

LOC_DIVISORS = (1024, 1023)   # <loc> bin → pixel: our datasets' encoding, or big_vision's (tasks/detection.py)


def parse_args(argv=None) -> argparse.Namespace:
    from nanopali.datasets import add_arguments
    from nanopali.metrics import TASKS

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["score"]:
        p = argparse.ArgumentParser(prog="evaluate.py score", description="Score predictions made elsewhere: "
                                    "a JSONL file of {\"prediction\", \"references\"} objects.")
        p.add_argument("--task", required=True, choices=list(TASKS), help="which metrics (see evaluate.py --help)")
        p.add_argument("--predictions", required=True, help="JSONL: one {\"prediction\", \"references\"} a line; "
                       "boxes as [x0, y0, x1, y1] pixels (refcoco), [{\"label\", \"box\"}] (detect); a text "
                       "prediction of <loc> boxes needs \"width\" and \"height\"")
        p.add_argument("--loc-divisor", type=int, default=1024, choices=LOC_DIVISORS, help="<loc> bin → pixel: "
                       "bin / divisor x side; 1023 for checkpoints trained by big_vision")
        args = p.parse_args(argv[1:])
        args.mode = "score"
        return args
    p = argparse.ArgumentParser(description=__doc__, epilog="Score mode: python evaluate.py score "
                                "--help", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="Hugging Face PaliGemma directory (or what nanopali.load "
                   "takes)")
    p.add_argument("--data", required=True, help="held-out data: our JSONL, or a dataset the flags below read")
    p.add_argument("--task", required=True, choices=list(TASKS), help="which metrics")
    p.add_argument("--quantize", choices=["int8", "int4"], help="weight-only quantization while loading")
    p.add_argument("--batch-size", type=int, default=8, help="examples generated together (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="longest answer (default 32)")
    p.add_argument("--limit", type=int, help="evaluate the first N examples")
    p.add_argument("--out", default="runs/eval", help="folder for predictions.jsonl and scores.json "
                   "(default runs/eval)")
    p.add_argument("--loc-divisor", type=int, default=1024, choices=LOC_DIVISORS, help="<loc> bin → pixel: "
                   "bin / divisor x side (default 1024, as our datasets encode boxes; 1023 for big_vision's)")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 (auto: bf16 where native, else fp32)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (auto: cuda if available)")
    add_arguments(p.add_argument_group("how --data is read (docs/datasets.md)"))
    args = p.parse_args(argv)
    for name in ("batch_size", "max_new_tokens", "limit"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be ≥ 1, got {getattr(args, name)}")
    args.mode = "generate"
    return args


def main(argv=None) -> int:
    from nanopali import CheckpointError, InputError
    from nanopali.datasets import DataError
    from nanopali.formats.files import printable
    from nanopali.metrics import ScoreError

    args = parse_args(argv)
    try:
        return score_file(args) if args.mode == "score" else evaluate(args)
    except (ScoreError, DataError, InputError, CheckpointError, OSError) as e:   # they quote paths and content
        print(f"error: {printable(str(e))}", file=sys.stderr, flush=True)
        return 2


def score_file(args) -> int:
    from nanopali.metrics import read_predictions, score

    print(json.dumps(score(args.task, read_predictions(args.predictions, args.task, args.loc_divisor))))
    return 0


def read_examples(args, processor) -> list:
    """The held-out examples of --data (any format of nanopali.datasets), checked, the first --limit."""
    from nanopali.datasets import source_from_args
    from nanopali.train.data import load_examples

    return load_examples(source_from_args(args, args.data, evaluation=True), processor).examples[:args.limit]


def evaluate(args) -> int:
    from nanopali.metrics import check_records, score
    from nanopali.train.evaluate import task_record

    out_dir = check_out_dir(args.out)
    device, dtype = settings(args)
    processor = processor_without_weights(args.checkpoint)
    model = None
    if processor is None:        # a .npz: its processor comes with the model
        model, processor = load_model(args, device, dtype)
    examples = read_examples(args, processor)
    records = [task_record(args.task, ex, "", args.loc_divisor) for ex in examples]
    check_records(args.task, [(ex.where, r) for ex, r in zip(examples, records)], args.loc_divisor)
    if model is None:
        model, _ = load_model(args, device, dtype)
    t0 = time.perf_counter()
    for r, text in zip(records, generate_all(model, processor, examples, args.batch_size, args.max_new_tokens)):
        r["prediction"] = text
    seconds = time.perf_counter() - t0
    result = score(args.task, check_records(args.task, [(ex.where, r) for ex, r in zip(examples, records)],
                                            args.loc_divisor))
    write_atomic(os.path.join(out_dir, "predictions.jsonl"),
                 "".join(json.dumps({"where": ex.where, **r}) + "\n" for ex, r in zip(examples, records)))
    summary = {"checkpoint": args.checkpoint, "data": args.data, "task": args.task, "n": len(examples),
               "quantize": args.quantize, "max_new_tokens": args.max_new_tokens, "loc_divisor": args.loc_divisor,
               "generation_seconds": round(seconds, 3), "scores": result}
    write_atomic(os.path.join(out_dir, "scores.json"), json.dumps(summary, indent=1) + "\n")
    print(f"wrote {os.path.join(out_dir, 'predictions.jsonl')} and scores.json", file=sys.stderr)
    cells = [f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {'-' if v is None else v}" for k, v in result.items()]
    print("| " + " | ".join([args.checkpoint, args.task, str(len(examples)), *cells]) + " |")
    return 0


def check_out_dir(path: str) -> str:
    """--out created and writable now, not after minutes of generation."""
    from nanopali import InputError

    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise InputError(f"--out {path}: cannot create the folder ({e.strerror})") from None
    if not os.access(path, os.W_OK):
        raise InputError(f"--out {path} is not writable")
    return path


def processor_without_weights(checkpoint: str):
    """The Processor of a checkpoint directory or hub name, read before the weights (None for a .npz):
    bad data is refused before gigabytes are read or downloaded."""
    from nanopali.formats.hf_config import read_paligemma_config
    from nanopali.formats.hub import local_path
    from nanopali.processing import Processor

    checkpoint = local_path(checkpoint, "paligemma-config")   # a hub name: its config and tokenizer only
    tok = os.path.join(checkpoint, "tokenizer.model")
    if not (os.path.isfile(os.path.join(checkpoint, "config.json")) and os.path.isfile(tok)):
        return None
    return Processor.for_model(tok, read_paligemma_config(checkpoint))


def settings(args):
    """(device, dtype) of --device and --dtype, refused now if unknown."""
    from nanopali import InputError
    from nanopali.formats.files import resolve_device, resolve_dtype

    try:
        device = resolve_device(args.device)
        return device, resolve_dtype(args.dtype, device)
    except ValueError as e:
        raise InputError(f"{e}") from None


def load_model(args, device, dtype):
    import nanopali

    t0 = time.perf_counter()
    model, processor = nanopali.load(args.checkpoint, dtype=dtype, device=device, quantize=args.quantize)
    print(f"(loaded {args.checkpoint} in {time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
    return model, processor


def generate_all(model, processor, examples, batch_size: int, max_new_tokens: int) -> list[str]:
    """Greedy answers to every example, `batch_size` at a time, with progress and ETA on stderr every ~5 s."""
    from nanopali.generate import generate
    from nanopali.train.progress import clock

    texts, t0, shown = [], time.perf_counter(), 0.0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        texts += generate(model, processor, [ex.images for ex in chunk], [ex.prefix for ex in chunk],
                          max_new_tokens=max_new_tokens)
        elapsed = time.perf_counter() - t0
        if elapsed - shown >= 5 or len(texts) == len(examples):
            shown = elapsed
            left = elapsed / len(texts) * (len(examples) - len(texts))
            print(f"generated {len(texts)}/{len(examples)} | {clock(elapsed)} elapsed, {clock(left)} left",
                  file=sys.stderr, flush=True)
    return texts


def write_atomic(path: str, text: str) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    sys.exit(main())
