"""The flags several commands share (the layout, the tokenizer, vocabulary padding, the
checkpoint and its dtype) are declared once (recipes.model.flags, recipes.data.tokenizer) and
mean the same in every command; vocabulary padding defaults to Megatron-LM's 128 everywhere.

The padded sizes below are worked by hand from Megatron-LM's rule
(``megatron/training/tokenizer/tokenizer.py::_vocab_size_with_padding``: the vocabulary rounded
up to a multiple of divisor x TP), not from this project's function."""

from __future__ import annotations

import ast
import json

import pytest

from tests.helpers.launch import ROOT

# each shared flag, and the one module that may declare it
HOMES = {**{f: "recipes/model/flags.py" for f in ("tensor-model-parallel-size", "pipeline-model-parallel-size",
                                                  "make-vocab-size-divisible-by", "params-dtype", "load",
                                                  "lora-load")},
         **{f: "recipes/data/tokenizer.py" for f in ("tokenizer-name-or-path", "tokenizer-model", "tokenizer-type")}}


def _declared(path):
    """The option names of every add_argument call in ``path`` (an f-string's literal tail
    too, as in f"{lead}tensor-model-parallel-size")."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
            for arg in node.args:
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    yield arg.value
                elif isinstance(arg, ast.JoinedStr) and isinstance(arg.values[-1], ast.Constant):
                    yield arg.values[-1].value


def test_each_shared_flag_is_declared_in_one_module():
    where = {}
    for path in [*(ROOT / "recipes").rglob("*.py"), *(ROOT / "converters").rglob("*.py")]:
        for name in _declared(path):
            for flag in HOMES:
                if name == "--" + flag or (not name.startswith("--") and name == flag):
                    where.setdefault(flag, []).append(str(path.relative_to(ROOT)))
    assert where == {flag: [home] for flag, home in HOMES.items()}


def _parsers():
    from converters import deepspeed_to_megatron, hf_to_megatron, megatron_to_hf, merge_lora, reshard
    from recipes.data import preprocess_data
    from recipes.infer import evaluate, generate
    from recipes.train import pretrain

    return {m.__name__: m.build_parser() for m in (pretrain, generate, evaluate, preprocess_data, hf_to_megatron,
                                                   megatron_to_hf, reshard, deepspeed_to_megatron, merge_lora)}


def test_a_shared_flag_parses_the_same_in_every_command():
    """Same default (unset: None), type and choices wherever a command takes the flag; the
    commands that take the layout, tokenizer and padding flags all do."""
    seen = {}
    for name, parser in _parsers().items():
        for action in parser._actions:
            for option in action.option_strings:
                flag = option[2:].removeprefix("src-").removeprefix("tgt-")
                if flag in HOMES:
                    seen.setdefault(flag, {})[name] = (action.default, action.type, str(action.choices),
                                                             action.dest.removeprefix("src_").removeprefix("tgt_"))
    for flag, by_command in seen.items():
        assert len(set(by_command.values())) == 1, (flag, by_command)
        assert next(iter(by_command.values()))[0] is None, flag
    assert len(seen["tensor-model-parallel-size"]) == 7 and len(seen["make-vocab-size-divisible-by"]) == 4
    assert len(seen["tokenizer-name-or-path"]) == 7


def test_megatron_lms_tokenizer_model_is_the_path_flag_and_two_paths_that_differ_are_refused():
    from recipes.errors import BadInput
    from recipes.train import pretrain

    p = pretrain.build_parser()
    assert p.parse_args(["--data-path", "x", "--tokenizer-model", "t.model"]).tokenizer_name_or_path == "t.model"
    both = ["--data-path", "x", "--tokenizer-model", "a.model", "--tokenizer-name-or-path", "a.model"]
    assert p.parse_args(both).tokenizer_name_or_path == "a.model"
    with pytest.raises(BadInput, match="--tokenizer-name-or-path b.model and an earlier tokenizer path a.model "
                                       "disagree: give one"):
        p.parse_args(["--data-path", "x", "--tokenizer-model", "a.model", "--tokenizer-name-or-path", "b.model"])


def _pretrain_settings(*flags, world=1):
    from recipes.train import pretrain, run_settings

    args = pretrain.build_parser().parse_args(["--model", "llama2-tiny", "--data-path", "x", "--train-iters", "3",
                                               *map(str, flags)])
    return run_settings.resolve(args, world=world)


@pytest.mark.parametrize("tp, rows", [(1, 384), (2, 512)])
def test_pretraining_pads_the_vocabulary_as_megatron_lm_does(tp, rows):
    """300 tokens: a multiple of 128 x TP by default, and 300 with --make-vocab-size-divisible-by 1."""
    s = _pretrain_settings("--vocab-size", 300, "--tensor-model-parallel-size", tp, world=tp)
    assert (s.padded_vocab, s.checkpoint_args()["make_vocab_size_divisible_by"]) == (rows, 128)
    s = _pretrain_settings("--vocab-size", 300, "--make-vocab-size-divisible-by", 1)
    assert s.padded_vocab == 300


def _release(tmp_path, **args):
    from recipes.model import checkpointing, llama2
    from dataclasses import asdict

    (tmp_path / "ckpt" / "release").mkdir(parents=True)
    (tmp_path / "ckpt" / "release" / "args.json").write_text(json.dumps(
        {"model": "llama2-tiny", "shape": asdict(llama2.shape("llama2-tiny")), **args}))
    checkpointing.write_tracker(tmp_path / "ckpt", "release")
    return tmp_path / "ckpt"


def test_a_continued_checkpoint_keeps_its_rows_and_a_divisor_that_contradicts_them_is_refused(tmp_path):
    from recipes.errors import BadInput

    # written with divisor 1: 300 rows; the 128 default does not move them
    ckpt = _release(tmp_path, vocab_size=300, padded_vocab_size=300, make_vocab_size_divisible_by=1)
    s = _pretrain_settings("--load", ckpt, "--finetune", "--vocab-size", 300)
    assert (s.padded_vocab, s.make_vocab_size_divisible_by) == (300, 1)
    assert _pretrain_settings("--load", ckpt, "--finetune", "--vocab-size", 300, "--make-vocab-size-divisible-by",
                              1).padded_vocab == 300
    with pytest.raises(BadInput, match=r"--make-vocab-size-divisible-by 128 pads the vocabulary 300 to 384 rows at "
                                       r"TP=1, but --load .*ckpt holds 300"):
        _pretrain_settings("--load", ckpt, "--finetune", "--vocab-size", 300, "--make-vocab-size-divisible-by", 128)


def test_converters_pad_to_128_and_a_resharded_checkpoint_keeps_the_divisor_it_records(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from converters import hf_to_megatron, reshard
    from recipes.model import checkpointing

    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=4, vocab_size=300, max_position_embeddings=64)
                     ).save_pretrained(tmp_path / "hf")
    rows = {}
    for name, extra in (("default", []), ("by1", ["--make-vocab-size-divisible-by", "1"])):
        out = hf_to_megatron.main(["--input-model-dir", str(tmp_path / "hf"), "--output-model-dir",
                                   str(tmp_path / name), *extra])
        rows[name] = checkpointing.args_of(out)["padded_vocab_size"]
        out = reshard.main(["--input-model-dir", str(tmp_path / name), "--output-model-dir",
                            str(tmp_path / f"{name}_tp2"), "--tgt-tensor-model-parallel-size", "2"])
        rows[f"{name}_tp2"] = checkpointing.args_of(out)["padded_vocab_size"]
    assert rows == {"default": 384, "default_tp2": 512, "by1": 300, "by1_tp2": 300}


def test_stock_megatron_lm_continuing_a_checkpoint_is_given_the_divisor_of_its_rows(tmp_path):
    """Stock Megatron-LM pads by the divisor alone: a checkpoint whose args.json records no
    divisor (written before it was recorded, with 1) is refused under the 128 default and runs
    with its own divisor given."""
    from recipes.errors import BadInput

    ckpt = _release(tmp_path, vocab_size=300, padded_vocab_size=300)
    with pytest.raises(BadInput, match=r"holds 300 embedding rows; stock Megatron-LM pads the vocabulary 300 to 384 "
                                       r"with --make-vocab-size-divisible-by 128 at TP=1"):
        _pretrain_settings("--load", ckpt, "--finetune", "--megatron-lm", tmp_path, "--vocab-size", 300)
    s = _pretrain_settings("--load", ckpt, "--finetune", "--megatron-lm", tmp_path, "--vocab-size", 300,
                           "--make-vocab-size-divisible-by", 1)
    assert (s.engine, s.padded_vocab, s.make_vocab_size_divisible_by) == ("megatron-lm", 300, 1)
