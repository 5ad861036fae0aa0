"""A ``deepspeed.pipe.PipelineModule`` made of a stock Megatron-Core ``GPTModel``'s own modules:
the embedding, each ``TransformerLayer``, and the final norm with the output layer.

The whole model is built on every rank from the same seed (as the single-stage run builds
it), and each stage keeps its slice, so a pipelined run starts from the same weights.
Between stages only the hidden states ``[s, b, h]`` travel; each stage recomputes the RoPE
table it needs from the sequence length.
"""

from __future__ import annotations

import torch

from recipes.model import llama2
from recipes.train import training


class _Embedding(torch.nn.Module):
    def __init__(self, embedding):
        super().__init__()
        self.embedding = embedding

    def forward(self, inputs):
        tokens, position_ids = inputs
        return self.embedding(input_ids=tokens, position_ids=position_ids)


class _Layer(torch.nn.Module):
    def __init__(self, layer, rotary):
        super().__init__()
        self.layer, self.rotary = layer, [rotary]  # a list: the RoPE module is shared, not a child

    def forward(self, hidden):
        out, _ = self.layer(hidden, attention_mask=None, rotary_pos_emb=self.rotary[0](hidden.shape[0]))
        return out


class _Head(torch.nn.Module):
    def __init__(self, final_norm, output_layer):
        super().__init__()
        self.final_norm, self.output_layer = final_norm, output_layer

    def forward(self, hidden):
        logits, _ = self.output_layer(self.final_norm(hidden))
        return logits


def lm_loss(logits, labels_and_mask):
    """Megatron's vocab-parallel cross entropy, averaged over the tokens the mask keeps."""
    from megatron.core import tensor_parallel

    labels, mask = labels_and_mask
    losses = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels.transpose(0, 1).contiguous())
    return training.lm_loss(losses.transpose(0, 1).contiguous(), mask)[0]


def pipeline_module(s, config, stages: int):
    """Stages x data x tensor-parallel ranks, the tensor-parallel ranks adjacent as in
    megatron-core's own groups."""
    from deepspeed.pipe import PipelineModule
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    model = llama2.build_model(s.shape, config=config, vocab_size=s.padded_vocab)
    layers = [_Embedding(model.embedding)]
    layers += [_Layer(layer, model.rotary_pos_emb) for layer in model.decoder.layers]
    layers.append(_Head(model.decoder.final_layernorm, model.output_layer))
    tp = s.layout.tp
    topology = PipeModelDataParallelTopology(num_pp=stages, num_mp=tp, num_dp=s.layout.world // (stages * tp))
    return PipelineModule(layers=layers, topology=topology, loss_fn=lm_loss, partition_method="uniform")
