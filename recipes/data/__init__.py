"""Data: raw rows read, turned into token sequences (handlers, the tokenizer), written as
Megatron indexed datasets (``preprocess_data``) and read back as datasets.
May import only the shared top modules (``recipes.errors``, ``recipes.model.llama2``, ...)."""
