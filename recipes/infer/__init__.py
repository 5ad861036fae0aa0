"""Inference: a checkpoint opened at any TP/PP (``inference``), decoding, ``generate`` and
``evaluate``.  May import ``recipes.train``'s checkpoint and LoRA readers, ``recipes.data`` and
the shared top modules; nothing in ``recipes.train`` or ``recipes.data`` imports it."""
