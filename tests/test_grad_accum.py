"""Gradient accumulation fusion on the CPU against megatron's own unfused path: the same
model and micro-batches, once with ``gradient_accumulation_fusion`` (our CPU wgrad kernel
and the embedding's index-add into main_grad) and once stock; main_grad must agree."""

import pytest
import torch

from recipes.model import llama2
from recipes.train import training

SHAPE = llama2.LlamaShape(2, 64, 176, 4, 2, vocab_size=256, seq_length=32)


def _grads(fusion: bool, bf16: bool, batches):
    from megatron.core.pipeline_parallel import get_forward_backward_func
    torch.manual_seed(0)
    dtype = torch.bfloat16 if bf16 else torch.float32
    model = llama2.build_model(SHAPE, gradient_accumulation_fusion=fusion, bf16=bf16, params_dtype=dtype,
                               pipeline_dtype=dtype)
    model = training.wrap_ddp(training.wrap_float16(model))
    model.zero_grad_buffer()
    get_forward_backward_func()(forward_step_func=training.make_forward_step(), data_iterator=iter(batches),
                                model=model, num_microbatches=len(batches), seq_length=32, micro_batch_size=2)
    return {n: (p.main_grad.clone(), p.grad_added_to_main_grad) for n, p in model.named_parameters()}


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_fused_main_grad_equals_stock(single_process_group, bf16):
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(3):  # three micro-batches: the fused path accumulates, not only writes
        t = torch.randint(0, 256, (2, 33), generator=g)
        batches.append({"tokens": t[:, :-1], "labels": t[:, 1:]})
    stock, fused = _grads(False, bf16, batches), _grads(True, bf16, batches)
    assert stock.keys() == fused.keys()
    embedding = "module.module.embedding.word_embeddings.weight" if bf16 else "module.embedding.word_embeddings.weight"
    assert embedding in fused
    for name, (ref, ref_flag) in stock.items():
        got, flag = fused[name]
        is_matrix = ref.dim() == 2
        assert flag == is_matrix, f"{name}: fused into main_grad should be {is_matrix}, was {flag}"
        assert not ref_flag
        err = (got - ref).abs().max().item() / ref.abs().max().item()
        if bf16 and name == embedding:
            # stock sums the rows' bf16 gradients in bf16 before adding them to main_grad;
            # the fused path sums them in fp32: bf16's 8-bit mantissa, a few roundings
            assert err < 2e-2, f"{name}: relative error {err:.2e}"
        elif bf16:
            # the same bf16 product added to the same fp32 buffer: bit-identical
            assert err == 0, f"{name}: relative error {err:.2e}"
        else:
            # fp32: addmm's beta=1 accumulate rounds in another order than mm-then-add
            assert err < 1e-6, f"{name}: relative error {err:.2e}"


def test_missing_main_grad_is_a_clear_error():
    from ascend_patches.ops.grad_accum import CpuWgradAccum

    with pytest.raises(RuntimeError, match="main_grad"):
        CpuWgradAccum.wgrad_gemm_accum_fp32(torch.ones(2, 3), torch.ones(2, 4), None)
