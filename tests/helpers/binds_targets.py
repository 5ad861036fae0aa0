"""A user module that binds patch targets by name at import (`from x import f`)."""
from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd  # noqa: F401
from megatron.core.transformer.dot_product_attention import DotProductAttention  # noqa: F401
