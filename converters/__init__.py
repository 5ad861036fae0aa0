"""Checkpoint converters: HuggingFace <-> Megatron, TP/PP resharding, LoRA merging.

Converters build on the recipes' shape and checkpoint pieces (``recipes.llama2``,
``recipes.checkpointing``, ``recipes.lora``); the recipes never import converters."""

from recipes import errors

errors.install()  # a refusal that reaches the top of a command prints as one line
