"""One training step, patched vs stock megatron-core (device layer only) vs HF
transformers' LlamaForCausalLM of the same shape, measured side by side in one run; and
each fused op vs its stock counterpart.  Prints times, ratios and achieved GFLOP/s against
this machine's measured GEMM GFLOP/s in the same dtype.

    OMP_NUM_THREADS=2 python bench/bench_step.py [--shape cpu|tiny] [--steps 3] [--dtype fp32|bf16] [--profile]

The "cpu" shape is the project's CPU-sized LLaMA-2: 8 layers, hidden 1024, ffn 2816,
16 heads, vocab 32000, seq 512, batch 2.  "patched" is the step as the pretrain recipe
runs it (gradient accumulation fusion on); stock megatron-core cannot turn that on off
CUDA.  ``--profile`` adds one profiled step of each, its time split by kind of work
(``step_profile.py``), and the time the model's FLOPs need at the measured GEMM rate.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

import ascend_patches
from recipes.model import llama2, parallel
from recipes.train import throughput, training

SHAPES = {
    "cpu": (llama2.LlamaShape(8, 1024, 2816, 16, 16, vocab_size=32000, seq_length=512), 512, 2),
    "tiny": (llama2.shape("llama2-tiny"), 128, 4),
}


def stock_ops():
    return ascend_patches.disabled("ops")


def timed(fn, steps, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def batch(shape, seq, b, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, shape.vocab_size, (b, seq + 1), generator=g)
    return {"tokens": t[:, :-1].contiguous(), "labels": t[:, 1:].contiguous()}


def build_training(shape, seq, dtype, **overrides):
    """(model, optimizer) as the pretrain recipe builds them, seeded."""
    torch.manual_seed(0)
    bf16 = dtype == torch.bfloat16
    model = llama2.build_model(shape, seq_length=seq, bf16=bf16, params_dtype=dtype, **overrides)
    model = training.wrap_ddp(training.wrap_float16(model))
    opt = training.build_optimizer([model], lr=1e-4, bf16=bf16)
    training.attach_grad_sync([model], opt)
    return model, opt


def megatron_step_fn(shape, seq, b, dtype, **overrides):
    model, opt = build_training(shape, seq, dtype, **overrides)
    data = batch(shape, seq, b)

    def step():
        return training.train_step([model], opt, iter([data]), 1, seq, b)[0]

    return step


def hf_step_fn(shape, seq, b, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**shape.hf_config(), attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    data = batch(shape, seq, b)
    # bf16 as HF's Trainer runs it (--bf16): fp32 weights and optimizer, the forward autocast
    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            out = model(input_ids=data["tokens"], labels=data["tokens"])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return step


def bench_ops(shape, seq, b, steps, dtype=torch.float32):
    """Each fused op vs stock megatron's module or math, forward + backward, in ``dtype``
    (AdamW in fp32, as megatron keeps its main params)."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    from ascend_patches.ops import swiglu

    cfg = llama2.transformer_config(shape)
    n, d, h = shape.num_attention_heads, shape.kv_channels, shape.hidden_size
    ng = shape.num_query_groups
    rows = []

    def fb(fn, *inputs):
        def run():
            xs = [x.detach().requires_grad_(True) for x in inputs]
            fn(*xs).sum().backward()
        return run

    q = torch.randn(seq, b, n, d, dtype=dtype)
    k = torch.randn(seq, b, ng, d, dtype=dtype)
    v = torch.randn(seq, b, ng, d, dtype=dtype)
    with stock_ops():
        stock_attn = DotProductAttention(cfg, 1, AttnMaskType.causal, "self")
        t_stock = timed(fb(lambda q, k, v: stock_attn(q, k, v, None), q, k, v), steps)
        stock_norm = WrappedTorchNorm(cfg, h, 1e-5).to(dtype)
    fused_attn = DotProductAttention(cfg, 1, AttnMaskType.causal, "self")
    t_fused = timed(fb(lambda q, k, v: fused_attn(q, k, v, None), q, k, v), steps)
    rows.append(("flash attention", t_stock, t_fused))

    x = torch.randn(seq, b, h, dtype=dtype)
    fused_norm = WrappedTorchNorm(cfg, h, 1e-5).to(dtype)
    rows.append(("rms_norm", timed(fb(stock_norm, x), steps), timed(fb(fused_norm, x), steps)))

    y = torch.randn(seq, b, 2 * shape.ffn_hidden_size, dtype=dtype)
    rows.append(("swiglu", timed(fb(swiglu.swiglu_reference, y), steps), timed(fb(swiglu.swiglu_torch, y), steps)))

    from megatron.core.models.common.embeddings import rope_utils

    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    f = torch.outer(torch.arange(seq).float(), inv)
    freqs = torch.cat((f, f), -1)[:, None, None, :]
    stock_rope = ascend_patches.REGISTRY.original("rope")

    def stock_two(t):  # stock recomputes cos/sin for q and for k in every layer
        return stock_rope(t, freqs) + stock_rope(t, freqs)

    def fused_two(t):
        return rope_utils._apply_rotary_pos_emb_bshd(t, freqs) + rope_utils._apply_rotary_pos_emb_bshd(t, freqs)

    rows.append(("rope (q and k)", timed(fb(stock_two, q), steps), timed(fb(fused_two, q), steps)))

    params = [torch.nn.Parameter(torch.randn(h, h)) for _ in range(16)]
    for p in params:
        p.grad = torch.randn_like(p)
    plain = torch.optim.AdamW(params, lr=1e-4, foreach=False)
    fused = torch.optim.AdamW(params, lr=1e-4, fused=True)
    rows.append(("adamw step (16 x hidden^2)", timed(plain.step, steps), timed(fused.step, steps)))
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shape", choices=list(SHAPES) + ["all"], default="all")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: megatron's bf16 (bf16 weights, fp32 main params), HF's Trainer --bf16 (autocast)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--skip-ops", action="store_true")
    p.add_argument("--profile", action="store_true", help="then one profiled step of each: where the time goes")
    args = p.parse_args()
    parallel.init_distributed()
    for name in (SHAPES if args.shape == "all" else [args.shape]):
        run_shape(name, args)
    parallel.destroy()


