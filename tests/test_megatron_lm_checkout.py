"""--megatron-lm DIR: a folder that is not a Megatron-LM checkout is one clear error saying
what to clone; a checkout whose megatron/core is another release than the installed one
gets a warning naming both versions."""

import warnings

import pytest

from ascend_patches import versions
from recipes.train import megatron_lm, pretrain, run_settings


def _fake_checkout(root, core_version=None):
    (root / "megatron" / "training").mkdir(parents=True)
    (root / "pretrain_gpt.py").write_text("")
    if core_version:
        major, minor, patch = core_version.split(".")
        (root / "megatron" / "core").mkdir()
        (root / "megatron" / "core" / "package_info.py").write_text(f"MAJOR = {major}\nMINOR = {minor}\nPATCH = {patch}\n")
    return root


def test_folder_without_training_package_is_a_clear_error(tmp_path, fixtures_dir):
    args, unknown = pretrain.build_parser().parse_known_args(
        ["--model", "llama2-tiny", "--data-path", "x", "--train-iters", "1", "--megatron-lm", str(tmp_path)])
    s = run_settings.resolve(args, passthrough=unknown)
    assert s.engine == "megatron-lm"
    with pytest.raises(megatron_lm.CheckoutError, match=r"no megatron/training there; .*git clone -b core_v0\.16\.1"):
        megatron_lm.MegatronLMEngine(s)


def test_other_core_release_warns_naming_both(tmp_path):
    installed = versions.version_of("megatron-core")
    with pytest.warns(UserWarning, match=rf"its megatron/core is 0\.15\.0, the installed megatron-core is {installed}"):
        megatron_lm.check_checkout(str(_fake_checkout(tmp_path / "old", "0.15.0")))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same release, or none of its own: no warning
        megatron_lm.check_checkout(str(_fake_checkout(tmp_path / "same", installed)))
        megatron_lm.check_checkout(str(_fake_checkout(tmp_path / "training_only")))


def test_unknown_flags_pass_through_only_to_megatron_lm(tmp_path):
    base = ["--model", "llama2-tiny", "--data-path", "x", "--train-iters", "1", "--manual-gc-interval", "100"]
    args, unknown = pretrain.build_parser().parse_known_args(base)
    with pytest.raises(ValueError, match="unrecognized arguments: --manual-gc-interval 100"):
        run_settings.resolve(args, passthrough=unknown)
    known = ["--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "1"]
    args, unknown = pretrain.build_parser().parse_known_args(base + known + ["--megatron-lm", str(tmp_path)])
    s = run_settings.resolve(args, passthrough=unknown)
    flags = megatron_lm.argv(s)
    assert flags[-2:] == ["--manual-gc-interval", "100"]
    assert flags[flags.index("--recompute-granularity"):][:6] == known  # the recipe's own flags, passed on
    assert "--num-query-groups" in flags and flags[flags.index("--num-query-groups") + 1] == "4"
