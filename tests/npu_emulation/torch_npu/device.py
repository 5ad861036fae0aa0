"""The emulated NPU as a device of its own: torch's PrivateUse1 renamed ``npu``, as torch_npu
renames it, with tensors whose data lives in CPU memory.  TESTS ONLY.

A tensor on it is an ``NpuTensor``: a wrapper subclass (``_make_wrapper_subclass``) whose
``device`` is ``npu:0`` and whose data is a CPU tensor it holds.  Every aten op on it reaches
``__torch_dispatch__``, which runs the op on the CPU data and wraps the results again, so
autograd, views and in-place ops behave as on any device.  What hardware refuses is refused
here:

- an op that mixes an ``npu`` tensor with a CPU tensor of one or more dimensions raises (a
  0-dim CPU tensor is a scalar, which torch lets any device read, as on CUDA and NPU);
- a torch_npu kernel given a CPU tensor raises (``require_npu``), as the real kernels have no
  CPU implementation;
- ``.to("npu")``, ``.npu()``, ``.cpu()`` and ``copy_`` between devices copy.

Factory functions with ``device="npu"`` reach the PrivateUse1 kernels registered below
(``empty``, ``empty_strided``, the cross-device copies); random ops on it draw from the
device's own generator (``GENERATOR``; ``torch.npu.manual_seed`` / ``get_rng_state`` /
``set_rng_state`` act on it, not on the CPU's).  Device guards, the backend module and
``Tensor.npu()`` / ``Module.npu()`` come from torch's own Python-backend route
(``torch.utils.backend_registration``).

``EMULATED_NPU_DEVICE=0`` turns it off (the older mode, in which the emulated NPU *is* the
CPU); tests not yet moved onto the device set it, each saying so.
"""

from __future__ import annotations

import functools
import os
import weakref

import torch
from torch.utils._pytree import tree_map
from torch.utils._python_dispatch import return_and_correct_aliasing

NAME = "npu"
_CPU = torch.device("cpu")
GENERATOR = torch.Generator()  # the device's own RNG: CPU arithmetic, its own state
_installed = False


def enabled() -> bool:
    return os.environ.get("EMULATED_NPU_DEVICE", "1") != "0"


def installed() -> bool:
    return _installed


class MixedDevices(RuntimeError):
    pass


def _npu(index=0):
    return torch.device(NAME, index)


_TENSOR_DATA = torch._C.TensorBase.data


class OutOfMemory(RuntimeError):
    """What the device's allocator raises past its memory (torch_npu's message starts the same way)."""


class Allocator:
    """The device's memory statistics: the bytes of the CPU storages that live npu tensors hold,
    each storage once (views share their base's), at its size when first wrapped; the peak since
    ``reset_peak``.  No caching: reserved is allocated.  With ``EMULATED_NPU_MEMORY_GB`` set, a
    new storage that would take the total past it raises ``OutOfMemory``, as the device's
    allocator does past its HBM; unset, the limit is the host's memory and nothing is refused.
    A storage resized in place through an npu tensor's ``untyped_storage().resize_`` is counted
    at its new size."""

    def __init__(self):
        self.live = {}  # storage key -> [wrappers holding it, bytes]
        self.allocated = self.peak = 0
        gb = os.environ.get("EMULATED_NPU_MEMORY_GB")
        self.limit = int(float(gb) * 2 ** 30) if gb else None

    def acquire(self, data: torch.Tensor) -> int:
        storage = data.untyped_storage()
        key = storage._cdata
        entry = self.live.get(key)
        if entry is None:
            nbytes = storage.nbytes()
            if self.limit is not None and self.allocated + nbytes > self.limit:
                raise OutOfMemory(f"NPU out of memory. Tried to allocate {nbytes / 2 ** 20:.2f} MiB (NPU 0; "
                                  f"{self.limit / 2 ** 30:.2f} GiB total capacity; {self.allocated / 2 ** 30:.2f} GiB "
                                  "already allocated) [emulated: EMULATED_NPU_MEMORY_GB]")
            self.live[key] = [1, nbytes]
            self.allocated += nbytes
            self.peak = max(self.peak, self.allocated)
        else:
            entry[0] += 1
        return key

    def resize(self, key, nbytes: int) -> None:
        """A storage resized in place (``untyped_storage().resize_(n)``: 0 frees its memory, as
        megatron's offload and recomputation do, n reallocates it)."""
        entry = self.live.get(key)
        if entry is None:
            return
        grow = nbytes - entry[1]
        if grow > 0 and self.limit is not None and self.allocated + grow > self.limit:
            raise OutOfMemory(f"NPU out of memory. Tried to allocate {grow / 2 ** 20:.2f} MiB (NPU 0; "
                              f"{self.limit / 2 ** 30:.2f} GiB total capacity; {self.allocated / 2 ** 30:.2f} GiB "
                              "already allocated) [emulated: EMULATED_NPU_MEMORY_GB]")
        entry[1] = nbytes
        self.allocated += grow
        self.peak = max(self.peak, self.allocated)

    def release(self, key) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            del self.live[key]
            self.allocated -= entry[1]

    def reset_peak(self) -> None:
        self.peak = self.allocated