def run_shape(name, args):
    shape, seq, b = SHAPES[name]
    dtype = llama2.DTYPES[args.dtype]
    gemm = throughput.measured_gemm_tflops(dtype, seconds=2.0) * 1e3
    flops = throughput.train_flops_per_token(shape, seq, shape.vocab_size) * seq * b
    print(f"backend {ascend_patches.settings().backend}, threads {torch.get_num_threads()}, "
          f"measured {args.dtype} GEMM {gemm:.1f} GFLOP/s; shape {name}: {shape}, seq {seq}, batch {b}, {args.dtype}; "
          f"model FLOPs per step {flops / 1e9:.1f} G")

    with stock_ops():  # stock megatron-core has no CPU wgrad fusion (Apex's kernel is CUDA-only)
        stock_step = megatron_step_fn(shape, seq, b, dtype)
    # patched as the pretrain recipe runs it: gradient accumulation fusion on
    patched_step = megatron_step_fn(shape, seq, b, dtype, gradient_accumulation_fusion=True)
    hf_step = None if args.skip_hf else hf_step_fn(shape, seq, b, dtype)
    steps = {"stock": stock_step, "patched": patched_step, "hf": hf_step}
    # Interleaved rounds (stock, patched, HF, stock, ...) so drift in this noisy machine's
    # speed hits all three alike; medians per configuration.
    times = {"stock": [], "patched": [], "hf": []}
    gemms = [gemm]
    for r in range(args.steps + 1):
        if r:
            gemms.append(throughput.measured_gemm_tflops(dtype, seconds=1.0) * 1e3)
        losses = {}
        for config, fn in steps.items():
            if fn is None:
                continue
            with run_as(config):
                t = time.perf_counter()
                losses[config] = fn()
                if r:  # round 0 warms up
                    times[config].append(time.perf_counter() - t)
        if r == 0:
            check_agree("first-step loss", "stock", losses["stock"], "patched", losses["patched"],
                        LOSS_RTOL[args.dtype])
    t_stock, t_patched = statistics.median(times["stock"]), statistics.median(times["patched"])
    t_hf = statistics.median(times["hf"]) if times["hf"] else None
    gemm = statistics.median(gemms)  # GEMM rate measured in every round too
    print(f"{args.dtype} GEMM over the rounds: median {gemm:.1f} GFLOP/s (min {min(gemms):.1f}, max {max(gemms):.1f})")

    def line(label, t):
        gf = flops / t / 1e9
        return f"  {label:<28} {t * 1e3:9.1f} ms  {gf:8.1f} GFLOP/s  {100 * gf / gemm:5.1f}% of GEMM"

    print("training step (median of %d interleaved rounds after 1 warm-up round):" % args.steps)
    print(line("megatron stock (device only)", t_stock))
    print(line("megatron + ascend_patches", t_patched))
    if t_hf:
        print(line(f"HF LlamaForCausalLM (sdpa{', autocast' if args.dtype != 'fp32' else ''})", t_hf))
    print(f"  ratio patched / stock = {t_patched / t_stock:.3f} (goal <= 0.60)")
    if t_hf:
        print(f"  ratio patched / HF    = {t_patched / t_hf:.3f} (goal <= 0.75)")
    if args.profile:
        profile_steps(steps, gemm, flops)
    if not args.skip_ops:
        print("fused ops, forward + backward (median ms): stock | fused | ratio")
        for op, ts, tf in bench_ops(shape, seq, b, max(args.steps, 5), dtype):
            print(f"  {op:<28} {ts * 1e3:9.2f} | {tf * 1e3:9.2f} | {tf / ts:.3f}")


