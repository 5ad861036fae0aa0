"""LoRA on Megatron-Core's tensor-parallel linear layers, and its adapter-only checkpoints.

Why not peft: peft's Megatron support (``LoraConfig(megatron_config=..., megatron_core=...)``)
does not run with peft 0.21.2 and megatron-core 0.16:
``dispatch_megatron`` raises ``KeyError: 'fan_in_fan_out'`` (peft no longer passes that key);
past it, ``LoraParallelLinear.update_layer`` raises ``KeyError`` on ``lora_bias``; past that,
its forward multiplies the ``(output, bias)`` tuple megatron's parallel linears return by
the scaling (``TypeError``).  So this module holds the same design in ~100 lines:

- Column-parallel base (``linear_qkv``, ``linear_fc1``): A [r, in] replicated, B [out/TP, r]
  split like the base's rows.  The gradient reaching A's output is all-reduced over TP (each
  rank holds part of B), as megatron does for an input it shares.
- Row-parallel base (``linear_proj``, ``linear_fc2``): A [r, in/TP] split like the base's
  columns, its output all-reduced; B [out, r] replicated.
- B starts at zero, A Kaiming-uniform (peft's default), scaling alpha / r.

AscendSpeed's target names map to Megatron-Core modules: query_key_value -> linear_qkv,
dense -> linear_proj, gate_proj / up_proj / dense_h_to_4h -> linear_fc1 (one adapter on the
merged [gate; up] weight), down_proj / dense_4h_to_h -> linear_fc2.  Modules to save:
word_embeddings -> embedding.word_embeddings, lm_head / output_layer -> output_layer.

Checkpoints hold only adapters (and modules to save), the optimizer, scheduler, RNG and data
position, one file per TP/PP rank (``adapter_mp_rank_XX_YYY.pt``), written atomically like
``recipes.model.checkpointing``.  Resuming needs the same TP/PP; ``converters.merge_lora`` merges
them into the base at any layout.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from recipes.errors import BadInput, MissingInput

TARGET_ALIASES = {
    "query_key_value": "linear_qkv", "linear_qkv": "linear_qkv",
    "dense": "linear_proj", "linear_proj": "linear_proj",
    "gate_proj": "linear_fc1", "up_proj": "linear_fc1", "dense_h_to_4h": "linear_fc1", "linear_fc1": "linear_fc1",
    "down_proj": "linear_fc2", "dense_4h_to_h": "linear_fc2", "linear_fc2": "linear_fc2",
}
SAVE_ALIASES = {"word_embeddings": "embedding.word_embeddings", "embedding": "embedding.word_embeddings",
                "embedding.word_embeddings": "embedding.word_embeddings", "lm_head": "output_layer",
                "lm_head.lm_head": "output_layer", "output_layer": "output_layer"}
# canonical converter name of each target's base weight
CANONICAL = {"linear_qkv": "qkv", "linear_proj": "proj", "linear_fc1": "fc1", "linear_fc2": "fc2"}


def resolve_targets(names: Iterable[str]) -> List[str]:
    out = []
    for n in names:
        if n not in TARGET_ALIASES:
            raise BadInput(f"--lora-target-modules {n!r}: expected one of {', '.join(sorted(TARGET_ALIASES))}")
        if TARGET_ALIASES[n] not in out:
            out.append(TARGET_ALIASES[n])
    return out


def resolve_modules_to_save(names: Iterable[str]) -> List[str]:
    out = []
    for n in names or ():
        if n not in SAVE_ALIASES:
            raise BadInput(f"--lora-modules-to-save {n!r}: expected one of {', '.join(sorted(SAVE_ALIASES))}")
        if SAVE_ALIASES[n] not in out:
            out.append(SAVE_ALIASES[n])
    return out


class LoraParallelLinear(nn.Module):
    """A megatron Column/RowParallelLinear plus a trainable low-rank update."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, seed: int = 0):
        super().__init__()
        from megatron.core import parallel_state as ps
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
        from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

        if getattr(base.config, "sequence_parallel", False):
            raise NotImplementedError("LoRA with --sequence-parallel is not built; run LoRA without it")
        self.base = base
        self.column = isinstance(base, ColumnParallelLinear)
        if not self.column and not isinstance(base, RowParallelLinear):
            raise TypeError(f"LoRA targets megatron Column/RowParallelLinear, not {type(base).__name__}")
        self.r, self.scaling = r, alpha / r
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        tp = ps.get_tensor_model_parallel_world_size()
        w = base.weight
        out_local, in_local = w.shape
        b = torch.zeros(out_local, r)
        # A: Kaiming-uniform on the full fan-in, the same values on every TP rank
        full_in = in_local * (1 if self.column else tp)
        gen = torch.Generator().manual_seed(1234 + seed)  # per layer and target: same on every rank
        bound = 1 / math.sqrt(full_in) * math.sqrt(3) * math.sqrt(2 / (1 + 5))  # kaiming_uniform_(a=sqrt(5))
        full_a = torch.empty(r, full_in).uniform_(-bound, bound, generator=gen)
        a = full_a if self.column else full_a.chunk(tp, dim=1)[ps.get_tensor_model_parallel_rank()].clone()
        self.lora_A = nn.Parameter(a.to(w.device, w.dtype))  # drawn on the host (the same on every rank), kept
        self.lora_B = nn.Parameter(b.to(w.device, w.dtype))  # beside the weight it adapts
        if self.column:
            set_tensor_model_parallel_attributes(self.lora_B, is_parallel=True, dim=0, stride=1)
        else:
            set_tensor_model_parallel_attributes(self.lora_A, is_parallel=True, dim=1, stride=1)
        for p in base.parameters():
            p.requires_grad_(False)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        from megatron.core.tensor_parallel import (copy_to_tensor_model_parallel_region,
                                                   gather_from_tensor_model_parallel_region,
                                                   reduce_from_tensor_model_parallel_region)

        x = self.dropout(x).to(self.lora_A.dtype)
        if self.column:
            h = copy_to_tensor_model_parallel_region(F.linear(x, self.lora_A))  # all-reduce its gradient
            d = F.linear(h, self.lora_B)
            if self.base.gather_output:
                d = gather_from_tensor_model_parallel_region(d)
        else:
            h = reduce_from_tensor_model_parallel_region(F.linear(x, self.lora_A))
            d = F.linear(h, self.lora_B)
        return d * self.scaling

    def forward(self, x, *args, **kwargs):
        out, bias = self.base(x, *args, **kwargs)
        return out + self.delta(x).to(out.dtype), bias


