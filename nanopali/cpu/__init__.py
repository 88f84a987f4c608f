"""The CPU this process runs on: what it can do, how many threads to use, and the speed choices measured on it.

    machine.py   the CPU's model and the features torch may use here (AVX-512 BF16, AMX; capped by
                 ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA), the cores this process may use, thread counts
    products.py  the one-row product (a decode step's x · Wᵀ) in whichever form streams fastest here,
                 measured per weight shape and swapped into a loaded model's decoder

Nothing in the paper files depends on this folder: the loader applies it (as gpt-fast's quantize.py
swaps modules at load), so `gemma.py` reads as the model.
"""
