"""The parts of `bench.py gpu` (benchmarks/gpu.py runs them): each takes dry_run and returns its rows,
{"what", "value", "unit", "note"}. Dry run: CPU, Triton's interpreter, tiny sizes (PaliGemma 2's layout
at the bundled tiny-shapes model's widths), so every code path runs in seconds and nothing is a figure.

GPU anchors in the notes (transformers on one H100 80GB, bf16, 224 px, 64 new tokens) are those of
docs/gpu.md#what-to-compare-with, where they are described.
"""
from __future__ import annotations

import os
import statistics
import time

import torch

# Letters: B batch, N query heads, K key/value heads, T queries, S keys, H head dim.

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "nanopali", "assets", "tiny-shapes")


def _name(dry_run: bool) -> str:
    return "tiny PaliGemma 2" if dry_run else "PaliGemma 2 3B"


def _device(dry_run: bool) -> torch.device:
    return torch.device("cpu" if dry_run else "cuda:0")


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _seconds(fn, repeats: int = 3) -> float:
    """Median wall time of fn() over `repeats` runs, the device synchronized around each."""
    times = []
    for _ in range(repeats):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _ms(fn, dry_run: bool) -> float:
    if dry_run:
        return 1000 * _seconds(fn, 1)
    import triton.testing
    return triton.testing.do_bench(fn, warmup=10, rep=50)


def _config(dry_run: bool):
    """PaliGemma 2 3B at 224 px, or (dry run) the bundled tiny model's config at 1 + 2 layers: the same
    layout (a sliding-window layer and a global one) at tiny widths."""
    import json
    from dataclasses import replace

    import nanopali
    from nanopali.config import alternating_layers
    from nanopali.formats.hf_config import from_hf_config

    if dry_run:
        with open(os.path.join(TINY, "config.json")) as f:
            cfg = from_hf_config(json.load(f))
        return replace(cfg, vision=replace(cfg.vision, depth=1),
                       text=replace(cfg.text, depth=2, layer_types=alternating_layers(2)))
    return nanopali.preset("pg2-3b-224")


@torch.no_grad()
def random_model(cfg, device, dtype=torch.bfloat16):
    """The model with N(0, 0.02) matrices drawn on the device (seconds for 3B, no checkpoint written);
    LayerNorm scales 1, the rest 0, as train.finetune.init_random, which draws on the CPU."""
    from nanopali.model import PaliGemma

    with torch.device(device):
        model = PaliGemma(cfg).to(dtype).eval()
    g = torch.Generator(device=device).manual_seed(0)
    for name, p in model.named_parameters():
        if p.ndim >= 2:
            p.normal_(0, 0.02, generator=g)
        else:
            p.fill_(1.0 if name.startswith("vision_tower") and name.endswith("weight") else 0.0)
    return model


def prompt_batch(cfg, B: int, suffix: int = 0, device="cpu") -> dict:
    """B rows of [image tokens | BOS | 4 prompt tokens | "\\n" | suffix tokens], the suffix marked for the loss."""
    g = torch.Generator().manual_seed(0)
    n_img, V = cfg.num_image_tokens, cfg.text.vocab_size
    text = torch.randint(3, min(V, cfg.image_token_id), (B, 4 + suffix), generator=g)
    ids = torch.cat([torch.full((B, n_img), cfg.image_token_id), torch.full((B, 1), cfg.bos_token_id),
                     text[:, :4], torch.full((B, 1), 108 % V), text[:, 4:]], 1)
    types = torch.zeros_like(ids)
    types[:, ids.shape[1] - suffix:] = 1
    size = cfg.vision.image_size
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "token_type_ids": types.to(device), "pixel_values": torch.randn(B, 3, size, size, generator=g).to(device)}


def _bandwidth(dry_run: bool) -> float:
    """Device copy bandwidth, bytes/s (read + write) of a 1 GiB copy (dry run: 8 MiB on CPU)."""
    n = (8 if dry_run else 1024) << 20
    x = torch.empty(n, dtype=torch.uint8, device=_device(dry_run))
    y = torch.empty_like(x)
    return 2 * n / (_ms(lambda: y.copy_(x), dry_run) / 1000)


