"""Megatron-Core without Transformer Engine (every CPU and NPU machine, and GPUs without it).

``megatron.core.utils.is_te_min_version`` compares ``get_te_version()`` with the version
asked; without TE that is None and the comparison raises TypeError, so any caller not
guarded by ``HAVE_TE`` (Megatron-Core's own test fixtures, for one) fails.  Where TE is not
installed no minimum version of it is met: the answer is False.
"""

from __future__ import annotations


def is_te_min_version_wrapper(original):
    def is_te_min_version(version, check_equality=True):
        from megatron.core import utils

        if utils.get_te_version() is None:
            return False
        return original(version, check_equality)

    is_te_min_version.__wrapped__ = original
    return is_te_min_version
