"""Emulated ``torch_npu.contrib.transfer_to_npu``.

The real module redirects ``torch.cuda.*`` calls to ``torch.npu``, turns ``device="cuda"`` and
integer device arguments of torch's factory functions and ``Tensor.to`` into the NPU, makes
``Tensor.cuda()`` / ``Module.cuda()`` the NPU's, and wraps
``torch.distributed.init_process_group`` and ``distributed_c10d._new_group_with_tag`` (what
``new_group`` calls) in ``_wrapper_hccl``, which turns "nccl" in any string argument and in
``backend=`` into "hccl" (``HCCL_RENAMED``: the targets as torch-npu 2.14.0's source has them;
``tests/test_torch_npu_contract.py`` reads them off the wheel).

With the emulated device on (``torch_npu.device``) the redirects go to ``npu``, as the real
ones do.  With it off (``EMULATED_NPU_DEVICE=0``) the NPU *is* the CPU, and the redirect
installed is the CPU device layer's (``ascend_patches.device.cpu``).  ``undo()`` removes it all.
"""

import functools

import torch

import torch_npu
from ascend_patches.device import cpu
from ascend_patches.registry import Patch, Registry
from ascend_patches.settings import Settings

HCCL_RENAMED = ("torch.distributed:init_process_group", "torch.distributed.distributed_c10d:_new_group_with_tag")


def _wrapper_hccl(fn):
    @functools.wraps(fn)
    def decorated(*args, **kwargs):
        args = [a.replace("nccl", "hccl") if type(a) is str else a for a in args]
        if type(kwargs.get("backend")) is str:
            kwargs["backend"] = kwargs["backend"].replace("nccl", "hccl")
        return fn(*args, **kwargs)

    return decorated


def to_npu(d):
    """A CUDA device argument (a "cuda" string or device, or a bare index) as the NPU's."""
    if isinstance(d, bool) or d is None:
        return d
    if isinstance(d, int):
        return torch.device("npu", d)
    if isinstance(d, str) and d.startswith("cuda"):
        return d.replace("cuda", "npu", 1)
    if isinstance(d, torch.device) and d.type == "cuda":
        return torch.device("npu", d.index)
    return d


