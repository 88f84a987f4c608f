# The tiny PaliGemma 2 bundled in nanopali/assets/tiny-shapes, stage 1: the decoder learns the four
# prompts of nanopali/shapes/task.py; the image encoder and projector come from stage 0 and stay frozen.
#   python -m nanopali.shapes runs/tiny-shapes/data       # data, tokenizer, stage 0 (~1 min on 2 CPU cores)
#   python train.py recipes/tiny_shapes.py                # this stage (~27 min on 2 CPU cores)
#   python sample.py --checkpoint runs/tiny-shapes     # the result (the shipped copy stays as it is)
init = "runs/tiny-shapes/data/init"
data = "runs/tiny-shapes/data/train.jsonl"
eval_data = "runs/tiny-shapes/data/eval.jsonl"
out_dir = "runs/tiny-shapes"
metrics_file = "runs/tiny-shapes/metrics.jsonl"
trainable = "llm"               # decoder + embeddings; stage 0 trained the image side
precision = "fp32"
batch_size = 48
max_steps = 7000
lr = 1e-3
min_lr = 1e-4
warmup_steps = 50
weight_decay = 0.0
grad_clip = 1.0
seed = 0
log_every = 25                  # a line every ~6 s on 2 cores
eval_every = 1000
eval_max_examples = 200
eval_batch_size = 50
eval_max_new_tokens = 40
save_every = 1000
keep = 1
