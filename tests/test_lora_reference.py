"""LoRA's math against a plain-torch reference written from the LoRA paper (Hu et al., 2021:
h = W x + (alpha / r) B A x), not from recipes.model.lora: on megatron's column- and
row-parallel linears (TP=1), the forward and the gradients of A and B (and none for the
frozen W).  That the merged checkpoint (converters.merge_lora) gives the adapter's logits is
tests/test_lora.py's end-to-end check.

Tolerance 1e-12 relative in float64: the reference and the module do the same products in
the same order, so only a wrong formula (a missing scale, A and B swapped, a transposed B, a
gradient reaching W) would move them."""

import pytest
import torch

from recipes.model import lora


def _linear(kind, n_in, n_out):
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    cfg = ModelParallelConfig(tensor_model_parallel_size=1, use_cpu_initialization=True, params_dtype=torch.float64)
    init = torch.nn.init.normal_
    if kind == "column":
        return ColumnParallelLinear(n_in, n_out, config=cfg, init_method=init, bias=False, gather_output=False)
    return RowParallelLinear(n_in, n_out, config=cfg, init_method=init, bias=False, input_is_parallel=True,
                             skip_bias_add=True)


@pytest.mark.usefixtures("single_process_group")
@pytest.mark.parametrize("kind", ["column", "row"])
def test_lora_forward_gradients_and_merge_equal_the_papers_formula(kind):
    torch.manual_seed(0)
    n_in, n_out, r, alpha = 24, 40, 4, 16.0
    module = lora.LoraParallelLinear(_linear(kind, n_in, n_out), r=r, alpha=alpha)
    with torch.no_grad():  # B starts at zero (no update at first): give it values, as after training
        module.lora_B.normal_()
    W = module.base.weight.detach().clone()
    A = module.lora_A.detach().clone().requires_grad_(True)
    B = module.lora_B.detach().clone().requires_grad_(True)
    x = torch.randn(5, 3, n_in, dtype=torch.float64)
    g = torch.randn(5, 3, n_out, dtype=torch.float64)

    out, _ = module(x)
    (out * g).sum().backward()
    ref = x @ W.T + (alpha / r) * (x @ A.T) @ B.T
    (ref * g).sum().backward()

    def rel(a, b):
        return ((a - b).abs().max() / b.abs().max()).item()

    assert rel(out.detach(), ref.detach()) < 1e-12
    assert rel(module.lora_A.grad, A.grad) < 1e-12 and rel(module.lora_B.grad, B.grad) < 1e-12
    assert module.base.weight.grad is None and not module.base.weight.requires_grad


@pytest.mark.usefixtures("single_process_group")
@pytest.mark.parametrize("kind", ["column", "row"])
def test_merge_in_place_folds_the_update_into_the_weight(kind):
    """recipes.serve's merge at load: W' = W + (alpha / r) B A, the plain layer put back.  float64;
    the merged product is summed in another order than the paper's two products, hence 1e-12."""
    torch.manual_seed(0)
    n_in, n_out, r, alpha = 24, 40, 4, 16.0
    holder = torch.nn.Module()
    holder.linear = lora.LoraParallelLinear(_linear(kind, n_in, n_out), r=r, alpha=alpha)
    with torch.no_grad():
        holder.linear.lora_B.normal_()
    W, A, B = (t.detach().clone() for t in (holder.linear.base.weight, holder.linear.lora_A, holder.linear.lora_B))
    x = torch.randn(5, 3, n_in, dtype=torch.float64)
    assert lora.merge_in_place(holder) == 1
    assert not isinstance(holder.linear, lora.LoraParallelLinear)
    out, _ = holder.linear(x)
    ref = x @ W.T + (alpha / r) * (x @ A.T) @ B.T
    assert ((out - ref).abs().max() / ref.abs().max()).item() < 1e-12
