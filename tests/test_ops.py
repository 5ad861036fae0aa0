"""Each fused op against a plain reference, forward and backward, on the CPU/CUDA path and
on the emulated NPU path.

Tolerances: fp32 results agree to ~1e-6 relative (different summation order only), so we
assert 1e-5; bf16 has an 8-bit mantissa (relative step 2^-8 = 3.9e-3), so bf16 checks
assert 2e-2 on values of order 1.
"""

import pytest
import torch

from ascend_patches.ops import flash_attention as fa
from ascend_patches.ops import rms_norm as rn
from ascend_patches.ops import rope as rp
from ascend_patches.ops import swiglu as sg

FP32 = dict(rtol=1e-5, atol=1e-5)


def _grads(fn, *inputs):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    g = torch.randn_like(out, generator=torch.Generator().manual_seed(7)) if out.dtype == torch.float32 \
        else torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out.dtype)
    out.backward(g)
    return out.detach(), [t.grad for t in inputs]


def _check(fn, ref, *inputs, tol=FP32):
    out, grads = _grads(fn, *inputs)
    out_r, grads_r = _grads(ref, *inputs)
    torch.testing.assert_close(out, out_r, **tol)
    for g, gr in zip(grads, grads_r):
        torch.testing.assert_close(g, gr, **tol)


