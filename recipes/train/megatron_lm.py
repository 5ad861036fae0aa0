"""The stock Megatron-LM engine of the pretrain recipe: ``pretrain_gpt.py``'s ``pretrain()``
from a Megatron-LM checkout, with the size table and per-size defaults written as
Megatron-LM's own flags.

    torchrun --nproc-per-node 8 -m recipes.pretrain --megatron-lm ./Megatron-LM --model llama2-7b \\
        --data-path ... --tokenizer-name-or-path ... --train-iters 1000 [any Megatron-LM flag ...]

Flags this recipe does not know pass through to Megatron-LM unchanged; the translated
command line is printed before the run.  The user gets Megatron-LM's whole loop (its
logging, recompute, tensorboard, checkpoints); ascend_patches makes it run off CUDA.  The
checkout's ``megatron/training`` runs on the installed megatron-core (a checkout's own
``megatron/core`` that differs from it gets a warning naming both versions).
"""

from __future__ import annotations

import os
import re
import runpy
import sys
import warnings
from pathlib import Path
from typing import List, Optional

from recipes.errors import BadInput
from recipes.train.run_settings import RunSettings

CLONE = "git clone -b core_v0.16.1 https://github.com/NVIDIA/Megatron-LM"
ENV = "MEGATRON_LM_PATH"


class CheckoutError(BadInput):
    """--megatron-lm names a folder that is not a usable Megatron-LM checkout."""


def checkout_version(root: Path) -> Optional[str]:
    """The version of a checkout's own ``megatron/core``, or None when it has none."""
    info = root / "megatron" / "core" / "package_info.py"
    if not info.is_file():
        return None
    parts = dict(re.findall(r"^(MAJOR|MINOR|PATCH)\s*=\s*(\d+)", info.read_text(), flags=re.M))
    return ".".join(parts.get(k, "0") for k in ("MAJOR", "MINOR", "PATCH"))


def check_checkout(path: str) -> Path:
    """The checkout's folder; a clear error for one without ``megatron/training`` or
    ``pretrain_gpt.py``, and a warning for a ``megatron/core`` other than the installed one."""
    from ascend_patches import versions

    root = Path(path).expanduser().resolve()
    for need in ("megatron/training", "pretrain_gpt.py"):
        if not (root / need).exists():
            raise CheckoutError(f"--megatron-lm {path}: no {need} there; give the folder of a Megatron-LM checkout "
                                f"({CLONE})")
    ours, theirs = versions.version_of("megatron-core"), checkout_version(root)
    if theirs is not None and theirs != ours:
        warnings.warn(f"--megatron-lm {path}: its megatron/core is {theirs}, the installed megatron-core is {ours}; "
                      f"the installed one runs, under the checkout's megatron/training", stacklevel=2)
    if not versions.megatron_in_tested_range(ours):
        warnings.warn(f"megatron-core {ours} is outside the range ascend_patches is tested on "
                      f"({','.join(versions.TESTED_MEGATRON_CORE)})", stacklevel=2)
    return root


def _tokenizer_flags(s: RunSettings) -> List[str]:
    if not s.tokenizer_path:
        return ["--tokenizer-type", "NullTokenizer", "--vocab-size", str(s.vocab_size)]
    if Path(s.tokenizer_path).is_file() or s.tokenizer_type == "SentencePiece":
        model = Path(s.tokenizer_path)
        model = model if model.is_file() else model / "tokenizer.model"
        return ["--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model", str(model)]
    return ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(s.tokenizer_path)]


def _model_flags(s: RunSettings) -> List[str]:
    sh = s.shape
    out = ["--num-layers", sh.num_layers, "--hidden-size", sh.hidden_size, "--ffn-hidden-size", sh.ffn_hidden_size,
           "--num-attention-heads", sh.num_attention_heads]
    if sh.num_query_groups != sh.num_attention_heads:
        out += ["--group-query-attention", "--num-query-groups", sh.num_query_groups]
    out += ["--max-position-embeddings", sh.seq_length, "--position-embedding-type", "rope",
            "--rotary-base", int(sh.rope_theta) if float(sh.rope_theta).is_integer() else sh.rope_theta,
            "--normalization", "RMSNorm", "--norm-epsilon", sh.norm_epsilon, "--swiglu",
            "--untie-embeddings-and-output-weights", "--disable-bias-linear",
            "--hidden-dropout", s.hidden_dropout, "--attention-dropout", s.attention_dropout,
            "--make-vocab-size-divisible-by", s.make_vocab_size_divisible_by]
    if not _has_transformer_engine():
        out += ["--transformer-impl", "local"]
    return out


def _has_transformer_engine() -> bool:
    import importlib.util

    return importlib.util.find_spec("transformer_engine") is not None


