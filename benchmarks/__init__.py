"""Helpers of `bench.py --full` (not part of the package, not imported by it).

    random_checkpoint.py  a full-size PaliGemma checkpoint with random weights, written to disk tensor by
                          tensor in the hub layout, without ever holding the model in memory
    machine.py            this machine's own rates (memory read, GEMV per weight format) and the decode
                          floor they set for a model: bytes of weights read per token / rate

Data flows config → checkpoint directory → (bench.py loads and times it) → results beside the floors.
"""
