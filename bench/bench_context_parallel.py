"""Per-rank activation memory of one long sequence under context parallelism (ring attention):
one training step of a LLaMA-2-shaped model on one sequence of --seq tokens at CP=1 and at
CP=--cp with each algorithm (p2p: ring attention; a2a: Ulysses), each a launch of its own
(this script under torch.distributed.run).

    python bench/bench_context_parallel.py [--seq 8192] [--cp 2] [--algos p2p a2a] [--layers 4] [--hidden 512]

Per rank it reports:
- activations: the bytes of the tensors autograd saves for the backward during the forward
  (saved-tensor hooks, each storage once, the parameters left out): what the sequence costs;
- step peak: how far a steady step (the second; the optimizer's state exists) lifts the resident
  high-water mark over the memory held before it (weights, gradients, optimizer state),
  transients included.
Before printing a figure it checks that each CP=--cp loss equals CP=1's (1e-5 relative, fp32: the
ring sums the same terms in another order).  Goal: activations per rank at CP=2 <= 0.6 x CP=1.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch

ROOT = Path(__file__).resolve().parents[1]
LOSS_RTOL = 1e-5
GOAL = 0.6


def saved_bytes_during(fn, exclude: set) -> int:
    """Run fn; the bytes of the distinct storages autograd saved meanwhile, but those in exclude."""
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in exclude:
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def reset_peak_rss() -> None:
    """Start the resident high-water mark afresh (Linux: 5 into /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as e:
        raise SystemExit(f"cannot reset the peak resident memory ({e}): the step peak needs Linux's clear_refs")


def worker(args) -> None:
    """One rank of a CP=world launch: one step, a JSON line of its figures."""
    import torch.distributed as dist

    import bench_step
    from recipes.model import llama2, parallel
    from recipes.train import throughput, training

    cp = int(os.environ["WORLD_SIZE"])
    parallel.init_distributed(cp=cp)
    shape = llama2.LlamaShape(args.layers, args.hidden, args.ffn, args.heads, args.heads, vocab_size=32000,
                              seq_length=args.seq)
    model, opt = bench_step.build_training(shape, args.seq, torch.float32, context_parallel_size=cp,
                                           cp_comm_type=args.cp_comm_type if cp > 1 else None)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, shape.vocab_size, (1, args.seq + 1), generator=g)
    batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(1, args.seq),
             "position_ids": torch.arange(args.seq).unsqueeze(0)}
    result = {}

    def step():
        result["loss"], _ = training.train_step([model], opt, iter([batch]), 1, args.seq, 1)

    step()  # the optimizer's state exists from here on: the measured step is a steady one
    reset_peak_rss()
    before = throughput.process_memory_gib()["rss_gib"]
    saved = saved_bytes_during(step, params)
    peak = throughput.process_memory_gib()["peak_rss_gib"] - before
    line = {"cp": cp, "rank": dist.get_rank(), "loss": result["loss"], "activations_gib": saved / 2 ** 30,
            "step_peak_gib": peak}
    sys.stdout.write("RESULT " + json.dumps(line) + "\n")
    parallel.destroy()


def launch(args, cp: int, algo: str = "p2p") -> list:
    from tests.helpers.launch import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={cp}", f"--master-port={free_port()}",
           __file__, "--worker", "--cp-comm-type", algo, "--seq", str(args.seq), "--layers", str(args.layers), "--hidden", str(args.hidden),
           "--ffn", str(args.ffn), "--heads", str(args.heads)]
    threads = max(1, (os.cpu_count() or 1) // cp)
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(threads)))
    if proc.returncode:
        raise SystemExit(f"CP={cp} failed:\n{proc.stderr[-4000:]}")
    rows = [json.loads(l[7:]) for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    return sorted(rows, key=lambda r: r["rank"])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--cp", type=int, default=2)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--ffn", type=int, default=1408)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--algos", nargs="+", choices=("p2p", "a2a"), default=["p2p", "a2a"])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--cp-comm-type", default="p2p", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    print(f"one sequence of {args.seq} tokens; LLaMA-2 shape: {args.layers} layers, hidden {args.hidden}, ffn "
          f"{args.ffn}, {args.heads} heads, vocabulary 32000; fp32; one training step per launch")
    runs = {"CP=1": launch(args, 1)}
    for algo in args.algos:
        runs[f"CP={args.cp} {algo}"] = launch(args, args.cp, algo)
    import bench_step

    base = runs["CP=1"][0]
    for name, rows in runs.items():
        for r in rows if name != "CP=1" else []:
            bench_step.check_agree(f"loss, {name} rank {r['rank']}", "CP=1", base["loss"], name, r["loss"], LOSS_RTOL)
    print("\n| layout | rank | tokens on the rank | activations GiB | per 1k tokens MiB | step peak GiB |")
    print("|---|---|---|---|---|---|")
    for name, rows in runs.items():
        tokens = args.seq // (1 if name == "CP=1" else args.cp)
        for r in rows:
            print(f"| {name} | {r['rank']} | {tokens} | {r['activations_gib']:.3f} | "
                  f"{r['activations_gib'] * 2 ** 10 / (tokens / 1000):.1f} | {r['step_peak_gib']:.3f} |")
    print()
    for name, rows in runs.items():
        if name == "CP=1":
            continue
        worst = max(r["activations_gib"] for r in rows)
        ratio = worst / base["activations_gib"]
        peak_ratio = max(r["step_peak_gib"] for r in rows) / base["step_peak_gib"]
        print(f"{name}: activations per rank / CP=1's: {worst:.3f} / {base['activations_gib']:.3f} = {ratio:.3f} "
              f"(1/{args.cp} of the tokens: {1 / args.cp:.3f}; goal <= {GOAL}: {'met' if ratio <= GOAL else 'NOT met'}); "
              f"step peak {peak_ratio:.3f}")


if __name__ == "__main__":
    main()
