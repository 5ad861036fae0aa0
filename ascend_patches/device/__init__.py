"""Device layers: what makes stock megatron-core run on a given accelerator."""
