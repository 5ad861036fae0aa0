"""The CPU's packed GEMMs for decode-sized products (ascend_patches/ops/packed_linear.py), through
the no_grad linear patch of megatron's ColumnParallel/RowParallelLinear.

Reference: ``F.linear`` on the same weights (MKL's plain sgemm).  Tolerance: float32, a packed
GEMM sums in another order; 1e-5 relative to the output's scale (products of 64 to 96 terms of
unit size, each rounding at 6e-8)."""

import pytest
import torch
import torch.nn.functional as F

from ascend_patches.ops import packed_linear

pytestmark = pytest.mark.skipif(bool(packed_linear.unavailable()), reason=packed_linear.unavailable() or "-")


def _layers():
    from megatron.core.tensor_parallel import layers

    from recipes.model import llama2

    cfg = llama2.transformer_config(llama2.shape("llama2-tiny"))
    col = layers.ColumnParallelLinear(64, 96, config=cfg, init_method=torch.nn.init.normal_, bias=False,
                                      gather_output=False)
    row = layers.RowParallelLinear(96, 64, config=cfg, init_method=torch.nn.init.normal_, bias=False,
                                   input_is_parallel=True, skip_bias_add=True)
    return torch.nn.ModuleList([col, row]), col, row


def _close(a, b):
    return torch.allclose(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))


def test_packed_products_equal_plain_ones_at_every_row_count(single_process_group, monkeypatch):
    model, col, row = _layers()
    assert packed_linear.pack(model, 1 << 40, torch.get_num_threads()) > 0
    taken = []
    product = packed_linear._packed_product
    monkeypatch.setattr(packed_linear, "_packed_product", lambda *a: taken.append(a[0].shape[0]) or product(*a))
    try:
        for rows in range(1, 21):
            x = torch.randn(rows, 1, 64)  # megatron's [tokens, batch, hidden]
            with torch.no_grad():
                hidden = col(x)[0]
                out = row(hidden)[0]
            assert hidden.shape == (rows, 1, 96) and out.shape == (rows, 1, 64)
            assert _close(hidden, F.linear(x, col.weight)), rows
            assert _close(out, F.linear(F.linear(x, col.weight), row.weight)), rows
            # 4 to 16 rows go through the pack (padded to 16), the rest through F.linear
            assert taken == ([16, 16] if packed_linear.MIN_ROWS <= rows <= packed_linear.PACK_ROWS else []), rows
            taken.clear()
        with torch.enable_grad():  # with grad, megatron's own path: no pack
            col(torch.randn(8, 1, 64, requires_grad=True))
        assert taken == []
    finally:
        packed_linear.forget(model)
    with torch.no_grad():
        col(torch.randn(8, 1, 64))
    assert taken == []  # forgotten: F.linear again


def test_packs_are_made_on_the_engines_thread_count_and_none_past_the_budget(single_process_group, monkeypatch):
    """A pack keeps the thread count it was made with, so ``pack`` makes them in a thread of its
    own on the count it is given, whatever the caller's; and packs that would pass the budget
    are not kept."""
    model, col, row = _layers()
    seen = []
    reorder = torch.ops.mkl._mkl_reorder_linear_weight

    class Ops:  # torch.ops.mkl, recording the thread count each pack is made on
        _mkl_reorder_linear_weight = staticmethod(lambda w, n: seen.append(torch.get_num_threads()) or reorder(w, n))
        _mkl_linear = torch.ops.mkl._mkl_linear

    monkeypatch.setattr(packed_linear.torch.ops, "mkl", Ops)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert packed_linear.pack(model, 1 << 40, 2) > 0
        assert seen == [2, 2] and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
        packed_linear.forget(model)
    assert packed_linear.pack(model, 1, 1) == -1
    assert not any(w in packed_linear._packs for w in (col.weight, row.weight))
