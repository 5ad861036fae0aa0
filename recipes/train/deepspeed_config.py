"""A DeepSpeed config file as data: read, and what it states for the recipe's flags.

The run's settings take the file's values for flags not given, so they read it here, without
DeepSpeed or its engine; the engine (``deepspeed_engine.ds_config``) completes it for
``deepspeed.initialize``.
"""

from __future__ import annotations

import json
from pathlib import Path

from recipes.errors import BadInput


def read_config(path: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise BadInput(f"--deepspeed_config {path}: no such file") from None
    except json.JSONDecodeError as e:
        raise BadInput(f"--deepspeed_config {path}: not JSON ({e})") from None


def flags_from_config(cfg: dict) -> dict:
    """The recipe settings a DeepSpeed config states, keyed by this recipe's flag dest."""
    out = {"micro_batch_size": cfg.get("train_micro_batch_size_per_gpu"), "global_batch_size": cfg.get("train_batch_size"),
           "zero_stage": (cfg.get("zero_optimization") or {}).get("stage"), "clip_grad": cfg.get("gradient_clipping")}
    if (cfg.get("bf16") or {}).get("enabled"):
        out["bf16"] = True
    if (cfg.get("fp16") or {}).get("enabled"):
        out["fp16"] = True
    params = (cfg.get("optimizer") or {}).get("params") or {}
    out["lr"] = params.get("lr")
    return {k: v for k, v in out.items() if v is not None and v != "auto"}  # "auto": the flags decide


CONFIG_NAMES = {"micro_batch_size": "train_micro_batch_size_per_gpu", "global_batch_size": "train_batch_size",
                "zero_stage": "zero_optimization.stage", "clip_grad": "gradient_clipping", "bf16": "bf16.enabled",
                "fp16": "fp16.enabled", "lr": "optimizer.params.lr"}


def check_flags_against_config(args, cfg: dict, path: str) -> dict:
    """The config's values for flags not given; an error for a given flag that disagrees."""
    stated = flags_from_config(cfg)
    conflicts = []
    for dest, value in stated.items():
        given = getattr(args, dest, None)
        if given not in (None, False) and given != value:
            conflicts.append(f"--{dest.replace('_', '-')} {given} contradicts {CONFIG_NAMES[dest]} = {value} in {path}")
    if conflicts:
        raise BadInput("; ".join(conflicts) + "; drop the flag or change the file")
    return stated
