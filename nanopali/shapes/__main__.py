"""`python -m nanopali.shapes OUT_DIR`: the shapes task's data, tokenizer and stage-0 starting point.

Writes OUT_DIR/tokenizer.model, train.jsonl and eval.jsonl with their images (task.py), then OUT_DIR/init,
the tiny PaliGemma whose image encoder stage 0 trained (pretrain.py): what recipes/tiny_shapes.py starts from.
With --data-only, only the JSONL files and images: data to fine-tune the bundled model, which brings its
own tokenizer (--prompts kind-count: the README quickstart's new prompt, recipes/quickstart_cpu.py).
"""
from __future__ import annotations

import argparse
import os
import time

from .pretrain import pretrain_image_encoder
from .task import HELD_OUT_SEED, PROMPT_SETS, train_tokenizer, write_jsonl


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Write the shapes task (train/eval JSONL, images, tokenizer.model) "
                                "and the stage-0 starting point of the tiny model (OUT_DIR/init), for "
                                "recipes/tiny_shapes.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("out_dir")
    p.add_argument("--train", type=int, default=8000, help="training scenes (seeds 0..N-1)")
    p.add_argument("--eval", type=int, default=200, help="held-out scenes (seeds from 10,000,000)")
    p.add_argument("--prompts", default="pretraining", choices=list(PROMPT_SETS),
                   help="pretraining: the four prompts the bundled model knows; kind-count: 'count circles' -> 2, "
                   "new to it (for fine-tuning it)")
    p.add_argument("--data-only", action="store_true", help="only the JSONL files and images (no tokenizer.model, "
                   "no init/): data for fine-tuning an existing model")
    p.add_argument("--init-steps", type=int, default=400, help="stage-0 steps of the image encoder (0: random init)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random initialisation and of stage 0")
    args = p.parse_args(argv)
    if min(args.train, args.eval) < 1 or args.init_steps < 0:
        p.error("--train and --eval must be ≥ 1 and --init-steps ≥ 0")
    os.makedirs(args.out_dir, exist_ok=True)
    t0 = time.perf_counter()

    def say(line):
        print(f"[{time.perf_counter() - t0:5.1f} s] {line}", flush=True)

    if not args.data_only:
        tok = train_tokenizer(os.path.join(args.out_dir, "tokenizer.model"))
        say("tokenizer.model")
    prompts = PROMPT_SETS[args.prompts]
    write_jsonl(args.out_dir, "train", range(args.train), prompts=prompts, report=say)
    write_jsonl(args.out_dir, "eval", range(HELD_OUT_SEED, HELD_OUT_SEED + args.eval), prompts=prompts, report=say)
    say(f"wrote {args.out_dir}: train.jsonl ({args.train} scenes), eval.jsonl ({args.eval}), images/"
        + ("" if args.data_only else ", tokenizer.model"))
    if not args.data_only:
        pretrain_image_encoder(os.path.join(args.out_dir, "init"), tok, args.out_dir, range(args.train),
                               steps=args.init_steps, seed=args.seed)


if __name__ == "__main__":
    main()