ALLOCATOR = Allocator()


def _held(wrapper, data) -> None:
    """``wrapper`` now holds ``data``'s storage: counted, and released when it dies (its cell
    names the storage it holds at that time: ``param.data =`` moves it)."""
    cell = getattr(wrapper, "_storage_cell", None)
    if cell is None:
        wrapper._storage_cell = cell = [ALLOCATOR.acquire(data)]
        weakref.finalize(wrapper, lambda c: ALLOCATOR.release(c[0]), cell)
    else:
        key = ALLOCATOR.acquire(data)
        ALLOCATOR.release(cell[0])
        cell[0] = key


class NpuTensor(torch.Tensor):
    """A tensor on the emulated NPU: ``device`` is npu:0, ``_data`` the CPU tensor that holds it."""

    @staticmethod
    def __new__(cls, data: torch.Tensor):
        assert type(data) is torch.Tensor and data.device.type == "cpu", (type(data), data.device)
        # a normal tensor even under torch.inference_mode: autograd's view bookkeeping sets an output's
        # version counter from its (normal) base, which an inference tensor cannot take
        with torch.inference_mode(False):
            r = torch.Tensor._make_wrapper_subclass(
                cls, data.size(), strides=data.stride(), storage_offset=data.storage_offset(), dtype=data.dtype,
                layout=data.layout, device=_npu(), requires_grad=data.requires_grad)
        r._data = data
        _held(r, data)
        return r

    def __repr__(self, *, tensor_contents=None):
        return f"{self._data!r}".replace("tensor(", "npu_tensor(", 1)[:-1] + ", device='npu:0')"

    __torch_function__ = torch._C._disabled_torch_function_impl

    @property
    def data(self):
        return _TENSOR_DATA.__get__(self)

    @data.setter
    def data(self, new):
        """``param.data = t`` (megatron points parameters into its buffers this way): the wrapper
        takes ``t``'s metadata from torch and its CPU data from here, so both name one tensor."""
        _TENSOR_DATA.__set__(self, new)
        self._data = new._data
        _held(self, new._data)

    def record_stream(self, stream):  # one synchronous queue: nothing to keep alive past a stream
        return None

    def untyped_storage(self):
        """The device storage: its bytes are the host storage behind ``_data``; resizing it
        (megatron frees offloaded and recomputed activations with ``resize_(0)``) frees or
        reallocates them and the allocator counts it."""
        return NpuStorage(self._data.untyped_storage())

    def tolist(self):  # a device-to-host copy, as on hardware (torch has no tolist for subclasses)
        return self._data.tolist()

    def __format__(self, spec):
        """As torch formats a tensor: a 0-dim one as its value (f"T{t}" is "T4"); torch does that only
        for ``type(t) is Tensor``, which an npu tensor on hardware is and this wrapper is not."""
        if self.dim() == 0:
            return self.item().__format__(spec)
        return object.__format__(self, spec)

    def data_ptr(self):
        """The device address: here the address of the host bytes that stand in for device memory
        (a wrapper tensor has no storage of its own and answered 0 for every tensor); views of one
        tensor share it, as on hardware."""
        return self._data.data_ptr()

    def __reduce_ex__(self, protocol):
        """Pickled as torch pickles a tensor of a storage-less device: its CPU copy and the device,
        which ``torch.load`` (weights_only included) rebuilds on npu."""
        return (torch._utils._rebuild_device_tensor_from_cpu_tensor,
                (self._data.detach().clone(), self.dtype, str(self.device), self.requires_grad))

    def numpy(self, *, force=False):
        raise TypeError("can't convert npu:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor to "
                        "host memory first.")

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _dispatch(func, args, kwargs or {})