def _training_flags(s: RunSettings) -> List[str]:
    L, b, o = s.layout, s.batches, s.optim
    out = ["--tensor-model-parallel-size", L.tp, "--pipeline-model-parallel-size", L.pp]
    if L.cp > 1:
        out += ["--context-parallel-size", L.cp, "--cp-comm-type", L.cp_comm_type]
    if L.layers_per_virtual_stage:
        out += ["--num-layers-per-virtual-pipeline-stage", L.layers_per_virtual_stage]
    out += ["--sequence-parallel"] * L.sequence_parallel + ["--use-distributed-optimizer"] * L.distributed_optimizer
    out += ["--overlap-grad-reduce"] * L.overlap_grad_reduce + ["--overlap-param-gather"] * L.overlap_param_gather
    out += ["--micro-batch-size", b.micro, "--global-batch-size", b.global_batch, "--seq-length", b.seq_length,
            "--train-iters", s.train_iters, "--lr", o.lr, "--min-lr", o.min_lr, "--lr-decay-style", o.decay_style,
            "--lr-warmup-iters", o.warmup_iters, "--lr-decay-iters", o.decay_iters, "--weight-decay", o.weight_decay,
            "--clip-grad", o.clip_grad, "--adam-beta1", o.betas[0], "--adam-beta2", o.betas[1], "--adam-eps", o.eps,
            "--seed", s.seed]
    if s.dist_backend:  # Megatron-LM takes nccl or gloo; ascend_patches maps nccl to hccl on an NPU
        out += ["--distributed-backend", "gloo" if s.dist_backend == "gloo" else "nccl"]
    if s.bf16:
        out.append("--bf16")
    if s.fp16:
        out += ["--fp16", "--initial-loss-scale", o.initial_loss_scale]
    if not s.gradient_accumulation_fusion:
        out.append("--no-gradient-accumulation-fusion")
    if s.use_cpu_initialization:
        out.append("--use-cpu-initialization")
    out += s.recompute.argv() + s.offload.argv()
    if s.stop_at < s.train_iters:
        out += ["--exit-interval", s.stop_at]
    return out


def _data_and_checkpoint_flags(s: RunSettings) -> List[str]:
    out = ["--data-path", *s.data.paths, "--split", s.data.split, *_tokenizer_flags(s)]
    if s.data.cache_path:
        out += ["--data-cache-path", s.data.cache_path]
    log = s.logging
    out += ["--log-interval", log.log_interval]
    out += (["--eval-interval", log.eval_interval, "--eval-iters", log.eval_iters] if log.eval_interval
            else ["--eval-interval", s.train_iters, "--eval-iters", 0])  # Megatron-LM needs an interval
    if s.save:
        out += ["--save", s.save, "--save-interval", s.save_interval or s.stop_at]
    if s.resume.loads_weights:
        out += ["--load", s.resume.path] + (["--finetune"] if s.resume.kind == "weights" else [])
    return out


def argv(s: RunSettings) -> List[str]:
    """Megatron-LM's command line for these settings, then the flags passed through."""
    flags = _model_flags(s) + _training_flags(s) + _data_and_checkpoint_flags(s)
    return [str(f) for f in flags] + list(s.passthrough)


class MegatronLMEngine:
    """Runs the checkout's ``pretrain_gpt.py`` in this process, as ``python pretrain_gpt.py ...``
    would under the same launcher."""

    def __init__(self, s: RunSettings):
        if s.lora:
            raise BadInput("--lora-target-modules: LoRA is built for the built-in engine only; drop --megatron-lm")
        if s.data.instruction:
            raise BadInput("--is-instruction-dataset: the packed instruction pair is read by the built-in engine "
                             "only (Megatron-LM's SFT reads its own format); drop --megatron-lm")
        self.s, self.root = s, check_checkout(s.megatron_lm)

    def run(self):
        import ascend_patches
        import torch.distributed as dist

        from recipes.model import parallel

        parallel.default_rendezvous_env()  # Megatron-LM reads torchrun's variables; one plain process works too
        flags = argv(self.s)
        if int(os.environ.get("RANK", "0")) == 0:
            print("Megatron-LM: python " + " ".join([str(self.root / "pretrain_gpt.py"), *flags]), flush=True)
        if self.s.compile_fused_ops:
            ascend_patches.configure(compile_ops=True)
        sys.path.insert(0, str(self.root))
        saved_argv, sys.argv = sys.argv, [str(self.root / "pretrain_gpt.py"), *flags]
        try:
            runpy.run_path(str(self.root / "pretrain_gpt.py"), run_name="__main__")
        finally:
            sys.argv = saved_argv
        if dist.is_initialized():
            dist.barrier()
        return None
