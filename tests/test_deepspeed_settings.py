"""--deepspeed settings, without running DeepSpeed: a flag that contradicts the config file is
an error naming both, the file fills what the flags leave open, ZeRO 2/3 with DeepSpeed's
pipeline is refused, the mpu adapter answers from megatron-core's groups, and an emulated
NPU in saturation mode refuses fp16 loss scaling."""

import json
import sys

import pytest

from recipes.train import pretrain, run_settings
from recipes.errors import BadInput


def _resolve(tmp_path, cfg, *flags, world=2):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(cfg))
    args = pretrain.build_parser().parse_args(["--model", "llama2-tiny", "--data-path", "x", "--train-iters", "3",
                                               "--deepspeed", "--deepspeed_config", str(path), *map(str, flags)])
    return run_settings.resolve(args, world=world)


def test_config_fills_and_flags_must_agree(tmp_path):
    cfg = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3}, "bf16": {"enabled": True},
           "gradient_clipping": 0.5}
    s = _resolve(tmp_path, cfg)
    assert (s.engine, s.batches.micro, s.deepspeed.zero_stage, s.bf16, s.optim.clip_grad) == ("deepspeed", 2, 3, True, 0.5)
    with pytest.raises(BadInput, match=r"--micro-batch-size 4 contradicts train_micro_batch_size_per_gpu = 2 in .*ds\.json"):
        _resolve(tmp_path, cfg, "--micro-batch-size", 4)
    with pytest.raises(BadInput, match=r"--zero-stage 2 contradicts zero_optimization\.stage = 3"):
        _resolve(tmp_path, cfg, "--zero-stage", 2)
    from recipes.train.deepspeed_engine import ds_config

    final = ds_config(s)
    assert final["train_batch_size"] == 8 and final["gradient_accumulation_steps"] == 2  # tiny: global batch 8, DP 2
    assert final["optimizer"]["params"]["torch_adam"] is True  # the CPU: torch's AdamW, no JIT-built FusedAdam
    assert final["optimizer"]["params"]["fused"] is True  # its one-kernel CPU form


def test_config_optimizer_params_reach_deepspeed_or_a_contradicting_flag_is_refused(tmp_path):
    """The file's betas, eps and weight decay are the run's (they reached DeepSpeed as the flags'
    defaults before); a flag that contradicts one names both; without file or flag, the
    defaults."""
    from recipes.train.deepspeed_engine import ds_config

    cfg = {"optimizer": {"type": "AdamW", "params": {"betas": [0.8, 0.9], "eps": 1e-6, "weight_decay": 0.0}}}
    s = _resolve(tmp_path, cfg)
    assert (s.optim.betas, s.optim.eps, s.optim.weight_decay) == ((0.8, 0.9), 1e-6, 0.0)
    params = ds_config(s)["optimizer"]["params"]
    assert (params["betas"], params["eps"], params["weight_decay"]) == ([0.8, 0.9], 1e-6, 0.0)
    for flag, value, name in (("--adam-beta2", 0.95, r"optimizer\.params\.betas\[1\] = 0\.9"),
                              ("--weight-decay", 0.1, r"optimizer\.params\.weight_decay = 0\.0"),
                              ("--adam-eps", 1e-8, r"optimizer\.params\.eps = 1e-06")):
        with pytest.raises(BadInput, match=rf"--{flag[2:]} {value} contradicts {name} in .*ds\.json"):
            _resolve(tmp_path, cfg, flag, value)
    plain = _resolve(tmp_path, {})
    assert (plain.optim.betas, plain.optim.eps, plain.optim.weight_decay) == ((0.9, 0.95), 1e-8, 0.1)


