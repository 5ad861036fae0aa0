"""Checkpoint converters (HuggingFace <-> Megatron, TP/PP resharding): see issue 4."""
