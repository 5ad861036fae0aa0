"""Context-parallel attention without Transformer Engine (``ascend_patches/ops/context_parallel.py``).

Ring attention on megatron's load-balanced split, cut by stock ``get_batch_on_this_cp_rank``,
against plain causal softmax attention over the whole sequence in one process: outputs and the
gradients of q, k and v, MHA and GQA, at CP=2 and CP=4 on the torch blocks and at CP=2 through
the emulated NPU's ``npu_fusion_attention`` / ``npu_fusion_attention_grad`` (bound to the
torch-npu wheel's schemas).  Tolerance 2e-6 of the largest value, fp32: the ring sums the same
terms in another order, blocks merged by log-sum-exp (measured up to 8e-7).

What the ring does not serve is refused in one line when the layer is built or called.
Stock ``pretrain_gpt.py`` at CP=2 is in ``tests/test_megatron_lm.py``.
"""

import json
import re

import pytest
import torch

from tests.conftest import EMULATION
from tests.helpers.launch import run_torchrun

TOL = 2e-6


def _results(out: str) -> list:
    return [json.loads(m) for m in re.findall(r"RESULT (\{.*\})", out)]


@pytest.mark.slow
@pytest.mark.parametrize("backend,cp", [("cpu", 2), ("cpu", 4), ("npu", 2)])
def test_ring_attention_equals_whole_sequence_attention(backend, cp):
    env = {"ASCEND_PATCHES_BACKEND": "npu", "PYTHONPATH": f"{EMULATION}"} if backend == "npu" else None
    if env:
        from tests.helpers.launch import pythonpath

        env["PYTHONPATH"] = pythonpath() + ":" + str(EMULATION)
    results = _results(run_torchrun("context_parallel_checks.py", nproc=cp, env=env))
    assert sorted(r["rank"] for r in results) == list(range(cp))
    for r in results:
        for case in ("mha", "gqa"):
            assert max(r[case].values()) < TOL, (r["rank"], case, r[case])
        if backend == "npu":  # each rank: per case cp forward blocks, cp backward blocks
            assert r["calls"]["npu_fusion_attention"] == 2 * cp and r["calls"]["npu_fusion_attention_grad"] == 2 * cp, r
        else:
            assert "calls" not in r


def _config(**kw):
    from megatron.core.transformer.transformer_config import TransformerConfig

    base = dict(num_layers=1, hidden_size=64, num_attention_heads=4, context_parallel_size=2, attention_dropout=0.0,
                hidden_dropout=0.0)
    return TransformerConfig(**{**base, **kw})


@pytest.mark.parametrize("kw,init,says", [
    ({"attention_dropout": 0.1}, {}, "attention dropout 0.1 (set --attention-dropout 0)"),
    ({}, {"attention_dropout": 0.2}, "attention dropout 0.2"),
    ({}, {"cp_comm_type": "a2a"}, "cp_comm_type='a2a' (built: 'p2p', ring attention; use --cp-comm-type p2p)"),
])
def test_what_the_ring_does_not_serve_is_refused_when_the_layer_is_built(kw, init, says):
    import ascend_patches  # noqa: F401
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    with pytest.raises(ValueError, match=re.escape(says)):
        DotProductAttention(_config(**kw), 1, AttnMaskType.causal, "self", **init)


def test_a_document_mask_or_a_kv_cache_is_refused_under_context_parallelism(single_process_group, monkeypatch):
    """A one-process stand-in for a CP group of 2 (the checks run before any communication):
    a mask other than the causal rows of this rank, and more keys than queries, each raise."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from ascend_patches.ops import context_parallel

    monkeypatch.setattr(context_parallel, "_group", lambda module: (None, [0, 1]))
    monkeypatch.setattr(context_parallel.dist, "get_rank", lambda group=None: 0)
    layer = DotProductAttention(_config(), 1, AttnMaskType.causal, "self")
    s, b, n, d = 8, 1, 4, 16
    q = torch.randn(s, b, n, d)
    causal = context_parallel.causal_mask_for_rank(s, 2, 0).view(1, 1, s, 2 * s)
    document = causal.clone()
    document[..., 5:, :2] = True  # rows of a second document masked from the first
    with pytest.raises(ValueError, match="other than the causal one"):
        layer(q, q, q, document)
    with pytest.raises(ValueError, match=r"12 keys for 8 queries"):
        layer(q, torch.randn(12, b, n, d), torch.randn(12, b, n, d), None)
    with pytest.raises(ValueError, match="attn_mask_type=no_mask"):
        layer(q, q, q, None, attn_mask_type=AttnMaskType.no_mask)
    assert torch.equal(causal[0, 0, :4, :4], torch.ones(4, 4, dtype=torch.bool).triu(1))  # chunk 0 sees itself
    assert not causal[0, 0, 4:, :12].any() and causal[0, 0, 4:, 12:].equal(torch.ones(4, 4, dtype=torch.bool).triu(1))