def test_scheduler_block_and_flags_the_engine_ignores_are_refused(tmp_path):
    with pytest.raises(BadInput, match=r"a scheduler block \(WarmupLR\) would step the learning rate beside"):
        _resolve(tmp_path, {"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 10}}})
    with pytest.raises(BadInput, match=r"--use-distributed-optimizer .*not honoured by the DeepSpeed engine"):
        _resolve(tmp_path, {}, "--use-distributed-optimizer")
    with pytest.raises(BadInput, match=r"--sequence-parallel .*not honoured by the DeepSpeed engine"):
        _resolve(tmp_path, {}, "--tensor-model-parallel-size", 2, "--sequence-parallel")


def test_auto_values_follow_the_model_or_the_flags(tmp_path):
    """Hugging Face-style "auto": batch sizes come from the flags (never a contradiction), the
    bucket sizes from the hidden size; an "auto" the recipe cannot fill names the key."""
    from recipes.train.deepspeed_engine import ds_config

    auto = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
            "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                                  "stage3_param_persistence_threshold": "auto"}}
    s = _resolve(tmp_path, auto, "--micro-batch-size", 2)
    h = s.shape.hidden_size
    zero = ds_config(s)["zero_optimization"]
    assert (zero["reduce_bucket_size"], zero["stage3_prefetch_bucket_size"],
            zero["stage3_param_persistence_threshold"]) == (h * h, int(0.9 * h * h), 10 * h)
    assert ds_config(s)["train_micro_batch_size_per_gpu"] == 2
    bad = _resolve(tmp_path, {"zero_optimization": {"sub_group_size": "auto"}})
    with pytest.raises(BadInput, match=r"zero_optimization\.sub_group_size is \"auto\""):
        ds_config(bad)


def test_pipeline_takes_zero1_at_most(tmp_path):
    with pytest.raises(BadInput, match="DeepSpeed's pipeline takes ZeRO-1 at most"):
        _resolve(tmp_path, {}, "--zero-stage", 2, "--pipeline-model-parallel-size", 2)
    s = _resolve(tmp_path, {}, "--zero-stage", 2, "--no-pipeline-parallel")
    assert s.deepspeed.pipeline_stages == 1
    with pytest.raises(BadInput, match="--deepspeed needs --deepspeed_config"):
        run_settings.resolve(pretrain.build_parser().parse_args(["--model", "llama2-tiny", "--data-path", "x",
                                                                 "--train-iters", "1", "--deepspeed"]))


def test_mpu_adapter_answers_from_megatron_groups(single_process_group):
    from megatron.core import parallel_state as ps

    from ascend_patches.with_deepspeed import mpu

    assert mpu.get_model_parallel_world_size() == ps.get_tensor_model_parallel_world_size() == 1
    assert mpu.get_model_parallel_group() is ps.get_tensor_model_parallel_group()
    assert mpu.get_data_parallel_group() is ps.get_data_parallel_group()
    assert mpu.get_data_parallel_rank() == 0


@pytest.fixture
def deepspeed_on_cpu():
    """DeepSpeed imported (its accelerator chosen: the CPU's) before the NPU emulation starts;
    the emulation covers torch_npu's op contract, not all DeepSpeed's NPU accelerator touches."""
    import deepspeed  # noqa: F401
    from deepspeed.accelerator import get_accelerator

    get_accelerator()


def test_npu_in_saturation_mode_refuses_fp16_loss_scaling(deepspeed_on_cpu, npu_emulated):
    import ascend_patches
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

    assert ascend_patches.REGISTRY.status["deepspeed.npu_saturation_fp16"][0] == "applied"
    kw = dict(init_scale=2 ** 16, scale_window=1000, min_scale=1, delayed_shift=2, consecutive_hysteresis=False)
    DynamicLossScaler(**kw)  # INF_NAN mode: fine
    npu_emulated.npu.utils.INF_NAN = False
    try:
        with pytest.raises(RuntimeError, match="saturation mode"):
            DynamicLossScaler(**kw)
    finally:
        npu_emulated.npu.utils.INF_NAN = True
    assert "deepspeed" in sys.modules


def test_file_gradient_accumulation_sets_the_global_batch_or_a_contradicting_flag_is_refused(tmp_path):
    """DeepSpeed's rule, train_batch_size = micro x gradient_accumulation_steps x DP: the file's
    accumulation is the run's (it was overwritten by the recipe's default global batch of 8,
    silently running 4 steps of accumulation instead of 16), and a --global-batch-size or a
    train_batch_size that disagrees is refused naming both values."""
    from recipes.train.deepspeed_engine import ds_config

    cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 16}
    s = _resolve(tmp_path, cfg)  # world 2, TP 1: DP 2
    assert (s.batches.micro, s.batches.global_batch, s.batches.num_microbatches) == (1, 32, 16)
    final = ds_config(s)
    assert (final["gradient_accumulation_steps"], final["train_batch_size"]) == (16, 32)
    assert _resolve(tmp_path, cfg, "--global-batch-size", 32).batches.global_batch == 32  # agrees: fine
    with pytest.raises(BadInput, match=r"--global-batch-size 8 contradicts gradient_accumulation_steps = 16 in "
                                       r".*ds\.json \(x micro-batch 1 x data-parallel size 2 = a global batch of 32\)"):
        _resolve(tmp_path, cfg, "--global-batch-size", 8)
    with pytest.raises(BadInput, match=r"train_batch_size = 8 but train_micro_batch_size_per_gpu 1 x "
                                       r"gradient_accumulation_steps = 16 x data-parallel size 2 = 32"):
        _resolve(tmp_path, {**cfg, "train_batch_size": 8})
    # the other direction: the flags set what the file leaves open, and the file's train_batch_size is used
    assert _resolve(tmp_path, {"train_micro_batch_size_per_gpu": 2}, "--global-batch-size", 12).batches.num_microbatches == 3
    assert _resolve(tmp_path, {"train_batch_size": 16, "train_micro_batch_size_per_gpu": 2}).batches.num_microbatches == 4
