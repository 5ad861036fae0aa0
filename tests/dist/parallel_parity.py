"""Under torchrun with 2 CPU processes (gloo): the tiny LLaMA-2 trained for a few steps at
TP=1 (reference), TP=2, TP=2 with sequence parallelism, PP=2, and DP=2 with the
distributed optimizer, all from the same initial weights and data.  Rank 0 prints one JSON
line with every run's losses and the TP=2 logits error."""

import itertools
import json
import re

import torch
import torch.distributed as dist

import ascend_patches
from megatron.core import parallel_state
from recipes.model import llama2, parallel
from recipes.train import training
from tests.helpers.parity import batch, rel_err, tiny_shape

STEPS, SEQ, MBS, GLOBAL_MB = 8, 32, 2, 4
shape = tiny_shape()


def data():
    """Step i's global batch is microbatches (i%3)*4 + 0..3; each DP rank takes its share."""
    d, r = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    per = GLOBAL_MB // d
    for i in itertools.count():
        for j in range(r * per, (r + 1) * per):
            yield batch(seed=(i % 3) * GLOBAL_MB + j, b=MBS, s=SEQ)


def build(full_state, **over):
    pp, stage = parallel_state.get_pipeline_model_parallel_world_size(), parallel_state.get_pipeline_model_parallel_rank()
    cfg = llama2.transformer_config(shape, tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
                                    pipeline_model_parallel_size=pp, pipeline_dtype=torch.float32, **over)
    model = llama2.build_model(shape, config=cfg, pre_process=parallel_state.is_pipeline_first_stage(),
                               post_process=parallel_state.is_pipeline_last_stage())
    if full_state is not None:
        load_slices(model, full_state, stage * shape.num_layers // pp)
    return model


def load_slices(model, full_state, layer_offset):
    """Load a TP=1/PP=1 state dict into this rank's TP shard / PP stage."""
    tp, rank = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
    own = model.state_dict()
    new = {}
    for key, value in own.items():
        if value is None or key.endswith("_extra_state"):
            continue
        src = re.sub(r"layers\.(\d+)\.", lambda m: f"layers.{int(m.group(1)) + layer_offset}.", key)
        full = full_state[src]
        if full.shape == value.shape:
            new[key] = full
            continue
        dim = next(d for d in range(full.dim()) if full.shape[d] != value.shape[d])
        if key.endswith("linear_fc1.weight"):  # [gate; up], each split per rank
            gate, up = full.chunk(2, dim=0)
            new[key] = torch.cat([gate.chunk(tp, 0)[rank], up.chunk(tp, 0)[rank]], dim=0)
        else:
            new[key] = full.chunk(tp, dim=dim)[rank]
    model.load_state_dict(new, strict=False)


def train(model, distributed_optimizer=False):
    """Losses of the global batch (averaged over data-parallel ranks) per step."""
    ddp = training.wrap_ddp(model, use_distributed_optimizer=distributed_optimizer)
    opt = training.build_optimizer([ddp], lr=3e-3, use_distributed_optimizer=distributed_optimizer)
    training.attach_grad_sync([ddp], opt)
    it = data()
    nmb = GLOBAL_MB // parallel_state.get_data_parallel_world_size()
    losses = []
    for _ in range(STEPS):
        loss, _ = training.train_step([ddp], opt, it, nmb, SEQ, MBS)
        if loss is not None:
            t = torch.tensor([loss], dtype=torch.float64)
            dist.all_reduce(t, group=parallel_state.get_data_parallel_group())
            loss = t.item() / parallel_state.get_data_parallel_world_size()
        losses.append(loss)
    return losses


def logits_of(model):
    b = batch(seed=0, b=MBS, s=SEQ)
    pos = torch.arange(SEQ).unsqueeze(0).expand(MBS, -1)
    out = model(b["tokens"], pos, None).detach()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp > 1:
        parts = [torch.empty_like(out) for _ in range(tp)]
        dist.all_gather(parts, out.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
        out = torch.cat(parts, dim=-1)
    return out


result = {}
parallel.init_distributed(tp=1, pp=1)
torch.manual_seed(0)
ref_model = llama2.build_model(shape)
full_state = {k: v.clone() for k, v in ref_model.state_dict().items() if v is not None}
ref_logits = logits_of(ref_model)
result["dp2"] = train(ref_model)

parallel.init_distributed(tp=1, pp=1)
result["dp2_distopt"] = train(build(full_state), distributed_optimizer=True)

parallel.init_distributed(tp=2, pp=1)
m = build(full_state)
result["tp2_logits_rel_err"] = rel_err(logits_of(m), ref_logits)
result["tp2"] = train(m)

parallel.init_distributed(tp=2, pp=1)
result["tp2_sp"] = train(build(full_state, sequence_parallel=True))

parallel.init_distributed(tp=1, pp=2)
losses = train(build(full_state))
if parallel_state.is_pipeline_last_stage():
    result["pp2"] = losses
gathered = [None] * dist.get_world_size()
dist.all_gather_object(gathered, result)
if dist.get_rank() == 0:
    merged = {}
    for r in gathered:
        merged.update({k: v for k, v in r.items() if v is not None})
    merged["report"] = ascend_patches.report().splitlines()[1]
    print(json.dumps(merged))
parallel.destroy()
