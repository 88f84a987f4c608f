# The README's CPU quickstart: LoRA teaches the bundled tiny model a prompt it never saw, "count circles"
# (how many circles, squares or triangles; nanopali/shapes/task.py kind_count_examples), in a few
# minutes on 2 CPU cores (README, "Fine-tune on a CPU in minutes", has the measured times and scores).
#   python -m nanopali.shapes runs/quickstart/data --data-only --prompts kind-count --train 400 --eval 100
#   python train.py recipes/quickstart_cpu.py
#   python sample.py --checkpoint runs/quickstart --prompt "count circles" --prompt "count squares"
init = "nanopali/assets/tiny-shapes"
data = "runs/quickstart/data/train.jsonl"
eval_data = "runs/quickstart/data/eval.jsonl"
out_dir = "runs/quickstart"
trainable = "lora"              # rank-8 adapters on every decoder projection; the model itself stays frozen
lora_rank = 8
lora_alpha = 16.0
precision = "fp32"
batch_size = 16
max_steps = 200
lr = 1e-2
warmup_steps = 10
seed = 0
log_every = 10
eval_every = 50                 # step 0 too: the starting point
eval_batch_size = 50
eval_max_new_tokens = 4
save_every = 50
keep = 1
