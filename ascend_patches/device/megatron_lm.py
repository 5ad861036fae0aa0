"""What stock Megatron-LM's training package (``megatron.training``, ``megatron.legacy``)
needs beyond Megatron-Core to run off CUDA: its own device checks, answered for its callers
only.

- ``initialize_megatron`` asserts ``torch.cuda.is_available()``, and
  ``_initialize_distributed`` / ``_set_random_seed`` build the model-parallel groups and seed
  the tensor-parallel RNG tracker only when ``torch.cuda.device_count() > 0``.  On the CPU
  backend the CPU is the one device of each process, so those two queries answer True and 1
  to callers in ``megatron.training.initialize``, and only there: everything else (torch's
  inductor, autograd, data loaders, megatron-core) keeps the true answers (False, 0).
- ``get_device_arch_version`` reads ``torch.cuda.get_device_properties``; off CUDA there is
  no GPU architecture, so it answers 0.  ``validate_args`` then asks, as for a pre-Blackwell
  GPU, for ``CUDA_DEVICE_MAX_CONNECTIONS=1`` with TP > 1: one hardware queue, so collectives
  run in issue order.  A CPU runs its work in one in-order queue already, so on the CPU
  backend the variable defaults to 1 (a value set by the user is kept).
- ``megatron.legacy.fused_kernels.load`` builds nothing in Megatron-LM 0.16: it only probes
  ``nvcc`` (``CUDA_HOME`` is None off CUDA) and makes a build folder beside itself.
- Megatron-LM builds its data loaders after loading a checkpoint, and a ``DataLoader``
  draws its base seed from the torch default generator when its iterator starts.  On a GPU
  that draw lands in the CPU generator, so dropout's CUDA stream resumes exactly; on the CPU
  backend the default generator is dropout's stream, so the draw would shift it after every
  resume.  Megatron-LM's loaders get a host generator of their own (seeded from
  ``torch.initial_seed()``), as the CPU generator is to a GPU run.
- ``compile_helpers`` runs ``make`` in ``megatron/core/datasets``; PyPI's megatron-core
  ships the built ``helpers_cpp`` and no Makefile, so where the helpers import there is
  nothing to build.
"""

from __future__ import annotations

import contextlib
import os
import sys

import torch

def no_gpu_arch_version():
    """No GPU architecture off CUDA (Megatron-LM: 8 Ampere, 9 Hopper, 10 Blackwell)."""
    return 0


def validate_args_wrapper(original):
    def validate_args(args, defaults={}):
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
        return original(args, defaults)

    validate_args.__wrapped__ = original
    return validate_args


_HOST = {}


def host_generator() -> torch.Generator:
    """The host-side generator Megatron-LM's data loaders draw their seeds from on the CPU."""
    if "gen" not in _HOST:
        _HOST["gen"] = torch.Generator().manual_seed(torch.initial_seed())
    return _HOST["gen"]


def data_loader_wrapper(original):
    def build_pretraining_data_loader(dataset, consumed_samples):
        loader = original(dataset, consumed_samples)
        if isinstance(loader, torch.utils.data.DataLoader) and loader.generator is None:
            loader.generator = host_generator()
        return loader

    build_pretraining_data_loader.__wrapped__ = original
    return build_pretraining_data_loader


def fused_kernels_load(args):
    """Megatron-LM 0.16's ``fused_kernels.load`` compiles no kernel; nothing to do off CUDA."""
    return None


def _helpers_built() -> bool:
    try:
        from megatron.core.datasets import helpers_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def compile_helpers_wrapper(original):
    def compile_helpers():
        if _helpers_built():
            return None  # the wheel's prebuilt helpers; its folder has no Makefile
        return original()

    compile_helpers.__wrapped__ = original
    return compile_helpers


@contextlib.contextmanager
def cpu_fork(self, name=None):
    """``CudaRNGStatesTracker.fork`` on the CPU backend, same contract as megatron's: swap the
    named tracker state into the generator, run the block, store the state back, restore.

    On a CPU the tracker's "CUDA" state and the host's state live in one generator, so while
    the block runs the host stream is parked in ``host`` and cannot change; the block's
    draws (dropout, weight init) advance only the tracker's stream.  Megatron's GPU fork
    compares the generator with itself before and after the block and would report every
    draw as a host-RNG change; here the host stream is compared where it really is."""
    from megatron.core.tensor_parallel import random as mrandom

    name = name or mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME
    if name not in self.states_:
        raise Exception(f"cuda rng state {name} is not added")
    host = torch.get_rng_state()
    names = hasattr(self, "_current_state_name")  # megatron-core 0.16+ names the active stream; 0.14-0.15 do not
    outer = self._current_state_name if names else "default-rng"
    if outer != "default-rng":
        self.states_[outer] = host  # a nested fork: the outer stream is what the generator holds
    torch.set_rng_state(self.states_[name])
    if names:
        self._current_state_name = name
    try:
        yield
    finally:
        if names and self._current_state_name != name:
            raise Exception(f"current state name {self._current_state_name} is not the same as the desired "
                            f"state name {name}.")
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(self.states_[outer] if outer != "default-rng" else host)
        if names:
            self._current_state_name = outer
