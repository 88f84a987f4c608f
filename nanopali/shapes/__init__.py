"""The bundled tiny model's synthetic task (not part of PaliGemma): scenes, exact answers, tokenizer, metrics.

    task.py       scenes drawn from a seed, their answers to caption / count / colour / detect prompts,
                  the task's SentencePiece tokenizer, held-out metrics (`evaluate`)
    pretrain.py   stage 0: the image encoder learns to name what is under each patch
    __main__.py   `python -m nanopali.shapes OUT_DIR` writes data, tokenizer and the stage-0 model
                  (--data-only --prompts kind-count: the README quickstart's fine-tuning data)

Data flows task → pretrain → train.py recipes/tiny_shapes.py → nanopali/assets/tiny-shapes.
"""
from .task import (KINDS, COLOURS, NUMBERS, HELD_OUT_SEED, BUNDLED_SEEDS, ASSETS, BUNDLED_MODEL, SUPERSAMPLE, GRID,
                   MARGIN, IMAGE_SIZE, RENDER_SIZE, Shape, Scene, make_scene, boxes_near, caption, count,
                   colour_questions, detect, detect_prompt, examples, kind_count_examples, PROMPT_SETS,
                   scene_image, write_jsonl,
                   train_tokenizer, score, evaluate)

__all__ = ['KINDS', 'COLOURS', 'NUMBERS', 'HELD_OUT_SEED', 'BUNDLED_SEEDS', 'ASSETS', 'BUNDLED_MODEL', 'SUPERSAMPLE',
           'GRID', 'MARGIN', 'IMAGE_SIZE', 'RENDER_SIZE', 'Shape', 'Scene', 'make_scene', 'boxes_near', 'caption',
           'count', 'colour_questions', 'detect', 'detect_prompt', 'examples', 'kind_count_examples',
           'PROMPT_SETS', 'scene_image', 'write_jsonl',
           'train_tokenizer', 'score', 'evaluate']
