"""The compressed causal mask ``npu_fusion_attention`` takes with ``sparse_mode`` 2 and 3: one
2048 x 2048 upper triangle (True = masked out) that the kernel reads for any sequence length,
built once per device and shared by every attention path that calls the kernel."""

from __future__ import annotations

import torch

_COMPRESSED_CAUSAL = {}


def compressed_causal_mask(device) -> torch.Tensor:
    key = str(device)
    if key not in _COMPRESSED_CAUSAL:
        _COMPRESSED_CAUSAL[key] = torch.triu(torch.ones(2048, 2048, device=device), diagonal=1).bool()
    return _COMPRESSED_CAUSAL[key]
