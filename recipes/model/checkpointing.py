"""Checkpoints through megatron.core's ``dist_checkpointing``, written atomically.

Layout (Megatron-LM's): ``<dir>/iter_0000100/`` (torch_dist shards) and
``<dir>/latest_checkpointed_iteration.txt``.  A save goes to ``iter_XXXXXXX.tmp`` first; only
when every rank has finished is it renamed and the tracker file replaced (``os.replace``,
atomic), so a crash during a save leaves "latest" pointing at the previous, complete one.

Saved: model and optimizer (sharded, so weights reshard across TP/PP on load), the LR
scheduler, the iteration and consumed samples (the data position), each rank's RNG state,
and the model arguments (``args.json``) so later commands need only ``--load``.

Checkpoints that stock Megatron-LM wrote (``pretrain_gpt.py``, ``tools/checkpoint``) record
no ``args.json``; their ``common.pt`` holds Megatron-LM's parsed arguments, which
``args_of`` reads into the same form, so every command loads them too.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

import ascend_patches
from recipes.errors import BadInput, MissingInput

TRACKER = "latest_checkpointed_iteration.txt"


def iter_dir(root, iteration) -> Path:
    return Path(root) / ("release" if iteration == "release" else f"iter_{int(iteration):07d}")


def latest_iteration(root) -> Optional[int]:
    tracker = Path(root) / TRACKER
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    if text == "release":
        return "release"
    try:
        return int(text)
    except ValueError:
        raise BadInput(f"{tracker}: expected an iteration number or 'release', got {text!r}") from None


def what_else_is_there(root) -> Optional[str]:
    """For a folder with no tracker: what it holds instead, as advice, or None when it holds
    nothing a run would lose (missing, empty, a metrics file, a crashed first save)."""
    root = Path(root)
    if not root.is_dir():
        return None if not root.exists() else f"{root} is a file, not a checkpoint folder"
    names = {p.name for p in root.iterdir()}
    if "config.json" in names and any(n.endswith((".safetensors", ".bin")) for n in names):
        return (f"{root} is a HuggingFace model folder; convert it first: python -m converters.hf_to_megatron "
                f"--input-model-dir {root} --output-model-dir <dir>, then --load <dir>")
    if any(n.startswith("mp_rank_") for n in names):
        return (f"{root} holds per-rank mp_rank_XX folders (a legacy Megatron/AscendSpeed checkpoint) but no {TRACKER}; "
                f"convert it with python -m converters.reshard --input-model-dir {root} --output-model-dir <dir>")
    finished = sorted(n for n in names if n.startswith("iter_") and not n.endswith(".tmp"))
    if finished:
        return (f"{root} holds {', '.join(finished[-3:])} but no {TRACKER}; write the iteration to load into "
                f"{root / TRACKER}")
    return None


def rng_state() -> dict:
    """Every RNG a resumed run must continue: python, numpy, torch's host generator, off the CPU
    the accelerator's default generator (Megatron-LM's ``cuda_rng_state``: the dropout outside
    megatron's tracker draws from it; ``torch.cuda`` is the NPU's under transfer_to_npu), and
    megatron's tracker."""
    state = {"random": random.getstate(), "np": np.random.get_state(), "torch": torch.get_rng_state(),
             "tracker": _tracker_states()}
    if ascend_patches.settings().backend != "cpu":
        state["device"] = torch.cuda.get_rng_state()
    return state


def _tracker_states():
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    return get_cuda_rng_tracker().get_states()


