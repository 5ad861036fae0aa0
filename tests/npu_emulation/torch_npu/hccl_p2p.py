"""The emulated "hccl": gloo underneath, with HCCL's and NCCL's point-to-point rules, which gloo
does not have.  TESTS ONLY.

gloo buffers a send and matches messages by tag, so an exchange that deadlocks on an
accelerator passes on it.  HCCL and NCCL (torch's ProcessGroupNCCL, and torch_npu's
ProcessGroupHCCL built like it) run a rank's point-to-point operations on a stream, one after
another in the order they were posted, and:

- a send completes only once its matching receive is running on the peer: two ranks that each
  post a send to the other before their receive wait for each other for ever (a small message
  may slip through NCCL's buffers; at ring attention's sizes, 128 MiB at LLaMA-2 7B seq 16k
  CP 2, it does not);
- tags are ignored: messages between a pair match in the order they were posted;
- the operations of one ``batch_isend_irecv`` run together (ncclGroupStart/End), so a batch
  holding both sides of an exchange cannot deadlock.

Here every point-to-point operation on an "hccl" group (``isend``/``irecv``/``send``/``recv``
through ``ProcessGroup.send``/``recv``, and ``batch_isend_irecv``) goes to one queue per group
and process, run by one thread in posting order.  A receive first tells its peer it is posted
(a token on a channel of its own), a send waits for that token, and data travels on one tag
whatever tag the caller gave.  A wait longer than ``EMULATED_HCCL_P2P_TIMEOUT_S`` (default
300 s) fails the operation, and every later one on the group, with a message that names the
peer: where hardware would hang, the test fails.

Stricter than NCCL in one way: NCCL runs ungrouped operations to different peers on
communicators (and streams) of their own, while here one queue serves the whole group, so an
ungrouped send to one peer also waits ahead of a receive from another.  Code that posts
exchanges with ``batch_isend_irecv``, or orders them by rank parity as megatron's
``p2p_communication`` does, runs here as there.  Collectives are gloo's, unchanged.
"""

from __future__ import annotations

import datetime
import os
import queue
import threading

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
from torch.utils._pytree import tree_map

from . import device
from .device import data_of

BACKEND = "hccl"
DATA_TAG, READY_TAG = 0, 0x7EAD  # gloo tags of the two channels; the caller's tag is not used
_gloo_send, _gloo_recv = dist.ProcessGroup.send, dist.ProcessGroup.recv
_gloo_batch = c10d.batch_isend_irecv


def timeout_s() -> float:
    return float(os.environ.get("EMULATED_HCCL_P2P_TIMEOUT_S", "300"))


class Work:
    """What isend / irecv / batch_isend_irecv return: done when the queue has run the operation."""

    def __init__(self, what: str):
        self.what, self.error, self.done = what, None, threading.Event()

    def wait(self, timeout=None) -> bool:
        self.done.wait()
        if self.error:
            raise RuntimeError(self.error)
        return True

    def is_completed(self) -> bool:
        return self.done.is_set()

    def is_success(self) -> bool:
        return self.done.is_set() and self.error is None


class _Queue:
    """One process's point-to-point operations on one group, run one post at a time."""

    def __init__(self, group):
        self.group, self.posts, self.broken = group, queue.Queue(), None
        threading.Thread(target=self._run, daemon=True, name="emulated-hccl-p2p").start()

    def post(self, ops, what: str) -> Work:
        """``ops``: [(is_send, tensor, peer's rank in the group)], run together."""
        work = Work(what)
        self.posts.put((ops, work))
        return work

    def _run(self):
        while True:
            ops, work = self.posts.get()
            if self.broken:
                work.error = f"emulated hccl: {work.what} not run: the group failed before ({self.broken})"
            else:
                try:
                    self._execute(ops)
                except RuntimeError as e:
                    self.broken = work.error = str(e)
            work.done.set()

    def _wait(self, work, what: str) -> None:
        limit = timeout_s()
        try:
            work.wait(timeout=datetime.timedelta(seconds=limit))
        except RuntimeError as e:
            raise RuntimeError(f"emulated hccl: {what} waited {limit:g} s: on HCCL or NCCL this hangs ({e}). A send "
                               "completes only once its matching receive runs on the peer, and a rank runs its "
                               "point-to-point operations in the order it posted them: post both sides of an exchange "
                               "in one batch_isend_irecv, or order them by rank parity") from None

    def _execute(self, ops) -> None:
        pending = []  # gloo's unbound sends complete once the peer receives: none is waited for alone
        for is_send, tensor, peer in ops:  # receives first tell their peers they are posted
            if not is_send:
                pending.append((f"a receive from rank {peer} of the group, telling it so,",
                                _gloo_send(self.group, [torch.zeros(1)], peer, READY_TAG)))
                pending.append((f"a receive from rank {peer} of the group", _gloo_recv(self.group, [tensor], peer,
                                                                                      DATA_TAG)))
        for is_send, tensor, peer in ops:
            if is_send:
                self._wait(_gloo_recv(self.group, [torch.empty(1)], peer, READY_TAG),
                           f"a send to rank {peer} of the group, for its matching receive,")
                pending.append((f"a send to rank {peer} of the group", _gloo_send(self.group, [tensor], peer, DATA_TAG)))
        for what, work in pending:
            self._wait(work, what)


