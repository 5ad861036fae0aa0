"""Fused ops, one file each, with their NPU, CUDA and CPU implementations side by side."""
