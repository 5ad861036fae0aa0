"""Run under torchrun (gloo), N ranks = the context-parallel size: ring attention on megatron's
load-balanced split (each rank's chunks cut by stock ``get_batch_on_this_cp_rank``) against
plain causal softmax attention over the whole sequence on one process, in float64-free fp32:
outputs and the gradients of q, k and v.  Each rank prints RESULT {...}.  On the emulated NPU
(ASCEND_PATCHES_BACKEND=npu, tests/npu_emulation on PYTHONPATH) the blocks go through
npu_fusion_attention and npu_fusion_attention_grad; RESULT then counts their calls."""

import json
import sys

import torch
import torch.distributed as dist

import ascend_patches  # noqa: F401

from megatron.core import parallel_state as ps  # noqa: E402

from ascend_patches.ops import context_parallel, flash_attention  # noqa: E402
from ascend_patches.ops.context_parallel import ring_attention  # noqa: E402
from recipes.train.training import split_for_context_parallel  # noqa: E402

dist.init_process_group(ascend_patches.dist_backend())  # "hccl" on the emulated NPU: its point-to-point rules
rank, world = dist.get_rank(), dist.get_world_size()
ps.initialize_model_parallel(context_parallel_size=world)
group, ranks = ps.get_context_parallel_group(), ps.get_context_parallel_global_ranks()


def reference(q, k, v, scale):
    """softmax(QK^T)V over the whole sequence, causal, k/v repeated per query head: [s, b, n, d]."""
    s, _, n, _ = q.shape
    rep = n // k.shape[2]
    qf, kf, vf = (t.permute(1, 2, 0, 3) for t in (q, k, v))
    kf, vf = kf.repeat_interleave(rep, 1), vf.repeat_interleave(rep, 1)
    scores = (qf @ kf.transpose(-1, -2) * scale).masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1),
                                                             float("-inf"))
    return (scores.softmax(-1) @ vf).permute(2, 0, 1, 3)


def local(t):
    """This rank's chunks of a [s, b, ...] tensor, cut by megatron's own CP split (it splits dim 1)."""
    return split_for_context_parallel({"x": t.transpose(0, 1)})["x"].transpose(0, 1).contiguous()


def rel(a, b_):
    return float((a - b_).detach().abs().max() / b_.detach().abs().max())


def check(attention, s, b, n, ng, d):
    """attention(q, k, v, scale) on this rank's chunks against the whole sequence's reference:
    {out, dq, dk, dv: largest difference / largest value}."""
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(s, b, h, d, generator=g) for h in (n, ng, ng))
    dout = torch.randn(s, b, n, d, generator=g)
    scale = d ** -0.5
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = reference(*full, scale)
    ref.backward(dout)
    device = ascend_patches.device()  # the reference on the host, the attention on the backend's device
    mine = [local(t).to(device).requires_grad_() for t in (q, k, v)]
    out = attention(*mine, scale)
    out.backward(local(dout).reshape(out.shape).to(device))
    return {"out": rel(out.cpu(), local(ref).reshape(out.shape)),
            **{f"d{x}": rel(m.grad.cpu(), local(f.grad)) for x, m, f in zip("qkv", mine, full)}}


def npu_calls():
    emulated = sys.modules.get("torch_npu")
    return dict(emulated.calls) if getattr(emulated, "EMULATED", False) else None


result = {"rank": rank}
# "rows": the torch blocks in passes of 5 query rows (not dividing the chunks), as long sequences run
CASES = {"mha": (16 * world, 2, 4, 4, 8, None), "gqa": (24 * world, 1, 4, 2, 16, None),
         "rows": (24 * world, 1, 4, 2, 16, 5)}
default_rows = context_parallel.BLOCK_ROWS
for name, (s, b, n, ng, d, rows) in CASES.items():
    context_parallel.BLOCK_ROWS = rows or default_rows
    result[name] = check(lambda q, k, v, scale: ring_attention(q, k, v, scale, group, ranks), s, b, n, ng, d)
context_parallel.BLOCK_ROWS = default_rows
result["calls"] = npu_calls()
# Ulysses: heads (and K/V groups) split over the CP group, so only where CP divides them
for name, (s, b, n, ng, d, _) in CASES.items():
    if name != "rows" and n % world == 0 and ng % world == 0:
        result[f"ulysses_{name}"] = check(
            lambda q, k, v, scale: context_parallel.ulysses_attention(q, k, v, scale, group, flash_attention.attention),
            s, b, n, ng, d)
sys.stdout.write("RESULT " + json.dumps(result) + "\n")  # one write: ranks share the pipe
ps.destroy_model_parallel()
dist.destroy_process_group()
