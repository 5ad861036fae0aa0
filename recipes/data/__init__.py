"""Reading raw data, turning rows into token sequences, and Megatron datasets."""
