"""A resume that would draw other batches is refused: the packed rows and the sample order,
and so what a checkpoint's consumed_samples means, depend on --data-path, --split, --seed,
--seq-length and the packing flags.  Each changed one is named with both values, unless
--accept-data-change, which logs the change.  The checkpoint is written by the recipe's own
atomic save with the args.json a run writes (``RunSettings.checkpoint_args``); a real run's
record is checked in test_pretrain."""

import re

import pytest

from recipes.errors import BadInput
from recipes.model import checkpointing
from recipes.train import pretrain, run_settings

BASE = ["--model", "llama2-tiny", "--train-iters", "10", "--seed", "7", "--split", "98,2,0", "--seq-length", "128"]


def _resolve(*flags):
    return run_settings.resolve(pretrain.build_parser().parse_args([*BASE, *map(str, flags)]), world=1)


@pytest.fixture
def saved(tmp_path, single_process_group):
    """A checkpoint folder at iteration 4 of a run on ``data`` (pretraining, EOD masked)."""
    data, ckpt = tmp_path / "data", tmp_path / "ckpt"
    first = _resolve("--data-path", data, "--eod-mask-loss")
    checkpointing.atomic_save(ckpt, 4, lambda tmp: None, {"args.json": first.checkpoint_args()})
    return data, ckpt


@pytest.mark.parametrize("change,says", [
    (["--seed", 8], "--seed 8 (the checkpoint's: 7)"),
    (["--seq-length", 64], "--seq-length 64 (the checkpoint's: 128)"),
    (["--split", "90,10,0"], "--split 90,10,0 (the checkpoint's: 98,2,0)"),
    (["--data-path", "OTHER"], "--data-path {other} (the checkpoint's: {data})"),
    (["--no-eod"], "--eod-mask-loss off (the checkpoint's: on)"),
    (["--reset-position-ids", "--reset-attention-mask"], "--reset-position-ids on (the checkpoint's: off)"),
    (["--is-instruction-dataset", "--no-eod"], "--is-instruction-dataset on (the checkpoint's: off)"),
], ids=["seed", "seq_length", "split", "data_path", "eod_mask_loss", "packing", "instruction"])
def test_a_resume_with_other_data_settings_is_refused_naming_both_values(saved, change, says):
    data, ckpt = saved
    flags = ["--load", ckpt, "--save", ckpt]
    flags += ["--data-path", data] if "--data-path" not in change else []
    flags += [] if "--no-eod" in change else ["--eod-mask-loss"]
    change = [c for c in change if c != "--no-eod"]
    if "OTHER" in change:
        change = ["--data-path", ckpt.parent / "other"]
    says = says.format(other=ckpt.parent / "other", data=data)
    with pytest.raises(BadInput, match=re.escape(says) + ".*--accept-data-change"):
        _resolve(*flags, *change)
    accepted = _resolve(*flags, *change, "--accept-data-change")
    assert accepted.resume.kind == "full" and says in accepted.resume.note
    assert "--accept-data-change: continuing" in accepted.resume.note


def test_the_same_data_resumes_and_a_finetune_is_not_checked(saved):
    data, ckpt = saved
    same = _resolve("--data-path", data, "--eod-mask-loss", "--load", ckpt, "--save", ckpt)
    assert same.resume.kind == "full" and same.resume.note is None
    finetune = _resolve("--data-path", ckpt.parent / "other", "--load", ckpt, "--finetune", "--seed", 9)
    assert finetune.resume.kind == "weights"  # starts its data from the beginning: nothing to mismatch
