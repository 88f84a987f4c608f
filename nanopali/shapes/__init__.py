"""The bundled tiny model's synthetic task (not part of PaliGemma): scenes, exact answers, tokenizer, metrics.

    task.py       scenes drawn from a seed, their answers to caption / count / colour / detect prompts,
                  the task's SentencePiece tokenizer, held-out metrics (`evaluate`)
    pretrain.py   stage 0: the image encoder learns to name what is under each patch
    __main__.py   `python -m nanopali.shapes OUT_DIR` writes data, tokenizer and the stage-0 model

Data flows task → pretrain → train.py recipes/tiny_shapes.py → nanopali/assets/tiny-shapes.
"""
from .task import *  # noqa: F401,F403  (nanopali.shapes.make_scene etc., as before the folder existed)
from .task import ASSETS, BUNDLED_MODEL, BUNDLED_SEEDS, HELD_OUT_SEED, IMAGE_SIZE, RENDER_SIZE  # noqa: F401
