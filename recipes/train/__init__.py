"""Training: flags -> settings (``run_settings``, data that knows no engine), the engines (the
built-in ``trainer``, ``megatron_lm``, ``deepspeed_engine``), weights and LoRA, checkpointing.
May import ``recipes.data`` and the shared top modules; never ``recipes.infer``."""
