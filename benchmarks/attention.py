"""Attention alone, side by side: nanopali's Triton kernel, SDPA, FlexAttention and the reference.

Issue 7's benchmark: S = 288, 1056, 4128 (PaliGemma 2 at 224 / 448 / 896 px plus 32 text tokens),
head dim 256, GQA 8/4, prefix-LM mask (the last 32 tokens are the causal suffix), bf16, with and
without Gemma 2's soft-cap (c = 50); forward, and forward + backward. SDPA has no soft-cap, so its
soft-cap rows are empty. TF/s count only allowed (unmasked) pairs: the forward does 4·H flops per
pair and query head (q·kᵀ and p·v), the backward 2.5 times that.

    python bench.py attention [--lengths 288 1056 4128] [--tokens 8192]

Without CUDA it runs one tiny case through Triton's interpreter, checks it and says so.
"""
import argparse
import os

import torch

from nanopali.attention import reference_attention, sdpa_attention
from nanopali.masking import PrefixLMMask

# Letters: B batch, N query heads, K key/value heads, S sequence (queries = keys), H head dim.
N, K, H, SUFFIX, SOFTCAP = 8, 4, 256, 32, 50.0


def implementations(mask: PrefixLMMask, S: int, device="cuda", compile=True):
    """name -> f(q, k, v, softcap) for every implementation, or None where it cannot soft-cap."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from nanopali.kernels import flash_attention

    allowed = mask.allowed(0, S, S)                                  # (B, 1, S, S)
    start, pe = mask.start, mask.prefix_end

    def rule(b, h, i, j):
        return ((i >= start[b]) & (j >= start[b]) & (((i < pe[b]) & (j < pe[b])) | (j <= i))) | (i == j)

    block_mask = create_block_mask(rule, mask.batch, None, S, S, device=device)
    flex = torch.compile(flex_attention) if compile else flex_attention

    def tanh_cap(score, b, h, i, j):
        return SOFTCAP * torch.tanh(score / SOFTCAP)

    scale = H ** -0.5
    return {
        "nanopali triton": lambda q, k, v, c: flash_attention(q, k, v, start, pe, scale=scale, softcap=c),
        "sdpa bool mask": lambda q, k, v, c: None if c else sdpa_attention(q, k, v, allowed, scale),
        "flex attention": lambda q, k, v, c: flex(q, k, v, score_mod=tanh_cap if c else None,
                                                  block_mask=block_mask, scale=scale, enable_gqa=True),
        "reference": lambda q, k, v, c: reference_attention(q, k, v, allowed, scale, c),
    }


def bench_cuda(lengths, tokens):
    import triton.testing

    print(f"{torch.cuda.get_device_name()}, bf16, H={H}, GQA {N}/{K}, prefix-LM mask (suffix {SUFFIX}); "
          "TF/s on allowed pairs; fwd+bwd = one forward and one backward")
    print(f"{'S':>5} {'B':>3} {'soft-cap':>8} {'implementation':<16} {'fwd ms':>8} {'TF/s':>6} "
          f"{'fwd+bwd ms':>10} {'TF/s':>6} {'max |diff|':>10}")
    for S in lengths:
        B = max(1, tokens // S)
        mask = PrefixLMMask(torch.zeros(B, dtype=torch.long, device="cuda"),
                            torch.full((B,), S - SUFFIX, device="cuda"), S)
        fwd_flops = 4 * H * N * mask.allowed(0, S, S).sum().item()
        g = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(B, N, S, H, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
        k, v = (torch.randn(B, K, S, H, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
                for _ in range(2))
        do = torch.randn_like(q)
        impls = implementations(mask, S)
        for softcap in (None, SOFTCAP):
            with torch.no_grad():
                want = impls["reference"](q, k, v, softcap).float()
            for name, f in impls.items():
                with torch.no_grad():
                    out = f(q, k, v, softcap)
                if out is None:
                    print(f"{S:>5} {B:>3} {str(softcap):>8} {name:<16} {'(no soft-cap)':>8}")
                    continue
                diff = (out.float() - want).abs().max().item()
                with torch.no_grad():
                    fwd = triton.testing.do_bench(lambda: f(q, k, v, softcap))
                both = triton.testing.do_bench(lambda: torch.autograd.grad(f(q, k, v, softcap), (q, k, v), do))
                print(f"{S:>5} {B:>3} {str(softcap):>8} {name:<16} {fwd:8.3f} {fwd_flops / fwd / 1e9:6.0f} "
                      f"{both:10.3f} {3.5 * fwd_flops / both / 1e9:6.0f} {diff:10.2e}")


def smoke_interpreter():
    """No GPU: one tiny prefix-LM case with soft-cap through the interpreter, against the reference."""
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before nanopali.kernels imports triton's jit
    from nanopali.kernels import flash_attention, is_supported

    if not is_supported("cpu"):
        print("No CUDA device, and no triton interpreter to run the kernel in: nothing to benchmark.")
        return
    mask = PrefixLMMask(torch.tensor([0, 3]), torch.tensor([24, 12]), 40)
    q = torch.randn(2, 4, 40, 16)
    k, v = torch.randn(2, 2, 40, 16), torch.randn(2, 2, 40, 16)
    got = flash_attention(q, k, v, mask.start, mask.prefix_end, scale=0.25, softcap=SOFTCAP)
    want = reference_attention(q, k, v, mask.allowed(), 0.25, SOFTCAP)
    print("No CUDA device: no timings. Interpreter smoke check (B=2, GQA 4/2, S=40, H=16, soft-cap): "
          f"max |kernel - reference| = {(got - want).abs().max().item():.2e}")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="bench.py attention", description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[288, 1056, 4128],
                        help="sequence lengths S, queries = keys (default: 224 / 448 / 896 px + 32 text tokens)")
    parser.add_argument("--tokens", type=int, default=8192, help="batch B = max(1, tokens // S)")
    args = parser.parse_args(argv)
    if torch.cuda.is_available():
        bench_cuda(args.lengths, args.tokens)
    else:
        smoke_interpreter()


if __name__ == "__main__":
    main()
