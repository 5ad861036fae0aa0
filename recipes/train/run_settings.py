"""The pretrain recipe's settings, derived once from the command line and the checkpoint it
resumes, into frozen typed objects.  Every engine (the built-in loop, stock Megatron-LM,
DeepSpeed) reads the same ``RunSettings``; nothing later adds fields to ``args``.

Precedence for the model shape: shape flags > ``--hf-config`` > the ``--load`` checkpoint's
``args.json`` > ``--model``.  Training defaults come from ``llama2.RECIPE_DEFAULTS`` for the
size (or ``CUSTOM_DEFAULTS``); any flag given overrides them.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Tuple

import torch

import ascend_patches
from recipes.data import datasets
from recipes.model import checkpointing, flags, llama2
from recipes.train import offload, recompute
from recipes.train.offload import Offload
from recipes.train.recompute import Recompute
from recipes.errors import BadInput, Exists, MissingInput

SHAPE_FLAGS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups")


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    world: int
    vpp: Optional[int] = None  # virtual pipeline stages per pipeline stage (the interleaved schedule)
    layers_per_virtual_stage: Optional[int] = None
    sequence_parallel: bool = False
    distributed_optimizer: bool = False
    cp: int = 1  # context parallel: each sequence split over this many ranks
    cp_comm_type: str = "p2p"  # megatron's name for the CP algorithm: p2p (ring attention) or a2a (Ulysses)
    overlap_grad_reduce: bool = False  # DDP's gradient reduction bucket by bucket during the backward
    overlap_param_gather: bool = False  # the distributed optimizer's all-gather during the next forward


@dataclass(frozen=True)
class Batches:
    micro: int
    global_batch: int
    seq_length: int
    num_microbatches: int  # per data-parallel rank and iteration


@dataclass(frozen=True)
class Optim:
    lr: float
    min_lr: float
    decay_style: str
    warmup_iters: int
    decay_iters: int
    weight_decay: float
    clip_grad: float
    betas: Tuple[float, float]
    eps: float
    initial_loss_scale: float


@dataclass(frozen=True)
class Data:
    paths: Tuple[str, ...]
    split: str
    instruction: bool
    cache_path: Optional[str]
    # each sample / document its own sequence in the batch (THD attention, positions restart):
    # instruction samples packed into rows of --seq-length, or pretraining split at EOD
    packed: bool = False
    variable_seq_lengths: bool = False  # instruction data, unpacked: pad to the micro-batch's longest
    eod_mask_loss: bool = False
    note: Optional[str] = None  # said on rank 0 at the start (a dataset preprocessed with --pack)


@dataclass(frozen=True)
class Lora:
    targets: Tuple[str, ...]
    r: int
    alpha: float
    dropout: float
    modules_to_save: Tuple[str, ...]
    load: Optional[str]  # a LoRA checkpoint to resume

    def config(self, base: Optional[str]) -> dict:
        """``lora_config.json``."""
        return {"target_modules": list(self.targets), "r": self.r, "alpha": self.alpha, "dropout": self.dropout,
                "modules_to_save": list(self.modules_to_save), "base": base}


@dataclass(frozen=True)
class DeepSpeed:
    """The DeepSpeed engine's settings; ``config`` is the file's, which the engine completes."""
    config_path: str
    config: dict
    zero_stage: int
    pipeline_stages: int
    activation_checkpointing: bool = False
    partition_activations: bool = False


@dataclass(frozen=True)
class Resume:
    """The one decision of what ``--load`` brings: ``fresh`` (nothing), ``full`` (weights,
    optimizer, scheduler, RNG, data position) or ``weights`` (``--finetune``, a converter's
    ``release`` checkpoint, or the frozen base of a LoRA run)."""

    kind: str
    path: Optional[str] = None
    iteration: Any = None  # int or "release"
    note: Optional[str] = None  # said on rank 0 at the start (e.g. an empty --load folder)

    @property
    def loads_weights(self) -> bool:
        return self.kind != "fresh"


@dataclass(frozen=True)
class Logging:
    log_interval: int
    eval_interval: Optional[int]
    eval_iters: int
    metrics_file: Optional[str]
    peak_tflops: Optional[float]
    measure_peak_every: int
    tensor_memory: bool = False


@dataclass(frozen=True)
class RunSettings:
    model_name: Optional[str]
    shape: llama2.LlamaShape
    vocab_size: int
    padded_vocab: int
    dtype: torch.dtype
    layout: Layout
    batches: Batches
    optim: Optim
    data: Data
    resume: Resume
    logging: Logging
    train_iters: int
    stop_at: int  # --exit-after-iters, else train_iters
    save: Optional[str]
    save_interval: Optional[int]
    seed: int
    hidden_dropout: float
    attention_dropout: float
    gradient_accumulation_fusion: bool
    compile_fused_ops: bool
    use_cpu_initialization: bool  # --use-cpu-initialization (the CPU backend initialises on the host anyway)
    tokenizer_path: Optional[str]
    tokenizer_type: Optional[str]
    make_vocab_size_divisible_by: int
    lora: Optional[Lora] = None
    recompute: Recompute = Recompute()  # activation recomputation (recipes.train.recompute)
    offload: Offload = Offload()  # activations and optimizer on the host (recipes.train.offload)
    engine: str = "builtin"      # "builtin" | "megatron-lm" | "deepspeed"
    megatron_lm: Optional[str] = None  # the Megatron-LM checkout the megatron-lm engine runs
    deepspeed: Optional[DeepSpeed] = None
    passthrough: Tuple[str, ...] = ()  # flags for Megatron-LM that this recipe does not know
    dist_backend: Optional[str] = None  # torch.distributed's backend: the accelerator's (--distributed-backend)
    tokenizer: Any = field(default=None, compare=False, repr=False)  # the loaded tokenizer, or None

    @property
    def bf16(self) -> bool:
        return self.dtype == torch.bfloat16

    @property
    def fp16(self) -> bool:
        return self.dtype == torch.float16

    def checkpoint_args(self) -> dict:
        """``args.json`` of every checkpoint this run writes: what later commands need to
        rebuild the model from ``--load`` alone."""
        return {"model": self.model_name, "shape": asdict(self.shape), "tokenizer_name_or_path": self.tokenizer_path,
                "padded_vocab_size": self.padded_vocab, "vocab_size": self.vocab_size,
                "make_vocab_size_divisible_by": self.make_vocab_size_divisible_by,
                "tensor_model_parallel_size": self.layout.tp, "pipeline_model_parallel_size": self.layout.pp,
                "bf16": self.bf16, "fp16": self.fp16, "data": self.data_record()}

    def data_record(self) -> dict:
        """What decides the batches a step draws, and so what a checkpoint's consumed_samples
        means: a full resume with another value would train on other samples or rows."""
        d = self.data
        return {"data_path": [p if _is_number(p) else os.path.abspath(p) for p in d.paths], "split": d.split,
                "seed": self.seed, "seq_length": self.batches.seq_length, "is_instruction_dataset": d.instruction,
                "reset_position_ids": d.packed, "variable_seq_lengths": d.variable_seq_lengths,
                "eod_mask_loss": d.eod_mask_loss}

    def describe(self) -> str:
        L, b = self.layout, self.batches
        vpp = f" VPP={L.vpp}" if L.vpp else ""
        cp = f" CP={L.cp}" if L.cp > 1 else ""
        rc = f"; recompute {self.recompute.describe()}" if self.recompute.granularity else ""
        overlap = [name for name, on in (("grad reduce", L.overlap_grad_reduce), ("param gather", L.overlap_param_gather))
                   if on]
        ov = f"; overlapped {' and '.join(overlap)}" if overlap else ""
        ov += f"; offloaded {self.offload.describe()}" if self.offload.any else ""
        return (f"{self.model_name or 'custom'} {self.shape}; TP={L.tp} PP={L.pp}{vpp}{cp} DP={L.dp}; "
                f"{b.num_microbatches} micro-batches of {b.micro} x {b.seq_length}; {llama2.dtype_name(self.dtype)}"
                f"{rc}{ov}")


def _resume(args, lora: bool) -> Resume:
    if not args.load:
        return Resume("fresh")
    it = checkpointing.latest_iteration(args.load)
    if it is None:
        other = checkpointing.what_else_is_there(args.load)
        if other:
            raise BadInput(f"--load {args.load}: no checkpoint there; {other}")
        if args.finetune or lora:
            raise MissingInput(f"--load {args.load}: no checkpoint there, and "
                               f"{'--finetune' if args.finetune else 'LoRA'} needs trained weights to start from")
        # Megatron-LM's behaviour: the first launch of a `--load D --save D` script starts from scratch
        return Resume("fresh", note=f"--load {args.load}: no checkpoint there yet; starting from scratch")
    weights_only = args.finetune or lora or it == "release"
    return Resume("weights" if weights_only else "full", args.load, it)


def _shape(args, saved: dict) -> llama2.LlamaShape:
    shape = llama2.LlamaShape(**saved["shape"]) if saved.get("shape") else None
    if args.hf_config:
        config = Path(args.hf_config) / "config.json"
        if not config.is_file():
            raise MissingInput(f"--hf-config {args.hf_config}: no config.json there")
        shape = llama2.LlamaShape.from_hf_config(json.loads(config.read_text()))
    if shape is None:
        if not args.model and not all(getattr(args, f) for f in SHAPE_FLAGS[:4]):
            raise BadInput("give --model, --hf-config, a --load checkpoint, or the shape flags "
                             "--num-layers --hidden-size --ffn-hidden-size --num-attention-heads")
        shape = llama2.shape(args.model) if args.model else llama2.LlamaShape(
            args.num_layers, args.hidden_size, args.ffn_hidden_size, args.num_attention_heads,
            args.num_query_groups or args.num_attention_heads)
    over = {f: getattr(args, f) for f in SHAPE_FLAGS if getattr(args, f) is not None}
    if args.num_attention_heads and not args.num_query_groups:
        over["num_query_groups"] = args.num_attention_heads
    for flag, name in (("vocab_size", "vocab_size"), ("max_position_embeddings", "seq_length"),
                       ("rotary_base", "rope_theta"), ("norm_epsilon", "norm_epsilon")):
        if getattr(args, flag) is not None:
            over[name] = getattr(args, flag)
    return replace(shape, **over)


def _defaults(args, size: Optional[str]) -> dict:
    """Each training flag's value: the flag if given, else the size's recipe default."""
    defaults = dict(llama2.RECIPE_DEFAULTS[size]) if size else dict(llama2.CUSTOM_DEFAULTS)
    if args.lr is not None and args.min_lr is None:
        defaults["min_lr"] = args.lr / 10
    out = {k: (getattr(args, k) if getattr(args, k, None) is not None else v) for k, v in defaults.items()}
    if args.fp32 or args.fp16:
        out["bf16"] = False
    if out["min_lr"] > out["lr"]:
        raise BadInput(f"--min-lr {out['min_lr']} is above --lr {out['lr']}")
    return out


def _vocab(args, shape, saved, tokenizer, tp: int) -> Tuple[int, int, int]:
    """(true vocabulary, padded rows, divisor): a checkpoint continued with its own vocabulary
    keeps its rows (a divisor that would give others is refused); otherwise the rows are padded
    to --make-vocab-size-divisible-by x TP (default 128, or the divisor the checkpoint records)."""
    vocab = args.vocab_size or (tokenizer.vocab_size if tokenizer is not None else shape.vocab_size)
    divisor = flags.vocab_divisor(args.make_vocab_size_divisible_by, saved.get("make_vocab_size_divisible_by"))
    if saved.get("padded_vocab_size") and saved.get("vocab_size", vocab) == vocab:
        rows = flags.checkpoint_rows(args.make_vocab_size_divisible_by, vocab, tp, saved["padded_vocab_size"],
                                     f"--load {args.load}")
        return vocab, rows, divisor
    return vocab, llama2.padded_vocab_size(vocab, divisor, tp), divisor


def _same_folder(a, b) -> bool:
    return a is not None and b is not None and Path(a).resolve() == Path(b).resolve()


def _check_save(args, resume: Resume, lora: Optional["Lora"]) -> None:
    """Refuse to write into a --save folder holding another run's checkpoints (its tracker
    would move back, its metrics file be rewritten) unless --overwrite."""
    if not args.save or getattr(args, "overwrite", False):
        return
    it = checkpointing.latest_iteration(args.save)
    if it is None:
        return
    continuing = (resume.kind == "full" and _same_folder(resume.path, args.save)) or (
        lora is not None and _same_folder(lora.load, args.save))
    if not continuing:
        raise Exists(f"--save {args.save} holds another run's checkpoint (iteration {it}); to continue it add "
                     f"--load {args.save}{' (--lora-load for LoRA)' if lora else ''}, else give a new folder or "
                     "--overwrite")


def _check_pasted(args) -> str:
    """The Megatron-LM / AscendSpeed script flags: refuse a value that contradicts LLaMA-2;
    the torch.distributed backend ``--distributed-backend`` names."""
    for flag, dest, value in llama2.ARCHITECTURE_FLAGS:
        given = getattr(args, dest, None)
        if value is not True and given is not None and given.lower() != value.lower():
            raise BadInput(f"{flag} {given}: LLaMA-2 uses {value}; drop the flag or give {flag} {value}")
    own = ascend_patches.dist_backend()
    asked = getattr(args, "distributed_backend", None)
    if asked not in (None, "nccl", own):
        raise BadInput(f"--distributed-backend {asked}: this machine's accelerator ({ascend_patches.settings().backend}) "
                       f"communicates through {own}; give {own} (or nccl, which means it) or drop the flag")
    return own


def _overlap(args) -> Tuple[bool, bool]:
    """(--overlap-grad-reduce, --overlap-param-gather), with Megatron-LM's rules for the second."""
    if args.overlap_param_gather and not args.use_distributed_optimizer:
        raise BadInput("--overlap-param-gather overlaps the distributed optimizer's all-gather: add "
                       "--use-distributed-optimizer (Megatron-LM's rule)")
    if args.overlap_param_gather and not args.overlap_grad_reduce:
        raise BadInput("--overlap-param-gather needs --overlap-grad-reduce (Megatron-LM's rule)")
    return args.overlap_grad_reduce, args.overlap_param_gather


