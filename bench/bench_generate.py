"""Generation throughput (greedy, KV cache, batch 1 and 8) of recipes.infer.decoding on the
converted Megatron model vs HF transformers' ``generate`` on the same weights, interleaved
in one run; and the converter's time and peak RSS on a synthetic multi-shard HF checkpoint.

    OMP_NUM_THREADS=2 python bench/bench_generate.py [--model stories|cpu] [--new-tokens 64] [--rounds 3] [--no-compile]
    python bench/bench_generate.py --converter [--layers 2]   (7B-wide, few layers; run alone for RSS)

``stories`` is the real stories260K model (overhead-bound: per-token framework cost);
``cpu`` a random LLaMA of 8 layers, hidden 1024, 16 heads, vocab 32000 (compute-bound).
Ours runs twice: the eager fused decode step (the default) and the same step through
torch.compile (``ASCEND_PATCHES_COMPILE_DECODE=1``); compile time is reported, not timed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "stories260K"


def hf_model_dir(kind: str, tmp: Path) -> Path:
    if kind == "stories":
        return FIXTURE
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                      num_key_value_heads=16, vocab_size=32000, max_position_embeddings=1024,
                      tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(tmp / "hf")
    return tmp / "hf"


def bench_generation(args):
    import ascend_patches
    from transformers import LlamaForCausalLM

    from converters import hf_to_megatron
    from recipes.infer import decoding, inference

    tmp = Path(tempfile.mkdtemp())
    hf_dir = hf_model_dir(args.model, tmp)
    hf_to_megatron.main(["--input-model-dir", str(hf_dir), "--output-model-dir", str(tmp / "mg")])
    lm = inference.load(tmp / "mg", 1, 1)
    hf = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    n = args.new_tokens
    g = torch.Generator().manual_seed(0)
    print(f"model {args.model}; up to {n} new tokens (both stop at EOS) from a 16-token prompt; "
          f"threads {torch.get_num_threads()}; tokens asserted equal to HF's")
    for bsz in (1, 8):
        prompts = torch.randint(3, lm.vocab_size, (bsz, 16), generator=g)
        prompts[:, 0] = 1

        eos = hf.generation_config.eos_token_id  # both sides stop at it, and neither forbids it early

        def ours():
            def run():
                out = decoding.generate(lm, prompts.tolist(), n, decoding.SamplingParams(), eos_id=eos,
                                        log_probs=False)  # HF computes no scores by default either
                return [o.tokens for o in out]
            return run

        def theirs():
            with torch.no_grad():
                out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=n,
                                  do_sample=False, num_beams=1)
            rows = out[:, 16:].tolist()
            return [r[:r.index(eos) + 1] if eos in r else r for r in rows]  # a finished row is padded after EOS

        # name: (compile_decode setting, run); configure() re-applies patches, so it stays untimed
        configs = {"ours (eager)": (False, ours()), "HF generate": (False, theirs)}
        if not args.no_compile:
            configs["ours (compiled)"] = (True, ours())
        t = time.perf_counter()
        tokens = {}
        for name, (compiled, fn) in configs.items():  # warm-up; the compiled step compiles here, once per batch size
            ascend_patches.configure(compile_decode=compiled)
            tokens[name] = fn()
        print(f"batch {bsz}: warm-up (compiling the decode step) {time.perf_counter() - t:.1f} s")
        for name, toks in tokens.items():  # greedy on the same fp32 weights: the same tokens, or the timing means nothing
            bad = next((i for i, (a, b) in enumerate(zip(toks, tokens["HF generate"])) if a != b), None)
            assert bad is None, f"batch {bsz}, row {bad}: {name} generated {toks[bad]}, HF {tokens['HF generate'][bad]}"
        generated = sum(len(r) for r in tokens["HF generate"])
        times = {k: [] for k in configs}
        for _ in range(args.rounds):  # interleaved: this machine's speed drifts
            for name, (compiled, fn) in configs.items():
                ascend_patches.configure(compile_decode=compiled)
                t = time.perf_counter()
                out = fn()
                times[name].append(time.perf_counter() - t)
                assert out == tokens[name], f"{name}: a timed round generated other tokens than its warm-up"
        ascend_patches.configure(compile_decode=False)
        med = {k: statistics.median(v) for k, v in times.items()}
        tok = generated
        row = "   ".join(f"{k} {tok / v:8.1f} tokens/s" for k, v in med.items())
        ratios = "   ".join(f"{k}/HF = {med['HF generate'] / v:.2f}x" for k, v in med.items() if k != "HF generate")
        print(f"batch {bsz}: {row}\n         {ratios}")


def bench_converter(args):
    """A 7B-wide HF checkpoint (hidden 4096, ffn 11008, 32 heads, vocab 32000) with few layers,
    written shard by shard at ~1 GB per shard, then converted; peak RSS vs the largest shard."""
    from safetensors.torch import save_file

    from converters.layout import hf_config
    from recipes.model.llama2 import LlamaShape

    tmp = Path(tempfile.mkdtemp(dir=args.tmp))
    hf_dir = tmp / "hf7b"
    hf_dir.mkdir()
    shape = LlamaShape(args.layers, 4096, 11008, 32, 32, 32000)
    g = torch.Generator().manual_seed(0)

    def rnd(*s):
        return (torch.randn(*s, generator=g) * 0.02).to(torch.bfloat16)

    weight_map, shards = {}, []
    shards.append({"model.embed_tokens.weight": rnd(32000, 4096)})
    for i in range(args.layers):
        p = f"model.layers.{i}."
        shards.append({p + "input_layernorm.weight": rnd(4096), p + "post_attention_layernorm.weight": rnd(4096),
                       p + "self_attn.q_proj.weight": rnd(4096, 4096), p + "self_attn.k_proj.weight": rnd(4096, 4096),
                       p + "self_attn.v_proj.weight": rnd(4096, 4096), p + "self_attn.o_proj.weight": rnd(4096, 4096),
                       p + "mlp.gate_proj.weight": rnd(11008, 4096), p + "mlp.up_proj.weight": rnd(11008, 4096),
                       p + "mlp.down_proj.weight": rnd(4096, 11008)})
    shards.append({"model.norm.weight": rnd(4096), "lm_head.weight": rnd(32000, 4096)})
    largest = 0
    for k, sd in enumerate(shards):
        name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(sd, str(hf_dir / name))
        largest = max(largest, (hf_dir / name).stat().st_size)
        weight_map.update({n: name for n in sd})
    total = sum(f.stat().st_size for f in hf_dir.glob("*.safetensors"))
    import json

    (hf_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (hf_dir / "config.json").write_text(json.dumps(hf_config(shape, torch.bfloat16)))
    del shards, sd
    import subprocess

    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "converters.hf_to_megatron", "--input-model-dir", str(hf_dir),
                           "--output-model-dir", str(tmp / "mg"), "--tensor-model-parallel-size", "8"], check=True,
                          cwd=Path(__file__).resolve().parents[1], env=dict(os.environ, TQDM_DISABLE="1"),
                          capture_output=True, text=True)
    dt = time.perf_counter() - t
    peak = float(proc.stdout.split("peak RSS ")[1].split()[0])  # the converter's own VmHWM
    print(f"converter: {args.layers} layers of 7B width, {total / 2**30:.2f} GiB bf16 in {len(weight_map)} tensors, "
          f"{len(weight_map) and len(list(hf_dir.glob('*.safetensors')))} shards, largest {largest / 2**30:.2f} GiB; "
          f"converted (TP=8) in {dt:.1f} s ({total / 2**30 / dt:.2f} GiB/s); converter peak RSS {peak:.2f} GiB "
          f"= {peak * 2**30 / largest:.2f}x the largest shard, {peak * 2**30 / total:.2f}x the model")
    import shutil

    shutil.rmtree(tmp)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("stories", "cpu"), default="stories")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd decode step")
    p.add_argument("--converter", action="store_true")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--tmp", default=None)
    args = p.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    if args.converter:
        return bench_converter(args)
    bench_generation(args)


if __name__ == "__main__":
    main()
