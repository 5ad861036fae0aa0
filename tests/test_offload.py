"""Offload to the host (recipes.train.offload): megatron-core's fine-grained activation offloading
and HybridDeviceOptimizer under Megatron-LM's flags and MindSpeed's --swap-attention /
--swap-optimizer, on the emulated NPU device, whose allocator counts what lives on the device.

Reference: the same run without offload on the same device.  Losses and gradient norms are
compared bit for bit: offload copies tensors to the host and back, and the host optimizer
(torch's AdamW on fp32 master weights) computes what the device's fused AdamW computes, so
any difference is a bug.  The device's peak (``torch.npu.max_memory_allocated``, the emulated
allocator: the bytes of live npu storages) must fall by at least what the arithmetic frees.
"""

import argparse
import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from recipes.errors import BadInput
from recipes.train import offload
from tests.conftest import emulated_npu_env
from tests.helpers.launch import run_torchrun


def _resolve(*argv, backend="npu", distopt=True, half=True):
    p = argparse.ArgumentParser()
    offload.add_flags(p)
    return offload.resolve(p.parse_args([str(a) for a in argv]), backend, distopt, half)


def test_flags_resolve_to_megatron_cores_fields():
    o = _resolve("--swap-attention", "--swap-optimizer")
    assert o.transformer_config() == {"fine_grained_activation_offloading": True,
                                      "offload_modules": ["core_attn", "attn_proj"],
                                      "min_offloaded_tensor_size": 1024 * 1024}
    assert o.optimizer_config() == {"optimizer_cpu_offload": True, "optimizer_offload_fraction": 1.0,
                                    "overlap_cpu_optimizer_d2h_h2d": False, "use_precision_aware_optimizer": True}
    o = _resolve("--fine-grained-activation-offloading", "--offload-modules", "mlp_norm", "attn_norm",
                 "--min-offloaded-tensor-size", 0, "--optimizer-cpu-offload", "--use-precision-aware-optimizer",
                 "--optimizer-offload-fraction", 0.5)
    assert o.modules == ("attn_norm", "mlp_norm") and o.min_tensor_size == 0 and o.fraction == 0.5
    assert o.argv() == ["--fine-grained-activation-offloading", "--offload-modules", "attn_norm", "mlp_norm",
                        "--min-offloaded-tensor-size", 0, "--optimizer-cpu-offload", "--optimizer-offload-fraction",
                        0.5, "--use-precision-aware-optimizer"]
    assert not _resolve().any


@pytest.mark.parametrize("argv, kw, says", [
    (["--swap-attention"], {"backend": "cpu"}, "on the CPU backend the device is the host"),
    (["--swap-optimizer"], {"backend": "cpu"}, "on the CPU backend the device is the host"),
    (["--offload-modules", "core_attn"], {}, "needs --fine-grained-activation-offloading"),
    (["--fine-grained-activation-offloading"], {}, "needs --offload-modules"),
    (["--fine-grained-activation-offloading", "--offload-modules", "expert_fc1"], {}, "a dense LLaMA-2 layer has"),
    (["--fine-grained-activation-offloading", "--offload-modules", "attn_proj"], {}, "needs core_attn too"),
    (["--min-offloaded-tensor-size", 0], {}, "applies to --fine-grained-activation-offloading"),
    (["--optimizer-cpu-offload"], {}, "needs --use-precision-aware-optimizer"),
    (["--use-precision-aware-optimizer"], {}, "needs Transformer Engine's FusedAdam"),
    (["--swap-optimizer", "--exp-avg-dtype", "bf16"], {}, "--exp-avg-dtype bf16: the host optimizer"),
    (["--swap-optimizer"], {"distopt": False}, "needs --use-distributed-optimizer"),
    (["--swap-optimizer"], {"half": False}, "add --bf16"),
    (["--swap-optimizer", "--optimizer-offload-fraction", 0.5], {}, "--swap-optimizer offloads the whole"),
    (["--optimizer-offload-fraction", 0.5], {}, "apply to --optimizer-cpu-offload only"),
    (["--optimizer-cpu-offload", "--use-precision-aware-optimizer", "--optimizer-offload-fraction", 0], {},
     "give a share in (0, 1]"),
])
def test_a_flag_that_cannot_work_or_would_be_ignored_is_refused(argv, kw, says):
    with pytest.raises(BadInput, match=None) as e:
        _resolve(*argv, **kw)
    assert says in str(e.value), str(e.value)


