"""Ask PaliGemma about an image.

    python sample.py                     # the bundled tiny model on a bundled image: caption, count, boxes
    python sample.py --image my.png      # the bundled model on your image (it knows only nanopali.shapes)
    python sample.py --checkpoint DIR --image cat.jpg --prompt "caption en"
    python sample.py --checkpoint google/paligemma2-3b-mix-224 --image cat.jpg   # by hub name: docs/checkpoints.md
    python sample.py --checkpoint DIR --image cat.jpg --prompt "detect cat ; dog" --out boxes.png
    python sample.py --checkpoint DIR --image a.jpg --image b.jpg --multi --prompt "answer en same?"

    python sample.py --image my.png --prompt "caption en" --prompt "count shapes"   # two prompts, one image

The answer is the last line of stdout; everything else (load time, speed, where boxes were drawn) goes
to stderr. --json prints one JSON object per answer instead: image, prompt, text, tokens (the new ids),
and for detections "boxes": [{"label", "box": [x0, y0, x1, y1] in pixels of the image, "bins":
[y0, x0, y1, x1] as the model's <loc> tokens, 0..1023}] (PaliGemma writes y before x; docs/boxes-and-masks.md).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

TASKS = """task prompts (PaliGemma's prefixes; the "\\n" separator is added for you):
  caption en               short caption (any language code: caption de, caption fr, ...)
  describe en              longer description          cap en     very short raw caption
  ocr                      read the text in the image
  answer en QUESTION       visual question answering   question en ANSWER   ask a question
  detect cat ; dog         boxes: <loc><loc><loc><loc> label ; ...  (drawn into --out)
  segment cat              box + 16 <seg> codes of a mask (masks drawn into --out with --vae vae-oid.npz)
pt (pretrained) checkpoints are meant for fine-tuning; mix checkpoints answer these out of the box."""

BUNDLED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "nanopali", "assets", "tiny-shapes")
BUNDLED_IMAGE = os.path.join(os.path.dirname(BUNDLED), "images", "shapes_1.png")
# What the bundled model was trained to answer (nanopali/shapes/task.py), asked when no --prompt is given.
BUNDLED_PROMPTS = ["caption en", "count shapes", "detect circle ; square ; triangle"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1], epilog=TASKS,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="Hugging Face PaliGemma directory (config.json, tokenizer.model, "
                   "*.safetensors) or hub name (google/paligemma2-3b-pt-224: fetched into the Hugging Face "
                   "cache); default: the bundled tiny model")
    p.add_argument("--revision", default=None, help="branch, tag or commit of a hub --checkpoint (default main)")
    p.add_argument("--image", action="append", help="image path (repeatable); a JPEG's EXIF orientation is "
                   "applied, so the model sees the image as a viewer shows it")
    p.add_argument("--prompt", action="append", help="task prompt (repeatable: one per image, one for all images, "
                   "or several for one image)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="most tokens to generate (default 32; prompt + "
                   "new tokens must fit the model's positions)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="sample among the most likely tokens reaching p")
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible (0 ≤ seed < 2**63)")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 (auto: bf16 on CUDA and on CPUs that "
                   "multiply bf16 natively, else fp32; the choice is printed)")
    p.add_argument("--quantize", choices=["int8", "int4"], default=None, help="weight-only quantization while "
                   "loading: 2x (int8) or ~4x (int4) fewer bytes read per token; see docs/speed.md")
    p.add_argument("--group-size", type=int, default=None, help="int4 group size: 32, 64 (default), 128, 256")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (auto: cuda if available)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: the cores this process may use; "
                   "more are cut to them). On a machine another program keeps busy, one fewer can be faster: see "
                   "docs/speed.md")
    p.add_argument("--attn-impl", default="auto", choices=["auto", "reference", "sdpa", "triton"])
    p.add_argument("--out", default=None, help="write the image with boxes drawn (PNG unless the name says "
                   "otherwise, e.g. .jpg); default annotated.png in the current directory when an answer has boxes "
                   "(several images: annotated_N.png)")
    p.add_argument("--vae", default=None, help="big_vision's vae-oid.npz: decodes the <seg> codes of 'segment' "
                   "answers into masks, drawn into --out (default segmented.png) and added to --json as RLE")
    p.add_argument("--json", action="store_true", help="print one JSON object per answer (fields above)")
    p.add_argument("--multi", action="store_true", help="send all --image files with one prompt, as one "
                   "multi-image prompt (image pairs, video frames)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the decode step (CUDA graphs on GPU); default: on for CUDA, off on CPU")
    p.add_argument("--tokenizer", default=None, help="tokenizer.model, for a big_vision .npz --checkpoint")
    p.add_argument("--variant", default=None, help="preset of a big_vision .npz (default: inferred from shapes)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    import nanopali
    from nanopali.cpu import machine
    from nanopali.formats.files import resolve_device, resolve_dtype
    from nanopali.formats.hub import local_path
    from nanopali.tasks.answers import answer_fields, read_answer
    from nanopali.tasks.detection import draw_detections
    from nanopali.generate import generate
    from nanopali.processing import load_image
    from nanopali.tasks.segmentation import MaskDecoder, draw_segmentations

    ckpt = args.checkpoint
    if ckpt is None:
        if not os.path.isdir(BUNDLED):
            raise nanopali.InputError("No --checkpoint given and the bundled model is not installed here. "
                                      "Pass --checkpoint DIR (a Hugging Face PaliGemma directory).")
        ckpt = BUNDLED
    images = args.image or ([BUNDLED_IMAGE] if os.path.isfile(BUNDLED_IMAGE) else [])
    if not images:
        raise nanopali.InputError("Pass at least one --image PATH")
    prompts = args.prompt or (BUNDLED_PROMPTS if ckpt == BUNDLED else ["caption en"])
    if len(images) == 1 or args.multi:          # every prompt of the one image (or the one image list)
        rows = [0] * len(prompts)
    elif len(prompts) == 1 or (args.prompt is None and ckpt == BUNDLED):
        rows = [i for i in range(len(images)) for _ in prompts]
        prompts = prompts * len(images)
    elif len(prompts) == len(images):
        rows = list(range(len(images)))         # row → index of its image
    else:
        raise nanopali.InputError(f"Got {len(images)} --image and {len(prompts)} --prompt; give one prompt for "
                                  "all images, one per image, or several prompts for one image")
    if args.vae is not None and not os.path.isfile(args.vae):  # before minutes of loading, not after
        raise nanopali.InputError(f"--vae {args.vae}: no such file. It is big_vision's vae-oid.npz (see "
                                  "docs/boxes-and-masks.md#segmenting-an-image)")
    if args.out is not None:
        check_out(args.out)
    if args.threads is not None and args.threads < 1:
        raise nanopali.InputError(f"--threads must be ≥ 1, got {args.threads}")
    threads, note = machine.set_threads(args.threads)  # 10,000 threads once took 27 s to start for 2 tokens
    if note:
        print(f"(--threads: {note})", file=sys.stderr)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    ckpt = local_path(ckpt, "paligemma", args.revision)  # a hub name: its snapshot in the hub cache
    npz = {"tokenizer": args.tokenizer, "variant": args.variant} if ckpt.endswith(".npz") else {}
    size = _bytes(ckpt)
    if size > 200e6 and not args.json:  # a 3B checkpoint takes seconds to map: say so before, not only after
        print(f"(loading {ckpt}: {size / 1e9:.1f} GB ...)", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    model, processor = nanopali.load(ckpt, dtype=dtype, device=device, attn_impl=args.attn_impl,
                                     quantize=args.quantize, group_size=args.group_size, **npz)
    setting = f"{device}, {str(dtype).removeprefix('torch.')}" + (f", {args.quantize}" if args.quantize else "")
    if not args.json:
        print(f"(loaded {ckpt} in {time.perf_counter() - t0:.1f} s: {setting}, {threads} threads)", file=sys.stderr)
        print(machine.describe(threads), file=sys.stderr)  # what a speed report needs to be compared
    pils = [load_image(p) for p in images]
    batch_images = [pils if args.multi else pils[i] for i in rows]  # --multi: each row holds every image
    compile_step = device.type == "cuda" if args.compile is None else args.compile
    # One row in plain text mode streams: the answer appears as it is decoded (a 3B model on a CPU
    # makes a few tokens a second). The stream's line is the answer's line, printed whole at the end.
    stream = None if args.json or len(batch_images) != 1 else Stream(processor, f"{prompts[0]} ->")
    t0 = time.perf_counter()
    texts, ids = generate(model, processor, batch_images, prompts, args.max_new_tokens, args.temperature,
                          args.top_k, args.top_p, args.seed, return_ids=True, compile=compile_step,
                          on_token=stream)
    seconds = time.perf_counter() - t0
    mask_decoder = MaskDecoder.from_npz(args.vae) if args.vae else None
    for i, prompt, text, toks in zip(rows, prompts, texts, ids):
        path, pil = images[i], pils[i]
        shown = os.path.relpath(path) if os.path.isabs(path) and not os.path.relpath(path).startswith("..") else path
        dets, segs = read_answer(prompt, text, *pil.size, mask_decoder)
        out_path = None
        if dets or segs:
            out_path = args.out or ("segmented.png" if segs else "annotated.png")
            if len(images) > 1:
                root, ext = os.path.splitext(out_path)
                out_path = f"{root}_{i}{ext or '.png'}"
            drawing = draw_segmentations(pil, segs) if segs else draw_detections(pil, dets)
            drawing.save(out_path, format=None if os.path.splitext(out_path)[1] else "PNG")
        drawn = out_path and (f"[{shown}] {len(segs)} mask(s)" if segs else f"[{shown}] {len(dets)} box(es)") + \
            f" drawn into {out_path}"
        if stream is not None:
            stream.finish(text)
        elif args.json:
            rec = {"image": images if args.multi else path, "prompt": prompt, "text": text, "tokens": toks,
                   **answer_fields(dets, segs)}  # boxes; masks: box, bins, codes, COCO RLE of the full-image mask
            if dets or segs:
                rec["annotated"] = out_path
            print(json.dumps(rec))
        else:
            print(f"[{shown}] {prompt} ->" if len(images) > 1 else f"{prompt} ->")
            print(text, flush=True)
        if drawn and not args.json:  # after its answer, on stderr: stdout's last line stays the answer
            print(drawn, file=sys.stderr, flush=True)
    if not args.json:
        n = sum(len(t) for t in ids)
        print(f"({n} tokens in {seconds:.2f} s: {n / seconds:.1f} tok/s including the prompt, {setting})",
              file=sys.stderr)
    return 0


def check_out(out: str) -> None:
    """Refuse, before minutes of loading, an --out that could only fail after the answer is generated."""
    from PIL import Image

    from nanopali import InputError

    folder, ext = os.path.dirname(out) or ".", os.path.splitext(out)[1].lower()
    if os.path.isdir(out):
        raise InputError(f"--out {out} is a directory: give a file name, e.g. {os.path.join(out, 'annotated.png')}")
    if not os.path.isdir(folder):
        raise InputError(f"--out {out}: {folder}: no such directory")
    if not os.access(folder, os.W_OK):
        raise InputError(f"--out {out}: {folder} is not writable")
    if ext and Image.registered_extensions().get(ext) not in Image.SAVE:
        raise InputError(f"--out {out}: no image format PIL writes has the extension {ext!r}; use .png or .jpg")


def _bytes(path: str) -> int:
    files = [os.path.join(path, n) for n in os.listdir(path)] if os.path.isdir(path) else [path]
    return sum(os.path.getsize(f) for f in files if os.path.isfile(f))


class Stream:
    """Prints one row's answer as it is decoded: the text of the ids so far, minus what is on screen.
    SentencePiece may change the tail of the text as pieces arrive (a byte sequence completing a
    character), so only the part before the last piece is printed early; `finish` prints the rest."""

    def __init__(self, processor, header: str):
        self.processor, self.ids, self.shown = processor, [], ""
        print(header, flush=True)

    def __call__(self, tokens) -> None:
        self.ids.append(int(tokens[0]))
        text = self.processor.decode(self.ids[:-1])
        if text.startswith(self.shown) and len(text) > len(self.shown):
            print(text[len(self.shown):], end="", flush=True)
            self.shown = text

    def finish(self, text: str) -> None:
        print(text[len(self.shown):] if text.startswith(self.shown) else "\n" + text, flush=True)


if __name__ == "__main__":
    try:
        code = main()
        sys.stdout.flush()  # here, where a closed pipe is caught, not at exit
    except BrokenPipeError:  # `sample.py | head`: the reader left. Quiet, with the status a shell gives SIGPIPE
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit flush writes nowhere
        code = 128 + 13
    except (ValueError, OSError) as e:  # InputError and CheckpointError are ValueErrors
        from nanopali.formats.files import printable

        print(f"error: {printable(str(e))}", file=sys.stderr)  # paths and file content, escaped
        code = 2
    sys.exit(code)
