# Full fine-tune of PaliGemma 2 3B (224 px) on a captioning JSONL, one 80 GB GPU or torchrun.
#   python train.py recipes/caption_full_pg2_3b.py --init=/path/to/paligemma2-3b-pt-224 --data=train.jsonl
# Each line of the file is a flag of train.py (`python train.py --help`); the command line overrides it.
trainable = "all"
precision = "bf16"
trainable_dtype = "fp32"        # fp32 master weights and AdamW state (about 63 GiB at batch 8 x 288)
batch_size = 8
grad_accum = 4                  # 32 examples per step
max_seq_len = 288               # 256 image tokens + prompt + caption
lr = 1e-5
warmup_steps = 50
weight_decay = 0.0
grad_clip = 1.0
max_steps = 2000
log_every = 10
eval_every = 250
save_every = 250
keep = 2
out_dir = "runs/caption_full_pg2_3b"
metrics_file = "runs/caption_full_pg2_3b/metrics.jsonl"
