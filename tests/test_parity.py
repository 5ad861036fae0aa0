"""Patched vs stock megatron (device layer only) on the tiny LLaMA-2 (GQA 8/4): forward
logits, loss and every parameter gradient, then 30 training steps with Megatron's own
optimizer; on the CPU path and on the emulated NPU path.

Tolerances, fp32: the fused kernels change only the order of floating-point sums
(flash attention's online softmax, one-pass SwiGLU), measured at ~1e-7 relative; we
assert 1e-5 relative on logits/loss/gradients, and a 1e-5 max relative loss
difference over 30 steps.  bf16: every op rounds to 8 mantissa bits (2^-8 = 0.4 %), and
the two paths round at different places (SDPA keeps probabilities in fp32, stock casts
them to bf16 before P@V), so we assert 2e-2 relative on logits/gradients and 1e-2 on the
30-step losses; measured values are printed by `pytest -s`.
"""

import itertools

import pytest
import torch

from recipes.model import llama2
from recipes.train import training
from tests.helpers.parity import batch, forward_backward, ops_disabled, rel_err, tiny_shape


def _init_state(shape, seed=0):
    with ops_disabled():
        torch.manual_seed(seed)
        model = llama2.build_model(shape)
    return {k: v.clone() for k, v in model.state_dict().items() if v is not None}


def _model(shape, state, **overrides):
    m = llama2.build_model(shape, **overrides)
    missing, unexpected = m.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
    return training.wrap_float16(m)  # with bf16: what Megatron-LM does for --bf16, every weight in bf16


def _final_norm(m):
    return (m.module if hasattr(m, "module") else m).decoder.final_layernorm


def _compare_step(shape, data, tol, bf16=False):
    state = _init_state(shape)
    over = dict(bf16=True, params_dtype=torch.bfloat16) if bf16 else {}
    with ops_disabled():
        stock = _model(shape, state, **over)
        assert type(_final_norm(stock)).__module__.startswith("torch.nn")
        ref = forward_backward(stock, data)
    fused = _model(shape, state, **over)
    assert type(_final_norm(fused)).__name__ == "FusedRMSNorm"
    out = forward_backward(fused, data)
    errs = {"logits": rel_err(out[0], ref[0]), "loss": rel_err(out[1], ref[1])}
    grad_errs = {k: rel_err(out[2][k], ref[2][k]) for k in ref[2]}
    assert set(out[2]) == set(ref[2]) and len(ref[2]) > 0
    print(f"\nparity {'bf16' if bf16 else 'fp32'}: {errs}, max grad rel err {max(grad_errs.values()):.2e}")
    assert errs["logits"] < tol and errs["loss"] < tol, errs
    assert max(grad_errs.values()) < tol, sorted(grad_errs.items(), key=lambda kv: -kv[1])[:3]


@pytest.mark.usefixtures("single_process_group")
def test_forward_backward_parity_cpu():
    _compare_step(tiny_shape(), batch(), tol=1e-5)


@pytest.mark.usefixtures("single_process_group")
def test_forward_backward_parity_cpu_bf16():
    _compare_step(tiny_shape(), batch(), tol=2e-2, bf16=True)


def test_forward_backward_parity_npu_emulated(npu_emulated):
    _compare_step(tiny_shape(), batch(), tol=1e-5)
    # every training kernel ran (the paged inference attention is the dynamic engine's); the attention's
    # backward is npu_fusion_attention_grad, as the wheel's autograd
    assert all(n for op, n in npu_emulated.calls.items() if op != "npu_fused_infer_attention_score"), \
        npu_emulated.calls
    assert npu_emulated.calls["npu_fusion_attention_grad"] == npu_emulated.calls["npu_fusion_attention"]


def _train(shape, state, steps=30, bf16=False, seq=32, mbs=2, nmb=2):
    over = dict(bf16=True, params_dtype=torch.bfloat16) if bf16 else {}
    model = training.wrap_ddp(_model(shape, state, **over))
    opt = training.build_optimizer([model], lr=3e-3, bf16=bf16)
    data = (batch(seed=i % 4, b=mbs, s=seq) for i in itertools.count())  # 4 batches, learnable
    losses = []
    for _ in range(steps):
        loss, _ = training.train_step([model], opt, data, nmb, seq, mbs)
        losses.append(loss)
    return losses, opt


def _compare_training(shape, tol, bf16=False):
    state = _init_state(shape)
    with ops_disabled():
        stock, stock_opt = _train(shape, state, bf16=bf16)
    fused, fused_opt = _train(shape, state, bf16=bf16)
    inner = fused_opt.optimizer if hasattr(fused_opt, "optimizer") else fused_opt
    assert getattr(inner, "defaults", {}).get("fused")
    rel = [abs(a - b) / abs(b) for a, b in zip(fused, stock)]
    print(f"\ntraining {'bf16' if bf16 else 'fp32'}: loss {stock[0]:.4f} -> {stock[-1]:.4f}, "
          f"max rel diff {max(rel):.2e}")
    assert stock[-1] < stock[0] - 0.5, "the tiny model must learn in 30 steps"
    assert max(rel) <= tol, rel


@pytest.mark.usefixtures("single_process_group")
def test_training_parity_fp32():
    _compare_training(tiny_shape(), tol=1e-5)


@pytest.mark.usefixtures("single_process_group")
def test_training_parity_bf16():
    _compare_training(tiny_shape(), tol=1e-2, bf16=True)


def test_training_parity_npu_emulated(npu_emulated):
    _compare_training(tiny_shape(), tol=1e-5)


@pytest.mark.parametrize("fusion", [False, True], ids=["unfused_glu", "bias_activation_fusion"])
def test_swiglu_patch_covers_both_mlp_paths(npu_emulated, fusion):
    """With bias_activation_fusion on, stock megatron would call its jit-compiled
    bias_swiglu_impl; the patched MLP calls the NPU kernel either way, and the result equals
    stock's unfused path."""
    shape = tiny_shape()
    state = _init_state(shape)
    with ops_disabled():
        ref = forward_backward(_model(shape, state), batch())
    npu_emulated.calls["npu_swiglu"] = 0
    out = forward_backward(_model(shape, state, bias_activation_fusion=fusion), batch())
    assert npu_emulated.calls["npu_swiglu"] == shape.num_layers  # one fused call per layer
    assert rel_err(out[0], ref[0]) < 1e-5
