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
    betas = params.get("betas")
    if betas not in (None, "auto") and (not isinstance(betas, (list, tuple)) or len(betas) != 2):
        raise BadInput(f"optimizer.params.betas = {betas!r}: expected [beta1, beta2]")
    out.update(lr=params.get("lr"), weight_decay=params.get("weight_decay"), adam_eps=params.get("eps"),
               adam_beta1=None if betas in (None, "auto") else betas[0],
               adam_beta2=None if betas in (None, "auto") else betas[1])
    return {k: v for k, v in out.items() if v is not None and v != "auto"}  # "auto": the flags decide


CONFIG_NAMES = {"micro_batch_size": "train_micro_batch_size_per_gpu", "global_batch_size": "train_batch_size",
                "zero_stage": "zero_optimization.stage", "clip_grad": "gradient_clipping", "bf16": "bf16.enabled",
                "fp16": "fp16.enabled", "lr": "optimizer.params.lr", "weight_decay": "optimizer.params.weight_decay",
                "adam_eps": "optimizer.params.eps", "adam_beta1": "optimizer.params.betas[0]",
                "adam_beta2": "optimizer.params.betas[1]"}


def check_config(cfg: dict, path: str) -> None:
    """What the recipe cannot honour in a DeepSpeed config, refused: a ``scheduler`` block (the
    recipe's megatron scheduler steps the learning rate; DeepSpeed's would step it as well)."""
    if cfg.get("scheduler"):
        kind = (cfg["scheduler"] or {}).get("type", "?")
        raise BadInput(f"--deepspeed_config {path}: a scheduler block ({kind}) would step the learning rate beside "
                       "the recipe's own scheduler (--lr, --min-lr, --lr-decay-style, --lr-warmup-iters); remove the "
                       "block and give those flags")


def global_batch(cfg: dict, path: str, micro: int, dp: int, global_batch_size: int, flag_given: bool) -> int:
    """The global batch under the file's ``gradient_accumulation_steps``: DeepSpeed's rule,
    train_batch_size = micro x accumulation x data-parallel size.  A ``--global-batch-size``
    (or the file's ``train_batch_size``) that disagrees is an error naming both values; without
    the key, the flags' (or the recipe's) global batch stands."""
    steps = cfg.get("gradient_accumulation_steps")
    if steps in (None, "auto"):
        return global_batch_size
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise BadInput(f"--deepspeed_config {path}: gradient_accumulation_steps = {steps!r}: expected a positive integer")
    implied = micro * steps * dp
    stated = cfg.get("train_batch_size")
    if stated not in (None, "auto") and stated != implied:
        raise BadInput(f"--deepspeed_config {path}: train_batch_size = {stated} but train_micro_batch_size_per_gpu "
                       f"{micro} x gradient_accumulation_steps = {steps} x data-parallel size {dp} = {implied}; "
                       "make them agree")
    if flag_given and global_batch_size != implied:
        raise BadInput(f"--global-batch-size {global_batch_size} contradicts gradient_accumulation_steps = {steps} in "
                       f"{path} (x micro-batch {micro} x data-parallel size {dp} = a global batch of {implied}); "
                       "drop the flag or change the file")
    return implied


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
