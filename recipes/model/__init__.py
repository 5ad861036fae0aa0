"""The model floor every room stands on: the LLaMA-2 shape table and model building
(``llama2``), the process groups (``parallel``), the checkpoint format with its atomic save,
load and tracker (``checkpointing``), and the LoRA adapter layer with its file format's one
writer and reader (``lora``).  ``recipes.train``, ``recipes.infer`` and ``converters`` sit on it
as siblings; it imports only ``recipes.errors`` and ``ascend_patches``."""
