"""What a training layout holds per device, before a run builds anything: weights, gradients,
optimizer states and activations, by the arithmetic in ``docs/memory.md``.

The device that holds the most is reported: the first pipeline stage (the embedding, and the
most micro-batches in flight under 1F1B) or the last (the output layer and the loss's softmax
over the vocabulary), whichever totals more.  Units: bytes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import List, Optional, Tuple

from recipes.model import llama2
from recipes.train.offload import Offload
from recipes.train.recompute import Recompute

GB = 1e9  # device memory in GB, as vendors quote it (a 910B's 64 GB); the table also prints GiB
# The plan counts tensors.  What the caching allocator keeps and fragments, the kernels' workspaces and the
# runtime's own share are not counted: a layout fits when the plan is within this share of the device.
USABLE = 0.9


@dataclass(frozen=True)
class Layout:
    """What the arithmetic reads of a run's settings."""
    shape: llama2.LlamaShape
    padded_vocab: int
    tp: int = 1
    pp: int = 1
    dp: int = 1
    cp: int = 1
    vpp: Optional[int] = None
    sequence_parallel: bool = False
    distributed_optimizer: bool = False
    micro_batch: int = 1
    seq_length: int = 4096
    num_microbatches: int = 1
    half: bool = True              # bf16 / fp16 weights and activations (else fp32)
    dropout: bool = False          # hidden dropout keeps a one-byte mask per element
    recompute: Recompute = Recompute()
    offload: Offload = Offload()

    @classmethod
    def of(cls, s) -> "Layout":
        """From ``recipes.train.run_settings.RunSettings``."""
        L, b = s.layout, s.batches
        return cls(s.shape, s.padded_vocab, L.tp, L.pp, L.dp, L.cp, L.vpp, L.sequence_parallel,
                   L.distributed_optimizer, b.micro, b.seq_length, b.num_microbatches, s.bf16 or s.fp16,
                   s.hidden_dropout > 0, s.recompute, s.offload)


@dataclass(frozen=True)
class Plan:
    stage: str            # "first" | "last" | "only": the stage reported
    parameters: int       # on that device
    weights: int
    gradients: int
    optimizer: int
    activations: int
    in_flight: float      # micro-batches whose activations the stage holds at once
    per_layer: int        # one layer's activations for one micro-batch
    offloaded: Tuple[str, ...] = ()  # modules whose activations are offloaded (counted as kept)
    on_host: float = 0.0  # the share of the optimizer's main parameters and states on the host

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations

    def rows(self) -> List[Tuple[str, int]]:
        return [("weights", self.weights), ("gradients (fp32 main_grad)", self.gradients),
                ("optimizer states" + (" (on the device)" if self.on_host else ""), self.optimizer),
                (f"activations ({self.in_flight:g} micro-batches in flight)", self.activations),
                ("total", self.total)]


def layer_parameters(shape: llama2.LlamaShape, tp: int) -> int:
    """One layer's parameters on a TP rank: QKV, projection, fc1 (gate and up), fc2 sharded; the
    two RMSNorm weights whole."""
    h, f = shape.hidden_size, shape.ffn_hidden_size
    kv = shape.num_query_groups * shape.kv_channels
    return (h * (h + 2 * kv) + h * h + 3 * f * h) // tp + 2 * h


def layer_units(shape: llama2.LlamaShape, tp: int, sp: bool, recompute: Recompute) -> float:
    """One layer's activations for one micro-batch, in units of s*b*h elements (docs/memory.md).
    The GEMMs' outputs shard by TP; the norms' tensors only under sequence parallelism."""
    h, a = shape.hidden_size, shape.num_attention_heads
    kv, f = shape.num_query_groups / a, shape.ffn_hidden_size / h
    norm_share = tp if sp else 1
    norms = (6 + 2 / h) / norm_share
    attention = (3 + 3 * kv + a / h) / tp
    mlp = 3 * f / tp
    modules = recompute.modules or ("core_attn",)
    if recompute.granularity == "selective":
        if "core_attn" in modules:
            attention -= a / h / tp
        if "mlp" in modules:
            mlp = 0.0
        if "layernorm" in modules:
            norms -= (4 + 2 / h) / norm_share
    return norms + attention + mlp


