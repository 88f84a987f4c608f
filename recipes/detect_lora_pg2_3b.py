# LoRA fine-tune of PaliGemma 2 3B (448 px) for detection (`detect cat ; dog` -> <loc> boxes).
# Fits a 24 GB GPU: frozen weights in bf16, adapters and their AdamW state in fp32.
#   python train.py recipes/detect_lora_pg2_3b.py --init=/path/to/paligemma2-3b-pt-448 --data=train.jsonl \
#       --eval-data=val.jsonl
trainable = "lora"
lora_rank = 16
lora_alpha = 32.0
lora_dropout = 0.05
lora_targets = ["q", "k", "v", "o", "gate", "up", "down"]
frozen_dtype = "bf16"
precision = "bf16"
grad_checkpointing = True
batch_size = 4
grad_accum = 4
max_seq_len = 1100              # 1024 image tokens + prompt + a few boxes
lr = 2e-4
warmup_steps = 20
max_steps = 1000
eval_every = 200
eval_max_examples = 200
eval_max_new_tokens = 64        # room for several `<loc>`x4 label objects
save_every = 200
out_dir = "runs/detect_lora_pg2_3b"
metrics_file = "runs/detect_lora_pg2_3b/metrics.jsonl"