class NpuStorage:
    """An npu tensor's untyped storage: the host storage that holds it, on device npu:0."""

    def __init__(self, host):
        self._host = host

    device = property(lambda self: _npu())

    def __getattr__(self, name):  # size, nbytes, data_ptr, element_size, ... of the host storage
        return getattr(self._host, name)

    def __len__(self):
        return len(self._host)

    def resize_(self, nbytes: int):
        ALLOCATOR.resize(self._host._cdata, nbytes)
        self._host.resize_(nbytes)
        return self

    def copy_(self, src, non_blocking=False):
        self._host.copy_(src._host if isinstance(src, NpuStorage) else src, non_blocking)
        return self


def data_of(t):
    """The CPU tensor behind an npu tensor (what "hccl" hands to gloo); anything else as it is."""
    return t._data if isinstance(t, NpuTensor) else t


def require_npu(op: str, *tensors) -> None:
    """What a torch_npu kernel does with a CPU tensor: it has no CPU implementation."""
    if not _installed:
        return
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != NAME:
            raise RuntimeError(f"{op}: expected every tensor on npu, got one on {t.device} (torch_npu's kernels "
                               "run on the NPU only; move the tensor with .npu())")



def _dispatch(func, args, kwargs):
    if func.namespace == "npu":  # a torch_npu kernel reached without autograd (torch.inference_mode): its
        import npu_emulated_ops  # emulation runs on the npu tensors, as under autograd

        return npu_emulated_ops.IMPLEMENTATIONS[func._opname](*args, **kwargs)
    if func is torch.ops.aten._to_copy.default:
        src, kw = args[0], dict(kwargs)
        dev = kw.pop("device", None)
        out = func(data_of(src), **kw)
        return out if dev is not None and torch.device(dev).type == "cpu" else NpuTensor(out)
    if func.overloadpacket is torch.ops.aten.to and _to_device(func, args, kwargs) == "cpu":
        # Tensor.to / .cpu() reach here undecomposed under torch.inference_mode: a copy to the host
        kw = {k: v for k, v in kwargs.items() if k != "device"}
        if func is torch.ops.aten.to.device or func is torch.ops.aten.to.other:
            return data_of(args[0]).to(*[data_of(a) if isinstance(a, NpuTensor) else a for a in args[1:]], **kw)
        return func(data_of(args[0]), *args[1:], device=_CPU, **kw)
    if func is torch.ops.aten._has_compatible_shallow_copy_type.default:
        # a question about two tensors' implementations, not a kernel: an npu tensor and a CPU one
        # are not (torch's Module._apply asks it of a parameter and its moved copy, as on hardware)
        a, b = args
        return isinstance(a, NpuTensor) == isinstance(b, NpuTensor)
    if func is torch.ops.aten.copy_.default:  # cross-device copies are allowed: this is how data moves
        data_of(args[0]).copy_(data_of(args[1]), *args[2:], **kwargs)
        return args[0]

    def unwrap(x):
        if isinstance(x, NpuTensor):
            return x._data
        if isinstance(x, torch.Tensor) and x.dim() > 0 and x.device.type != NAME:
            raise MixedDevices(f"{func}: expected all tensors to be on the same device, but found at least two "
                               f"devices, npu:0 and {x.device} (the emulated NPU refuses what hardware refuses)")
        if isinstance(x, torch.device) and x.type == NAME:
            return _CPU
        return x

    uargs, ukwargs = tree_map(unwrap, args), tree_map(unwrap, kwargs)
    if "generator" in _argument_names(func) and ukwargs.get("generator") is None:
        ukwargs["generator"] = GENERATOR
    out = func(*uargs, **ukwargs)
    for name, given in kwargs.items():  # an out= argument its kernel resized: the wrapper's sizes cannot follow
        if isinstance(given, NpuTensor) and given.shape != given._data.shape:
            raise RuntimeError(f"the emulated NPU: {func} resized its {name}= tensor from {tuple(given.shape)} to "
                               f"{tuple(given._data.shape)}, which an npu wrapper tensor cannot follow; give it an "
                               "out tensor of the result's size (or emulate the op as a PrivateUse1 kernel)")
    wrapped = tree_map(lambda x: NpuTensor(x) if type(x) is torch.Tensor and x.device.type == "cpu" else x, out)
    return return_and_correct_aliasing(func, args, kwargs, wrapped)


