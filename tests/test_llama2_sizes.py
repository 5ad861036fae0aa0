"""Each LLaMA-2 size builds a stock GPTModel (on the meta device) whose parameter count
equals HF transformers' LlamaForCausalLM of the same config."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from recipes.model import llama2

PUBLISHED = {"llama2-7b": 6_738_415_616}


@pytest.mark.usefixtures("single_process_group")
@pytest.mark.parametrize("name", list(llama2.SIZES))
def test_parameter_count_matches_hf(name):
    s = llama2.shape(name)
    with torch.device("meta"):
        model = llama2.build_model(s, perform_initialization=False)
        hf = LlamaForCausalLM(LlamaConfig(**s.hf_config()))
    ours, theirs = llama2.count_parameters(model), llama2.count_parameters(hf)
    assert ours == theirs, (name, ours, theirs)
    if name in PUBLISHED:
        assert ours == PUBLISHED[name]
    assert all(p.device.type == "meta" for p in model.parameters())


def test_unknown_size():
    with pytest.raises(ValueError, match="unknown model 'llama2-8b'"):
        llama2.shape("llama2-8b")
