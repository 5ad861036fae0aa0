"""Make stock megatron-core run on a machine with no accelerator, in this one module.

Megatron-Core calls ``torch.cuda`` in ~100 files.  On a CPU-only machine every one of those
calls raises, so redirecting them changes no code path that worked before: we only turn
calls that would fail into their CPU equivalents.  Queries that already answer truthfully
(``torch.cuda.is_available()`` -> False, ``device_count()`` -> 0) are left alone.

What is redirected (backend ``cpu`` only):

- ``torch.cuda.*`` functions megatron uses: ``current_device`` (-> ``torch.device('cpu')``),
  ``set_device``, ``synchronize``, streams and events, nvtx ranges, the RNG functions
  (the CPU default generator stands in for the CUDA one, so megatron's RNG tracker forks
  the generator that CPU dropout really draws from), memory statistics (0: a CPU has no
  device memory pool) and ``empty_cache``.
- ``device="cuda"`` / ``device=<int>`` arguments of torch factory functions and
  ``Tensor.new_*``; ``Tensor.cuda()``; ``Tensor.to("cuda")``; ``pin_memory=True``.
- ``Tensor.type()`` called *from megatron modules only* answers ``torch.cuda.FloatTensor``
  for a CPU float tensor, because megatron's optimizers and grad clipping compare type
  strings literally (``param.type() == 'torch.cuda.FloatTensor'``).
- megatron's inference broadcasts (``inference/communication_utils``) assert that every
  tensor they send is a CUDA tensor; on the CPU backend they check that it is a CPU one.
"""

from __future__ import annotations

import sys
import time
from typing import List

import torch
import torch.utils._device

from ..registry import Patch

CPU = torch.device("cpu")

# `with torch.device(...)` recognises factory functions by identity, from a set it builds
# (and caches) on first use.  Build it now, from the originals, before any are wrapped.
torch.utils._device._device_constructors()


def _is_cuda_device(d) -> bool:
    if d is None or isinstance(d, bool):
        return False
    if isinstance(d, int):
        return True  # a bare index means a CUDA ordinal to torch
    if isinstance(d, str):
        return d.startswith("cuda")
    if isinstance(d, torch.device):
        return d.type == "cuda"
    return False


def _fix_kwargs(kwargs):
    # A CUDA device argument means "the accelerator": drop it so the default device applies
    # (the CPU, or whatever `with torch.device(...)` set, e.g. meta for counting parameters).
    if _is_cuda_device(kwargs.get("device")):
        kwargs["device"] = torch.get_default_device()
    if kwargs.get("pin_memory"):
        kwargs["pin_memory"] = False
    return kwargs


def factory_wrapper(original):
    def factory(*args, **kwargs):
        return original(*args, **_fix_kwargs(kwargs))

    factory.__wrapped__ = original
    factory.__name__ = getattr(original, "__name__", "factory")
    return factory


def tensor_cuda(self, device=None, non_blocking=False, memory_format=torch.preserve_format):
    return self.to(CPU, non_blocking=non_blocking, memory_format=memory_format)


def tensor_to_wrapper(original):
    def to(self, *args, **kwargs):
        if args and _is_cuda_device(args[0]):
            args = (CPU,) + args[1:]
        return original(self, *args, **_fix_kwargs(kwargs))

    to.__wrapped__ = original
    return to