def _train_iters(args, global_batch: int) -> int:
    samples = getattr(args, "train_samples", None)
    if samples is not None and args.train_iters is not None:
        raise BadInput("--train-iters and --train-samples: give one")
    if samples is not None:
        if samples < global_batch:
            raise BadInput(f"--train-samples {samples} is less than one global batch ({global_batch}); give more")
        return samples // global_batch
    if args.train_iters is None:
        raise BadInput("give --train-iters (or --train-samples)")
    return args.train_iters


def _lora(args) -> Optional[Lora]:
    if not args.lora_target_modules:
        return None
    from recipes.model import lora

    return Lora(tuple(lora.resolve_targets(args.lora_target_modules)), args.lora_r, args.lora_alpha, args.lora_dropout,
                tuple(lora.resolve_modules_to_save(args.lora_modules_to_save)), args.lora_load)


def resolve(args, world: Optional[int] = None, passthrough=()) -> RunSettings:
    """Every setting of a run, from the parsed flags (and what ``--load`` records).
    ``passthrough``: flags the recipe does not know, for the Megatron-LM engine."""
    from recipes.data.tokenizer import kind as tokenizer_kind, load_tokenizer

    world = world or int(os.environ.get("WORLD_SIZE", "1"))
    ds_config, global_given = None, args.global_batch_size is not None
    if args.deepspeed:
        from recipes.train import deepspeed_config

        if not args.deepspeed_config:
            raise BadInput("--deepspeed needs --deepspeed_config ds_config.json "
                           "(recipes/deepspeed_configs/ has one per LLaMA-2 size)")
        ds_config = deepspeed_config.read_config(args.deepspeed_config)
        deepspeed_config.check_config(ds_config, args.deepspeed_config)
        # the file's values for the flags not given (a given flag that contradicts it is an error)
        args = argparse.Namespace(**{**vars(args), **{k: v for k, v in deepspeed_config.check_flags_against_config(
            args, ds_config, args.deepspeed_config).items() if getattr(args, k, None) in (None, False)}})
    args = _with_preprocessed_packing(args)
    dist_backend = _check_pasted(args)
    lora = _lora(args)
    resume = _resume(args, lora is not None)
    _check_save(args, resume, lora)
    saved = checkpointing.load_args(args.load) if resume.loads_weights else {}
    size = args.model or saved.get("model")
    d = _defaults(args, size)
    shape = _shape(args, saved)
    seq_length = d["seq_length"] or shape.seq_length
    if seq_length > shape.seq_length:
        shape = replace(shape, seq_length=seq_length)
    tokenizer_path = args.tokenizer_name_or_path or saved.get("tokenizer_name_or_path")
    tokenizer = load_tokenizer(tokenizer_path, args.tokenizer_type) if tokenizer_path else None
    tp, pp = d["tensor_model_parallel_size"], d["pipeline_model_parallel_size"]
    vocab, padded, divisor = _vocab(args, shape, saved, tokenizer, tp)
    llama2.check_layout(shape, tp, pp, padded_vocab=padded, world=world,
                        layers_per_virtual_stage=args.num_layers_per_virtual_pipeline_stage)
    cp, cp_comm_type = _context_parallel(args, world, tp, pp, seq_length, shape)
    dp = world // (tp * pp * cp)
    per_stage = args.num_layers_per_virtual_pipeline_stage
    vpp = shape.num_layers // pp // per_stage if per_stage else None
    micro, global_batch = d["micro_batch_size"], d["global_batch_size"]
    if ds_config is not None:  # the file's gradient_accumulation_steps sets the global batch, or must agree with it
        global_batch = deepspeed_config.global_batch(ds_config, args.deepspeed_config, micro, dp, global_batch,
                                                     global_given)
    if global_batch % (micro * dp):
        raise BadInput(f"--global-batch-size {global_batch} is not a multiple of --micro-batch-size {micro} x "
                         f"data-parallel size {dp}")
    args = argparse.Namespace(**{**vars(args), "train_iters": _train_iters(args, global_batch),
                                 "make_vocab_size_divisible_by": divisor,
                                 "tokenizer_type": tokenizer_kind(args.tokenizer_type)})
    settings = _assemble(args, d, size, shape, vocab, padded, tokenizer, tokenizer_path, resume, lora,
                         Layout(tp, pp, dp, world, vpp, per_stage, args.sequence_parallel,
                                args.use_distributed_optimizer, cp, cp_comm_type, *_overlap(args)),
                         Batches(micro, global_batch, seq_length, global_batch // (micro * dp)))
    settings = replace(_with_engine(args, settings, tuple(passthrough)), dist_backend=dist_backend)
    settings = _with_deepspeed(args, settings, ds_config) if ds_config is not None else settings
    return _check_data_unchanged(args, settings)


DATA_FLAGS = {"data_path": "--data-path", "split": "--split", "seed": "--seed", "seq_length": "--seq-length",
              "is_instruction_dataset": "--is-instruction-dataset", "reset_position_ids": "--reset-position-ids",
              "variable_seq_lengths": "--variable-seq-lengths", "eod_mask_loss": "--eod-mask-loss"}


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _check_data_unchanged(args, s: RunSettings) -> RunSettings:
    """A run that continues a checkpoint (a full resume, or --lora-load) draws the batches after
    its consumed_samples: with another data path, split, seed, sequence length or packing those
    are other samples or rows, so a change is refused naming the flag and both values, unless
    --accept-data-change, which says what changed.  Checkpoints written before args.json
    recorded the data (and Megatron-LM's, whose engine reads the data itself) are not checked."""
    path = s.lora.load if s.lora is not None and s.lora.load else s.resume.path if s.resume.kind == "full" else None
    if path is None or s.engine == "megatron-lm" or checkpointing.latest_iteration(path) is None:
        return s
    saved = checkpointing.load_args(path).get("data") or {}
    now = s.data_record()
    changed = [f"{DATA_FLAGS[k]} {_shown(now[k])} (the checkpoint's: {_shown(saved[k])})"
               for k in DATA_FLAGS if k in saved and saved[k] != now[k]]
    if not changed:
        return s
    if not getattr(args, "accept_data_change", False):
        raise BadInput(f"continuing {path}: {'; '.join(changed)}: its consumed samples would mean other batches; "
                       "give the checkpoint's values, or --accept-data-change to continue on the new data")
    note = (f"--accept-data-change: continuing {path} with {'; '.join(changed)}; its consumed samples now count "
            "batches of the new data")
    return replace(s, resume=replace(s.resume, note="; ".join(n for n in (s.resume.note, note) if n)))


def _shown(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


CP_ALGOS = {"megatron_cp_algo": "p2p", "ulysses_cp_algo": "a2a"}  # MindSpeed's names -> megatron's cp_comm_type


def _context_parallel(args, world: int, tp: int, pp: int, seq_length: int, shape) -> Tuple[int, str]:
    """(--context-parallel-size, megatron's cp_comm_type), checked: ring attention (MindSpeed's
    megatron_cp_algo) or all-to-all over heads (ulysses_cp_algo) over ranks that divide the
    world with TP x PP, on sequences that split into 2 x CP equal chunks."""
    cp = args.context_parallel_size
    if cp < 1:
        raise BadInput(f"--context-parallel-size {cp}: give 1 or more")
    algo = CP_ALGOS.get(args.context_parallel_algo)
    if algo is None:
        raise BadInput(f"--context-parallel-algo {args.context_parallel_algo}: built are "
                       f"{' and '.join(CP_ALGOS)}")
    if cp == 1:
        return cp, algo
    if algo == "a2a" and (shape.num_attention_heads // tp % cp or shape.num_query_groups // tp % cp):
        raise BadInput(f"--context-parallel-algo ulysses_cp_algo splits heads over CP {cp}: the "
                       f"{shape.num_attention_heads} heads and {shape.num_query_groups} query groups per TP {tp} "
                       "are not multiples of it; use megatron_cp_algo")
    if world % (tp * pp * cp):
        raise BadInput(f"the world size {world} is not a multiple of TP {tp} x PP {pp} x CP {cp}")
    if seq_length % (2 * cp):
        raise BadInput(f"--seq-length {seq_length} is not a multiple of 2 x --context-parallel-size {cp}: each "
                       "sequence is split into 2 x CP equal chunks")
    # --eod-mask-loss only zeroes the loss after EOD: megatron's split cuts loss_mask with the tokens
    packing = [f for f in _given_data_flags(args) if f != "--eod-mask-loss"]
    if packing and not (args.megatron_lm or os.environ.get("MEGATRON_LM_PATH")):
        raise BadInput(f"{', '.join(packing)} with --context-parallel-size {cp}: packed or variable-length "
                       "batches under context parallelism are not built; use one or the other")
    if args.attention_dropout:
        raise BadInput(f"--attention-dropout {args.attention_dropout} with --context-parallel-size {cp}: attention "
                       "dropout under context parallelism is not built; set --attention-dropout 0")
    return cp, algo


def _with_deepspeed(args, s: RunSettings, config: dict) -> RunSettings:
    if s.engine != "builtin":
        raise BadInput("--deepspeed and --megatron-lm are two engines: give one")
    stages = 1 if args.no_pipeline_parallel else s.layout.pp
    if args.no_pipeline_parallel and s.layout.pp > 1:
        raise BadInput(f"--no-pipeline-parallel with --pipeline-model-parallel-size {s.layout.pp}: drop one")
    zero = args.zero_stage if args.zero_stage is not None else 0
    if stages > 1 and zero > 1:
        raise BadInput(f"ZeRO stage {zero} with DeepSpeed's pipeline ({stages} stages): DeepSpeed's pipeline takes "
                       "ZeRO-1 at most; use --zero-stage 1, or --no-pipeline-parallel with PP 1")
    if s.logging.eval_interval:
        raise BadInput("--eval-interval: validation in the DeepSpeed engine is not built; drop it (or train in the "
                       "built-in engine)")
    if s.layout.vpp:
        raise BadInput("--num-layers-per-virtual-pipeline-stage: DeepSpeed's pipeline has no virtual stages")
    if s.layout.cp > 1:
        raise BadInput(f"--context-parallel-size {s.layout.cp} with --deepspeed: context parallelism is built in "
                       "the built-in engine (and with --megatron-lm) only")
    if s.layout.overlap_grad_reduce:
        raise BadInput("--overlap-grad-reduce with --deepspeed: DeepSpeed overlaps its own reduction "
                       "(zero_optimization.overlap_comm in the config)")
    if s.offload.any:
        raise BadInput("megatron-core's offload with --deepspeed: DeepSpeed offloads through its config "
                       "(zero_optimization.offload_optimizer / offload_param)")
    if s.recompute.granularity:
        raise BadInput(f"--recompute-granularity {s.recompute.granularity} with --deepspeed: DeepSpeed's engine "
                       "recomputes through its own checkpointing; use --deepspeed-activation-checkpointing")
    if stages > 1:
        _refuse_data_flags(args, "DeepSpeed's pipeline", "its stages exchange activations of one fixed shape, "
                           "without the packed sequences' boundaries; use --no-pipeline-parallel")
    ignored = [why for given, why in (
        (s.layout.distributed_optimizer, "--use-distributed-optimizer (megatron's ZeRO-1; with DeepSpeed give "
                                         "--zero-stage 1 or the config's zero_optimization.stage)"),
        (s.layout.sequence_parallel, "--sequence-parallel (the DeepSpeed engine's tensor-parallel layers do not "
                                     "split activations over the sequence)")) if given]
    if ignored:
        raise BadInput(f"{'; '.join(ignored)}: not honoured by the DeepSpeed engine; drop it")
    if args.partition_activations and not args.deepspeed_activation_checkpointing:
        raise BadInput("--partition-activations partitions DeepSpeed's activation checkpoints: add "
                       "--deepspeed-activation-checkpointing")
    return replace(s, engine="deepspeed", deepspeed=DeepSpeed(
        args.deepspeed_config, config, zero, stages, args.deepspeed_activation_checkpointing,
        args.partition_activations))


def _with_engine(args, s: RunSettings, passthrough: Tuple[str, ...]) -> RunSettings:
    checkout = args.megatron_lm or os.environ.get("MEGATRON_LM_PATH")
    if not checkout:
        if passthrough:
            raise BadInput(f"unrecognized arguments: {' '.join(passthrough)}")
        return s
    builtin_only = [f for f, v in (("--metrics-file", args.metrics_file), ("--peak-tflops", args.peak_tflops),
                                   ("--measure-peak-every", args.measure_peak_every),
                                   ("--log-tensor-memory", args.log_tensor_memory)) if v]
    if builtin_only:
        raise BadInput(f"{', '.join(builtin_only)}: the built-in engine's metrics; with --megatron-lm, "
                         "Megatron-LM logs (and writes tensorboard with --tensorboard-dir)")
    stock_rows = llama2.padded_vocab_size(s.vocab_size, s.make_vocab_size_divisible_by, s.layout.tp)
    if stock_rows != s.padded_vocab:  # stock pads by the divisor alone: a continued checkpoint's rows must follow
        raise BadInput(f"--load {args.load} holds {s.padded_vocab} embedding rows; stock Megatron-LM pads the "
                       f"vocabulary {s.vocab_size} to {stock_rows} with --make-vocab-size-divisible-by "
                       f"{s.make_vocab_size_divisible_by} at TP={s.layout.tp}: pass the divisor it was written with")
    if s.offload.modules:
        raise BadInput("--fine-grained-activation-offloading with --megatron-lm: Megatron-LM allows it with "
                       "--transformer-impl transformer_engine only (its arguments.py); it runs in the built-in engine")
    # Megatron-LM's own data flags reach it, with its meaning (its GPTDataset builds the masks)
    passthrough = tuple(passthrough) + tuple(_given_data_flags(args))
    return replace(s, engine="megatron-lm", megatron_lm=checkout, passthrough=passthrough)


def _with_preprocessed_packing(args):
    """An instruction dataset preprocessed with --pack (MindSpeed-LLM's first step) trains
    packed: it is read as if --reset-position-ids were given, so what that flag is refused
    with, such a dataset is refused with too.  With --megatron-lm the data is Megatron-LM's."""
    if not (args.is_instruction_dataset and args.data_path) or args.megatron_lm or os.environ.get("MEGATRON_LM_PATH"):
        return args
    packing = datasets.read_packing(args.data_path[0])
    if not packing:
        return args
    return argparse.Namespace(**{**vars(args), "reset_position_ids": True, "preprocessed_packing": packing,
                                 "packing_implied": not args.reset_position_ids})


def _given_data_flags(args) -> list:
    reset = ("--reset-position-ids (implied: the --data-path was preprocessed with --pack)"
             if getattr(args, "packing_implied", False) else "--reset-position-ids")
    return [f for f, v in ((reset, args.reset_position_ids),
                           ("--reset-attention-mask", args.reset_attention_mask),
                           ("--eod-mask-loss", args.eod_mask_loss),
                           ("--variable-seq-lengths", args.variable_seq_lengths)) if v]


def _refuse_data_flags(args, engine: str, why: str) -> None:
    given = _given_data_flags(args)
    if given:
        raise BadInput(f"{', '.join(given)} with {engine}: not built there ({why})")


def _data(args, layout, seq_length: int) -> Data:
    """--reset-position-ids / --reset-attention-mask / --eod-mask-loss / --variable-seq-lengths.
    With instruction data, --reset-position-ids packs samples (MindSpeed-LLM's pack fine-tuning,
    which gives that flag alone); in pretraining, documents are split at EOD, and Megatron-LM's
    two flags come together, since attention here always restarts with the positions."""
    reset_pos, reset_mask = args.reset_position_ids, args.reset_attention_mask
    if args.megatron_lm or os.environ.get("MEGATRON_LM_PATH"):  # passed to Megatron-LM, its meaning (_with_engine)
        return Data(tuple(args.data_path), args.split, args.is_instruction_dataset, args.data_cache_path)
    note = None
    packing = getattr(args, "preprocessed_packing", None)  # _with_preprocessed_packing: reset_pos is on
    if packing:
        where = f"--data-path {args.data_path[0]} was preprocessed with --pack --seq-length {packing['seq_length']}"
        if packing["seq_length"] != seq_length:
            raise BadInput(f"{where}; this run's --seq-length is {seq_length}: give --seq-length "
                           f"{packing['seq_length']}, or preprocess again without --pack")
        if args.variable_seq_lengths:
            raise BadInput(f"{where}: its samples train packed; --variable-seq-lengths pads unpacked samples, drop it")
        if args.packing_implied:
            note = (f"{where}: its samples train packed into rows of {seq_length}, each attending to itself "
                    "(as --reset-position-ids gives)")
    if reset_mask and not reset_pos:
        raise BadInput("--reset-attention-mask without --reset-position-ids: attention within each sample or "
                       "document restarts its positions too here (RoPE per sequence); add --reset-position-ids")
    if reset_pos and not reset_mask and not args.is_instruction_dataset:
        raise BadInput("--reset-position-ids without --reset-attention-mask (positions restart, attention crosses "
                       "documents) is not built; give both for document masking")
    if args.variable_seq_lengths:
        if not args.is_instruction_dataset or reset_pos:
            raise BadInput("--variable-seq-lengths pads instruction samples to the micro-batch's longest: it takes "
                           "--is-instruction-dataset without packing (--reset-position-ids)")
        if layout.pp > 1:
            raise BadInput("--variable-seq-lengths with pipeline parallelism: the stages exchange activations of "
                           "one fixed shape; pack instead (--reset-position-ids) or use PP 1")
    if args.eod_mask_loss and args.is_instruction_dataset:
        raise BadInput("--eod-mask-loss masks EOD tokens of pretraining documents; instruction data's loss is "
                       "on the responses already (their EOS trains, as in MindSpeed-LLM)")
    return Data(tuple(args.data_path), args.split, args.is_instruction_dataset, args.data_cache_path,
                packed=reset_pos, variable_seq_lengths=args.variable_seq_lengths, eod_mask_loss=args.eod_mask_loss,
                note=note)


# the optimizer flags' defaults (their flags default to None: given, or stated by a DeepSpeed config)
OPTIM_DEFAULTS = {"weight_decay": 0.1, "clip_grad": 1.0, "adam_beta1": 0.9, "adam_beta2": 0.95, "adam_eps": 1e-8}


def _assemble(args, d, size, shape, vocab, padded, tokenizer, tokenizer_path, resume, lora, layout, batches):
    dtype = torch.bfloat16 if d["bf16"] and not args.fp16 else torch.float16 if args.fp16 else torch.float32
    warmup = args.lr_warmup_iters or int((args.lr_warmup_fraction or 0) * args.train_iters)
    o = {k: OPTIM_DEFAULTS[k] if getattr(args, k) is None else getattr(args, k) for k in OPTIM_DEFAULTS}
    optim = Optim(d["lr"], d["min_lr"], args.lr_decay_style, warmup, args.lr_decay_iters or args.train_iters,
                  o["weight_decay"], o["clip_grad"], (o["adam_beta1"], o["adam_beta2"]), o["adam_eps"],
                  args.initial_loss_scale)
    logging = Logging(args.log_interval, args.eval_interval, args.eval_iters,
                      args.metrics_file or (os.path.join(args.save, "metrics.jsonl") if args.save else None),
                      args.peak_tflops, args.measure_peak_every,
                      args.log_tensor_memory)
    stop_at = args.train_iters if args.exit_after_iters is None else min(args.train_iters, args.exit_after_iters)
    rc = recompute.resolve(args)
    off = offload.resolve(args, ascend_patches.settings().backend, layout.distributed_optimizer,
                          half=dtype != torch.float32)
    offload.check_with_recompute(off, rc.granularity)
    return RunSettings(
        model_name=size, shape=shape, vocab_size=vocab, padded_vocab=padded, dtype=dtype, layout=layout,
        batches=batches, optim=optim,
        data=_data(args, layout, batches.seq_length),
        resume=resume, logging=logging, train_iters=args.train_iters, stop_at=stop_at, save=args.save,
        save_interval=args.save_interval, seed=args.seed, hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout,
        gradient_accumulation_fusion=args.gradient_accumulation_fusion and lora is None and ascend_patches.gradient_accumulation_fusion_available(),
        compile_fused_ops=args.compile_fused_ops,
        use_cpu_initialization=getattr(args, "use_cpu_initialization", False),
        tokenizer_path=tokenizer_path, tokenizer_type=args.tokenizer_type,
        make_vocab_size_divisible_by=args.make_vocab_size_divisible_by, lora=lora, tokenizer=tokenizer,
        recompute=rc, offload=off)
