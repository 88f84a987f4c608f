# The README's CPU quickstart: LoRA teaches the bundled tiny model a prompt it never saw, "count circles"
# (how many circles, squares or triangles; nanopali/shapes/task.py kind_count_examples), in under a
# minute on 2 idle CPU cores (README, "Fine-tune on a CPU in a minute").
#   python -m nanopali.shapes runs/quickstart/data --data-only --prompts kind-count --train 1000 --eval 200
#   python train.py recipes/quickstart_cpu.py
#   python sample.py --checkpoint runs/quickstart --prompt "count circles" --prompt "count squares"
# Measured (idle 2-core CPU): ~25 s in all; held-out exact match 0.27 before, 0.92 / 0.885 / 0.90 after
# (seeds 0 / 1 / 2); with --quantize-base int8, 0.92 / 0.895 / 0.89.
init = "nanopali/assets/tiny-shapes"
data = "runs/quickstart/data/train.jsonl"
eval_data = "runs/quickstart/data/eval.jsonl"
out_dir = "runs/quickstart"
trainable = "lora"              # rank-8 adapters on every decoder projection; the model itself stays frozen
lora_rank = 8
lora_alpha = 16.0
precision = "fp32"
batch_size = 16
max_steps = 300
lr = 1e-3                        # 1e-2 collapsed to the majority answer ("1"), 55 % (measured)
warmup_steps = 10
seed = 0
log_every = 10
eval_every = 100                # step 0 too: the starting point
eval_batch_size = 50
eval_max_new_tokens = 4
save_every = 100
keep = 1
