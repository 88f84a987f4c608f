# QLoRA on PaliGemma 2 10B (224 px) for captioning on one 24 GB GPU: the 9.7 G-weight base (18.5 GB in
# bf16, which does not fit) held as int4 (groups of 64), adapters and AdamW in fp32.
#   python train.py recipes/caption_qlora_24gb_pg2_10b.py --init=/path/to/paligemma2-10b-pt-224 --data=train.jsonl
#   python train.py recipes/caption_qlora_24gb_pg2_10b.py --init=pg2-10b-224 --tokenizer=x --estimate-memory
# Estimate (docs/qlora.md): 9.05 GiB at batch 8 x 320 (int4 base 5.12, activations 1.55, logits 1.47);
# with 10 % for the allocator, 10.0 GiB of an A10's 22.5 GiB (the smallest "24 GB"): a 12.5 GiB margin.
# Batch 16 is estimated at 12.1 GiB.
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
grad_accum = 4                  # 32 examples per step
max_seq_len = 320               # 256 image tokens + prompt + caption
lr = 2e-4
warmup_steps = 50
max_steps = 2000
eval_every = 250
eval_max_examples = 200
save_every = 250
keep = 2
out_dir = "runs/caption_qlora_24gb_pg2_10b"
metrics_file = "runs/caption_qlora_24gb_pg2_10b/metrics.jsonl"