def device(dry_run: bool) -> list[dict]:
    import triton

    from benchmarks.machine import decode_bytes

    dev, rows = _device(dry_run), []
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        rows += [dict(what="device", value=p.name), dict(what="compute capability", value=f"sm_{p.major}{p.minor}"),
                 dict(what="multiprocessors", value=p.multi_processor_count),
                 dict(what="memory", value=p.total_memory / 2**30, unit="GiB")]
    rows.append(dict(what="versions", value=f"torch {torch.__version__}, triton {triton.__version__}"))
    bw = _bandwidth(dry_run)
    floor = bw / decode_bytes(_config(dry_run).text, "bf16")
    rows += [dict(what="copy bandwidth", value=bw / 1e12, unit="TB/s", note="H100 80GB: 2.96"),
             dict(what=f"{_name(dry_run)} bf16 decode floor, batch 1", value=floor, unit="tok/s",
                  note="weights read per token / copy bandwidth; H100: ~570")]
    return rows


def selfcheck(dry_run: bool) -> list[dict]:
    """The check "auto" runs before first use, timed: its cost is mostly compiling the kernels."""
    from nanopali.kernels import selfcheck as check

    dev, rows = _device(dry_run), []
    for H, G in ((16, 2),) if dry_run else ((72, 1), (128, 2), (256, 2), (256, 8)):
        check.VERDICTS.clear()
        t0 = time.perf_counter()
        ok = check.passes(dev, torch.bfloat16, H, G)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        check.passes(dev, torch.bfloat16, H, G)
        rows.append(dict(what=f"bf16 H={H} G={G}", value=first, unit="s at first use",
                         note=("passed" if ok else check.VERDICTS[(dev.type, dev.index, torch.bfloat16, H)])
                         + f"; then {1e6 * (time.perf_counter() - t0):.0f} µs (cached)"))
    return rows


