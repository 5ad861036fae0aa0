"""Run under torchrun (gloo): all-gathers with the flat 1-D outputs megatron passes
(``gather_split_1d_tensor``, the timers) and gloo refuses without ascend_patches; each rank
prints RESULT {...}."""

import json
import os
import sys

import torch
import torch.distributed as dist

import ascend_patches  # noqa: F401

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
x = torch.arange(8, dtype=torch.float32).view(2, 4) + 100 * rank
expected = torch.cat([torch.arange(8, dtype=torch.float32).view(2, 4) + 100 * r for r in range(world)]).view(-1)
result = {}
for name in ("all_gather_into_tensor", "_all_gather_base"):
    out = torch.empty(x.numel() * world)
    getattr(dist, name)(out, x)
    result[name] = torch.equal(out, expected)
from megatron.core import parallel_state as ps  # noqa: E402
from megatron.core.tensor_parallel.utils import gather_split_1d_tensor, split_tensor_into_1d_equal_chunks  # noqa: E402

ps.initialize_model_parallel(tensor_model_parallel_size=world)
full = torch.arange(24, dtype=torch.float32)
result["gather_split_1d_tensor"] = torch.equal(gather_split_1d_tensor(split_tensor_into_1d_equal_chunks(full)), full)
sys.stdout.write("RESULT " + json.dumps({"rank": rank, **result}) + "\n")  # one write: ranks share the pipe (torchrun runs them -u)
ps.destroy_model_parallel()
dist.destroy_process_group()
