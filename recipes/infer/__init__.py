"""Inference: a checkpoint opened at any TP/PP (``inference``), decoding, ``generate`` and
``evaluate``.  May import the model floor (``recipes.model``: shapes, checkpoint and LoRA
formats), ``recipes.data`` and the shared top modules; never ``recipes.train``, its sibling;
nothing in ``recipes.train`` or ``recipes.data`` imports it."""