def kernel(dry_run: bool) -> list[dict]:
    """Kernel vs the fp32 reference: output and gradients, per mask kind, head dim and dtype."""
    from nanopali.kernels.selfcheck import TOLERANCE, relative_errors

    dev, S, rows = _device(dry_run), 20 if dry_run else 300, []
    g = torch.Generator().manual_seed(1)
    pads, none = torch.tensor([0, 5]), torch.tensor([0, 0])
    masks = {  # name → (start, prefix_end, T, slot, window)
        "full (SigLIP)": (none, torch.tensor([S, S]), S, 0, None),
        "causal, left pads": (pads, pads, S, 0, None),
        "prefix-LM, left pads": (pads, torch.tensor([2 * S // 3, S // 3]), S, 0, None),
        "prefix-LM + window": (pads, torch.tensor([2 * S // 3, S // 3]), S, 0, S // 4),
        "chunked prefill (3 queries)": (pads, torch.tensor([2 * S // 3, S // 3]), 3, S // 2, S // 4),
        "decode (1 query, split-K)": (pads, torch.tensor([2 * S // 3, S // 3]), 1, S - 1, None)}
    configs = [(16, 2, 50.0, torch.bfloat16)] if dry_run else [
        (72, 1, None, torch.bfloat16), (128, 2, 50.0, torch.bfloat16), (256, 2, 50.0, torch.bfloat16),
        (256, 8, None, torch.bfloat16), (256, 2, 50.0, torch.float16)]
    for H, G, cap, dtype in configs:
        for name, (start, pe, T, q0, window) in masks.items():
            # each soft-cap setting is its own compiled kernel: both in bf16, the model's own elsewhere
            for softcap in dict.fromkeys((None, cap)) if dtype == torch.bfloat16 and not dry_run else (cap,):
                what = f"{str(dtype)[6:]} H={H} G={G} {name}{', soft-cap' if softcap else ''}"
                try:
                    err = relative_errors(dev, dtype, 2, 2 * G, 2, T, S, H, start, pe, q0, softcap, window,
                                          4.0 if softcap else 1.0, g)
                except Exception as e:   # e.g. a tile over this GPU's shared memory: the other configs still run
                    rows.append(dict(what=what, value=None, note=f"FAIL: {type(e).__name__}: {str(e)[:150]}"))
                    continue
                worst = max(err, key=lambda w: err[w] if err[w] == err[w] else float("inf"))
                rows.append(dict(what=what, value=err[worst], unit="max |diff| / max |ref|",
                                 note=f"worst: {worst}; {'ok' if err[worst] <= TOLERANCE[dtype] else 'FAIL'}"))
    return rows


def attention(dry_run: bool) -> list[dict]:
    """TF/s of allowed pairs at S = 4128 (896 px), H 256, GQA 8/4, prefix-LM mask (benchmarks/attention.py)."""
    import benchmarks.attention as ba
    from nanopali.masking import PrefixLMMask

    dev = _device(dry_run)
    B, S, H, dtype = (1, 24, 16, torch.float32) if dry_run else (2, 4128, ba.H, torch.bfloat16)
    mask = PrefixLMMask(torch.zeros(B, dtype=torch.long, device=dev), torch.full((B,), S - ba.SUFFIX, device=dev), S)
    flops = 4 * H * ba.N * mask.allowed(0, S, S).sum().item()
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(B, ba.N, S, H, device=dev, dtype=dtype, generator=g).requires_grad_()
    k, v = (torch.randn(B, ba.K, S, H, device=dev, dtype=dtype, generator=g).requires_grad_() for _ in range(2))
    do = torch.randn_like(q)
    anchors = {"sdpa bool mask": "H100 SDPA: 207 / 183", "flex attention": "H100 Flex (soft-cap): 147 / 87",
               "reference": "H100 eager: 49 / 73", "nanopali triton": "goal: ≥ 350 forward with soft-cap"}
    rows = []
    for softcap in (None, ba.SOFTCAP):
        impls = ba.implementations(mask, S, device=dev.type, compile=not dry_run)
        with torch.no_grad():
            want = impls["reference"](q, k, v, softcap).float()
        for name, f in impls.items():
            what = f"{name}, {'soft-cap' if softcap else 'no soft-cap'}"

            def forward():   # on inputs that need no gradient: what inference runs (and Flex on CPU accepts)
                x = [t.detach() for t in (q, k, v)]
                with torch.no_grad():
                    diff = (f(*x, softcap).float() - want).abs().max().item()
                    ms = _ms(lambda: f(*x, softcap), dry_run)
                return dict(value=flops / ms / 1e9, note=f"{ms:.3f} ms; max |diff| vs reference {diff:.2e}; "
                            + anchors[name])

            def both():
                ms = _ms(lambda: torch.autograd.grad(f(q, k, v, softcap), (q, k, v), do), dry_run)
                return dict(value=3.5 * flops / ms / 1e9, note=f"{ms:.3f} ms")

            if name == "sdpa bool mask" and softcap:
                continue                                    # SDPA has no soft-cap
            for direction, measure in (("forward", forward), ("forward + backward", both)):
                try:   # one implementation failing (e.g. Flex's backward on CPU) keeps the others
                    rows.append(dict(what=f"{what}, {direction}", unit="TF/s", **measure()))
                except Exception as e:
                    rows.append(dict(what=f"{what}, {direction}", value=None,
                                     note=f"failed: {type(e).__name__}: {str(e)[:150]}"))
    return rows


def _decode_rows(model, cfg, dry_run, compile, batches, label, peer=True):
    """Time to first token and decode tok/s per batch size: median of 3 runs of 1 and of n new tokens
    (dry run: one of each)."""
    from nanopali.generate import generate_ids

    (n, repeats), rows = (4, 1) if dry_run else (64, 3), []
    for B in batches:
        batch = prompt_batch(cfg, B, device=model.device)
        t0 = time.perf_counter()
        generate_ids(model, batch, max_new_tokens=n, stop_at_eos=False, compile=compile)   # warm-up (compiles)
        warm = time.perf_counter() - t0
        with torch.inference_mode():
            t1 = _seconds(lambda: generate_ids(model, batch, 1, stop_at_eos=False, compile=compile), repeats)
            tn = _seconds(lambda: generate_ids(model, batch, n, stop_at_eos=False, compile=compile), repeats)
        rows.append(dict(what=f"{label}, batch {B}: time to first token", value=1000 * t1, unit="ms",
                         note=f"warm-up incl. compile {warm:.1f} s"
                         + ("; H100 transformers SDPA: 43.5 ms (b1)" if peer else "")))
        rows.append(dict(what=f"{label}, batch {B}: decode", value=B * (n - 1) / (tn - t1) if tn > t1 else None,
                         unit="tok/s", note="H100 transformers SDPA: 28.9 (b1), 452 (b16); goal ≥ 400 (b1)" if peer
                         else "against part decode's bf16 row: weights read per token are ~1/2 (int8), ~1/4 (int4)"))
    return rows


def _decode(dry_run: bool, compile: bool) -> list[dict]:
    cfg = _config(dry_run)
    model = random_model(cfg, _device(dry_run))
    rows = [dict(what="attention implementation", value=model.attn_impl)]
    rows += _decode_rows(model, cfg, dry_run, compile, (1, 2) if dry_run else (1, 16),
                         f"{_name(dry_run)} bf16, " + ("compiled + CUDA graphs" if compile else "eager"))
    if torch.cuda.is_available():
        rows.append(dict(what="peak memory", value=torch.cuda.max_memory_allocated() / 2**30, unit="GiB"))
    return rows


def decode(dry_run: bool) -> list[dict]:
    """Eager decoding; the compiled one is the next part, so a failing compile keeps these figures."""
    return _decode(dry_run, compile=False)


def decode_compiled(dry_run: bool) -> list[dict]:
    """torch.compile(mode="reduce-overhead"): CUDA graphs. Not in the dry run: on CPU it would be the eager
    part again plus minutes of compiling, which CI cannot afford."""
    if dry_run:
        return [dict(what="not run in the dry run", note="GPU only")]
    return _decode(dry_run, compile=True)


def quant(dry_run: bool) -> list[dict]:
    from nanopali.quant import quantize_model

    cfg, rows = _config(dry_run), []
    for mode in ("int8", "int4"):
        try:
            model = quantize_model(random_model(cfg, _device(dry_run)), mode)
            label = f"{_name(dry_run)} {mode} weight-only, eager"
            rows += _decode_rows(model, cfg, dry_run, False, (1,), label, peer=False)
        except Exception as e:   # a mode this GPU / torch build has no kernel for: say so, try the next
            rows.append(dict(what=mode, value=None, note=f"failed: {type(e).__name__}: {str(e)[:150]}"))
        model = None
    return rows


def train(dry_run: bool) -> list[dict]:
    """One full fine-tuning step, bf16 weights and AdamW state, batch 8 x 288 tokens (224 px + 32 text)."""
    from nanopali.train.cost import estimate_memory, peak_flops, train_flops
    from nanopali.train.finetune import Objective, make_optimizer, set_trainable, train_step

    cfg, dev = _config(dry_run), _device(dry_run)
    B, suffix = (2, 4) if dry_run else (8, 26)                           # 256 + 6 + 26 = 288 tokens
    model = random_model(cfg, dev).train()
    set_trainable(model, "all")
    objective, optimizer = Objective(model), make_optimizer(model, lr=1e-5)
    batch = prompt_batch(cfg, B, suffix, dev)
    T = batch["input_ids"].shape[1]
    count = float(batch["token_type_ids"].sum())
    train_step(objective, optimizer, [batch], count, precision="bf16")   # warm-up: allocator, AdamW state
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step = _seconds(lambda: train_step(objective, optimizer, [batch], count, precision="bf16"), 1 if dry_run else 3)
    flops = B * train_flops(cfg, T, 1, suffix)
    peak = peak_flops(dev, "bf16")
    est = estimate_memory(cfg, "all", batch=B, seq_len=T, precision="bf16", trainable_dtype="bf16",
                          frozen_dtype="bf16", fused_attention=model.attn_impl == "triton").total
    rows = [dict(what=f"attention {model.attn_impl}, batch {B} x {T} tokens", value=B * T / step, unit="tokens/s",
                 note="H100 transformers SDPA: 10.0k tokens/s"),
            dict(what="MFU", value=100 * flops / step / peak if peak else None, unit="%",
                 note="H100 transformers SDPA: 18.5 %; goal ≥ 40 %"),
            dict(what="memory estimate (train.cost.estimate_memory)", value=est / 2**30, unit="GiB")]
    if dev.type == "cuda":
        rows.append(dict(what="peak memory", value=torch.cuda.max_memory_allocated() / 2**30, unit="GiB",
                         note="H100 transformers SDPA: 36.6 GiB; goal within 36 GiB"))
    return rows
