"""nanopali vs transformers, side by side in one process on the same random weights.

    python bench.py                      # CPU defaults: real widths, reduced depth (printed)
    python bench.py --text-layers 26 --vision-layers 27 --dtype bfloat16 --device cuda   # full size
    python bench.py attention            # the fused kernel vs SDPA / FlexAttention (bench_attention.py)

Builds transformers' PaliGemma (1 or 2) at the released widths with random weights, saves it in the
hub layout, loads the same files into nanopali, and times on the same prompt (224 px = 256 image
tokens + BOS + 4 prompt tokens + "\\n"): time to first token (prefill incl. SigLIP + first token),
decode tokens/s at batch 1 and 4 (every run decodes the same count), peak CUDA memory on a GPU.
transformers runs with its default attention for the model (PaliGemma 1: sdpa, PaliGemma 2: eager)
and its default dynamic cache.
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import tempfile
import time

import torch


def build_reference(gen: int, text_layers: int, vision_layers: int, out_dir: str, dtype):
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

    text = dict(model_type="gemma", hidden_size=2048, intermediate_size=16384, num_attention_heads=8,
                num_key_value_heads=1, head_dim=256, vocab_size=257216)
    if gen == 2:
        text = dict(model_type="gemma2", hidden_size=2304, intermediate_size=9216, num_attention_heads=8,
                    num_key_value_heads=4, head_dim=256, vocab_size=257216, query_pre_attn_scalar=256)
    text["num_hidden_layers"] = text_layers
    vision = dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304, num_attention_heads=16,
                  num_hidden_layers=vision_layers, patch_size=14, image_size=224, vision_use_head=False)
    cfg = PaliGemmaConfig(text_config=text, vision_config=vision, image_token_index=257152,
                          projection_dim=text["hidden_size"], hidden_size=text["hidden_size"], vocab_size=257216)
    torch.manual_seed(0)
    model = PaliGemmaForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # RMSNorm weights are 0 at init; give every tensor some signal
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(out_dir)
    return model.to(dtype)


def timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


class PeakMemory:
    """Peak CUDA memory a block allocates on top of what was allocated before it.

    Not measured on CPU: with both implementations in one process, the resident set cannot be
    attributed to either (freed heap is reused, not returned)."""

    def __init__(self, device):
        self.device, self.peak_mib = device, None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak_mib = (torch.cuda.max_memory_allocated() - self._base) / 2**20


def make_batch(batch: int, device):
    g = torch.Generator().manual_seed(0)
    text = torch.randint(300, 250000, (batch, 4), generator=g)
    ids = torch.cat([torch.full((batch, 256), 257152), torch.full((batch, 1), 2), text, torch.full((batch, 1), 108)], 1)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "token_type_ids": torch.zeros_like(ids).to(device),
            "pixel_values": torch.randn(batch, 3, 224, 224, generator=g).to(device)}


def run_tf(model, batch, n):
    # min_new_tokens: transformers falls back to the config's EOS when given None, and a random model
    # may emit it at once; every run must decode exactly n tokens.
    out = model.generate(**batch, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    assert out.shape[1] == batch["input_ids"].shape[1] + n


def run_ours(model, batch, n):
    from nanopali.generate import generate_ids
    assert all(len(r) == n for r in generate_ids(model, batch, max_new_tokens=n, stop_at_eos=False))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--generation", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--text-layers", type=int, default=2)
    ap.add_argument("--vision-layers", type=int, default=4)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args()
    import nanopali

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype, device = getattr(torch, args.dtype), torch.device(args.device)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, device {device}, {args.dtype}; real widths, {args.text_layers} text / {args.vision_layers} vision layers")
    rows = []
    for gen in args.generation:
        with tempfile.TemporaryDirectory() as d:
            tf = build_reference(gen, args.text_layers, args.vision_layers, d, dtype).to(device)
            ours = nanopali.formats.hf.load_paligemma_model(d, dtype=dtype, device=device)
        impls = (("transformers", tf, run_tf), ("nanopali", ours, run_ours))
        res = {name: {} for name, _, _ in impls}
        mem = {name: None for name, _, _ in impls}
        with torch.inference_mode():
            for b in args.batches:
                batch = make_batch(b, device)
                best = {name: [float("inf"), float("inf")] for name, _, _ in impls}
                for name, model, fn in impls:
                    with PeakMemory(device) as pm:
                        fn(model, batch, 2)                                          # warm-up
                    if pm.peak_mib is not None:
                        mem[name] = max(mem[name] or 0.0, pm.peak_mib)
                # interleaved repeats, best of each: both see the same machine load
                for _ in range(args.repeats):
                    for name, model, fn in impls:
                        best[name][0] = min(best[name][0], timed(lambda: fn(model, batch, 1)))
                        best[name][1] = min(best[name][1], timed(lambda: fn(model, batch, args.new_tokens)))
                for name in best:
                    t1, tn = best[name]
                    res[name][b] = (t1, b * (args.new_tokens - 1) / (tn - t1))
        rows += [(f"PaliGemma {gen}", name, res[name], mem[name]) for name, _, _ in impls]
        del tf, ours, impls
        gc.collect()
    b0 = args.batches[0]
    print(f"\n| model | implementation | time to first token (batch {b0}) | "
          + " | ".join(f"decode tok/s batch {b}" for b in args.batches) + " | peak memory added |")
    print("|---|---|---|" + "---|" * len(args.batches) + "---|")
    # peak memory = what one generate call adds on top of the loaded weights (activations, cache, logits)
    for i, (model, name, res, mem) in enumerate(rows):
        line = f"| {model} | {name} | {res[b0][0] * 1000:.0f} ms | " + " | ".join(f"{res[b][1]:.1f}" for b in args.batches)
        print(line + (f" | {mem:.0f} MiB |" if mem is not None else " | n/a on CPU |"))
        if name == "nanopali":
            ref = rows[i - 1][2]
            ratios = [f"{ref[b][1] and res[b][1] / ref[b][1]:.2f}x" for b in args.batches]
            print(f"| {model} | ratio nanopali/transformers | {ref[b0][0] / res[b0][0]:.2f}x faster | "
                  + " | ".join(ratios) + " | |")


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["attention"]:
        import bench_attention

        sys.argv.pop(1)
        bench_attention.main()
    else:
        main()
