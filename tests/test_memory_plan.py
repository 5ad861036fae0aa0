"""recipes.memory_plan: what a layout holds per device, before a run.

- Weights, gradients and optimizer states equal Megatron-LM's own ``report_theoretical_memory``
  arithmetic (core_v0.16.1's ``compute_weight_and_optimizer_memory``, called from the
  third-party checkout) within 0.1 % for the four LLaMA-2 sizes: both count 18 bytes a
  parameter (bf16 weight, fp32 gradient, fp32 master and two Adam moments), 6 + 12 / DP with the
  distributed optimizer; they differ in the RMSNorm weights, which Megatron-LM divides by TP and
  which every TP rank holds whole.
- The activations per layer are the bytes counted after a forward (the arithmetic of
  ``docs/memory.md``, checked against the count in tests/test_recompute.py), here at TP=1 for
  every recompute setting, against the same count.
- The command's last line and exit code; recipes.pretrain's refusal names the cheapest change.
"""

import argparse
import dataclasses
import sys

import pytest

from recipes.errors import BadInput
from recipes.model import llama2
from recipes.train import memory_plan
from recipes.train.recompute import Recompute
from tests.helpers.launch import ROOT


def _layout(model, tp=8, pp=1, dp=1, distopt=False, **kw):
    shape = llama2.shape(model)
    return memory_plan.Layout(shape, llama2.padded_vocab_size(shape.vocab_size, 128, tp), tp=tp, pp=pp, dp=dp,
                              distributed_optimizer=distopt, **kw)


@pytest.mark.parametrize("model, tp, pp, dp, distopt", [
    ("llama2-7b", 8, 1, 1, False), ("llama2-13b", 8, 1, 4, True), ("llama2-34b", 8, 2, 1, False),
    ("llama2-70b", 8, 4, 2, True), ("llama2-70b", 8, 8, 1, False)])
def test_weights_and_optimizer_equal_megatron_lms_report(model, tp, pp, dp, distopt):
    checkout = ROOT.parent / "shared" / "third_party" / "Megatron-LM"
    if not (checkout / "megatron" / "training" / "theoretical_memory_usage.py").is_file():
        pytest.skip("the third-party Megatron-LM checkout is not beside the repository")
    sys.path.insert(0, str(checkout))
    try:
        from megatron.training.theoretical_memory_usage import compute_weight_and_optimizer_memory
    finally:
        sys.path.remove(str(checkout))
    x = _layout(model, tp, pp, dp, distopt)
    sh = x.shape
    args = argparse.Namespace(
        kv_channels=sh.kv_channels, num_attention_heads=sh.num_attention_heads, hidden_size=sh.hidden_size,
        group_query_attention=sh.num_query_groups != sh.num_attention_heads, num_query_groups=sh.num_query_groups,
        num_experts=None, swiglu=True, ffn_hidden_size=sh.ffn_hidden_size, moe_shared_expert_intermediate_size=None,
        mtp_num_layers=None, normalization="RMSNorm", multi_latent_attention=False, padded_vocab_size=x.padded_vocab,
        untie_embeddings_and_output_weights=True, num_layers=sh.num_layers, pipeline_model_parallel_size=pp,
        tensor_model_parallel_size=tp, use_distributed_optimizer=distopt, data_parallel_size=dp)
    theirs = compute_weight_and_optimizer_memory(args)
    p = memory_plan.plan(x)
    ours = p.weights + p.gradients + p.optimizer
    print(f"{model} TP{tp} PP{pp} DP{dp}{' distopt' if distopt else ''}: ours {ours / 1e9:.3f} GB, "
          f"Megatron-LM's {theirs / 1e9:.3f} GB")
    assert abs(ours - theirs) <= 1e-3 * theirs, (ours, theirs)


@pytest.mark.parametrize("recompute", [Recompute(), Recompute("full", "uniform", 1), Recompute("selective"),
                                       Recompute("selective", modules=("mlp",)),
                                       Recompute("selective", modules=("layernorm",))],
                         ids=["none", "full_uniform", "core_attn", "mlp", "layernorm"])
def test_activations_per_layer_are_what_a_forward_keeps(single_process_group, recompute):
    from tests.test_recompute import A, B, F, G, H, S, _saved_bytes

    shape = dataclasses.replace(llama2.shape("llama2-tiny"), num_layers=2, hidden_size=H, ffn_hidden_size=F,
                                num_attention_heads=A, num_query_groups=G)
    counted = _saved_bytes(2, **recompute.config()) - _saved_bytes(1, **recompute.config())
    x = memory_plan.Layout(shape, 512, micro_batch=B, seq_length=S, half=False, recompute=recompute)
    planned = memory_plan.layer_units(shape, 1, False, recompute) * S * B * H * 4
    if recompute.granularity == "full":
        planned = S * B * H * 4  # a checkpointed layer keeps its input
    assert abs(planned - counted) <= 4, (planned, counted)  # core_attn's checkpoint keeps one int more
    assert memory_plan.plan(x).per_layer == int(memory_plan.layer_units(shape, 1, False, recompute) * S * B * H * 4)


