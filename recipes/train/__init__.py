"""Training: flags -> settings (``run_settings``, data that knows no engine), the engines (the
built-in ``trainer``, ``megatron_lm``, ``deepspeed_engine``), weights, one step, throughput.
May import ``recipes.data``, the model floor (``recipes.model``) and the shared top modules;
never ``recipes.infer``, its sibling."""
