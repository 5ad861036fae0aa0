"""Pretrain (and fully fine-tune) LLaMA-2 on stock megatron.core parts.

    torchrun --nproc-per-node 8 -m recipes.pretrain --model llama2-7b \\
        --data-path ./dataset/alpaca_text_document --tokenizer-name-or-path ./llama-2-7b-hf \\
        --load ./ckpt --save ./ckpt --train-iters 1000 \\
        [--tensor-model-parallel-size 8 --pipeline-model-parallel-size 1 \\
         --micro-batch-size 4 --global-batch-size 16 --seq-length 4096 --lr ... --bf16 ...]

``--model`` picks a size from ``recipes.llama2.SIZES`` and its defaults (``RECIPE_DEFAULTS``);
any flag given overrides them.  Shape flags (``--num-layers --hidden-size ...``) or
``--hf-config DIR`` give custom shapes.  With ``--is-instruction-dataset`` the data is the
packed instruction pair from ``recipes.preprocess_data`` and only response tokens train.

The loop: ``GPTModel`` -> megatron ``DistributedDataParallel`` -> ``get_megatron_optimizer``
+ ``OptimizerParamScheduler`` -> ``get_forward_backward_func`` (1F1B / interleaved
pipeline schedules), checkpoints through ``dist_checkpointing`` (``recipes.checkpointing``).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

import ascend_patches
from ascend_patches.device import cpu_heap
from ascend_patches.ops import grad_accum
from recipes import checkpointing, llama2, lora, parallel, throughput, training

# The seed's defaults per size (AscendSpeed's LLaMA-2 scripts); flags override.
RECIPE_DEFAULTS = {
    "llama2-7b": dict(tensor_model_parallel_size=8, pipeline_model_parallel_size=1, micro_batch_size=4,
                      global_batch_size=16, lr=1.25e-6, min_lr=1.25e-7, seq_length=4096, bf16=True),
    "llama2-13b": dict(tensor_model_parallel_size=8, pipeline_model_parallel_size=1, micro_batch_size=2,
                       global_batch_size=16, lr=1e-6, min_lr=1e-7, seq_length=4096, bf16=True),
    "llama2-34b": dict(tensor_model_parallel_size=8, pipeline_model_parallel_size=2, micro_batch_size=2,
                       global_batch_size=32, lr=1e-6, min_lr=1e-7, seq_length=4096, bf16=True),
    "llama2-70b": dict(tensor_model_parallel_size=8, pipeline_model_parallel_size=8, micro_batch_size=1,
                       global_batch_size=32, lr=1e-6, min_lr=1e-7, seq_length=4096, bf16=True),
    "llama2-tiny": dict(tensor_model_parallel_size=1, pipeline_model_parallel_size=1, micro_batch_size=4,
                        global_batch_size=8, lr=3e-3, min_lr=3e-4, seq_length=128, bf16=False),
}
CUSTOM_DEFAULTS = dict(tensor_model_parallel_size=1, pipeline_model_parallel_size=1, micro_batch_size=1,
                       global_batch_size=8, lr=1e-4, min_lr=1e-5, seq_length=None, bf16=False)
SHAPE_FLAGS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups")


def build_parser():
    p = argparse.ArgumentParser(description="LLaMA-2 pretraining / fine-tuning on stock megatron.core")
    g = p.add_argument_group("model")
    g.add_argument("--model", choices=list(llama2.SIZES), default=None)
    g.add_argument("--hf-config", default=None, help="an HF model folder whose config.json gives the shape")
    for flag in SHAPE_FLAGS:
        g.add_argument("--" + flag.replace("_", "-"), type=int, default=None)
    g.add_argument("--group-query-attention", action="store_true", help="accepted for compatibility")
    g.add_argument("--vocab-size", type=int, default=None, help="default: the tokenizer's")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=1)
    g.add_argument("--max-position-embeddings", type=int, default=None)
    g.add_argument("--rotary-base", type=float, default=None)
    g.add_argument("--norm-epsilon", type=float, default=None)
    g.add_argument("--hidden-dropout", type=float, default=0.0)
    g.add_argument("--attention-dropout", type=float, default=0.0)
    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=None)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=None)
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None)
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--use-distributed-optimizer", action="store_true")
    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=None)
    g.add_argument("--global-batch-size", type=int, default=None)
    g.add_argument("--seq-length", type=int, default=None)
    g.add_argument("--train-iters", type=int, required=True)
    g.add_argument("--lr", type=float, default=None)
    g.add_argument("--min-lr", type=float, default=None)
    g.add_argument("--lr-decay-style", choices=("cosine", "linear", "constant"), default="cosine")
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-warmup-fraction", type=float, default=None)
    g.add_argument("--lr-decay-iters", type=int, default=None)
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.95)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--bf16", action="store_true", default=None)
    g.add_argument("--fp16", action="store_true")
    g.add_argument("--fp32", action="store_true", help="override a size's bf16 default")
    g.add_argument("--initial-loss-scale", type=float, default=2.0 ** 16)
    g.add_argument("--compile-fused-ops", action="store_true",
                   help="CPU: run RMSNorm, SwiGLU and RoPE forward and backward as torch.compile-generated "
                        "kernels (ascend_patches compile_ops; compiles for ~15 s at the first step)")
    g.add_argument("--no-gradient-accumulation-fusion", action="store_false", dest="gradient_accumulation_fusion",
                   help="add weight gradients to the fp32 main_grad after the GEMM, not in it (on by default "
                        "where the accelerator has the kernel: Apex on CUDA, ascend_patches on the CPU; never "
                        "with LoRA, whose frozen weights have no main_grad)")
    g.add_argument("--seed", type=int, default=1234)
    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", required=True)
    g.add_argument("--split", default="949,50,1")
    g.add_argument("--is-instruction-dataset", action="store_true")
    g.add_argument("--tokenizer-name-or-path", default=None)
    g.add_argument("--tokenizer-type", default=None)
    g.add_argument("--data-cache-path", default=None)
    g = p.add_argument_group("checkpoints and logging")
    g.add_argument("--load", default=None)
    g.add_argument("--save", default=None)
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--finetune", action="store_true", help="load weights only; reset optimizer, iteration, data")
    g.add_argument("--eval-interval", type=int, default=None)
    g.add_argument("--eval-iters", type=int, default=2)
    g.add_argument("--log-interval", type=int, default=1)
    g.add_argument("--metrics-file", default=None, help="JSONL; default <save>/metrics.jsonl")
    g.add_argument("--peak-tflops", type=float, default=None, help="per device; default: known peak or measured CPU GEMM")
    g.add_argument("--measure-peak-every", type=int, default=0,
                   help="CPU: re-measure the GEMM peak every N iterations (untimed), so CPU-MFU compares each step "
                        "with the machine's speed at that time; a shared machine's speed drifts")
    g.add_argument("--exit-after-iters", type=int, default=None, help="stop early (testing resume)")
    g = p.add_argument_group("LoRA (recipes.lora)")
    g.add_argument("--lora-target-modules", nargs="+", default=None,
                   help="query_key_value dense gate_proj up_proj down_proj (or linear_qkv ... linear_fc2)")
    g.add_argument("--lora-r", type=int, default=16)
    g.add_argument("--lora-alpha", type=float, default=32)
    g.add_argument("--lora-dropout", type=float, default=0.0)
    g.add_argument("--lora-modules-to-save", nargs="*", default=None, help="word_embeddings lm_head.lm_head")
    g.add_argument("--lora-load", default=None, help="a LoRA checkpoint to resume (adapters, optimizer, data)")
    return p


def resolve_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    saved = None
    if args.load and checkpointing.latest_iteration(args.load) is not None:
        saved = checkpointing.load_args(args.load)
    size = args.model or (saved or {}).get("model")
    defaults = dict(RECIPE_DEFAULTS[size]) if size else dict(CUSTOM_DEFAULTS)
    if args.lr is not None and args.min_lr is None:
        defaults["min_lr"] = args.lr / 10
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.min_lr > args.lr:
        raise ValueError(f"--min-lr {args.min_lr} is above --lr {args.lr}")
    if args.fp32 or args.fp16:
        args.bf16 = False
    # shape: flags > --hf-config > the checkpoint's args > --model
    shape = None
    if saved:
        shape = llama2.LlamaShape(**saved["shape"])
        args.model = args.model or saved.get("model")
    if args.hf_config:
        from converters.layout import shape_from_hf_config

        shape = shape_from_hf_config(json.loads((Path(args.hf_config) / "config.json").read_text()))
    if saved and args.tokenizer_name_or_path is None:
        args.tokenizer_name_or_path = saved.get("tokenizer_name_or_path")  # --load alone is enough
    if shape is None:
        if not args.model and not all(getattr(args, f) for f in SHAPE_FLAGS[:4]):
            raise ValueError("give --model, --hf-config, a --load checkpoint, or the shape flags "
                             "--num-layers --hidden-size --ffn-hidden-size --num-attention-heads")
        shape = llama2.shape(args.model) if args.model else llama2.LlamaShape(
            args.num_layers, args.hidden_size, args.ffn_hidden_size, args.num_attention_heads,
            args.num_query_groups or args.num_attention_heads)
    over = {f: getattr(args, f) for f in SHAPE_FLAGS if getattr(args, f) is not None}
    if args.num_attention_heads and not args.num_query_groups:
        over["num_query_groups"] = args.num_attention_heads
    for flag, field in (("vocab_size", "vocab_size"), ("max_position_embeddings", "seq_length"),
                        ("rotary_base", "rope_theta"), ("norm_epsilon", "norm_epsilon")):
        if getattr(args, flag) is not None:
            over[field] = getattr(args, flag)
    from dataclasses import replace

    args.shape = replace(shape, **over)
    args.saved = saved or {}  # the --load checkpoint's args.json, read once
    if args.seq_length is None:
        args.seq_length = args.shape.seq_length
    if args.seq_length > args.shape.seq_length:
        args.shape = replace(args.shape, seq_length=args.seq_length)
    return args


def _check_divisibility(args, world):
    s, tp, pp = args.shape, args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    problems = []
    if s.num_attention_heads % tp:
        problems.append(f"--tensor-model-parallel-size {tp} does not divide {s.num_attention_heads} attention heads")
    if s.num_query_groups % tp:
        problems.append(f"--tensor-model-parallel-size {tp} does not divide {s.num_query_groups} kv groups")
    if s.num_layers % pp:
        problems.append(f"--pipeline-model-parallel-size {pp} does not divide {s.num_layers} layers")
    if world % (tp * pp):
        problems.append(f"world size {world} is not a multiple of TP {tp} x PP {pp}")
    else:
        dp = world // (tp * pp)
        if args.global_batch_size % (args.micro_batch_size * dp):
            problems.append(f"--global-batch-size {args.global_batch_size} is not a multiple of "
                            f"--micro-batch-size {args.micro_batch_size} x data-parallel size {dp}")
    if problems:
        raise ValueError("; ".join(problems))


def build_models(args, config):
    """One model chunk per virtual pipeline stage (interleaved schedule) or just one."""
    from megatron.core import parallel_state as ps

    vpp = ps.get_virtual_pipeline_model_parallel_world_size()
    chunks = []
    for v in range(vpp or 1):
        kw = {"vp_stage": v} if vpp else {}
        model = llama2.build_model(args.shape, config=config, vocab_size=args.padded_vocab,
                                   pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, **kw),
                                   post_process=ps.is_pipeline_last_stage(ignore_virtual=False, **kw),
                                   vp_stage=v if vpp else None)
        chunks.append(training.wrap_float16(model))
    return chunks


def build_data(args, tokenizer, dp_rank, dp_size, consumed_samples):
    from recipes.data import datasets

    n_train = args.train_iters * args.global_batch_size
    n_eval = (args.train_iters // args.eval_interval + 1) * args.eval_iters * args.global_batch_size \
        if args.eval_interval else 0
    if args.is_instruction_dataset:
        if len(args.data_path) != 1:
            raise ValueError("--is-instruction-dataset takes one --data-path prefix")
        train, valid, _ = datasets.split_instruction_dataset(args.data_path[0], args.seq_length, tokenizer.eos_id,
                                                             args.split, args.seed)
    else:
        train, valid, _ = datasets.build_pretrain_datasets(args.data_path, args.split, args.seq_length, args.seed,
                                                           [n_train, n_eval, 0], tokenizer, args.data_cache_path)
    if train is None or len(train) == 0:
        raise ValueError(f"--split {args.split} leaves no training data in {args.data_path}")
    # one iterator per model chunk: each virtual pipeline stage draws the same batches
    its = [datasets.microbatches(train, consumed_samples, args.global_batch_size, args.micro_batch_size,
                                 dp_rank, dp_size, args.seed) for _ in range(args.num_model_chunks)]
    return (its if len(its) > 1 else its[0]), valid


def evaluate(args, models, valid, dp_rank, dp_size):
    from recipes.data import datasets

    if valid is None or len(valid) == 0:
        return None
    its = [datasets.microbatches(valid, 0, args.global_batch_size, args.micro_batch_size, dp_rank, dp_size,
                                 args.seed + 1) for _ in models]
    it = its if len(its) > 1 else its[0]
    for m in models:
        m.eval()
    losses = []
    with torch.no_grad():
        for _ in range(args.eval_iters):
            loss, _ = training.train_step(models, None, it, args.num_microbatches, args.seq_length,
                                          args.micro_batch_size, forward_only=True)
            losses.append(loss)
    for m in models:
        m.train()
    return None if losses[0] is None else sum(losses) / len(losses)


def _dp_mean(value, group):
    t = torch.tensor([0.0 if value is None else value], dtype=torch.float64)
    dist.all_reduce(t, group=group)
    return t.item() / dist.get_world_size(group)


def main(argv=None):
    args = resolve_args(argv)
    from recipes.tokenizer import load_tokenizer

    world = int(os.environ.get("WORLD_SIZE", "1"))
    _check_divisibility(args, world)
    vpp = None
    if args.num_layers_per_virtual_pipeline_stage:
        per_stage = args.shape.num_layers // args.pipeline_model_parallel_size
        if per_stage % args.num_layers_per_virtual_pipeline_stage:
            raise ValueError("--num-layers-per-virtual-pipeline-stage must divide the layers per pipeline stage")
        vpp = per_stage // args.num_layers_per_virtual_pipeline_stage
    parallel.init_distributed(args.tensor_model_parallel_size, args.pipeline_model_parallel_size, vpp, seed=args.seed)
    from megatron.core import parallel_state as ps
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    rank = dist.get_rank()
    if args.compile_fused_ops:
        ascend_patches.configure(compile_ops=True)  # a clear error off the CPU
    on_cpu = ascend_patches.settings().backend == "cpu"
    heap_note = cpu_heap.keep_freed_memory() if on_cpu else None
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    tokenizer = load_tokenizer(args.tokenizer_name_or_path, args.tokenizer_type) if args.tokenizer_name_or_path else None
    vocab = args.shape.vocab_size if args.vocab_size is None and tokenizer is None else (
        args.vocab_size or tokenizer.vocab_size)
    args.padded_vocab = llama2.padded_vocab_size(vocab, args.make_vocab_size_divisible_by, args.tensor_model_parallel_size)
    saved = args.saved
    if saved.get("padded_vocab_size") and saved.get("vocab_size", vocab) == vocab:
        if saved["padded_vocab_size"] % args.tensor_model_parallel_size:
            raise ValueError(f"--load {args.load}: its padded vocabulary {saved['padded_vocab_size']} does not split "
                             f"over TP={args.tensor_model_parallel_size}; reshard it with converters.reshard")
        args.padded_vocab = saved["padded_vocab_size"]  # the checkpoint's embedding rows
    args.num_microbatches = args.global_batch_size // (args.micro_batch_size * dp_size)
    dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
    use_lora = bool(args.lora_target_modules)
    grad_accum_fusion = args.gradient_accumulation_fusion and not use_lora and grad_accum.available()
    config = llama2.transformer_config(
        args.shape, tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=vpp, sequence_parallel=args.sequence_parallel,
        pipeline_dtype=dtype, bf16=args.bf16, fp16=args.fp16, params_dtype=dtype,
        hidden_dropout=args.hidden_dropout, attention_dropout=args.attention_dropout,
        gradient_accumulation_fusion=grad_accum_fusion,
    )
    models = build_models(args, config)
    args.num_model_chunks = len(models)
    progress = {"iteration": 0, "consumed_samples": 0}
    weights_only = args.finetune or use_lora or (args.load and checkpointing.latest_iteration(args.load) == "release")
    if use_lora:
        if len(models) > 1:
            raise ValueError("LoRA with virtual pipeline stages is not built; drop --num-layers-per-virtual-pipeline-stage")
        if args.use_distributed_optimizer:
            raise ValueError("LoRA checkpoints hold the plain optimizer state; drop --use-distributed-optimizer")
        if args.load and checkpointing.latest_iteration(args.load) is not None:
            checkpointing.load(args.load, models, restore_rng=False)  # the frozen base, before wrapping
            if rank == 0:
                print(f"loaded base weights from {args.load}", flush=True)
        targets = lora.resolve_targets(args.lora_target_modules)
        to_save = lora.resolve_modules_to_save(args.lora_modules_to_save)
        wrapped = lora.apply_lora(checkpointing.unwrap(models[0]), targets, args.lora_r, args.lora_alpha,
                                  args.lora_dropout, to_save)
        lora_config = {"target_modules": targets, "r": args.lora_r, "alpha": args.lora_alpha,
                       "dropout": args.lora_dropout, "modules_to_save": to_save, "base": args.load}
    models = [training.wrap_ddp(m, use_distributed_optimizer=args.use_distributed_optimizer) for m in models]
    optimizer = training.build_optimizer(models, lr=args.lr, weight_decay=args.weight_decay, clip_grad=args.clip_grad,
                                         bf16=args.bf16, fp16=args.fp16, betas=(args.adam_beta1, args.adam_beta2),
                                         eps=args.adam_eps, use_distributed_optimizer=args.use_distributed_optimizer,
                                         initial_loss_scale=args.initial_loss_scale, min_lr=args.min_lr)
    training.attach_grad_sync(models, optimizer)
    warmup = args.lr_warmup_iters or int((args.lr_warmup_fraction or 0) * args.train_iters)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if warmup else args.lr, max_lr=args.lr, min_lr=args.min_lr,
        lr_warmup_steps=warmup * args.global_batch_size,
        lr_decay_steps=(args.lr_decay_iters or args.train_iters) * args.global_batch_size,
        lr_decay_style=args.lr_decay_style, start_wd=args.weight_decay, end_wd=args.weight_decay,
        wd_incr_steps=args.train_iters * args.global_batch_size, wd_incr_style="constant")

    if use_lora:
        if args.lora_load and checkpointing.latest_iteration(args.lora_load) is not None:
            progress = lora.load(args.lora_load, checkpointing.unwrap(models[0]), wrapped, optimizer, scheduler)
            if rank == 0:
                print(f"resumed LoRA from {args.lora_load} (iteration {progress['iteration']})", flush=True)
        elif args.lora_load:
            raise FileNotFoundError(f"--lora-load {args.lora_load}: no checkpoint there")
    elif args.load and checkpointing.latest_iteration(args.load) is not None:
        loaded = checkpointing.load(args.load, models, None if weights_only else optimizer,
                                    None if weights_only else scheduler, restore_rng=not weights_only)
        if not weights_only:
            progress = loaded
        if rank == 0:
            print(f"loaded {args.load} (iteration {loaded['iteration']}){' weights only' if weights_only else ''}",
                  flush=True)
    elif args.load:
        raise FileNotFoundError(f"--load {args.load}: no checkpoint there")

    data, valid = build_data(args, tokenizer, dp_rank, dp_size, progress["consumed_samples"])
    from dataclasses import asdict

    save_args = {"model": args.model, "shape": asdict(args.shape),
                 "tokenizer_name_or_path": args.tokenizer_name_or_path, "padded_vocab_size": args.padded_vocab,
                 "vocab_size": vocab, "tensor_model_parallel_size": args.tensor_model_parallel_size,
                 "pipeline_model_parallel_size": args.pipeline_model_parallel_size, "bf16": args.bf16,
                 "fp16": args.fp16}
    metrics_path = args.metrics_file or (os.path.join(args.save, "metrics.jsonl") if args.save else None)
    last_rank = dist.get_world_size() - 1
    metrics = None
    if metrics_path and rank == last_rank:
        Path(metrics_path).parent.mkdir(parents=True, exist_ok=True)
        metrics = open(metrics_path, "a")
    if rank == 0:
        print(ascend_patches.report().splitlines()[1], flush=True)
        if heap_note:
            print(f"CPU allocator: {heap_note}", flush=True)
        print(f"{args.model or 'custom'} {args.shape}; TP={args.tensor_model_parallel_size} "
              f"PP={args.pipeline_model_parallel_size}{f' VPP={vpp}' if vpp else ''} DP={dp_size}; "
              f"{args.num_microbatches} micro-batches of {args.micro_batch_size} x {args.seq_length}; "
              f"{'bf16' if args.bf16 else 'fp16' if args.fp16 else 'fp32'}; gradient accumulation fusion "
              f"{'on' if grad_accum_fusion else 'off'}; compiled CPU ops {'on' if args.compile_fused_ops else 'off'}",
              flush=True)
    peak, peak_src = throughput.peak_tflops(ascend_patches.settings().backend, dtype, args.peak_tflops)
    meter = throughput.Meter(throughput.train_flops_per_token(args.shape, args.seq_length, args.padded_vocab),
                             peak, dist.get_world_size())
    stop_at = args.train_iters if args.exit_after_iters is None else min(args.train_iters, args.exit_after_iters)
    reprobe = args.measure_peak_every if on_cpu and not args.peak_tflops else 0
    while progress["iteration"] < stop_at:
        it = progress["iteration"] + 1
        if reprobe and (it - 1) % reprobe == 0 and it > 1:
            meter.peak = throughput.measured_gemm_tflops(dtype)
            meter.reset()
        try:
            loss, grad_norm = training.train_step(models, optimizer, data, args.num_microbatches, args.seq_length,
                                                  args.micro_batch_size)
        except FloatingPointError as e:
            raise FloatingPointError(f"iteration {it}: {e}; the last checkpoint is untouched") from None
        scheduler.step(increment=args.global_batch_size)
        progress = {"iteration": it, "consumed_samples": progress["consumed_samples"] + args.global_batch_size}
        m = meter.step(args.global_batch_size * args.seq_length)
        if ps.is_pipeline_last_stage(ignore_virtual=True):
            loss = _dp_mean(loss, ps.get_data_parallel_group())
        record = {"iteration": it, "loss": loss, "lr": optimizer.param_groups[0]["lr"],
                  "grad_norm": None if grad_norm is None else float(grad_norm), **m, "peak_tflops": meter.peak,
                  "consumed_samples": progress["consumed_samples"]}
        if args.eval_interval and it % args.eval_interval == 0:
            val = evaluate(args, models, valid, dp_rank, dp_size)
            if ps.is_pipeline_last_stage(ignore_virtual=True) and val is not None:
                record["val_loss"] = _dp_mean(val, ps.get_data_parallel_group())
        if rank == last_rank:
            if it % args.log_interval == 0 or it == 1:
                val_txt = f" | val loss {record['val_loss']:.4f}" if "val_loss" in record else ""
                print(f"iteration {it:6d}/{args.train_iters} | loss {loss:.6f}{val_txt} | lr {record['lr']:.3e} | "
                      f"grad norm {record['grad_norm']:.3f} | {m['tokens_per_s_per_device']:,.0f} tokens/s/device | "
                      f"{m['tflops_per_device']:.4f} TFLOP/s/device | MFU {100 * m['mfu']:.2f}% ({peak_src})",
                      flush=True)
            if metrics:
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
        if args.save and ((args.save_interval and it % args.save_interval == 0) or it == stop_at):
            if use_lora:
                lora.save(args.save, it, checkpointing.unwrap(models[0]), wrapped, lora_config["modules_to_save"],
                          optimizer, scheduler, progress, lora_config, save_args)
            else:
                checkpointing.save(args.save, it, models, optimizer, scheduler, progress, save_args)
            if rank == 0:
                print(f"saved {checkpointing.iter_dir(args.save, it)}", flush=True)
        meter.reset()  # evaluation and saving are not training throughput
    if metrics:
        metrics.close()
    parallel.destroy()
    return models


if __name__ == "__main__":
    main()