def _to_device(func, args, kwargs):
    """The device type an ``aten.to`` overload copies to (None: unchanged)."""
    if func is torch.ops.aten.to.other:
        return args[1].device.type
    device = kwargs.get("device", args[1] if func is torch.ops.aten.to.device and len(args) > 1 else None)
    return None if device is None else torch.device(device).type


@functools.lru_cache(maxsize=None)
def _argument_names(func):
    return frozenset(a.name for a in func._schema.arguments)


# -- the PrivateUse1 kernels: what runs before any npu tensor exists ------------------------
# aten's ops, not torch.empty: libraries wrap torch's Python factories (DeepSpeed's zero.Init does), and
# a wrapper that sends them to npu would come back here


def _empty(size, dtype=None, layout=None, device=None, pin_memory=None, memory_format=None):
    return NpuTensor(torch.ops.aten.empty.memory_format(size, dtype=dtype, layout=layout, device=_CPU,
                                                        memory_format=memory_format))


def _empty_strided(size, stride, dtype=None, layout=None, device=None, pin_memory=None):
    return NpuTensor(torch.ops.aten.empty_strided.default(size, stride, dtype=dtype, layout=layout, device=_CPU))


def _arange(*args, dtype=None, layout=None, device=None, pin_memory=None):
    """``torch.arange(..., device="npu")``: aten's composite makes an empty tensor and resizes it in
    ``arange.out``, which a wrapper tensor's fixed sizes do not follow (it came back empty)."""
    return NpuTensor(torch.ops.aten.arange.start_step(*args, dtype=dtype, layout=layout, device=_CPU)
                     if len(args) == 3 else torch.arange(*args, dtype=dtype, layout=layout, device=_CPU))


def _copy_from(self, dst, non_blocking=False):
    data_of(dst).copy_(data_of(self))
    return dst


def _copy_from_and_resize(self, dst):
    d = data_of(dst)
    d.resize_(self.shape)
    d.copy_(data_of(self))
    return dst


def _keep_parameter_attributes(original):
    """``Module.to("npu")`` keeps each parameter's Python attributes (megatron's
    ``tensor_model_parallel``, ``partition_dim``, ``shared`` ...), as on hardware, where the
    move is ``param.data = moved``.  A wrapper tensor cannot take a CPU tensor's place that way,
    so torch makes new Parameters here; their attributes are carried over."""
    def _apply(self, fn, recurse=True):
        before = dict(self._parameters)
        out = original(self, fn, recurse)
        for key, old in before.items():
            new = self._parameters.get(key)
            if old is not None and new is not None and new is not old:
                for attr, value in vars(old).items():
                    vars(new).setdefault(attr, value)
        return out

    _apply.__wrapped__ = original
    return _apply


_LIB = None
_PINNED = set()  # the data pointers of host storages pinned for the NPU (_pin_memory)


def _pinned_for(device) -> None:
    if device is not None and torch.device(device).type != NAME:
        raise RuntimeError(f"pin_memory: the emulation pins host memory for {NAME} only, not {device}")


def _is_pinned(self, device=None):
    _pinned_for(device)
    return self.untyped_storage().data_ptr() in _PINNED


