"""Multi-tensor L2 norm and scale, for gradient clipping and the mixed-precision optimizer.

Without Apex or Transformer Engine megatron falls back to per-tensor Python loops
(``local_multi_tensor_l2_norm``: one ``torch.norm`` per tensor; ``local_multi_tensor_scale``:
``dst.copy_(src * scale)``, which allocates a temporary per tensor).  torch's ``_foreach``
kernels do each list in one call (one fused kernel launch per dtype/device group on CUDA
and NPU, one pass per tensor without temporaries on CPU).  Same math: scaling in the
source dtype then copying, exactly as the stock loop rounds.
"""

from __future__ import annotations

import torch


def multi_tensor_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    norms = [n for tl in tensor_lists if tl for n in torch._foreach_norm(tl)]
    if not norms:
        total = torch.zeros((), dtype=torch.float)
    else:
        total = torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))
    return total.reshape(1), None


def multi_tensor_scale_wrapper(original):
    def multi_tensor_scale(chunk_size, noop_flag, tensor_lists, scale):
        srcs, dsts = tensor_lists[0], tensor_lists[1]
        if scale == 1.0:
            # megatron's fp32 master -> bf16/fp16 weight copy goes through here with scale 1;
            # src * 1.0 is exact, so a converting copy rounds exactly as the stock loop does,
            # without its temporary full-size product.
            torch._foreach_copy_(list(dsts), list(srcs))
            return
        if any(s.dtype != d.dtype for s, d in zip(srcs, dsts)):
            return original(chunk_size, noop_flag, tensor_lists, scale)  # rounding must follow src's dtype
        copies = [(s, d) for s, d in zip(srcs, dsts) if s is not d]
        if copies:
            torch._foreach_copy_([d for _, d in copies], [s for s, _ in copies])
        torch._foreach_mul_(list(dsts), scale)

    return multi_tensor_scale
