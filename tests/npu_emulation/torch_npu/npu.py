"""``torch_npu.npu`` for the emulation: one device, whose RNG is the CPU generator and whose
memory is the host's."""

import torch

NAME = "emulated NPU (the CPU)"  # no chip's name: MFU says there is no cited peak for it


def is_available():
    return True


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


def _host_peak_bytes() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def max_memory_allocated(device=None):
    """The emulated device's memory is the host's: the process's peak resident bytes."""
    return _host_peak_bytes()


def memory_reserved(device=None):
    return _host_peak_bytes()


def get_rng_state(device="npu"):
    return torch.get_rng_state()


def set_rng_state(new_state, device="npu"):
    torch.set_rng_state(new_state)


def manual_seed(seed):
    torch.default_generator.manual_seed(int(seed))


class utils:
    """``torch_npu.npu.utils``: ``is_support_inf_nan()`` is False on an NPU in saturation mode
    (Atlas 910A); tests set ``INF_NAN`` to emulate one."""

    INF_NAN = True

    @staticmethod
    def is_support_inf_nan():
        return utils.INF_NAN