# Stock and patched start from the same seed, weights and batch, so their first losses differ
# only by the fused ops' rounding: fp32 kernels that sum in another order agree to ~1e-6
# relative per op, and the mean loss over seq x batch tokens averages that further; bf16 keeps
# 8 bits of mantissa (2^-8 = 0.4 % per rounding), so its bound is looser.
LOSS_RTOL = {"fp32": 1e-5, "bf16": 1e-2}


def check_agree(what: str, a_name: str, a: float, b_name: str, b: float, rtol: float) -> None:
    """Timing two sides that compute different things would mean nothing: stop before timing."""
    rel = abs(b - a) / abs(a)
    if rel > rtol:
        raise SystemExit(f"{what} differs: {a_name} {a:.7f}, {b_name} {b:.7f} (relative {rel:.2e} > {rtol:.0e}); "
                         "not timing")
    print(f"{what}: {a_name} {a:.7f}, {b_name} {b:.7f}, relative difference {rel:.2e} (<= {rtol:.0e})")


def run_as(config):
    return stock_ops() if config == "stock" else contextlib.nullcontext()


def profile_steps(steps, gemm_gflops, flops):
    """One profiled step of each configuration, side by side, and the floor its GEMMs set."""
    import step_profile  # beside this script

    rows, walls = {}, {}
    for config, fn in steps.items():
        if fn is not None:
            with run_as(config):
                rows[config], walls[config] = step_profile.breakdown(fn)
    print("where one step's time goes (own CPU time per kind of work, one profiled step each):")
    print(step_profile.table(rows, walls))
    for config, r in rows.items():
        other = sum(r.values()) - r["GEMM"]
        print(f"  {config}: GEMM {r['GEMM']:.2f} s ({flops / 1e9:.0f} G model FLOPs need {flops / gemm_gflops / 1e9:.2f} s "
              f"at the measured GEMM rate); everything else {other:.2f} s")


if __name__ == "__main__":
    main()
