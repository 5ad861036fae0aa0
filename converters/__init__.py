"""Checkpoint converters: HuggingFace <-> Megatron, TP/PP resharding, LoRA merging.

Converters build on the recipes' shape and checkpoint pieces (``recipes.model.llama2``,
``recipes.model.checkpointing``, ``recipes.model.lora``); the recipes never import converters."""

from recipes import errors  # noqa: F401  (registers the recipes' refusals with ascend_patches' hook)

