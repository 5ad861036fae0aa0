"""Host memory of loading a checkpoint, per rank: a LLaMA-2-7B-width model (hidden 4096, FFN
11008, 32 heads, vocab 32000; ``--num-layers`` of them) at ``--tensor-model-parallel-size``,
saved once with the recipes' checkpoint writer, then loaded by a fresh process into a model
built on the backend's device, the way ``recipes.pretrain --load`` and ``recipes.generate``
load it (``recipes.model.checkpointing.load``).

Per rank it prints the shard (the bytes of the rank's parameters), the process's resident
bytes before the load and its peak during the load (the kernel's high-water mark, reset just
before: ``/proc/self/clear_refs``), and what the load added.  The target (issue 40): peak host
RSS at most the shard + 1 GB.  On an accelerator the model is in device memory, so the host
holds only what the loader keeps; on the CPU backend and the CPU-backed emulated NPU the model
itself is host memory, so the host figure there is the peak less the model's bytes.  Exits 1
when a rank is past the target.

    torchrun --nproc-per-node 2 bench/load_memory.py --dir /tmp/ckpt7b [--num-layers 4]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

import ascend_patches
from recipes.model import checkpointing, llama2, parallel

GB = 1 << 30


def rss_bytes(field: str = "VmRSS") -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak() -> None:
    """The kernel's VmHWM back to the current RSS (proc(5): clear_refs, value 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def build(num_layers: int, tp: int):
    shape = dataclasses.replace(llama2.shape("llama2-7b"), num_layers=num_layers)
    vocab = llama2.padded_vocab_size(shape.vocab_size, tp=tp)
    model = llama2.build_model(shape, vocab_size=vocab, seq_length=4096, tensor_model_parallel_size=tp)
    return shape, model


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", required=True, help="the checkpoint folder: written first if it holds none")
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--tensor-model-parallel-size", type=int, default=2)
    a = p.parse_args(argv)
    tp = a.tensor_model_parallel_size
    parallel.init_distributed(tp, 1)
    rank = torch.distributed.get_rank()
    torch.manual_seed(1234)
    shape, model = build(a.num_layers, tp)
    shard = sum(t.numel() * t.element_size() for t in model.state_dict().values() if isinstance(t, torch.Tensor))
    if checkpointing.latest_iteration(a.dir) is None:
        t0 = time.time()
        checkpointing.save(a.dir, 1, [model], None, None, {"iteration": 1, "consumed_samples": 0},
                           {"shape": dataclasses.asdict(shape), "tensor_model_parallel_size": tp,
                            "pipeline_model_parallel_size": 1})
        if rank == 0:
            print(f"wrote {a.dir} ({time.time() - t0:.0f} s); run again to measure the load", flush=True)
        parallel.destroy()
        return 0
    for param in model.parameters():  # what the load must bring back
        param.data.zero_()
    gc.collect()
    before = rss_bytes()
    reset_peak()
    t0 = time.time()
    checkpointing.load(a.dir, [model], restore_rng=False)
    seconds = time.time() - t0
    peak = rss_bytes("VmHWM")
    nonzero = all(bool(t.abs().sum() > 0) for t in model.parameters())
    on_host = ascend_patches.device().type == "cpu" or os.environ.get("ASCEND_PATCHES_BACKEND") == "npu" \
        and getattr(sys.modules.get("torch_npu"), "EMULATED", False)  # the emulated device is host memory
    host_peak = peak - shard if on_host else peak
    row = {"rank": rank, "device": str(ascend_patches.device()), "shard_gb": shard / GB, "rss_before_gb": before / GB,
           "rss_peak_gb": peak / GB, "added_by_load_gb": (peak - before) / GB, "host_peak_gb": host_peak / GB,
           "model_in_host_memory": on_host, "limit_gb": (shard + GB) / GB, "load_s": seconds,
           "weights_restored": nonzero}
    rows = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(rows, row)
    ok = all(r["host_peak_gb"] <= r["limit_gb"] and r["weights_restored"] for r in rows)
    if rank == 0:
        for r in rows:
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}))
        print(f"load memory: {'within' if ok else 'PAST'} shard + 1 GB on every rank "
              f"(LLaMA-2-7B width, {a.num_layers} layers, TP={tp})", flush=True)
    parallel.destroy()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
