"""One layout rule set: the same TP/PP that does not fit a model gets the same error, word for
word, from pretraining, generation, evaluation, the HF converter and the LoRA merge."""

import pytest

from converters import hf_to_megatron, merge_lora
from recipes.model import llama2
from recipes.infer import evaluate, generate
from recipes.train import pretrain, run_settings


@pytest.fixture(scope="module")
def stories(tmp_path_factory, fixtures_dir):
    out = tmp_path_factory.mktemp("layout") / "stories"
    hf_to_megatron.main(["--input-model-dir", str(fixtures_dir / "stories260K"), "--output-model-dir", str(out)])
    return out


def _error(call) -> str:
    with pytest.raises(llama2.LayoutError) as e:
        call()
    return str(e.value)


def test_same_bad_layout_same_error_everywhere(stories, fixtures_dir, tmp_path):
    tp8 = ["--tensor-model-parallel-size", "8"]  # stories260K: 8 heads, 4 kv groups, ffn 172, 5 layers
    errors = {
        "pretrain": _error(lambda: run_settings.resolve(pretrain.build_parser().parse_args(
            ["--load", str(stories), "--data-path", "unused", "--train-iters", "1", "--finetune", *tp8]), world=8)),
        "generate": _error(lambda: generate.main(["--load", str(stories), *tp8])),
        "evaluate": _error(lambda: evaluate.main(["--task", "boolq", "--task-data-path",
                                                  str(fixtures_dir / "boolq"), "--load", str(stories), *tp8])),
        "hf_to_megatron": _error(lambda: hf_to_megatron.main(["--input-model-dir", str(fixtures_dir / "stories260K"),
                                                              "--output-model-dir", str(tmp_path / "o"), *tp8])),
        "merge_lora": _error(lambda: merge_lora.main(["--base", str(stories), "--lora", str(tmp_path / "none"),
                                                      "--output-model-dir", str(tmp_path / "m"), *tp8])),
    }
    first = errors["pretrain"]
    assert "--tensor-model-parallel-size 8 does not divide 4 kv groups" in first
    assert "--tensor-model-parallel-size 8 does not divide ffn size 172" in first  # every rule, in one error
    assert all(e == first for e in errors.values()), errors


def test_rules():
    tiny = llama2.shape("llama2-tiny")  # 2 layers, 8 heads, 4 kv groups, ffn 176
    llama2.check_layout(tiny, 4, 2, padded_vocab=512, world=8)
    with pytest.raises(llama2.LayoutError, match="more than the 2 layers"):
        llama2.check_layout(tiny, 1, 3)
    five = llama2.LlamaShape(5, 64, 176, 8, 4)
    llama2.check_layout(five, 1, 2)  # uneven: the first stage takes the remainder
    with pytest.raises(llama2.LayoutError, match="virtual pipeline stages need --pipeline-model-parallel-size 2 to divide"):
        llama2.check_layout(five, 1, 2, layers_per_virtual_stage=1)
    with pytest.raises(llama2.LayoutError, match="does not divide the padded vocabulary 502.*world size 6 is not a "
                                                 "multiple of TP 4 x PP 1"):
        llama2.check_layout(tiny, 4, 1, padded_vocab=502, world=6)