def _qkv(sq=24, b=2, n=8, ng=4, d=16, sk=None, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    sk = sk or sq
    return (torch.randn(sq, b, n, d, generator=g).to(dtype), torch.randn(sk, b, ng, d, generator=g).to(dtype),
            torch.randn(sk, b, ng, d, generator=g).to(dtype))


@pytest.fixture(params=["torch", "npu"])
def path(request):
    if request.param == "npu":
        yield request.getfixturevalue("npu_emulated")
    else:
        yield None


@pytest.mark.parametrize("ng", [8, 4, 1], ids=["mha", "gqa", "mqa"])
def test_attention_causal(path, ng):
    q, k, v = _qkv(ng=ng)
    scale = 16 ** -0.5
    _check(lambda q, k, v: fa.attention(q, k, v, True, None, scale),
           lambda q, k, v: fa.attention_reference(q, k, v, True, None, scale), q, k, v)
    if path is not None:
        assert path.calls["npu_fusion_attention"] >= 1


def test_attention_padding_mask(path):
    q, k, v = _qkv()
    mask = torch.zeros(2, 1, 1, 24, dtype=torch.bool)
    mask[0, ..., 20:] = True  # padding at the end of sample 0; True = masked out
    causal = torch.ones(24, 24, dtype=torch.bool).triu(1).view(1, 1, 24, 24)
    full = mask | causal
    _check(lambda q, k, v: fa.attention(q, k, v, False, full, 0.25),
           lambda q, k, v: fa.attention_reference(q, k, v, False, full, 0.25), q, k, v)
    _check(lambda q, k, v: fa.attention(q, k, v, False, mask, 0.25),
           lambda q, k, v: fa.attention_reference(q, k, v, False, mask, 0.25), q, k, v)


def test_attention_bf16(path):
    q, k, v = _qkv(dtype=torch.bfloat16)
    _check(lambda q, k, v: fa.attention(q, k, v, True, None, 0.25),
           lambda q, k, v: fa.attention_reference(q, k, v, True, None, 0.25), q, k, v,
           tol=dict(rtol=2e-2, atol=2e-2))


def test_rms_norm(path):
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(6, 3, 64, generator=g), torch.rand(64, generator=g) + 0.5
    _check(lambda x, w: rn.rms_norm(x, w, 1e-5), lambda x, w: rn.rms_norm_reference(x, w, 1e-5), x, w)
    _check(lambda x, w: rn.rms_norm(x, w, 1e-5), lambda x, w: rn.rms_norm_reference(x, w, 1e-5),
           x.bfloat16(), w.bfloat16(), tol=dict(rtol=2e-2, atol=2e-2))
    if path is not None:
        assert path.calls["npu_rms_norm"] >= 1


def test_swiglu(path):
    x = torch.randn(5, 2, 2 * 48, generator=torch.Generator().manual_seed(2))
    _check(sg.swiglu, sg.swiglu_reference, x)
    _check(sg.swiglu, sg.swiglu_reference, x.bfloat16(), tol=dict(rtol=2e-2, atol=2e-2))
    if path is not None:
        assert path.calls["npu_swiglu"] >= 1


@pytest.mark.parametrize("rot", [16, 8], ids=["full", "partial"])
def test_rope(path, rot):
    s, d = 12, 16
    x = torch.randn(s, 2, 4, d, generator=torch.Generator().manual_seed(3))
    inv = 1.0 / (10000 ** (torch.arange(0, rot, 2).float() / rot))
    f = torch.outer(torch.arange(s).float(), inv)
    freqs = torch.cat((f, f), dim=-1)[:, None, None, :]
    _check(lambda x: rp.apply_rope(x, freqs), lambda x: rp.rope_reference(x, freqs), x)
    if path is not None:
        assert path.calls["npu_rotary_mul"] >= 1


def test_rope_cache_follows_in_place_change():
    freqs = torch.rand(4, 1, 1, 8)
    x = torch.randn(4, 1, 2, 8)
    a = rp.apply_rope(x, freqs)
    freqs.mul_(2)  # same tensor object, new values: the cos/sin cache must notice
    torch.testing.assert_close(rp.apply_rope(x, freqs), rp.rope_reference(x, freqs), **FP32)
    assert not torch.allclose(a, rp.apply_rope(x, freqs))


def test_emulation_is_strict(npu_emulated):
    t = npu_emulated
    q = torch.randn(8, 2, 64)
    with pytest.raises(RuntimeError, match="atten_mask shape"):
        t.npu_fusion_attention(q, q, q, 4, "SBH", atten_mask=torch.zeros(2, 1, 1, 8, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="not divisible by 5 heads"):
        t.npu_fusion_attention(q, q, q, 5, "SBH")
    with pytest.raises(RuntimeError, match="must be bool/uint8"):
        t.npu_fusion_attention(q, q, q, 4, "SBH", atten_mask=torch.zeros(8, 8))
    with pytest.raises(RuntimeError, match="compressed"):
        t.npu_fusion_attention(q, q, q, 4, "SBH", atten_mask=torch.ones(8, 8, dtype=torch.bool).triu(1),
                               sparse_mode=2)
    with pytest.raises(RuntimeError, match="gamma shape"):
        t.npu_rms_norm(torch.randn(2, 8), torch.ones(4))
    with pytest.raises(RuntimeError, match="odd"):
        t.npu_swiglu(torch.randn(2, 7))
    with pytest.raises(RuntimeError, match="4-D"):
        t.npu_rotary_mul(torch.randn(2, 8), torch.randn(2, 8), torch.randn(2, 8))
    out = t.npu_fusion_attention(q, q, q, 4, "SBH")
    assert len(out) == 7 and out[0].shape == q.shape and out[1].shape == (2, 4, 8, 8)
    y, rstd = t.npu_rms_norm(torch.randn(3, 5, 8), torch.ones(8))
    assert rstd.shape == (3, 5, 1) and rstd.dtype == torch.float32


def test_multi_tensor_norm_and_scale_match_megatrons_loops():
    import ascend_patches
    from ascend_patches.ops import multi_tensor as mt
    from megatron.core import utils as mutils

    g = torch.Generator().manual_seed(5)
    ts = [torch.randn(n, generator=g) for n in (7, 300, 4096)]
    stock_norm = ascend_patches.REGISTRY.original("multi_tensor_l2norm")
    ours, _ = mt.multi_tensor_l2_norm(0, None, [ts], False)
    ref, _ = stock_norm(0, None, [ts], False)
    torch.testing.assert_close(ours.float(), ref.float(), rtol=1e-6, atol=0)
    stock_scale = ascend_patches.REGISTRY.original("multi_tensor_scale")
    a, b = [t.clone() for t in ts], [t.clone() for t in ts]
    mutils.local_multi_tensor_scale(0, None, [a, a], 0.37)  # the patched name, in place
    stock_scale(0, None, [b, b], 0.37)
    assert all(torch.equal(x, y) for x, y in zip(a, b))  # bitwise: same rounding
    dst16, ref16 = [torch.empty(t.shape, dtype=torch.bfloat16) for t in ts], [torch.empty(t.shape, dtype=torch.bfloat16) for t in ts]
    mutils.local_multi_tensor_scale(0, None, [ts, dst16], 0.37)  # fp32 -> bf16 keeps stock's rounding
    stock_scale(0, None, [ts, ref16], 0.37)
    assert all(torch.equal(x, y) for x, y in zip(dst16, ref16))
    mutils.local_multi_tensor_scale(0, None, [ts, dst16], 1.0)  # master -> model weight copy
    stock_scale(0, None, [ts, ref16], 1.0)
    assert all(torch.equal(x, y) for x, y in zip(dst16, ref16))


def test_no_grad_linear_fast_path_equals_stock(single_process_group, monkeypatch):
    """Under no_grad, ColumnParallel/RowParallelLinear skip megatron's autograd Functions;
    the result is the same matmul, bit for bit, and with grad the stock Function still runs."""
    import ascend_patches
    from megatron.core.tensor_parallel import layers
    from recipes import llama2

    cfg = llama2.transformer_config(llama2.shape("llama2-tiny"))
    col = layers.ColumnParallelLinear(64, 96, config=cfg, init_method=torch.nn.init.normal_, bias=False,
                                      gather_output=False)
    row = layers.RowParallelLinear(96, 64, config=cfg, init_method=torch.nn.init.normal_, bias=False,
                                   input_is_parallel=True, skip_bias_add=True)
    x = torch.randn(7, 2, 64)
    calls = []
    original = layers.LinearWithGradAccumulationAndAsyncCommunication.apply
    monkeypatch.setattr(layers.LinearWithGradAccumulationAndAsyncCommunication, "apply",
                        lambda *a: calls.append(1) or original(*a))
    with torch.no_grad():
        fast = row(col(x)[0])[0]
    assert calls == []
    with ascend_patches.disabled("inference.linear", "inference.copy_to_tensor_model_parallel_region",
                                 "inference.reduce_from_tensor_model_parallel_region"), torch.no_grad():
        stock = row(col(x)[0])[0]
    assert len(calls) == 2
    assert torch.equal(fast, stock)
    y = row(col(x.requires_grad_())[0])[0]
    assert len(calls) == 4 and y.requires_grad
