"""`python -m nanopali.shapes OUT_DIR`: the shapes task's data, tokenizer and stage-0 starting point.

Writes OUT_DIR/tokenizer.model, train.jsonl and eval.jsonl with their images (task.py), then OUT_DIR/init,
the tiny PaliGemma whose image encoder stage 0 trained (pretrain.py): what recipes/tiny_shapes.py starts from.
"""
from __future__ import annotations

import argparse
import os

from .pretrain import pretrain_image_encoder
from .task import HELD_OUT_SEED, train_tokenizer, write_jsonl


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Write the shapes task (train/eval JSONL, images, tokenizer.model) "
                                "and the stage-0 starting point of the tiny model (OUT_DIR/init), for "
                                "recipes/tiny_shapes.py")
    p.add_argument("out_dir")
    p.add_argument("--train", type=int, default=8000, help="training scenes (seeds 0..N-1)")
    p.add_argument("--eval", type=int, default=200, help="held-out scenes (seeds from 10,000,000)")
    p.add_argument("--init-steps", type=int, default=400, help="stage-0 steps of the image encoder (0: random init)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random initialisation and of stage 0")
    args = p.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    tok = train_tokenizer(os.path.join(args.out_dir, "tokenizer.model"))
    write_jsonl(args.out_dir, "train", range(args.train))
    write_jsonl(args.out_dir, "eval", range(HELD_OUT_SEED, HELD_OUT_SEED + args.eval))
    print(f"wrote {args.out_dir}: tokenizer.model, train.jsonl ({args.train} scenes), eval.jsonl ({args.eval})")
    pretrain_image_encoder(os.path.join(args.out_dir, "init"), tok, args.out_dir, range(args.train),
                           steps=args.init_steps, seed=args.seed)


if __name__ == "__main__":
    main()
