"""LLaMA-2 recipes on stock megatron.core building blocks."""

import warnings

from recipes import errors  # noqa: F401  (registers the recipes' refusals with ascend_patches' hook)


# Expected on any machine without Transformer Engine / Apex (every CPU and NPU one): the
# fused replacements come from ascend_patches instead.
warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex) (and Apex )?(are|is) not installed.*")
# CUDA-only advice that megatron prints on every machine.
warnings.filterwarnings("ignore", message=r".*CUDA_DEVICE_MAX_CONNECTIONS.*")
warnings.filterwarnings("ignore", message=r".*full scope is deprecated.*")
# torch deprecations raised inside megatron's own calls (checkpoint loading, all-gather);
# nothing a user of the recipes can act on.
warnings.filterwarnings("ignore", message=r".*`load_state_dict` is deprecated.*", category=FutureWarning)
warnings.filterwarnings("ignore", message=r".*Please use DTensor instead.*", category=FutureWarning)
warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor` is deprecated.*", category=FutureWarning)
