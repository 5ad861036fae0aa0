"""Instruction fine-tuning of the Alpaca sample (LLaMA-2 tokenizer, Alpaca template) three ways,
interleaved step by step in one process on one model: every sample padded to --seq-length
(one per row), --variable-seq-lengths (a micro-batch of samples padded to its longest), and
packed (--reset-position-ids: samples packed whole into rows of --seq-length, THD attention).

    OMP_NUM_THREADS=2 python bench/bench_packing.py [--shape cpu|tiny] [--seq-lengths 2048 4096]
        [--rounds 3] [--variable-batch 8] [--dtype fp32|bf16] [--no-memory]

Reports, per sequence length: the fraction of real tokens per row, loss-bearing tokens per
second, step time, and each way's peak memory (one step in a process of its own, the growth
of the resident high-water mark over the model's); then packed / padded (goal >= 10x at 2048)
and packed / variable (goal >= 1.5x).  Before timing it checks that a packed row's loss equals
its samples' losses run alone, padded.  The "cpu" shape is bench_step.py's CPU-sized LLaMA-2.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np
import torch

import bench_step  # beside this script: the CPU-sized shape and the recipe's model and optimizer
from recipes.model import llama2, parallel
from recipes.data import datasets
from recipes.train import throughput, training

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures"
WAYS = ("padded", "variable", "packed")
LOSS_RTOL = {"fp32": 1e-4, "bf16": 2e-2}  # a sum over ~thousands of tokens: fp32 rounding, or bf16's 8 bits


def preprocess(tmp: Path, seq: int) -> str:
    from recipes.data import preprocess_data

    prefix = tmp / f"alpaca{seq}"
    preprocess_data.main(["--input", str(FIXTURES / "alpaca" / "alpaca_data_sample.json"), "--tokenizer-name-or-path",
                          str(FIXTURES / "tokenizer" / "tokenizer.model"), "--output-prefix", str(prefix),
                          "--handler-name", "GeneralInstructionHandler", "--seq-length", str(seq), "--workers", "1",
                          "--log-interval", "100000"])
    return str(prefix)


def streams(prefix: str, seq: int, variable_batch: int):
    """Each way's endless micro-batches, its (seq_length, micro_batch_size, packed) for the
    schedule, and its real-token fraction."""
    samples = datasets.InstructionDataset(prefix, seq, 2)
    packed = datasets.PackedInstructionDataset(samples)
    positions = samples.positions()
    variable = datasets.microbatches(samples, 0, variable_batch, variable_batch, 0, 1, seed=1, reshuffle_epochs=True,
                                     shape=datasets.trim_to_longest)
    # the first epoch's micro-batches in the stream's order: each padded to its longest sample
    order = positions[np.random.RandomState(1).permutation(len(samples))]
    groups = [order[i:i + variable_batch] for i in range(0, len(order) - variable_batch + 1, variable_batch)]
    variable_real = sum(g.sum() for g in groups) / sum(len(g) * g.max() for g in groups)
    return samples, packed, {
        "padded": (datasets.microbatches(samples, 0, 1, 1, 0, 1, seed=1, reshuffle_epochs=True), (seq, 1, False),
                   positions.sum() / (len(samples) * seq)),
        "variable": (variable, None, variable_real),
        "packed": (datasets.microbatches(packed, 0, 1, 1, 0, 1, seed=1, reshuffle_epochs=True, shape=datasets.to_thd),
                   (seq, 1, True), packed.real_fraction()),
    }


def check_packed_loss(model, samples, packed, dtype: str) -> None:
    """The first packed row's summed token loss against its samples' alone, padded, stock
    attention; stop before timing if they differ."""
    import ascend_patches
    from megatron.core.packed_seq_params import PackedSeqParams

    batch = datasets.to_thd({k: v[None] for k, v in packed[0].items()})
    cu = batch["cu_seqlens"]
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=batch["max_seqlen"],
                             max_seqlen_kv=batch["max_seqlen"])
    with torch.no_grad():
        got = (model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"], packed_seq_params=params)
               .float() * batch["loss_mask"]).sum().item()
        want = 0.0
        with ascend_patches.disabled("ops"):
            for j in packed.rows[0]:
                item = samples[j]
                pos = torch.arange(item["tokens"].shape[0])[None]
                want += (model(item["tokens"][None], pos, None, labels=item["labels"][None]).float()
                         * item["loss_mask"]).sum().item()
    bench_step.check_agree(f"packed row 0 ({len(packed.rows[0])} samples), loss sum", "its samples alone", want,
                           "packed", got, LOSS_RTOL[dtype])


def peak_memory(way: str, seq: int, args) -> float:
    """GiB the resident high-water mark grows by over one step of ``way``, in a process of its own."""
    cmd = [sys.executable, __file__, "--memory-of", way, "--seq-lengths", str(seq), "--shape", args.shape,
           "--dtype", args.dtype, "--variable-batch", str(args.variable_batch), "--tmp", args.tmp]
    from tests.helpers.launch import free_port

    out = subprocess.run(cmd, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT), MASTER_PORT=str(free_port())))
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])["step_gib"]


def one_step(model, opt, stream, schedule, batch):
    seq, mbs, packed = schedule or (batch["tokens"].shape[1], batch["tokens"].shape[0], False)
    training.train_step([model], opt, iter([batch]), 1, seq, mbs, packed=packed)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=list(bench_step.SHAPES), default="cpu")
    p.add_argument("--seq-lengths", nargs="+", type=int, default=[2048, 4096])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--variable-batch", type=int, default=8, help="--variable-seq-lengths' micro-batch (samples)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--no-memory", action="store_true", help="skip the per-way peak memory processes")
    p.add_argument("--memory-of", choices=WAYS, help=argparse.SUPPRESS)
    p.add_argument("--tmp", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    args.tmp = args.tmp or tempfile.mkdtemp()
    tmp = Path(args.tmp)
    dtype = llama2.DTYPES[args.dtype]
    parallel.init_distributed()
    shape = replace(bench_step.SHAPES[args.shape][0], vocab_size=32000)  # the LLaMA-2 tokenizer's
    if args.memory_of:
        seq = args.seq_lengths[0]
        samples, packed, ways = streams(str(tmp / f"alpaca{seq}"), seq, args.variable_batch)
        model, opt = bench_step.build_training(shape, seq, dtype)
        before = throughput.process_memory_gib()["peak_rss_gib"]
        stream, schedule, _ = ways[args.memory_of]
        one_step(model, opt, stream, schedule, next(stream))
        print(json.dumps({"step_gib": throughput.process_memory_gib()["peak_rss_gib"] - before}))
        return
    print(f"shape {args.shape}: {shape}, {args.dtype}, threads {torch.get_num_threads()}; Alpaca sample, LLaMA-2 "
          f"tokenizer; padded and packed take 1 row per step, variable {args.variable_batch} samples; "
          f"{args.rounds} interleaved rounds after a warm-up round")
    rows = []
    for seq in args.seq_lengths:
        prefix = preprocess(tmp, seq)
        samples, packed, ways = streams(prefix, seq, args.variable_batch)
        model, opt = bench_step.build_training(shape, seq, dtype)
        print(f"seq {seq}: {len(samples)} samples; {len(packed)} packed rows")
        check_packed_loss(model, samples, packed, args.dtype)
        times = {w: [] for w in WAYS}
        tokens = {w: [] for w in WAYS}
        for r in range(args.rounds + 1):
            for way in WAYS:
                stream, schedule, _ = ways[way]
                batch = next(stream)
                t = time.perf_counter()
                one_step(model, opt, stream, schedule, batch)
                if r:
                    times[way].append(time.perf_counter() - t)
                    tokens[way].append(float(batch["loss_mask"].sum()))
        memory = {} if args.no_memory else {w: peak_memory(w, seq, args) for w in WAYS}
        rate = {w: sum(tokens[w]) / sum(times[w]) for w in WAYS}
        for way in WAYS:
            frac = ways[way][2]
            mem = f", step memory {memory[way]:.2f} GiB" if memory else ""
            print(f"  {way:<8} {rate[way]:9.1f} loss tokens/s, step {statistics.median(times[way]):7.2f} s"
                  f"{'' if frac is None else f', real tokens per row {100 * frac:.1f}%'}{mem}", flush=True)
        rows.append((seq, rate["packed"] / rate["padded"], rate["packed"] / rate["variable"]))
        print(f"  packed / padded = {rows[-1][1]:.1f}x (goal >= 10x at 2048); packed / variable = {rows[-1][2]:.2f}x "
              "(goal >= 1.5x)", flush=True)
    print("summary: " + "; ".join(f"seq {s}: packed/padded {a:.1f}x, packed/variable {b:.2f}x" for s, a, b in rows))
    parallel.destroy()


if __name__ == "__main__":
    main()