def stages(x: Layout) -> List[Plan]:
    """Per pipeline stage that differs: the only one, or the first and the last (a middle stage
    holds no more than the first)."""
    sh = x.shape
    h, w = sh.hidden_size, 2 if x.half else 4
    per_stage = sh.num_layers // x.pp
    first_layers = per_stage + sh.num_layers % x.pp  # pipeline_split: the first stage takes the remainder
    s = x.seq_length // x.cp
    unit = s * x.micro_batch * h  # elements
    full = layer_units(sh, x.tp, x.sequence_parallel, Recompute())
    kept = layer_units(sh, x.tp, x.sequence_parallel, x.recompute)
    dropout_bytes = 2 * unit / (x.tp if x.sequence_parallel else 1) if x.dropout else 0  # two masks a layer
    layer_bytes = kept * unit * w + dropout_bytes
    in_flight = float(min(x.num_microbatches, x.pp)) if x.pp > 1 else 1.0
    if x.vpp:
        in_flight *= 1 + (x.pp - 1) / (x.pp * x.vpp)  # Megatron-LM's penalty for the interleaved schedule
    embedding = x.padded_vocab * h // x.tp
    # one layer's backward at a time: the gradients of its MLP's outputs (fc1's 2F, SwiGLU's F) are
    # alive together; a selectively recomputed MLP holds its 3F again for that one layer
    f = sh.ffn_hidden_size / h
    backward = 3 * f / x.tp * unit * w * (2 if x.recompute.granularity == "selective"
                                          and "mlp" in x.recompute.modules else 1)

    def stage(layers: int, first: bool, last: bool) -> Plan:
        params = layers * layer_parameters(sh, x.tp) + (embedding if first else 0) + \
            ((embedding + h) if last else 0)
        if x.recompute.granularity == "full":
            n = min(x.recompute.num_layers, layers)
            checkpointed = layers if x.recompute.method == "uniform" else n
            held = (checkpointed * unit / (x.tp if x.sequence_parallel else 1) * w
                    + (layers - checkpointed) * layer_bytes)
            # the chunk being recomputed holds its full activations once (one micro-batch)
            working = (n if x.recompute.method == "uniform" else 1) * (full * unit * w + dropout_bytes)
            acts = held * (in_flight if first else 1) + working
        else:
            acts = layers * layer_bytes * (in_flight if first else 1)
        acts += backward
        if last:  # the final norm's tensors, the loss's fp32 softmax over this rank's vocabulary and its gradient
            acts += 3 * unit * w + 2 * 4 * s * x.micro_batch * x.padded_vocab // x.tp
        master = 4 if x.half else 0  # fp32 main weights beside half-precision ones
        optimizer = (8 + master) * params
        if x.distributed_optimizer:
            optimizer //= x.dp * x.cp
        on_host = x.offload.fraction if x.offload.optimizer else 0.0
        optimizer = int(optimizer * (1 - on_host))  # --optimizer-cpu-offload: that share lives on the host
        name = "only" if first and last else "first" if first else "last"
        return Plan(name, params, w * params, 4 * params, optimizer, int(acts), in_flight,
                    int(layer_bytes), x.offload.modules, on_host)

    if x.pp == 1:
        return [stage(sh.num_layers, True, True)]
    return [stage(first_layers, True, False), stage(per_stage, False, True)]


def plan(x: Layout) -> Plan:
    """The stage that holds the most."""
    return max(stages(x), key=lambda p: p.total)


def device_memory_bytes(given_gb: Optional[float]) -> tuple:
    """(bytes, where it came from)."""
    if given_gb is not None:
        return int(given_gb * GB), "--device-memory-gb"
    import ascend_patches

    return ascend_patches.device_memory("total")


def cheapest_fix(x: Layout, limit: int) -> Optional[str]:
    """The first change, in order of what it costs in speed, that fits the device: the
    distributed optimizer (communication only), selective recomputation of the MLP, sequence
    parallelism, full recomputation of every layer, then a smaller micro-batch."""
    tries = []
    if not x.distributed_optimizer and x.dp * x.cp > 1:
        tries.append(("add --use-distributed-optimizer", {"distributed_optimizer": True}))
    if x.recompute.granularity is None:
        tries.append(("add --recompute-granularity selective --recompute-modules mlp",
                      {"recompute": Recompute("selective", modules=("mlp",))}))
    if x.tp > 1 and not x.sequence_parallel:
        tries.append(("add --sequence-parallel", {"sequence_parallel": True}))
    if x.recompute.granularity != "full":
        tries.append(("add --recompute-granularity full --recompute-method uniform --recompute-num-layers 1",
                      {"recompute": Recompute("full", "uniform", 1)}))
    if x.micro_batch > 1:
        tries.append(("use --micro-batch-size 1", {"micro_batch": 1}))
    changes = {}
    for i, (_, change) in enumerate(tries):  # cumulative: each step keeps the ones before it
        changes.update(change)
        if plan(dataclasses.replace(x, **changes)).total <= limit:
            return "; ".join(text for text, _ in tries[:i + 1])
    return None


def table(p: Plan, limit: int, where: str) -> str:
    lines = [f"per device ({p.stage} pipeline stage, {p.parameters / 1e9:.3f} B parameters):"]
    for name, value in p.rows():
        lines.append(f"  {name:<48} {value / GB:9.2f} GB {value / 2 ** 30:9.2f} GiB")
    lines.append(f"  {'device memory (' + where + ')':<48} {limit / GB:9.2f} GB {limit / 2 ** 30:9.2f} GiB")
    if p.offloaded:
        lines.append(f"  activation offload ({', '.join(p.offloaded)}) is not counted: the activations are those kept "
                     "without it, an upper bound")
    return "\n".join(lines)


def check(s, limit: int, where: str) -> tuple:
    """(fits, the plan's table and verdict) for run settings ``s``."""
    x = Layout.of(s)
    p = plan(x)
    text = table(p, limit, where)
    usable = int(limit * USABLE)
    if p.total <= usable:
        return True, text + f"\nfits: {p.total / GB:.2f} GB of the {usable / GB:.2f} GB usable ({USABLE:.0%} of the device)"
    fix = cheapest_fix(x, usable)
    return False, text + (f"\ndoes not fit: {p.total / GB:.2f} GB needed, {usable / GB:.2f} GB usable ({USABLE:.0%} of "
                          f"the device's {limit / GB:.2f} GB); "
                          + (f"cheapest change that fits: {fix}" if fix else
                             "no recomputation or sharding flag makes it fit: add devices (TP, PP) or shorten "
                             "--seq-length"))


def refuse_if_it_does_not_fit(s, given_gb: Optional[float] = None) -> None:
    """recipes.pretrain's check before it builds anything: the plan's table on rank 0, then one
    line naming the cheapest change that fits (``--skip-memory-check`` runs it anyway)."""
    import os
    import sys

    from recipes.errors import BadInput

    limit, where = device_memory_bytes(given_gb)
    fits, text = check(s, limit, where)
    if fits:
        return
    if int(os.environ.get("RANK", "0")) == 0:
        print(text, file=sys.stderr, flush=True)
    raise BadInput(text.splitlines()[-1] + " (recipes.memory_plan; --skip-memory-check runs it anyway)")
