# big_vision's recipe for a 16 GB GPU (configs/proj/paligemma/finetune_paligemma.ipynb): train only the
# decoder's attention weights of PaliGemma 1 3B (224 px); everything else frozen in bf16.
#   python train.py recipes/vqa_attn_16gb_pg1.py --init=/path/to/paligemma-3b-pt-224 --data=train.jsonl
#   python train.py recipes/vqa_attn_16gb_pg1.py --init=... --estimate-memory     # check it fits first
trainable = "attn"
frozen_dtype = "bf16"
precision = "bf16"
grad_checkpointing = True
batch_size = 8
max_seq_len = 320
lr = 3e-5
warmup_steps = 10
max_steps = 500
loss_normalization = "examples"  # big_vision's per-example mean
save_every = 100
out_dir = "runs/vqa_attn_16gb_pg1"
