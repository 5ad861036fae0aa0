"""LLaMA-2 recipes on stock megatron.core building blocks."""
