"""Run under torchrun, 2 ranks, on the backend's communication library (gloo on the CPU, the
emulated "hccl" with ASCEND_PATCHES_BACKEND=npu and tests/npu_emulation on PYTHONPATH): the
point-to-point rules ring attention meets.  Each case runs on a fresh group (a failed wait
breaks its group, as on hardware) and reports "ok" or the error's first line.  Each rank prints
RESULT {...}.

- ``ring_exchange``: the ring's own exchange (``context_parallel._exchange``, one batch), twice
  in flight as the backward posts K/V and then their gradients: the data arrive, in order;
- ``ungrouped_exchange``: the exchange as the ring posted it before (``isend`` to the next rank,
  then ``irecv`` from the previous, ungrouped): gloo passes it, HCCL/NCCL wait for ever;
- ``tags``: rank 0 sends a (tag 1) then b (tag 0), rank 1 receives with tag 0 then tag 1: gloo
  matches by tag (b, a), HCCL/NCCL by posting order (a, b);
- ``ring_attention_ungrouped``: ring attention with the ungrouped exchange swapped in.
"""

import json
import sys

import torch
import torch.distributed as dist

import ascend_patches

from ascend_patches.ops import context_parallel  # noqa: E402

dist.init_process_group(ascend_patches.dist_backend())
rank, world = dist.get_rank(), dist.get_world_size()
torch.set_default_device(ascend_patches.device())  # HCCL's tensors are on the NPU (the emulated one refuses others)
assert world == 2
peer = 1 - rank


def ungrouped_exchange(send, group, ranks, tag=0):
    """The ring's exchange before batch_isend_irecv: every rank sends, then receives."""
    r, n = dist.get_rank(group), len(ranks)
    recv = torch.empty_like(send)
    reqs = [dist.isend(send, ranks[(r + 1) % n], group=group, tag=tag),
            dist.irecv(recv, ranks[(r - 1) % n], group=group, tag=tag)]
    return recv, reqs


def ring_exchange(group):
    a, b = torch.full((4,), 10.0 + rank), torch.full((4,), 20.0 + rank)
    got_a, reqs_a = context_parallel._exchange(a, group, [0, 1])
    got_b, reqs_b = context_parallel._exchange(b, group, [0, 1])  # a second exchange in flight
    for req in reqs_a + reqs_b:
        req.wait()
    assert got_a.tolist() == [10.0 + peer] * 4 and got_b.tolist() == [20.0 + peer] * 4, (got_a, got_b)


def ungrouped(group):
    got, reqs = ungrouped_exchange(torch.full((4,), float(rank)), group, [0, 1])
    for req in reqs:
        req.wait()
    assert got.tolist() == [float(peer)] * 4


def tags(group):
    if rank == 0:
        reqs = [dist.isend(torch.full((2,), value), 1, group=group, tag=tag) for value, tag in ((1.0, 1), (2.0, 0))]
        for req in reqs:  # a, then b
            req.wait()
        return "sent"
    first, second = torch.empty(2), torch.empty(2)
    reqs = [dist.irecv(first, 0, group=group, tag=0), dist.irecv(second, 0, group=group, tag=1)]
    for req in reqs:
        req.wait()
    return "a,b" if first[0] == 1.0 else "b,a"


def ring_attention_ungrouped(group):
    original = context_parallel._exchange
    context_parallel._exchange = ungrouped_exchange
    try:
        q = torch.randn(8, 1, 2, 4, requires_grad=True)
        context_parallel.ring_attention(q, q, q, 0.5, group, [0, 1]).sum().backward()
    finally:
        context_parallel._exchange = original


result = {"rank": rank, "backend": dist.get_backend()}
for case in (ring_exchange, ungrouped, tags, ring_attention_ungrouped):
    group = dist.new_group([0, 1])
    try:
        result[case.__name__] = case(group) or "ok"
    except RuntimeError as e:
        result[case.__name__] = "error: " + str(e).splitlines()[0]
sys.stdout.write("RESULT " + json.dumps(result) + "\n")  # one write: ranks share the pipe
