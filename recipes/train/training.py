"""One training step on stock megatron.core parts: DDP wrapper, Megatron optimizer, the
pipeline schedule from ``get_forward_backward_func``.  The pretrain and fine-tune recipes
and the tests all step through here."""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator, List, Optional

import torch

import ascend_patches
from recipes.errors import BadInput


def wrap_ddp(model, use_distributed_optimizer: bool = False, bucket_size: Optional[int] = None,
             overlap_grad_reduce: bool = False, overlap_param_gather: bool = False, chunk: int = 0):
    """Megatron's DDP as Megatron-LM builds it: with overlap, buckets of max(40M, 1M x DP)
    elements unless ``bucket_size`` says, and no bucketing past the first virtual-pipeline
    chunk (``chunk``), whose reduction overlaps the other chunks' compute anyway."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    if overlap_grad_reduce and bucket_size is None:
        bucket_size = max(40_000_000, 1_000_000 * ps.get_data_parallel_world_size(with_context_parallel=True))
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=overlap_grad_reduce,
        overlap_param_gather=overlap_param_gather, align_param_gather=overlap_param_gather,
        use_distributed_optimizer=use_distributed_optimizer, bucket_size=bucket_size,
    )
    return DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model,
                                   disable_bucketing=chunk > 0)


def wrap_float16(model):
    """Megatron's ``Float16Module`` where the model's config trains in bf16 or fp16 (what
    Megatron-LM does for --bf16/--fp16: weights in that dtype, fp32 at the edges); an fp32
    model is returned as it is."""
    if not (model.config.bf16 or model.config.fp16):
        return model
    from megatron.core.transformer.module import Float16Module

    return Float16Module(model.config, model)


def attach_grad_sync(models: List, optimizer=None) -> None:
    """What Megatron-LM's training loop sets on the config so the schedule all-reduces (or
    reduce-scatters) data-parallel gradients, all-reduces sequence-parallel norm gradients
    across TP, and syncs pipeline-shared embeddings after the last microbatch."""
    from megatron.core.distributed import finalize_model_grads

    config = models[0].config
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = _per_chunk(models, "no_sync")
    if models[0].ddp_config.overlap_grad_reduce:  # Megatron-LM's default --align-grad-reduce
        config.grad_sync_func = _per_chunk(models, "start_grad_sync")
    if models[0].ddp_config.overlap_param_gather:  # and --align-param-gather
        config.param_sync_func = _per_chunk(models, "start_param_sync")
    if optimizer is not None:
        config.grad_scale_func = optimizer.scale_loss


def _per_chunk(models: List, method: str):
    return [getattr(m, method) for m in models] if len(models) > 1 else getattr(models[0], method)


class ParamGatherOverlap:
    """--overlap-param-gather's life cycle, as Megatron-LM's training loop runs it: the forward
    pre-hooks (which wait for each bucket's all-gather) off until a first step has run from the
    loaded or initialised weights, off with a synchronous gather around evaluation and at the
    end, and a forced gather before a save, whose weights must be the updated ones.  Without
    the flag every method does nothing."""

    def __init__(self, models: List):
        self.models = models
        self.on = bool(getattr(models[0], "ddp_config", None) and models[0].ddp_config.overlap_param_gather)
        self.hooks, self.param_sync_func = False, None
        if self.on:
            for m in models:
                m.disable_forward_pre_hook(param_sync=False)
            config = models[0].config
            self.param_sync_func, config.param_sync_func = config.param_sync_func, None

    def after_step(self) -> None:
        if self.on and not self.hooks:
            for m in self.models:
                m.enable_forward_pre_hook()
            self.models[0].config.param_sync_func = self.param_sync_func
            self.hooks = True

    @contextlib.contextmanager
    def gathered(self):
        """A context in which the weights are whole (evaluation)."""
        was = self.hooks
        if was:
            for m in self.models:
                m.disable_forward_pre_hook(param_sync=True)
            self.hooks = False
        try:
            yield
        finally:
            if was:
                for m in self.models:
                    m.enable_forward_pre_hook()
                self.hooks = True

    def before_save(self) -> None:
        if self.hooks:
            for m in self.models:
                m.start_param_sync(force_sync=True)

    def end(self) -> None:
        if self.hooks:
            for m in self.models:
                m.disable_forward_pre_hook(param_sync=True)
            self.hooks = False


def build_optimizer(models: List, lr: float = 1e-3, weight_decay: float = 0.0, clip_grad: float = 1.0,
                    bf16: bool = False, fp16: bool = False, use_distributed_optimizer: bool = False,
                    betas=(0.9, 0.95), eps: float = 1e-8, initial_loss_scale: float = 2.0 ** 16,
                    min_lr: float = 0.0, **offload):
    """Megatron's optimizer for ``models``; ``offload``: recipes.train.offload's OptimizerConfig fields."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    cfg = OptimizerConfig(
        optimizer="adam", lr=lr, min_lr=min_lr, weight_decay=weight_decay, adam_beta1=betas[0], adam_beta2=betas[1],
        adam_eps=eps, clip_grad=clip_grad, bf16=bf16, fp16=fp16,
        use_distributed_optimizer=use_distributed_optimizer,
        initial_loss_scale=initial_loss_scale if fp16 else None, **offload,
    )
    return get_megatron_optimizer(cfg, models)