def merge_in_place(model: nn.Module) -> int:
    """Fold every adapter into the weight it adapts, on each rank's shard (W += alpha/r * B @ A:
    a column-parallel layer holds its rows of B and all of A, a row-parallel one all of B and its
    columns of A), and put the plain layer back; the number merged.  Serving's way: the engine
    then runs megatron's own layers."""
    merged = 0
    for owner in list(model.modules()):
        for name, child in list(owner.named_children()):
            if isinstance(child, LoraParallelLinear):
                w = child.base.weight
                acc = torch.promote_types(w.dtype, torch.float32)  # a 16-bit weight's update summed in fp32
                with torch.no_grad():
                    w += (child.scaling * (child.lora_B.to(acc) @ child.lora_A.to(acc))).to(w.dtype)
                setattr(owner, name, child.base)
                merged += 1
    return merged


def apply_lora(model: nn.Module, targets: List[str], r: int, alpha: float, dropout: float = 0.0,
               modules_to_save: Optional[List[str]] = None) -> Dict[str, nn.Module]:
    """Freeze the model, wrap every target linear, unfreeze the modules to save.  Returns
    {global name: LoRA module}, names using global layer numbers (PP-independent)."""
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = {}
    layers = getattr(getattr(model, "decoder", None), "layers", [])
    for layer in layers:
        gl = layer.layer_number - 1  # megatron's layer_number is global and 1-based
        for owner_name, owner in (("self_attention", layer.self_attention), ("mlp", layer.mlp)):
            for t in targets:
                if hasattr(owner, t):
                    base = getattr(owner, t)
                    lora = LoraParallelLinear(base, r, alpha, dropout, seed=gl * 8 + list(CANONICAL).index(t))
                    setattr(owner, t, lora)
                    wrapped[f"decoder.layers.{gl}.{owner_name}.{t}"] = lora
    if not wrapped and layers:
        raise BadInput(f"--lora-target-modules {targets}: no such linear layer in the model")
    for name in modules_to_save or ():
        mod = _submodule(model, name)
        if mod is not None:
            for p in mod.parameters():
                p.requires_grad_(True)
    return wrapped


def _submodule(model: nn.Module, dotted: str) -> Optional[nn.Module]:
    """``model.embedding.word_embeddings`` and the like; None when not on this pipeline stage."""
    mod = model
    for part in dotted.split("."):
        mod = getattr(mod, part, None)
        if mod is None:
            return None
    return mod


def adapter_state(model: nn.Module, wrapped: Dict[str, nn.Module], modules_to_save: List[str]) -> dict:
    sd = {}
    for name, m in wrapped.items():
        sd[name + ".lora_A"] = m.lora_A.detach().clone()
        sd[name + ".lora_B"] = m.lora_B.detach().clone()
    for name in modules_to_save or ():
        mod = _submodule(model, name)
        if mod is not None:
            sd[name + ".weight"] = mod.weight.detach().clone()
    return sd