def _mark_pinned(out: torch.Tensor) -> torch.Tensor:
    ptr = out.untyped_storage().data_ptr()
    _PINNED.add(ptr)
    weakref.finalize(out, _PINNED.discard, ptr)
    return out


def _pin_memory(self, device=None):
    """Host memory pinned for the NPU, as the wheel's host allocator gives (what a DataLoader's
    pin_memory=True asks of the accelerator in use): here ordinary host memory, a copy with the
    same sizes and strides, marked pinned until it is freed."""
    _pinned_for(device)
    out = torch.empty_strided(self.size(), self.stride(), dtype=self.dtype)
    out.copy_(self)
    return _mark_pinned(out)


# the factories that take pin_memory=True; torch asks the PrivateUse1 hooks for a pinned
# allocator there, which a Python backend cannot register: the wheel's C++ hooks give one
PINNED_FACTORIES = ("empty", "empty_strided", "empty_like", "zeros", "zeros_like", "ones", "full")


def _pinned_factory(original):
    def factory(*args, pin_memory=False, **kwargs):
        if not pin_memory:
            return original(*args, **kwargs)
        device = kwargs.get("device")
        if device is not None and torch.device(device).type != "cpu":
            raise RuntimeError(f"pin_memory=True is for host tensors, not {device}")
        return _mark_pinned(original(*args, **kwargs))

    factory.__wrapped__ = original
    factory.__name__ = getattr(original, "__name__", "factory")
    return factory


def _tolerate_inference_tensors() -> None:
    """Under ``torch.inference_mode`` (megatron's dynamic inference engine) torch cannot share a
    view's version counter between wrapper tensors ("Cannot set version_counter for inference
    tensor"): there a view keeps the aliasing of its CPU data (``_data`` is a view of its
    base's), and the wrappers' storage bookkeeping is skipped.  On the device the view is
    plain; only this emulation's wrapper needs the bookkeeping."""
    import torch.utils._python_dispatch as pd

    original = pd._correct_storage_aliasing

    def correct_storage_aliasing(func, schema_info, args, outs):
        if torch.is_inference_mode_enabled():
            return None
        return original(func, schema_info, args, outs)

    pd._correct_storage_aliasing = correct_storage_aliasing


_TORCH_GENERATOR = torch.Generator


class NpuGenerator(_TORCH_GENERATOR):
    """``torch.Generator(device="npu")``: a generator of the device's (CPU arithmetic, its own
    state), where torch asks PrivateUse1 hooks a Python backend cannot register
    (``getNewGenerator``); the wheel's C++ hooks give one.  Any other device: torch's."""

    def __new__(cls, device="cpu"):
        if device is not None and not isinstance(device, int) and torch.device(device).type == NAME:
            device = "cpu"
        return _TORCH_GENERATOR(device)


def install(backend_module) -> None:
    """PrivateUse1 renamed ``npu`` with ``backend_module`` as ``torch.npu``; once per process
    (torch allows one rename)."""
    global _installed, _LIB
    if _installed:
        return
    from torch.utils.backend_registration import _setup_privateuseone_for_python_backend

    _setup_privateuseone_for_python_backend(rename=NAME, backend_module=backend_module)
    _LIB = torch.library.Library("aten", "IMPL")
    for name, fn in (("empty.memory_format", _empty), ("empty_strided", _empty_strided), ("arange", _arange),
                     ("arange.start", _arange), ("arange.start_step", _arange),
                     ("_copy_from", _copy_from), ("_copy_from_and_resize", _copy_from_and_resize)):
        _LIB.impl(name, fn, "PrivateUse1")
    for name, fn in (("is_pinned", _is_pinned), ("_pin_memory", _pin_memory)):  # host tensors, pinned for npu
        _LIB.impl(name, fn, "CPU")
    torch.nn.Module._apply = _keep_parameter_attributes(torch.nn.Module._apply)
    for name in PINNED_FACTORIES:
        setattr(torch, name, _pinned_factory(getattr(torch, name)))
    torch.Generator = NpuGenerator
    _tolerate_inference_tensors()
    _installed = True