def lm_loss(output_tensor: torch.Tensor, loss_mask: torch.Tensor, cp_group=None):
    """Mean token loss over the tokens the mask keeps; megatron's (loss, stats) contract.
    Under context parallelism (``cp_group``) each rank holds a share of every sequence: its
    summed loss is divided by the whole micro-batch's token count, gathered over the group
    (megatron's schedule multiplies this form by the CP size, and DDP averages gradients over
    data x context parallel ranks), and the reported loss is the whole micro-batch's."""
    losses = output_tensor.float().view(-1)
    mask = loss_mask.view(-1).float()
    local, total = torch.sum(losses * mask), mask.sum()
    if cp_group is None:
        loss = local / total.clamp(min=1)
        return loss, {"lm loss": loss.detach().clone()}
    sums = torch.stack([local.detach(), total])
    torch.distributed.all_reduce(sums, group=cp_group)
    return local / sums[1].clamp(min=1), {"lm loss": sums[0] / sums[1].clamp(min=1)}


@functools.lru_cache(maxsize=None)
def _cp_split_keywords() -> tuple:
    """What this megatron-core's ``get_batch_on_this_cp_rank`` needs besides the batch, read once
    (0.19 asks whether the CP is hybrid)."""
    import inspect

    from megatron.core.utils import get_batch_on_this_cp_rank

    return (("is_hybrid_cp", False),) if "is_hybrid_cp" in inspect.signature(get_batch_on_this_cp_rank).parameters \
        else ()


def split_for_context_parallel(batch: dict) -> dict:
    """This rank's share of each sequence, cut by megatron's own ``get_batch_on_this_cp_rank``
    (chunks r and 2 x CP - 1 - r)."""
    from megatron.core.utils import get_batch_on_this_cp_rank

    return get_batch_on_this_cp_rank(dict(batch), **dict(_cp_split_keywords()))


def with_defaults(batch: dict) -> dict:
    """A micro-batch with its positions (0..s-1 unless given) and loss mask (all ones unless given)."""
    if batch.get("position_ids") is None:
        batch = {**batch, "position_ids": torch.arange(batch["tokens"].shape[1]).unsqueeze(0).expand_as(
            batch["tokens"])}
    if batch.get("loss_mask") is None:
        batch = {**batch, "loss_mask": torch.ones_like(batch["labels"], dtype=torch.float)}
    return batch


def on_device(batch: dict, device: torch.device) -> dict:
    """A micro-batch's tensors (tokens, labels, masks, positions, packed-sequence offsets) on the
    accelerator the model is on."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def forward(model, batch: dict) -> torch.Tensor:
    """The model's per-token losses on a micro-batch (``with_defaults`` applied); a packed one
    (datasets.to_thd) reaches it with megatron's PackedSeqParams, so each sequence attends to
    itself alone."""
    extra = {}
    if "cu_seqlens" in batch:
        from megatron.core.packed_seq_params import PackedSeqParams

        cu, longest = batch["cu_seqlens"], batch["max_seqlen"]
        extra["packed_seq_params"] = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                                     max_seqlen_q=longest, max_seqlen_kv=longest)
    return model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"), labels=batch["labels"], **extra)


def make_forward_step() -> Callable:
    from megatron.core import parallel_state

    cp_group = parallel_state.get_context_parallel_group() if parallel_state.get_context_parallel_world_size() > 1 \
        else None

    device = ascend_patches.device()

    def forward_step(data_iterator: Iterator, model):
        batch = on_device(with_defaults(next(data_iterator)), device)
        if cp_group is not None:
            batch = split_for_context_parallel(batch)
        loss_mask = batch["loss_mask"]
        return forward(model, batch), lambda out: lm_loss(out, loss_mask, cp_group)

    return forward_step


def train_step(models: List, optimizer, data_iterator, num_microbatches: int, seq_length: int,
               micro_batch_size: int, forward_only: bool = False, packed: bool = False):
    """Run one global batch; returns (mean loss on the last pipeline stage or None, grad norm).
    ``packed``: each micro-batch is one packed row of micro_batch_size x seq_length tokens, the
    shape pipeline stages exchange."""
    if packed:
        seq_length, micro_batch_size = seq_length * micro_batch_size, 1
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    for m in models:
        m.zero_grad_buffer() if hasattr(m, "zero_grad_buffer") else m.zero_grad()
    if not forward_only:
        optimizer.zero_grad()
    fb = get_forward_backward_func()
    losses = fb(
        forward_step_func=make_forward_step(), data_iterator=data_iterator,
        model=models if len(models) > 1 else models[0], num_microbatches=num_microbatches,
        seq_length=seq_length, micro_batch_size=micro_batch_size, forward_only=forward_only,
    )
    loss = None
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        loss = torch.stack([d["lm loss"] for d in losses]).mean().item()
        if loss != loss or loss in (float("inf"), float("-inf")):
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            raise FloatingPointError(f"loss is {loss} on rank {rank}; stopping before the optimizer step")
    grad_norm = None
    if not forward_only:
        ok, grad_norm, _ = optimizer.step()
        if not ok:
            raise FloatingPointError("optimizer step skipped: gradients overflowed (fp16 loss scale)")
    return loss, grad_norm


def build_scheduler(optimizer, optim, train_iters: int, global_batch: int):
    """Megatron's ``OptimizerParamScheduler`` in samples, as Megatron-LM steps it: linear
    warm-up from 0 (if any), then the decay style down to min_lr; constant weight decay."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    return OptimizerParamScheduler(
        optimizer, init_lr=0.0 if optim.warmup_iters else optim.lr, max_lr=optim.lr, min_lr=optim.min_lr,
        lr_warmup_steps=optim.warmup_iters * global_batch, lr_decay_steps=optim.decay_iters * global_batch,
        lr_decay_style=optim.decay_style, start_wd=optim.weight_decay, end_wd=optim.weight_decay,
        wd_incr_steps=train_iters * global_batch, wd_incr_style="constant")