def load_adapter_state(model: nn.Module, wrapped: Dict[str, nn.Module], sd: dict, where: str):
    params = {n + ".lora_A": m.lora_A for n, m in wrapped.items()}
    params.update({n + ".lora_B": m.lora_B for n, m in wrapped.items()})
    for name, t in sd.items():
        if name.endswith(".lora_A") or name.endswith(".lora_B"):
            if name not in params:
                raise BadInput(f"{where}: adapter {name} has no matching layer (different --lora-target-modules?)")
            p = params.pop(name)
        else:
            mod = _submodule(model, name[:-len(".weight")])
            if mod is None:
                raise BadInput(f"{where}: saved module {name} is not in this model")
            p = mod.weight
        if p.shape != t.shape:
            raise BadInput(f"{where}: {name} has shape {tuple(t.shape)}, the model {tuple(p.shape)}")
        with torch.no_grad():
            p.copy_(t)
    if params:
        raise BadInput(f"{where}: no saved adapter for {sorted(params)[:3]} ...")


def rank_file(tp_rank: int, pp_rank: int) -> str:
    return f"adapter_mp_rank_{tp_rank:02d}_{pp_rank:03d}.pt"


def save(root, iteration: int, model, wrapped, modules_to_save, optimizer, scheduler, progress: dict,
         config: dict, args: dict):
    """Adapter-only checkpoint; same atomic protocol as recipes.model.checkpointing."""
    from megatron.core import parallel_state as ps

    from recipes.model import checkpointing

    state = {"adapters": adapter_state(model, wrapped, modules_to_save), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "progress": progress, "rng": checkpointing.rng_state()}
    meta = {**config, "tensor_model_parallel_size": ps.get_tensor_model_parallel_world_size(),
            "pipeline_model_parallel_size": ps.get_pipeline_model_parallel_world_size()}

    def write(tmp: Path):
        if ps.get_data_parallel_rank() == 0:
            torch.save(state, tmp / rank_file(ps.get_tensor_model_parallel_rank(),
                                               ps.get_pipeline_model_parallel_rank()))

    return checkpointing.atomic_save(root, iteration, write, {"lora_config.json": meta, "args.json": args})


def read_config(root) -> dict:
    from recipes.model import checkpointing

    it = checkpointing.latest_iteration(root)
    if it is None:
        raise MissingInput(f"--lora-load {root}: no {checkpointing.TRACKER}")
    path = checkpointing.iter_dir(root, it) / "lora_config.json"
    if not path.is_file():
        raise MissingInput(f"{path} missing: not a LoRA checkpoint")
    return json.loads(path.read_text())


ADAPTER_NAME = re.compile(r"decoder\.layers\.(\d+)\.(self_attention|mlp)\.(linear_\w+)\.lora_([AB])$")


def parse_adapter_name(name: str) -> Optional[Tuple[int, str, str]]:
    """(layer, linear, "A" or "B") of an adapter tensor's saved name; None for a module saved whole."""
    m = ADAPTER_NAME.match(name)
    return None if m is None else (int(m.group(1)), m.group(3), m.group(4))


def read_adapters(root) -> Tuple[dict, Path, Dict[str, Dict[int, torch.Tensor]]]:
    """(config, the iteration folder, {saved name: {TP rank: tensor}}) of the latest LoRA
    checkpoint under ``root``, every TP and PP rank's file read (each PP rank holds its own
    layers): what a merge needs, at any layout."""
    from recipes.model import checkpointing

    cfg = read_config(root)
    it_dir = checkpointing.iter_dir(root, checkpointing.latest_iteration(root))
    tp, pp = cfg["tensor_model_parallel_size"], cfg["pipeline_model_parallel_size"]
    per_rank: Dict[str, Dict[int, torch.Tensor]] = {}
    for t in range(tp):
        for p in range(pp):
            path = it_dir / rank_file(t, p)
            if not path.is_file():
                raise MissingInput(f"{path} missing (LoRA saved at TP={tp} PP={pp})")
            for name, tensor in torch.load(path, map_location="cpu", weights_only=False)["adapters"].items():
                per_rank.setdefault(name, {})[t] = tensor
    return cfg, it_dir, per_rank


def load(root, model, wrapped, optimizer=None, scheduler=None, restore_rng: bool = True) -> dict:
    from megatron.core import parallel_state as ps

    from recipes.model import checkpointing

    cfg = read_config(root)
    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    if (cfg["tensor_model_parallel_size"], cfg["pipeline_model_parallel_size"]) != (tp, pp):
        raise BadInput(f"--lora-load {root} was saved at TP={cfg['tensor_model_parallel_size']} "
                         f"PP={cfg['pipeline_model_parallel_size']}; resume at the same sizes (now TP={tp} PP={pp}), "
                         "or merge it with converters.merge_lora")
    it = checkpointing.latest_iteration(root)
    path = checkpointing.iter_dir(root, it) / rank_file(ps.get_tensor_model_parallel_rank(),
                                                         ps.get_pipeline_model_parallel_rank())
    state = torch.load(path, map_location="cpu", weights_only=False)
    load_adapter_state(model, wrapped, state["adapters"], str(path))
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        checkpointing.set_rng_state(state["rng"])
    return state["progress"]