# reduced shape, LLaMA-2-7B's FFN ratio (688 / 256 = 11008 / 4096); 512 tokens so activations count
SHAPE = ["--num-layers", 4, "--hidden-size", 256, "--ffn-hidden-size", 688, "--num-attention-heads", 4,
         "--max-position-embeddings", 512, "--seq-length", 512, "--micro-batch-size", 2, "--global-batch-size", 4,
         "--train-iters", 3, "--log-interval", 1, "--hidden-dropout", 0.1]
MiB = 2 ** 20


def _run(data, save, *flags):
    prefix, tok = data
    run_torchrun("recipes.pretrain", "--model", "llama2-tiny", "--data-path", prefix, "--tokenizer-name-or-path", tok,
                 "--save", save, *SHAPE, *flags, nproc=1, env=emulated_npu_env())  # later flags win
    rows = [json.loads(line) for line in open(save / "metrics.jsonl")]
    return [(r["loss"], r["grad_norm"]) for r in rows], max(r["max_memory_allocated_gib"] for r in rows) * 2 ** 30


def _runs(data, tmp_path, **flag_sets):
    """Each named run, two at a time (one process each, on the 2 cores; each counts its own device)."""
    with ThreadPoolExecutor(2) as pool:
        futures = {name: pool.submit(_run, data, tmp_path / name, *flags) for name, flags in flag_sets.items()}
        return {name: f.result() for name, f in futures.items()}


@pytest.mark.slow
def test_activation_offload_keeps_the_losses_and_frees_device_memory(alpaca_pretrain_data, tmp_path):
    """fp32, dropout 0.1.  Every saved tensor offloaded (--min-offloaded-tensor-size 0: the
    default 1M elements keeps this shape's tensors on the device).  --swap-attention offloads a
    layer's QKV output (V is a view of it: 1 + 2kv units of s*b*h), Q and K after RoPE (1 + kv),
    the flash output (1) and its two [B, N, S, 8] fp32 statistics (16N/H units): 6.25 units, 1 MiB
    each here.  The peak is in the last layer's backward: that layer's group was never offloaded
    (megatron keeps the group it needs next) and the layer before it is prefetched back, so
    L - 2 = 2 layers are on the host: 12.5 MiB.  The norms' inputs and the QKV GEMM's input
    (attn_norm, qkv_linear, mlp_norm) add at least 3 units a layer.  Measured: 141.1, 128.3
    (-12.75) and 119.3 (-9.0) MiB peak."""
    r = _runs(alpaca_pretrain_data, tmp_path, plain=[], attn=["--swap-attention", "--min-offloaded-tensor-size", 0],
              every=["--fine-grained-activation-offloading", "--offload-modules", *offload.MODULES,
                     "--min-offloaded-tensor-size", 0])
    (plain, plain_peak), (attn, attn_peak), (every, every_peak) = r["plain"], r["attn"], r["every"]
    assert attn == plain and every == plain
    # the memory plan's arithmetic (no offload) against the measured peak, within 10 % (149.7 vs 141.1 MiB)
    from dataclasses import replace

    from recipes.model import llama2
    from recipes.train import memory_plan

    shape = replace(llama2.shape("llama2-tiny"), num_layers=4, hidden_size=256, ffn_hidden_size=688,
                    num_attention_heads=4, num_query_groups=4, seq_length=512)
    planned = memory_plan.plan(memory_plan.Layout(shape, 512, micro_batch=2, seq_length=512, num_microbatches=2,
                                                  half=False, dropout=True)).total
    assert abs(planned - plain_peak) <= 0.10 * plain_peak, (planned / MiB, plain_peak / MiB)
    unit = 512 * 2 * 256 * 4  # s*b*h fp32 elements
    per_layer = (6 + 16 * 4 / 256) * unit  # QKV output, Q and K, flash output, statistics (N=4, H=256)
    assert abs((plain_peak - attn_peak) - 2 * per_layer) < MiB / 2, (plain_peak / MiB, attn_peak / MiB)
    assert attn_peak - every_peak >= 2 * 3 * unit, (attn_peak / MiB, every_peak / MiB)


