# QLoRA on PaliGemma 2 3B (448 px) for detection (`detect cat ; dog` -> <loc> boxes) on one 16 GB GPU
# with bf16 (Ampere or newer): the frozen base held as int4 (groups of 64), adapters and AdamW in fp32.
#   python train.py recipes/detect_qlora_16gb_pg2_3b_448.py --init=/path/to/paligemma2-3b-pt-448 \
#       --data=train.jsonl --eval-data=val.jsonl
#   python train.py recipes/detect_qlora_16gb_pg2_3b_448.py --init=pg2-3b-448 --tokenizer=x --estimate-memory
# Estimate (docs/qlora.md): 6.80 GiB at batch 8 x 1100 (int4 base 1.64, activations 3.06, logits 1.75);
# with 10 % for the allocator, 7.5 GiB of a T4's 15 GiB (the smallest "16 GB"): a 7.5 GiB margin, room
# for the activations not yet measured on a GPU and for int4 decoding's packed copy when --eval-data
# generates (+1.4 GiB). Batch 16 is estimated at 11.6 GiB.
trainable = "lora"
quantize_base = "int4"
lora_rank = 16
lora_alpha = 32.0
lora_dropout = 0.05
lora_targets = ["q", "k", "v", "o", "gate", "up", "down"]
frozen_dtype = "bf16"
precision = "bf16"
grad_checkpointing = True
batch_size = 8
grad_accum = 2                  # 16 examples per step
max_seq_len = 1100              # 1024 image tokens + prompt + a few boxes
lr = 2e-4
warmup_steps = 20
max_steps = 1000
eval_every = 200
eval_max_examples = 200
eval_max_new_tokens = 64        # room for several `<loc>`x4 label objects
save_every = 200
out_dir = "runs/detect_qlora_16gb_pg2_3b_448"
metrics_file = "runs/detect_qlora_16gb_pg2_3b_448/metrics.jsonl"