def tensor_type_wrapper(original):
    def type_(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        if args or kwargs or result.startswith("torch.cuda."):
            return result
        if not sys._getframe(1).f_globals.get("__name__", "").startswith("megatron."):
            return result
        if result.startswith("torch.npu."):
            return "torch.cuda." + result[len("torch.npu."):]
        if self.device.type == "cpu" and result.startswith("torch."):
            return "torch.cuda." + result[len("torch."):]
        return result

    type_.__wrapped__ = original
    return type_


class Event:
    """A CPU stand-in for ``torch.cuda.Event``: work on the CPU is synchronous, so
    recording a time stamp is an exact event."""

    def __init__(self, enable_timing=False, blocking=False, interprocess=False, external=False):
        self._t = None

    def record(self, stream=None):
        self._t = time.perf_counter()

    def wait(self, stream=None):
        return None

    def query(self):
        return True

    def synchronize(self):
        return None

    def elapsed_time(self, end: "Event") -> float:
        if self._t is None or end._t is None:
            raise RuntimeError("Event.elapsed_time: both events must be recorded first")
        return (end._t - self._t) * 1000.0


class Stream:
    """A CPU stand-in for ``torch.cuda.Stream``: CPU work is ordered already, so every
    wait is immediate."""

    def __init__(self, device=None, priority=0, **kwargs):
        self.device = CPU

    def wait_stream(self, stream):
        return None

    def wait_event(self, event):
        return None

    def record_event(self, event=None):
        event = event or Event()
        event.record()
        return event

    def synchronize(self):
        return None

    def query(self):
        return True


_DEFAULT_STREAM = Stream()


def _current_stream(device=None):
    return _DEFAULT_STREAM


def _noop(name):
    # One function object per target: torch._dynamo keeps a rule per torch.cuda function
    # object and rejects one object registered under two names.
    def noop(*args, **kwargs):
        return None

    noop.__name__ = name
    return noop


def _zero(name):
    def zero(*args, **kwargs):
        return 0

    zero.__name__ = name
    return zero


def _current_device():
    return CPU


def _get_rng_state(device="cuda"):
    return torch.get_rng_state()


def _set_rng_state(new_state, device="cuda"):
    torch.set_rng_state(new_state)


def _manual_seed(seed):
    # Not torch.manual_seed: that calls torch.cuda.manual_seed_all, which is lazy (a no-op
    # without CUDA) and is left alone.
    torch.default_generator.manual_seed(int(seed))


def on_this_device(tensor):
    """What megatron's inference communication asserts (``_is_cuda``), for the CPU backend."""
    assert tensor is not None
    assert tensor.device.type == "cpu", f"expected a CPU tensor, got one on {tensor.device}"


class _StreamContext:
    def __init__(self, stream=None):
        self.stream = stream

    def __enter__(self):
        return self.stream

    def __exit__(self, *exc):
        return False


def patches() -> List[Patch]:
    cpu = frozenset({"cpu"})

    def cuda(attr, replacement, module="torch.cuda", why="torch.cuda has no CPU fallback"):
        return Patch(
            name=f"cpu.{module.replace('torch.', '')}.{attr}", target=f"{module}:{attr}",
            replacement=replacement, backends=cpu, group="device", sweep=False, why=why,
        )

    out = [
        cuda("current_device", _current_device, why="megatron places tensors on current_device()"),
        cuda("set_device", _noop("set_device")),
        cuda("synchronize", _noop("synchronize")),
        cuda("current_stream", _current_stream),
        cuda("default_stream", lambda device=None: _DEFAULT_STREAM),
        cuda("Stream", Stream),
        cuda("stream", _StreamContext),
        cuda("set_stream", _noop("set_stream")),
        cuda("Event", Event),
        cuda("range_push", _zero("range_push"), module="torch.cuda.nvtx"),
        cuda("range_pop", _zero("range_pop"), module="torch.cuda.nvtx"),
        cuda("manual_seed", _manual_seed,
             why="lazy no-op without CUDA, which would leave megatron's per-TP-rank RNG unseeded"),
        cuda("get_rng_state", _get_rng_state),
        cuda("set_rng_state", _set_rng_state),
        cuda("get_rng_state", lambda device="cuda": torch.get_rng_state(), module="torch.cuda.random"),
        cuda("set_rng_state", lambda new_state, device="cuda": torch.set_rng_state(new_state),
             module="torch.cuda.random"),
        cuda("empty_cache", _noop("empty_cache")),
        cuda("memory_allocated", _zero("memory_allocated"), why="no device memory pool on CPU"),
        cuda("max_memory_allocated", _zero("max_memory_allocated"), why="no device memory pool on CPU"),
        cuda("memory_reserved", _zero("memory_reserved"), why="no device memory pool on CPU"),
        cuda("max_memory_reserved", _zero("max_memory_reserved"), why="no device memory pool on CPU"),
        cuda("reset_peak_memory_stats", _noop("reset_peak_memory_stats")),
        cuda("memory_stats", lambda *a, **k: {}, why="no device memory pool on CPU"),
    ]
    factories = (
        "empty zeros ones full tensor as_tensor arange linspace rand randn randint randperm "
        "empty_like zeros_like ones_like full_like rand_like randn_like empty_strided eye"
    ).split()
    for name in factories:
        out.append(Patch(
            name=f"cpu.torch.{name}", target=f"torch:{name}", wrapper=factory_wrapper,
            backends=cpu, group="device", sweep=False,
            why='device="cuda" / device=<int> arguments become the CPU',
        ))
    for name in ("new_empty", "new_zeros", "new_ones", "new_full", "new_tensor"):
        out.append(Patch(
            name=f"cpu.Tensor.{name}", target=f"torch:Tensor.{name}", wrapper=factory_wrapper,
            backends=cpu, group="device", sweep=False,
            why='device="cuda" arguments become the CPU',
        ))
    out += [
        Patch(name="cpu.Tensor.cuda", target="torch:Tensor.cuda", replacement=tensor_cuda,
              backends=cpu, group="device", sweep=False, why="Tensor.cuda() keeps the tensor on the CPU"),
        Patch(name="cpu.Tensor.to", target="torch:Tensor.to", wrapper=tensor_to_wrapper,
              backends=cpu, group="device", sweep=False, why='Tensor.to("cuda") keeps the tensor on the CPU'),
        Patch(name="cpu.inference_tensor_check", target="megatron.core.inference.communication_utils:_is_cuda",
              replacement=on_this_device, backends=cpu, group="device", sweep=False,
              why="megatron's inference broadcasts assert CUDA tensors; the CPU backend's are CPU tensors"),
        Patch(name="cpu.Tensor.type", target="torch:Tensor.type", wrapper=tensor_type_wrapper,
              backends=cpu, group="device", sweep=False,
              why="megatron compares type strings with 'torch.cuda.FloatTensor' (megatron callers only)"),
    ]
    return out