@pytest.mark.slow
def test_optimizer_offload_keeps_the_losses_and_moves_the_states_to_the_host(alpaca_pretrain_data, tmp_path):
    """bf16 with the distributed optimizer; --swap-optimizer (MindSpeed) is megatron-core's
    HybridDeviceOptimizer with everything on the host: the fp32 master weights and Adam's two
    moments, 12 bytes a parameter, leave the device.  Measured at 512 tokens: the peak falls by
    39.2 MiB = 12 x 3,426,560 parameters."""
    flags = ["--bf16", "--use-distributed-optimizer", "--train-iters", 2]  # the states exist from the 1st step
    r = _runs(alpaca_pretrain_data, tmp_path, plain=flags, off=[*flags, "--swap-optimizer"])
    (plain, plain_peak), (off, off_peak) = r["plain"], r["off"]
    assert off == plain
    params = 4 * (256 * 768 + 256 * 256 + 3 * 688 * 256 + 2 * 256) + 2 * 512 * 256 + 256
    assert abs((plain_peak - off_peak) - 12 * params) < 0.02 * 12 * params, ((plain_peak - off_peak) / MiB,
                                                                             12 * params / MiB)


def test_offload_with_full_recomputation_is_refused():
    with pytest.raises(BadInput, match="a fully recomputed layer saves nothing inside it"):
        offload.check_with_recompute(_resolve("--swap-attention"), "full")
    offload.check_with_recompute(_resolve("--swap-attention"), "selective")
    offload.check_with_recompute(_resolve("--swap-optimizer"), "full")


def _layout_run(data, save, *flags):
    prefix, tok = data
    run_torchrun("recipes.pretrain", "--model", "llama2-tiny", "--data-path", prefix, "--tokenizer-name-or-path", tok,
                 "--train-iters", 6, "--log-interval", 3, "--seq-length", 64, "--save", save, "--hidden-dropout", 0.1,
                 "--use-distributed-optimizer", *flags, env=emulated_npu_env(EMULATED_HCCL_P2P_TIMEOUT_S="60"))
    return [(r["loss"], r["grad_norm"]) for r in map(json.loads, open(save / "metrics.jsonl"))]


OVERLAP = ["--overlap-grad-reduce", "--overlap-param-gather"]
EVERY_MODULE = ["--fine-grained-activation-offloading", "--offload-modules", *offload.MODULES,
                "--min-offloaded-tensor-size", 0]


@pytest.mark.slow
@pytest.mark.parametrize("layout, runs", [
    # fp32 at TP=2: selective recomputation with the attention swapped, both overlaps
    (["--tensor-model-parallel-size", 2],
     [["--recompute-granularity", "selective", "--recompute-modules", "core_attn", "mlp", "--swap-attention",
       "--min-offloaded-tensor-size", 0, *OVERLAP]]),
    # bf16 at PP=2 (the optimizer offload needs 16-bit weights): full block recomputation with the optimizer
    # on the host and both overlaps; selective norms and MLP with every module's activations offloaded
    (["--pipeline-model-parallel-size", 2, "--bf16"],
     [["--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", 1,
       "--swap-optimizer", *OVERLAP],
      ["--recompute-granularity", "selective", "--recompute-modules", "layernorm", "mlp", *EVERY_MODULE]]),
], ids=["tp2_fp32", "pp2_bf16"])
def test_recomputation_overlap_and_offload_repeat_the_plain_run_on_the_emulated_npu(alpaca_pretrain_data,
                                                                                       tmp_path, layout, runs):
    """Two ranks on the emulated NPU (its hccl's point-to-point rules at PP=2), dropout 0.1, the
    distributed optimizer, 6 iterations: every loss and gradient norm equals the plain run's bit
    for bit (recomputation redraws dropout from the restored device generator; offload moves
    bytes; the host AdamW computes the device's)."""
    plain = _layout_run(alpaca_pretrain_data, tmp_path / "plain", *layout)
    assert len(plain) == 6
    for i, flags in enumerate(runs):
        assert _layout_run(alpaca_pretrain_data, tmp_path / f"run{i}", *layout, *flags) == plain, flags
