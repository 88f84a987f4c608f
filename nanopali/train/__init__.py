"""Fine-tuning (PaliGemma paper §3.2.4, transfer): the pieces train.py and notebooks put together.

    flags.py      train.py's flags with their defaults, and recipe files of flags (read without running code)
    run_dir.py    one run per directory (a lock), resume refusing changed flags, run.json's history, free memory
    data.py       JSONL / in-memory examples → validated examples → prefix-LM batches; the data order
    finetune.py   which weights train, AdamW, the prefix-LM loss, one optimizer step
    lora.py       low-rank adapters on the decoder's linear layers, merged for export
    qlora.py      LoRA on a frozen base held as int8 / int4 (nanopali/quant), and its exports
    resume.py     atomic step checkpoints that resume bit for bit; disk-full and damaged files named
    parallel.py   torchrun: DDP or FSDP2 around the objective
    cost.py       memory and FLOPs known before a run
    progress.py   the progress line during it: elapsed, ETA, tokens/s, MFU, peak memory
    evaluate.py   held-out loss and greedy-generation metrics

Data flows flags → examples → batches → Objective (model + loss) → train_step → checkpoints.
"""