def build_data(s, dp_rank: int, dp_size: int, consumed_samples: int, num_chunks: int):
    """(this rank's micro-batch iterator - one per model chunk, as each virtual pipeline stage
    draws the same batches -, the validation dataset or None)."""
    from recipes.data import datasets

    b, log = s.batches, s.logging
    n_train = s.train_iters * b.global_batch
    n_eval = (s.train_iters // log.eval_interval + 1) * log.eval_iters * b.global_batch if log.eval_interval else 0
    if s.data.instruction:
        if len(s.data.paths) != 1:
            raise BadInput("--is-instruction-dataset takes one --data-path prefix")
        train, valid, _ = datasets.split_instruction_dataset(s.data.paths[0], b.seq_length, s.tokenizer.eos_id,
                                                             s.data.split, s.seed)
        if s.data.packed:
            train, valid = (None if d is None else datasets.PackedInstructionDataset(d) for d in (train, valid))
    else:
        train, valid, _ = datasets.build_pretrain_datasets(list(s.data.paths), s.data.split, b.seq_length, s.seed,
                                                           [n_train, n_eval, 0], s.tokenizer, s.data.cache_path,
                                                           reset_position_ids=s.data.packed,
                                                           eod_mask_loss=s.data.eod_mask_loss)
    if train is None or len(train) == 0:
        raise BadInput(f"--split {s.data.split} leaves no training data in {' '.join(s.data.paths)}")
    its = [datasets.microbatches(train, consumed_samples, b.global_batch, b.micro, dp_rank, dp_size, s.seed,
                                 reshuffle_epochs=s.data.instruction, shape=batch_shape(s))
           for _ in range(num_chunks)]
    return (its if len(its) > 1 else its[0]), valid


def batch_shape(s):
    """What each micro-batch becomes before the model: packed (THD), trimmed, or as stacked."""
    from functools import partial

    from recipes.data import datasets

    if s.data.packed:
        return datasets.to_thd
    if s.data.variable_seq_lengths:
        return partial(datasets.trim_to_longest, multiple=s.layout.tp if s.layout.sequence_parallel else 1)
    return None


def evaluate(s, models: List, valid, dp_rank: int, dp_size: int) -> Optional[float]:
    """Mean loss over --eval-iters global batches of the validation split (last stage), or None."""
    from recipes.data import datasets

    if valid is None or len(valid) == 0:
        return None
    b = s.batches
    its = [datasets.microbatches(valid, 0, b.global_batch, b.micro, dp_rank, dp_size, s.seed + 1,
                                 reshuffle_epochs=s.data.instruction, shape=batch_shape(s)) for _ in models]
    it = its if len(its) > 1 else its[0]
    for m in models:
        m.eval()
    losses = []
    with torch.no_grad():
        for _ in range(s.logging.eval_iters):
            loss, _ = train_step(models, None, it, b.num_microbatches, b.seq_length, b.micro, forward_only=True,
                                 packed=s.data.packed)
            losses.append(loss)
    for m in models:
        m.train()
    return None if losses[0] is None else sum(losses) / len(losses)
