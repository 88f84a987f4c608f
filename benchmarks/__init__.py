"""Helpers and subcommands of `bench.py` (not part of the package, not imported by it).

    random_checkpoint.py  a full-size PaliGemma checkpoint with random weights, written to disk tensor by
                          tensor in the hub layout, without ever holding the model in memory
    machine.py            this machine's own rates (memory read, GEMV per weight format) and the decode
                          floor they set for a model: bytes of weights read per token / rate
    tables.py             the `--full` table and the words of its ratio rows
    attention.py          `bench.py attention`: the fused kernel vs SDPA, FlexAttention and the reference
    gpu.py, gpu_parts.py  `bench.py gpu`: everything a lent GPU should measure, in one guarded run
    compile_report.py     `bench.py compile-report`: the fused kernels compiled for sm_80/89/90 without a GPU

Data flows config → checkpoint directory → (bench.py loads and times it) → results beside the floors.
"""
