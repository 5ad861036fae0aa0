"""The DeepSpeed engine of the pretrain recipe: Megatron-Core's LLaMA-2 under ``deepspeed.initialize``.

    torchrun --nproc-per-node 8 -m recipes.pretrain --model llama2-7b --deepspeed \\
        --deepspeed_config recipes/deepspeed_configs/llama2-7b.json [--zero-stage 2] [--no-pipeline-parallel] \\
        [--deepspeed-activation-checkpointing [--partition-activations]] --data-path ... --train-iters ...
    deepspeed --num_gpus 8 --module recipes.pretrain ...   (DeepSpeed's launcher; --local_rank is accepted)

ZeRO 1/2/3 (models built under ``deepspeed.zero.Init`` at stage 3), tensor parallelism through
``ascend_patches.with_deepspeed.mpu`` (megatron-core's groups), and pipeline parallelism through
a ``deepspeed.pipe.PipelineModule`` made of Megatron-Core's own modules unless
``--no-pipeline-parallel`` is given (DeepSpeed's pipeline takes ZeRO-1 at most).  The data,
metrics (tokens/s, TFLOP/s, MFU), NaN stop and atomic checkpoints are the built-in loop's.
The DeepSpeed config file gives what the flags do not; a flag that contradicts it is an error
naming both.  Checkpoints are DeepSpeed's own (``engine.save_checkpoint``) in
``iter_XXXXXXX/``, renamed into place when complete, with this project's tracker and args.json.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import List, Optional

import torch
import torch.distributed as dist

import ascend_patches
from ascend_patches.with_deepspeed import accelerator_note, mpu
from recipes.model import llama2, parallel
from recipes.train import throughput, training
from recipes.model import checkpointing
from recipes.errors import BadInput
from recipes.train.run_settings import RunSettings
from recipes.train.trainer import Trainer, dp_mean


# "auto" in the zero_optimization section, as Hugging Face's DeepSpeed integration reads it:
# sizes that follow the hidden size h (a bucket of one h x h weight, parameters below 10 h
# elements kept whole at stage 3), so a small model does not carry DeepSpeed's fixed
# 5e8-element buckets
AUTO_ZERO = {"reduce_bucket_size": lambda h: h * h, "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
             "stage3_param_persistence_threshold": lambda h: 10 * h}


def ds_config(s: RunSettings) -> dict:
    """The config handed to DeepSpeed: the file's, with every value the settings determine."""
    cfg = json.loads(json.dumps(s.deepspeed.config))  # a copy
    zero = cfg.setdefault("zero_optimization", {})
    for key, value in zero.items():
        if value == "auto":
            if key not in AUTO_ZERO:
                raise BadInput(f"--deepspeed_config {s.deepspeed.config_path}: zero_optimization.{key} is \"auto\", "
                               f"which this recipe fills only for {', '.join(sorted(AUTO_ZERO))}; give a number")
            zero[key] = AUTO_ZERO[key](s.shape.hidden_size)
    b, o = s.batches, s.optim
    cfg.update(train_micro_batch_size_per_gpu=b.micro, train_batch_size=b.global_batch,
               gradient_accumulation_steps=b.num_microbatches, gradient_clipping=o.clip_grad,
               steps_per_print=cfg.get("steps_per_print", 10 ** 9))
    cfg.setdefault("zero_optimization", {})["stage"] = s.deepspeed.zero_stage
    cfg["bf16"] = dict(cfg.get("bf16") or {}, enabled=s.bf16)
    cfg["fp16"] = dict(cfg.get("fp16") or {}, enabled=s.fp16)
    params = dict((cfg.get("optimizer") or {}).get("params") or {})
    params.update(lr=o.lr, betas=list(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    if ascend_patches.settings().backend == "cpu":
        params.setdefault("torch_adam", True)  # DeepSpeed's CPU FusedAdam is a JIT build; torch's AdamW is the same math
        if params["torch_adam"]:
            params.setdefault("fused", True)  # torch's one-kernel CPU AdamW, as megatron gets from the adamw patch
    cfg["optimizer"] = {"type": (cfg.get("optimizer") or {}).get("type", "AdamW"), "params": params}
    if s.deepspeed.activation_checkpointing:
        cfg["activation_checkpointing"] = dict(cfg.get("activation_checkpointing") or {},
                                               partition_activations=s.deepspeed.partition_activations)
    return cfg


def param_groups(model, weight_decay: float) -> List[dict]:
    """Megatron's rule: biases and 1-D parameters (norms) take no weight decay.  Under
    ``zero.Init`` a parameter is a flat partition: its shape is ``ds_shape``."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            dims = len(getattr(p, "ds_shape", p.shape))
            (no_decay if dims == 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "wd_mult": 1.0, "weight_decay": weight_decay},
            {"params": no_decay, "wd_mult": 0.0, "weight_decay": 0.0}]


class DeepSpeedEngine(Trainer):
    """The built-in loop's data, metrics, evaluation and logging; DeepSpeed's engine for the
    model, optimizer, gradient accumulation and checkpoints."""

    def setup(self) -> None:
        import deepspeed

        s, L = self.s, self.s.layout
        self.memory_at_start = throughput.process_memory_gib().get("rss_gib")
        if s.lora:
            raise BadInput("--lora-target-modules with --deepspeed is not built; LoRA runs in the built-in engine")
        parallel.default_rendezvous_env()
        deepspeed.init_distributed(dist_backend=ascend_patches.dist_backend())
        # megatron's groups: TP for the layers; DeepSpeed's pipeline makes its own stage groups
        parallel.init_distributed(L.tp, 1, None, seed=s.seed)
        self.cfg = ds_config(s)
        if s.deepspeed.activation_checkpointing:
            deepspeed.checkpointing.configure(mpu, deepspeed_config=self.cfg,
                                              partition_activations=s.deepspeed.partition_activations)
            deepspeed.checkpointing.model_parallel_cuda_manual_seed(s.seed)
        self.on_cpu = ascend_patches.settings().backend == "cpu"
        self.heap_note = ascend_patches.keep_freed_memory() if self.on_cpu else None  # as the built-in loop does
        model = self._build_model()
        self.loaded_weights = self._load_project_weights(model)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, model_parameters=param_groups(model, s.optim.weight_decay), config=self.cfg,
            mpu=None if self.pipeline else mpu)
        self.models = [self.engine]
        self.scheduler = training.build_scheduler(self.engine.optimizer, s.optim, s.train_iters, s.batches.global_batch)

    @property
    def pipeline(self) -> bool:
        return self.s.deepspeed.pipeline_stages > 1

    def _config(self):
        s, L = self.s, self.s.layout
        return llama2.transformer_config(
            s.shape, tensor_model_parallel_size=L.tp, params_dtype=s.dtype, bf16=s.bf16, fp16=s.fp16,
            hidden_dropout=s.hidden_dropout, attention_dropout=s.attention_dropout,
            **llama2.initialisation(s.use_cpu_initialization),
            **({"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
               if s.deepspeed.activation_checkpointing else {}))

    def _build_model(self):
        import deepspeed

        s = self.s
        if self.pipeline:
            from recipes.train.deepspeed_pipe import pipeline_module

            return pipeline_module(s, self._config(), self.s.deepspeed.pipeline_stages)
        if s.deepspeed.zero_stage == 3:
            with deepspeed.zero.Init(config_dict_or_path=self.cfg, mpu=mpu):
                return llama2.build_model(s.shape, config=self._config(), vocab_size=s.padded_vocab)
        return llama2.build_model(s.shape, config=self._config(), vocab_size=s.padded_vocab)

    def _load_project_weights(self, model) -> bool:
        """--load of this project's format (a converter's release, a built-in engine's save,
        --finetune): its weights go into the megatron model before DeepSpeed takes it.  True
        if it did; a DeepSpeed checkpoint is left to ``load``."""
        r = self.s.resume
        if not r.loads_weights or is_deepspeed_checkpoint(r.path, r.iteration):
            return False
        if r.kind == "full":
            raise BadInput(f"--load {r.path}: a built-in engine checkpoint; its optimizer state does not resume under "
                           "DeepSpeed: add --finetune to start from its weights")
        if self.pipeline or self.s.deepspeed.zero_stage == 3:
            raise BadInput(f"--load {r.path}: this project's checkpoint loads into DeepSpeed's ZeRO 0-2 without its "
                           "pipeline (ZeRO-3 partitions the weights as they are built); use --zero-stage 2 or less "
                           "and --no-pipeline-parallel")
        checkpointing.load(r.path, [model], restore_rng=False)
        if dist.get_rank() == 0:
            print(f"loaded {r.path} weights only (this project's format, into the model DeepSpeed trains)", flush=True)
        return True

    def resume(self) -> None:
        self.progress = {"iteration": 0, "consumed_samples": 0}
        r = self.s.resume
        if r.loads_weights and not self.loaded_weights:
            self.progress = load(self.engine, r, self.scheduler)
        self.dp_rank, self.dp_size = self._dp()
        data, self.valid = training.build_data(self.s, self.dp_rank, self.dp_size,
                                               self.progress["consumed_samples"], 1)
        self.data = self._counted(data)

    def _dp(self):
        if self.pipeline:
            grid = self.engine.grid
            return grid.get_data_parallel_rank(), grid.get_data_parallel_world_size()
        return mpu.get_data_parallel_rank(), mpu.get_data_parallel_world_size()

    def _micro_losses(self) -> Optional[float]:
        """One global batch through the engine; the mean micro-batch loss (last stage) or None."""
        b = self.s.batches
        if self.pipeline:
            loss = self.engine.train_batch(data_iter=_pipe_batches(self.data))
            return float(loss) if self.engine.is_last_stage() else None
        losses = []
        for _ in range(b.num_microbatches):
            batch = next(self.data)
            loss = _loss(self.engine, batch)
            self.engine.backward(loss)
            self.engine.step()
            losses.append(loss.detach().float())
        return torch.stack(losses).mean().item()

    def step(self) -> dict:
        s, it = self.s, self.progress["iteration"] + 1
        loss = self._micro_losses()
        if loss is not None and (loss != loss or loss in (float("inf"), float("-inf"))):
            raise FloatingPointError(f"iteration {it}: loss is {loss} on rank {dist.get_rank()}; stopping; the last "
                                     "checkpoint is untouched")
        self.scheduler.step(increment=s.batches.global_batch)
        self.progress = {"iteration": it, "consumed_samples": self.progress["consumed_samples"] + s.batches.global_batch}
        group = self.engine.grid.get_data_parallel_group() if self.pipeline else mpu.get_data_parallel_group()
        m = self.meter.step(self._step_work(group))
        if loss is not None:
            loss = dp_mean(loss, group)
        grad_norm = self.engine.get_global_grad_norm()
        return {"iteration": it, "loss": loss, "lr": self.engine.optimizer.param_groups[0]["lr"],
                "grad_norm": None if grad_norm is None else float(grad_norm), **m, "peak_tflops": self.meter.peak,
                "consumed_samples": self.progress["consumed_samples"], **self._baseline()}

    def evaluate(self) -> dict:
        return {}  # validation under DeepSpeed is not built; --eval-interval is refused for this engine

    def save(self) -> None:
        s, it = self.s, self.progress["iteration"]
        if s.save and ((s.save_interval and it % s.save_interval == 0) or it == s.stop_at):
            save(self.engine, s.save, it, self.progress, self.scheduler, s.checkpoint_args())
            if dist.get_rank() == 0:
                print(f"saved {checkpointing.iter_dir(s.save, it)} (DeepSpeed)", flush=True)

    def _announce(self) -> None:
        super()._announce()
        if dist.get_rank() == 0:
            zs = self.s.deepspeed.zero_stage
            print(f"DeepSpeed: ZeRO stage {zs}, {self.s.deepspeed.pipeline_stages} pipeline stage(s); "
                  f"{accelerator_note()}", flush=True)


def _loss(engine, batch) -> torch.Tensor:
    """The micro-batch's mean loss through the engine, as the built-in loop computes it (its
    positions, and a packed batch's PackedSeqParams)."""
    batch = training.on_device(training.with_defaults(batch), ascend_patches.device())
    return training.lm_loss(training.forward(engine, batch), batch["loss_mask"])[0]


def _pipe_batches(data):
    """DeepSpeed's pipeline reads ((inputs...), labels) per micro-batch."""
    while True:
        batch = next(data)
        tokens = batch["tokens"]
        pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
        mask = batch.get("loss_mask")
        mask = torch.ones_like(batch["labels"], dtype=torch.float) if mask is None else mask
        yield (tokens, pos), (batch["labels"], mask)


def save(engine, root, iteration: int, progress: dict, scheduler, args: dict) -> Path:
    """DeepSpeed's checkpoint in ``iter_XXXXXXX.tmp``, renamed when every rank is done; then this
    project's tracker (and DeepSpeed's ``latest``) point at it."""
    root = Path(root)
    final = checkpointing.iter_dir(root, iteration)
    tmp = final.with_name(final.name + ".tmp")
    if dist.get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    dist.barrier()
    # the RNG states (dropout's stream among them), as the built-in loop saves them: DeepSpeed writes
    # client_state with each model-parallel rank's model states, from data-parallel rank 0, whose
    # streams every data-parallel rank shares
    engine.save_checkpoint(str(root), tag=tmp.name, save_latest=False,
                           client_state={"progress": progress, "scheduler": scheduler.state_dict(),
                                         "rng_state": checkpointing.rng_state()})
    dist.barrier()
    if dist.get_rank() == 0:
        (tmp / "args.json").write_text(json.dumps(args, indent=1, sort_keys=True))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        (root / "latest.tmp").write_text(final.name)
        os.replace(root / "latest.tmp", root / "latest")
        checkpointing.write_tracker(root, iteration)
    dist.barrier()
    return final


def is_deepspeed_checkpoint(root, iteration) -> bool:
    """Whether the checkpoint folder holds DeepSpeed's model states (every layout of them ends so)."""
    return any(checkpointing.iter_dir(root, iteration).glob("*model_states.pt"))


def load(engine, resume, scheduler) -> dict:
    """Resume a DeepSpeed checkpoint written by ``save``; the progress to continue from."""
    tag = checkpointing.iter_dir(resume.path, resume.iteration).name
    full = resume.kind == "full"
    path, client = engine.load_checkpoint(str(resume.path), tag=tag, load_optimizer_states=full,
                                          load_lr_scheduler_states=full, load_module_only=not full)
    if path is None:
        raise BadInput(f"--load {resume.path}: {tag} is not a DeepSpeed checkpoint (converters.deepspeed_to_megatron "
                       "turns one into this project's format; the other way is not built)")
    if dist.get_rank() == 0:
        print(f"loaded {path} (DeepSpeed, iteration {client['progress']['iteration']})"
              f"{'' if full else ' weights only'}", flush=True)
    if not full:
        return {"iteration": 0, "consumed_samples": 0}
    scheduler.load_state_dict(client["scheduler"])
    if "rng_state" in client:
        checkpointing.set_rng_state(client["rng_state"])
    elif dist.get_rank() == 0:
        print(f"note: {path} holds no RNG state (written before DeepSpeed checkpoints kept it): dropout's masks "
              "after this resume differ from an uninterrupted run's", flush=True)
    return client["progress"]
