"""``torch_npu.npu`` (``torch.npu`` once imported) for the emulation: one device, ``npu:0``.

With the emulated device on (``device.enabled()``), its RNG is the device's own generator
(``device.GENERATOR``), not the CPU's, as on hardware: a draw on the CPU does not move it
(``torch.manual_seed`` seeds both, as it seeds every registered device).  Off, the NPU is the CPU and so is its RNG.  Streams and events are the CPU's
(work here is synchronous: the CPU device layer's); memory statistics are the device allocator's
(``device.Allocator``: the bytes live npu tensors hold, and ``EMULATED_NPU_MEMORY_GB`` as the HBM)."""

import contextlib
import functools

import torch

from . import device as _device

NAME = "emulated NPU (the CPU)"  # no chip's name: MFU says there is no cited peak for it


def is_available():
    return True


def is_initialized():
    return True


def _is_in_bad_fork():
    return False


def device_count():
    return 1


def current_device():
    return 0


def set_device(index):
    return None


def synchronize(device=None):
    return None


def get_device_name(device=None):
    return NAME


def get_device_capability(device=None):
    """As the wheel's: ``TORCH_NPU_DEVICE_CAPABILITY`` ("major.minor") when set, else None (a
    CUDA notion the NPU does not have; the wheel warns and answers None)."""
    import os

    value = os.environ.get("TORCH_NPU_DEVICE_CAPABILITY")
    if not value:
        return None
    major, minor = value.split(".")
    return int(major), int(minor)


def __getattr__(name):
    """``Stream`` and ``Event``: the CPU device layer's (work here is synchronous), imported on
    first use (``ascend_patches`` imports this module while it initialises)."""
    if name in ("Stream", "Event"):
        from ascend_patches.device import cpu

        return getattr(cpu, name)
    raise AttributeError(name)


@functools.lru_cache(maxsize=None)
def _stream():
    return __getattr__("Stream")()


def current_stream(device=None):
    return _stream()


def default_stream(device=None):
    return _stream()


@contextlib.contextmanager
def stream(s=None):
    yield s


def set_stream(s):
    return None


def empty_cache():
    return None


def _allocator():
    return _device.ALLOCATOR


def memory_allocated(device=None):
    """The bytes the device's live tensors hold (``device.Allocator``)."""
    return _allocator().allocated


def max_memory_allocated(device=None):
    return _allocator().peak


memory_reserved, max_memory_reserved = memory_allocated, max_memory_allocated  # no caching allocator


def reset_peak_memory_stats(device=None):
    _allocator().reset_peak()


def memory_stats(device=None):
    a = _allocator()
    return {"allocated_bytes.all.current": a.allocated, "allocated_bytes.all.peak": a.peak,
            "reserved_bytes.all.current": a.allocated, "reserved_bytes.all.peak": a.peak}


def _host_total_bytes() -> int:
    for line in open("/proc/meminfo"):
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return 0


def _total_bytes() -> int:
    """The device's memory: ``EMULATED_NPU_MEMORY_GB`` when set, else the host's."""
    return _allocator().limit or _host_total_bytes()


class _Properties:
    """What ``get_device_properties`` reports: the name, and the device's memory."""

    def __init__(self):
        self.name, self.total_memory = NAME, _total_bytes()


def get_device_properties(device=None):
    return _Properties()


def mem_get_info(device=None):
    total = _total_bytes()
    return total - _allocator().allocated, total


def is_bf16_supported():
    return True


def _generator():
    return _device.GENERATOR if _device.installed() else torch.default_generator


def get_rng_state(device="npu"):
    return _generator().get_state()


def set_rng_state(new_state, device="npu"):
    _generator().set_state(new_state)


def manual_seed(seed):
    _generator().manual_seed(int(seed))


manual_seed_all = manual_seed


def initial_seed():
    return _generator().initial_seed()




class _LegacyType(type):
    """``torch.npu.FloatTensor`` and kin: ``isinstance`` holds for a tensor on npu of that dtype."""

    def __instancecheck__(cls, obj):
        return isinstance(obj, torch.Tensor) and obj.device.type == "npu" and obj.dtype == cls.dtype


class FloatTensor(metaclass=_LegacyType):
    dtype = torch.float32


class HalfTensor(metaclass=_LegacyType):
    dtype = torch.float16


class BFloat16Tensor(metaclass=_LegacyType):
    dtype = torch.bfloat16


class utils:
    """``torch_npu.npu.utils``: ``is_support_inf_nan()`` is False on an NPU in saturation mode
    (Atlas 910A); tests set ``INF_NAN`` to emulate one."""

    INF_NAN = True

    @staticmethod
    def is_support_inf_nan():
        return utils.INF_NAN