def _device_kwarg(original):
    def factory(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = to_npu(kwargs["device"])
        return original(*args, **kwargs)

    factory.__wrapped__ = original
    factory.__name__ = getattr(original, "__name__", "factory")
    return factory


def _tensor_to(original):
    def to(self, *args, **kwargs):
        if args and not isinstance(args[0], (torch.dtype, torch.Tensor)):
            args = (to_npu(args[0]),) + args[1:]
        if "device" in kwargs:
            kwargs["device"] = to_npu(kwargs["device"])
        return original(self, *args, **kwargs)

    to.__wrapped__ = original
    return to


def _tensor_cuda(self, device=None, non_blocking=False, **kwargs):
    return self.to(to_npu(0 if device is None else device), non_blocking=non_blocking)


def _module_cuda(self, device=None):
    return self.to(torch.device("npu", 0))


def _generator_proxy(original):
    """The wheel's _GeneratorProxy: torch.Generator(device="cuda" or an index) is the NPU's."""
    class GeneratorProxy(original):
        def __new__(cls, device="cpu"):
            return original(to_npu(device))

    GeneratorProxy.__wrapped__ = original
    return GeneratorProxy


def _no_triton(**kwargs):
    return False


def _npu_patches():
    npu = frozenset({"cpu"})  # the registry's backend here: this registry is applied under "cpu" below
    out = []

    def cuda(attr, replacement, module="torch.cuda"):
        out.append(Patch(f"transfer_to_npu.{module}.{attr}", f"{module}:{attr}", replacement=replacement,
                         backends=npu, group="device", sweep=False, why="torch.cuda.* is torch.npu.*"))

    n = torch_npu.npu
    # as the wheel's _patch_cuda, which copies torch.npu's names onto torch.cuda: is_available() is True
    # (stock Megatron-LM asserts it), the device's count, name, properties and capability (None unless
    # TORCH_NPU_DEVICE_CAPABILITY says); and as its _init, triton is reported absent (_patch_has_triton)
    for attr in ("is_available", "device_count", "get_device_name", "get_device_properties",
                 "get_device_capability", "mem_get_info", "is_bf16_supported",
                 "current_device", "set_device", "synchronize", "current_stream", "default_stream", "Stream",
                 "stream", "set_stream", "Event", "manual_seed", "manual_seed_all", "get_rng_state", "set_rng_state",
                 "empty_cache", "memory_allocated", "max_memory_allocated", "memory_reserved",
                 "max_memory_reserved", "reset_peak_memory_stats", "memory_stats"):
        cuda(attr, getattr(n, attr))
    for attr in ("FloatTensor", "HalfTensor", "BFloat16Tensor"):  # _patch_cuda copies torch.npu's onto torch.cuda
        cuda(attr, getattr(n, attr))
    for module in ("torch.utils._triton", "torch._dynamo.utils", "torch._inductor.runtime.autotune_cache",
                   "torch._inductor.compile_fx"):
        out.append(Patch(f"transfer_to_npu.{module}.has_triton", f"{module}:has_triton", replacement=_no_triton,
                         backends=npu, group="device", sweep=False, why="the wheel's _patch_has_triton"))
    cuda("get_rng_state", n.get_rng_state, module="torch.cuda.random")
    cuda("set_rng_state", n.set_rng_state, module="torch.cuda.random")
    for p in cpu.patches():  # nvtx ranges: no-ops, as the wheel leaves them with no CUDA
        if p.target.startswith("torch.cuda.nvtx:"):
            out.append(p)
    factories = (
        "empty zeros ones full tensor as_tensor arange linspace rand randn randint randperm "
        "empty_like zeros_like ones_like full_like rand_like randn_like empty_strided eye"
    ).split()
    for name in factories:
        out.append(Patch(f"transfer_to_npu.torch.{name}", f"torch:{name}", wrapper=_device_kwarg, backends=npu,
                         group="device", sweep=False, why='device="cuda" / device=<int> is the NPU'))
    for name in ("new_empty", "new_zeros", "new_ones", "new_full", "new_tensor"):
        out.append(Patch(f"transfer_to_npu.Tensor.{name}", f"torch:Tensor.{name}", wrapper=_device_kwarg,
                         backends=npu, group="device", sweep=False, why='device="cuda" is the NPU'))
    out += [
        Patch("transfer_to_npu.Tensor.to", "torch:Tensor.to", wrapper=_tensor_to, backends=npu, group="device",
              sweep=False, why='Tensor.to("cuda") goes to the NPU'),
        Patch("transfer_to_npu.Tensor.cuda", "torch:Tensor.cuda", replacement=_tensor_cuda, backends=npu,
              group="device", sweep=False, why="Tensor.cuda() is Tensor.npu()"),
        Patch("transfer_to_npu.Generator", "torch:Generator", wrapper=_generator_proxy, backends=npu, group="device",
              sweep=False, why="the wheel's _GeneratorProxy: a CUDA device argument is the NPU"),
        Patch("transfer_to_npu.Tensor.is_cuda", "torch:Tensor.is_cuda", replacement=torch.Tensor.is_npu,
              backends=npu, group="device", sweep=False, why="the wheel sets Tensor.is_cuda = Tensor.is_npu"),
        Patch("transfer_to_npu.Module.cuda", "torch.nn:Module.cuda", replacement=_module_cuda, backends=npu,
              group="device", sweep=False, why="Module.cuda() is Module.npu()"),
    ]
    return out


_registry = Registry()
if torch_npu.device.installed():
    for _p in _npu_patches():
        _registry.declare(_p)
else:
    for _p in cpu.patches():
        if _p.name != "cpu.Tensor.type":  # the real redirect leaves Tensor.type alone
            _registry.declare(_p)
for _target in HCCL_RENAMED:
    _registry.declare(Patch(f"transfer_to_npu.{_target.split(':')[1]}", _target, wrapper=_wrapper_hccl,
                            backends=frozenset({"cpu"}), group="device", sweep=False,
                            why="transfer_to_npu turns the 'nccl' megatron asks for into 'hccl'"))
_registry.apply(Settings(backend="cpu"))
torch.npu = torch_npu.npu


def undo():
    _registry.revert()
    if getattr(torch, "npu", None) is torch_npu.npu and not torch_npu.device.installed():
        del torch.npu