def test_the_command_says_whether_it_fits_and_exits_accordingly(capsys):
    from recipes.train import plan_command as cli

    base = ["--model", "llama2-70b", "--tensor-model-parallel-size", 8, "--pipeline-model-parallel-size", 4,
            "--seq-length", 4096, "--micro-batch-size", 1, "--device-memory-gb", 64]
    assert cli.main([str(a) for a in base]) == 1
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("does not fit:") and "cheapest change that fits: add --recompute-granularity selective" \
        in last, last
    assert cli.main([str(a) for a in base] + ["--sequence-parallel", "--recompute-granularity", "full",
                                              "--recompute-method", "uniform", "--recompute-num-layers", "1"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("fits:")


def test_pretrain_refuses_a_layout_the_device_cannot_hold(alpaca_pretrain_data):
    from recipes.train import pretrain, run_settings

    prefix, tok = alpaca_pretrain_data
    args = pretrain.build_parser().parse_args(["--model", "llama2-tiny", "--data-path", prefix,
                                               "--tokenizer-name-or-path", tok, "--train-iters", "1"])
    s = run_settings.resolve(args, world=1)
    need = memory_plan.plan(memory_plan.Layout.of(s)).total
    memory_plan.refuse_if_it_does_not_fit(s, given_gb=need / memory_plan.USABLE / 1e9 * 1.01)
    with pytest.raises(BadInput, match=r"does not fit: .* --skip-memory-check runs it anyway"):
        memory_plan.refuse_if_it_does_not_fit(s, given_gb=need / 1e9 * 0.5)


# reduced shape with LLaMA-2-7B's FFN ratio (688 / 256 = 11008 / 4096), 512 tokens: activations dominate
REDUCED = dict(num_layers=4, hidden_size=256, ffn_hidden_size=688, num_attention_heads=4, num_query_groups=4)


@pytest.mark.slow
@pytest.mark.parametrize("flags, layout", [
    (["--tensor-model-parallel-size", 2, "--sequence-parallel"], dict(tp=2, sequence_parallel=True)),
    (["--pipeline-model-parallel-size", 2, "--global-batch-size", 8], dict(pp=2, num_microbatches=4)),
    (["--recompute-granularity", "selective", "--recompute-modules", "mlp"],
     dict(recompute=Recompute("selective", modules=("mlp",)))),
    (["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", 1],
     dict(recompute=Recompute("full", "uniform", 1))),
], ids=["tp2_sp", "pp2", "selective_mlp", "full_uniform"])
def test_the_plan_is_within_10_percent_of_the_emulated_devices_peak(alpaca_pretrain_data, tmp_path, flags, layout):
    """Each rank's peak on the emulated NPU (its allocator: the bytes of live npu storages;
    EMULATED_NPU_REPORT gives every rank's) against the plan of that rank's pipeline stage, fp32,
    dropout 0.1, 3 iterations.  The emulated kernels save what torch_npu's do and tile attention
    over query rows as flash attention does.  Measured (plan): TP=2+SP 73.7 MiB (76.4), PP=2
    first stage 117.2 (116.5) and last 82.0 (82.4), selective MLP 118.9 (125.5), full uniform
    94.6 (91.9); TP=1 plain, in tests/test_offload.py, 141.1 (149.7).  The plan counts the CPU
    backend's RMSNorm, 1 unit a norm more than the NPU's keeps."""
    import json

    from tests.conftest import emulated_npu_env
    from tests.helpers.launch import run_torchrun

    prefix, tok = alpaca_pretrain_data
    report = tmp_path / "report.jsonl"
    nproc = 2 if "tp" in layout or "pp" in layout else 1
    argv = ["--model", "llama2-tiny", "--data-path", prefix, "--tokenizer-name-or-path", tok, "--save", tmp_path,
            *[a for k, v in REDUCED.items() for a in (f"--{k.replace('_', '-')}", v)],
            "--max-position-embeddings", 512, "--seq-length", 512, "--micro-batch-size", 2, "--global-batch-size", 4,
            "--train-iters", 3, "--hidden-dropout", 0.1, *flags]
    run_torchrun("recipes.pretrain", *argv, nproc=nproc, env=emulated_npu_env(EMULATED_NPU_REPORT=str(report)))
    peaks = {}
    for line in open(report):  # one line per process that imported the emulation; the ranks' hold the device
        r = json.loads(line)
        peaks[r["rank"]] = max(peaks.get(r["rank"], 0), r["peak_bytes"])
    shape = dataclasses.replace(llama2.shape("llama2-tiny"), **REDUCED, seq_length=512)
    planned = memory_plan.stages(memory_plan.Layout(shape, 512, **{
        "micro_batch": 2, "seq_length": 512, "num_microbatches": 2, "half": False, "dropout": True, **layout}))
    # the rank of each planned stage: PP=2 puts the first stage on rank 0 and the last on rank 1; TP ranks are alike
    for rank, p in (enumerate(planned) if len(planned) > 1 else [(0, planned[0])]):
        assert abs(p.total - peaks[rank]) <= 0.10 * peaks[rank], (p.stage, p.total / 2 ** 20, peaks[rank] / 2 ** 20)
