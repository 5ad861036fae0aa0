"""``torch_npu.npu`` for the emulation: one device, whose RNG is the CPU generator."""

import torch


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
