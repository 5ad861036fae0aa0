"""What a run trains and checkpoints: the full model, or LoRA adapters on a frozen base.

Both answer the same three calls, so the loop never asks which one it holds:

- ``prepare(chunks)``: before the DDP wrap (LoRA loads the frozen base here and wraps its
  linear layers; full weights need nothing);
- ``load(models, optimizer, scheduler)``: restore what ``--load`` (or ``--lora-load``)
  brings and return the progress (iteration, consumed samples) to continue from;
- ``save(iteration, models, optimizer, scheduler, progress)``: an atomic checkpoint.
"""

from __future__ import annotations

from typing import List

from recipes.errors import BadInput, MissingInput
from recipes.model import checkpointing, lora
from recipes.train.run_settings import RunSettings

FRESH = {"iteration": 0, "consumed_samples": 0}


def _say(message: str) -> None:
    import torch.distributed as dist

    if dist.get_rank() == 0:
        print(message, flush=True)


class FullWeights:
    def __init__(self, s: RunSettings):
        self.s = s

    def prepare(self, chunks: List) -> List:
        return chunks

    def load(self, models, optimizer, scheduler) -> dict:
        r = self.s.resume
        if not r.loads_weights:
            return dict(FRESH)
        full = r.kind == "full"
        loaded = checkpointing.load(r.path, models, optimizer if full else None, scheduler if full else None,
                                    restore_rng=full)
        _say(f"loaded {r.path} (iteration {loaded['iteration']}){'' if full else ' weights only'}")
        return loaded if full else dict(FRESH)

    def save(self, iteration, models, optimizer, scheduler, progress):
        return checkpointing.save(self.s.save, iteration, models, optimizer, scheduler, progress,
                                  self.s.checkpoint_args())


class LoraWeights:
    def __init__(self, s: RunSettings):
        self.s, self.wrapped = s, None

    def prepare(self, chunks: List) -> List:
        if len(chunks) > 1:
            raise BadInput("LoRA with virtual pipeline stages is not built; drop --num-layers-per-virtual-pipeline-stage")
        if self.s.layout.distributed_optimizer:
            raise BadInput("LoRA checkpoints hold the plain optimizer state; drop --use-distributed-optimizer")
        r = self.s.resume
        if r.loads_weights:
            checkpointing.load(r.path, chunks, restore_rng=False)  # the frozen base, before wrapping
            _say(f"loaded base weights from {r.path}")
        c = self.s.lora
        self.wrapped = lora.apply_lora(checkpointing.unwrap(chunks[0]), list(c.targets), c.r, c.alpha, c.dropout,
                                       list(c.modules_to_save))
        return chunks

    def load(self, models, optimizer, scheduler) -> dict:
        path = self.s.lora.load
        if not path:
            return dict(FRESH)
        if checkpointing.latest_iteration(path) is None:
            raise MissingInput(f"--lora-load {path}: no checkpoint there")
        progress = lora.load(path, checkpointing.unwrap(models[0]), self.wrapped, optimizer, scheduler)
        _say(f"resumed LoRA from {path} (iteration {progress['iteration']})")
        return progress

    def save(self, iteration, models, optimizer, scheduler, progress):
        c = self.s.lora
        return lora.save(self.s.save, iteration, checkpointing.unwrap(models[0]), self.wrapped,
                         list(c.modules_to_save), optimizer, scheduler, progress,
                         c.config(self.s.resume.path), self.s.checkpoint_args())


def for_run(s: RunSettings):
    return LoraWeights(s) if s.lora else FullWeights(s)
