"""Fine-tuning (PaliGemma paper §3.2.4, transfer): the pieces train.py and notebooks put together.

    data.py       JSONL / in-memory examples → validated examples → prefix-LM batches; the data order
    finetune.py   which weights train, AdamW, the prefix-LM loss, one optimizer step
    lora.py       low-rank adapters on the decoder's linear layers, merged for export
    resume.py     atomic step checkpoints that resume bit for bit
    parallel.py   torchrun: DDP or FSDP2 around the objective
    cost.py       memory and FLOPs before a run, tokens/s and MFU during it
    evaluate.py   held-out loss and greedy-generation metrics

Data flows examples → batches → Objective (model + loss) → train_step → checkpoints.
"""