_queues = {}
_lock = threading.Lock()


def _queue(group) -> _Queue:
    with _lock:
        if id(group) not in _queues:
            _queues[id(group)] = (group, _Queue(group))  # the group kept alive with its queue
        return _queues[id(group)][1]


def is_emulated_hccl(group) -> bool:
    try:
        return dist.get_backend(group) == BACKEND
    except (RuntimeError, ValueError):
        return False


def _send(self, tensors, dst_rank, tag=0):
    if not is_emulated_hccl(self):
        return _gloo_send(self, tensors, dst_rank, tag)
    return _queue(self).post([(True, _hccl_data("send", tensors[0]), dst_rank)], f"send to rank {dst_rank}")


def _recv(self, tensors, src_rank, tag=0):
    if not is_emulated_hccl(self):
        return _gloo_recv(self, tensors, src_rank, tag)
    return _queue(self).post([(False, _hccl_data("recv", tensors[0]), src_rank)], f"receive from rank {src_rank}")


def _batch_isend_irecv(p2p_op_list):
    group = p2p_op_list[0].group or dist.group.WORLD
    if not is_emulated_hccl(group):
        return _gloo_batch(p2p_op_list)
    c10d._check_p2p_op_list(p2p_op_list)
    ops = [(op.op is c10d.isend, _hccl_data("batch_isend_irecv", op.tensor), op.group_peer) for op in p2p_op_list]
    work = _queue(group).post(ops, f"batch of {len(ops)} sends and receives")
    return [work] * len(ops)


# The collectives megatron, DeepSpeed and torch.distributed's functions call on a ProcessGroup.
# On an "hccl" group their npu tensors are handed to gloo as the CPU tensors that hold them
# (results land in place); a gloo group given an npu tensor refuses it, as on hardware.
COLLECTIVES = ("allreduce", "allreduce_coalesced", "allgather", "_allgather_base", "allgather_coalesced",
               "allgather_into_tensor_coalesced", "all_gather_single", "all_gather_single_coalesced",
               "reduce_scatter", "_reduce_scatter_base", "reduce_scatter_tensor_coalesced", "reduce_scatter_single",
               "reduce_scatter_single_coalesced", "broadcast", "reduce", "gather", "scatter", "alltoall",
               "alltoall_base", "all_to_all_single")


def _hccl_data(what: str, t):
    """An npu tensor's CPU data for gloo; on the emulated device, a CPU tensor is refused as
    ProcessGroupHCCL refuses it."""
    if isinstance(t, torch.Tensor) and device.installed() and t.device.type != device.NAME \
            and not getattr(_objects, "inside", False):
        raise RuntimeError(f"ProcessGroupHCCL {what}: tensors must be on npu, got one on {t.device}")
    return data_of(t)


def _refuse_npu(what: str, t):
    if isinstance(t, torch.Tensor) and t.device.type == device.NAME:
        raise RuntimeError(f"ProcessGroupGloo {what}: no backend for device type npu (gloo takes CPU tensors)")
    return t


def _on_cpu_data(original):
    def collective(self, *args, **kwargs):
        check = _hccl_data if is_emulated_hccl(self) else _refuse_npu
        args = tree_map(lambda t: check(original.__name__, t), args)
        kwargs = tree_map(lambda t: check(original.__name__, t), kwargs)
        return original(self, *args, **kwargs)

    collective.__wrapped__ = original
    return collective


OBJECT_COLLECTIVES = ("all_gather_object", "gather_object", "broadcast_object_list", "scatter_object_list")
_objects = threading.local()


def _pickled_on_the_host(original):
    """torch's object collectives pickle into tensors of the device it picks for the group (npu
    for ProcessGroupHCCL on hardware).  Here that device would be the CPU, so within them a CPU
    tensor is not the caller's mistake and is let through."""
    def collective(*args, **kwargs):
        _objects.inside = True
        try:
            return original(*args, **kwargs)
        finally:
            _objects.inside = False

    collective.__wrapped__ = original
    return collective


def install() -> None:
    """Route "hccl" groups' point-to-point operations through the queues, and their collectives
    onto the npu tensors' CPU data (once)."""
    if dist.ProcessGroup.send is not _send:
        for name in OBJECT_COLLECTIVES:
            setattr(dist, name, _pickled_on_the_host(getattr(c10d, name)))
            setattr(c10d, name, getattr(dist, name))
        dist.ProcessGroup.send, dist.ProcessGroup.recv = _send, _recv
        dist.batch_isend_irecv = c10d.batch_isend_irecv = _batch_isend_irecv
        for name in COLLECTIVES:
            if hasattr(dist.ProcessGroup, name):
                setattr(dist.ProcessGroup, name, _on_cpu_data(getattr(dist.ProcessGroup, name)))