def set_rng_state(state) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(state["random"])
    np.random.set_state(state["np"])
    torch.set_rng_state(state["torch"])
    if "device" in state and ascend_patches.settings().backend != "cpu":  # saved and resumed on an accelerator
        torch.cuda.set_rng_state(state["device"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def unwrap(model):
    """The GPTModel inside DDP / Float16Module wrappers: checkpoint keys never depend on
    how the model was wrapped for training."""
    while hasattr(model, "module"):
        model = model.module
    return model


def _model_keys(models):
    """'model' for one chunk; 'model0', 'model1', ... for virtual pipeline chunks (Megatron-LM's keys)."""
    return ["model"] if len(models) == 1 else [f"model{i}" for i in range(len(models))]


def _sharded(models, optimizer, scheduler, is_loading: bool):
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    # the distributed optimizer's state in dp_reshardable form, Megatron-LM's default: sharded as
    # each rank holds it (no gather), loadable at another data-parallel size; megatron's default
    # here, fully_sharded_model_space, is refused by its torch_dist writer (flattened_range)
    metadata = {"dp_cp_group": ps.get_data_parallel_group(with_context_parallel=True),
                "singleton_local_shards": False, "distrib_optim_sharding_type": "dp_reshardable"}
    state = {key: unwrap(m).sharded_state_dict(prefix="", metadata=metadata)
             for key, m in zip(_model_keys(models), models)}
    model_sd = dict(state)
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(
            model_sd if len(models) > 1 else model_sd["model"], is_loading=is_loading, metadata=metadata)
    if scheduler is not None:
        state["opt_param_scheduler"] = scheduler.state_dict()
    pp, tp = ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()
    state["rng_state"] = ShardedObject(
        "rng_state", rng_state(), (pp, tp), (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()),
        replica_id=ps.get_data_parallel_rank(with_context_parallel=True))
    return state


def atomic_save(root, iteration: int, write, json_files: dict) -> Path:
    """Every rank calls ``write(tmp_dir)``; rank 0 then adds the JSON files, renames the
    folder into place and replaces the tracker atomically."""
    root = Path(root)
    final = iter_dir(root, iteration)
    tmp = final.with_name(final.name + ".tmp")
    rank = dist.get_rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a crashed save
        tmp.mkdir()
    dist.barrier()
    write(tmp)
    dist.barrier()
    if rank == 0:
        for name, content in json_files.items():
            (tmp / name).write_text(json.dumps(content, indent=1, sort_keys=True))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        write_tracker(root, iteration)
    dist.barrier()
    return final


def write_tracker(root, iteration) -> None:
    """Point "latest" at ``iteration`` (a number or "release") atomically."""
    tracker_tmp = Path(root) / (TRACKER + ".tmp")
    tracker_tmp.write_text(str(iteration))
    os.replace(tracker_tmp, Path(root) / TRACKER)


def save(root, iteration: int, models, optimizer, scheduler, progress: dict, args: dict) -> Path:
    """models: the list of model chunks (one unless virtual pipeline stages)."""
    from megatron.core import dist_checkpointing

    state = _sharded(models, optimizer, scheduler, is_loading=False)
    state["progress"] = progress
    return atomic_save(root, iteration, lambda tmp: dist_checkpointing.save(state, str(tmp)), {"args.json": args})


def load_args(root) -> dict:
    it = latest_iteration(root)
    if it is None:
        raise MissingInput(f"--load {root}: no {TRACKER} (not a checkpoint folder)")
    return args_of(iter_dir(root, it))


def args_of(folder) -> dict:
    """The model arguments of one iteration folder: its ``args.json``, or for a checkpoint of
    stock Megatron-LM the arguments its ``common.pt`` records."""
    folder = Path(folder)
    path = folder / "args.json"
    if path.is_file():
        return json.loads(path.read_text())
    if (folder / "common.pt").is_file():
        common = torch.load(folder / "common.pt", map_location="cpu", weights_only=False)
        if isinstance(common, dict) and common.get("args") is not None:
            return args_from_megatron_lm(common["args"], folder)
    raise MissingInput(f"{path} missing (and no Megatron-LM arguments in common.pt): cannot tell the "
                            "model's shape")


def args_from_megatron_lm(a, where) -> dict:
    """Megatron-LM's argument namespace as this project's ``args.json``; a model that is not
    LLaMA-shaped (RMSNorm, SwiGLU, RoPE, no biases, untied embeddings) is refused."""
    not_llama = [what for what, ok in (
        ("normalization RMSNorm", getattr(a, "normalization", None) == "RMSNorm"),
        ("--swiglu", getattr(a, "swiglu", False)),
        ("--position-embedding-type rope", getattr(a, "position_embedding_type", None) == "rope"),
        ("--disable-bias-linear", not getattr(a, "add_bias_linear", True)),
        ("--untie-embeddings-and-output-weights", getattr(a, "untie_embeddings_and_output_weights", False)))
        if not ok]
    if not_llama:
        raise BadInput(f"{where}: a Megatron-LM checkpoint of a model that is not LLaMA-shaped "
                         f"(it lacks {', '.join(not_llama)})")
    groups = a.num_query_groups if getattr(a, "group_query_attention", False) else a.num_attention_heads
    padded = a.padded_vocab_size
    shape = {"num_layers": a.num_layers, "hidden_size": a.hidden_size, "ffn_hidden_size": a.ffn_hidden_size,
             "num_attention_heads": a.num_attention_heads, "num_query_groups": groups, "vocab_size": padded,
             "seq_length": a.max_position_embeddings or a.seq_length, "rope_theta": float(a.rotary_base),
             "norm_epsilon": a.layernorm_epsilon}
    tokenizer = getattr(a, "tokenizer_model", None)
    return {"model": None, "shape": shape, "padded_vocab_size": padded,
            "vocab_size": None,  # the tokenizer's: Megatron-LM records only the padded rows
            "tensor_model_parallel_size": a.tensor_model_parallel_size,
            "pipeline_model_parallel_size": a.pipeline_model_parallel_size, "bf16": bool(a.bf16),
            "fp16": bool(a.fp16), "tokenizer_name_or_path": str(tokenizer) if tokenizer else None,
            "make_vocab_size_divisible_by": a.make_vocab_size_divisible_by, "written_by": "Megatron-LM"}


def load(root, models, optimizer=None, scheduler=None, restore_rng: bool = True) -> dict:
    """Load the latest checkpoint into the model chunks (and optimizer/scheduler); return progress."""
    from megatron.core import dist_checkpointing

    it = latest_iteration(root)
    if it is None:
        raise MissingInput(f"--load {root}: no {TRACKER}")
    path = iter_dir(root, it)
    if not path.is_dir():
        raise MissingInput(f"{root}/{TRACKER} points at {path}, which does not exist")
    state = _sharded(models, optimizer, scheduler, is_loading=True)
    if not restore_rng:
        state.pop("rng_state")
    state["progress"] = None
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        loaded = dist_checkpointing.load(state, str(path))
    except (Exception, CheckpointException) as e:  # torch.distributed.checkpoint wraps megatron's error per rank
        import traceback

        text = "".join(traceback.format_exception(e))
        found = next((line.strip() for line in text.splitlines() if "shape mismatch" in line.lower()), None)
        if found is None:
            raise
        saved = load_args(root).get("shape")
        raise BadInput(f"--load {root}: the checkpoint's tensors do not fit this model ({found[-200:]}); "
                       f"it was saved with {saved}: drop the shape flags (--num-layers, --hidden-size, ...) that differ "
                       "from it, or convert it (converters.reshard)") from None
    for key, m in zip(_model_keys(models), models):
        unwrap(m).load_state_dict(loaded[key])
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(loaded["opt_param_scheduler"])
    if restore_rng:
        set_rng_state(loaded["rng_state"])
    return loaded.get("progress") or {"iteration": 0 if it == "release" else it, "consumed_samples": 0}
