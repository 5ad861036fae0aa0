"""Pretrain (and fully fine-tune, or LoRA-tune) LLaMA-2 on stock Megatron-Core.

    torchrun --nproc-per-node 8 -m recipes.pretrain --model llama2-7b \\
        --data-path ./dataset/alpaca_text_document --tokenizer-name-or-path ./llama-2-7b-hf \\
        --load ./ckpt --save ./ckpt --train-iters 1000 \\
        [--tensor-model-parallel-size 8 --pipeline-model-parallel-size 1 \\
         --micro-batch-size 4 --global-batch-size 16 --seq-length 4096 --lr ... --bf16 ...]

``--model`` picks a size from ``recipes.model.llama2.SIZES`` with its defaults
(``llama2.RECIPE_DEFAULTS``); any flag given overrides them.  Shape flags (``--num-layers
--hidden-size ...``) or ``--hf-config DIR`` give custom shapes.  With
``--is-instruction-dataset`` the data is the packed instruction pair from
``recipes.preprocess_data`` and only response tokens train.

The run: flags -> ``run_settings.resolve`` (every setting, once) -> an engine's ``run()``.
The built-in engine is ``recipes.train.trainer.Trainer``.
"""

from __future__ import annotations


from recipes.errors import ArgumentParser

from recipes.data.tokenizer import add_tokenizer_flags
from recipes.model import flags, llama2
from recipes.train import memory_plan, offload, recompute, run_settings
from recipes.train.megatron_lm import MegatronLMEngine
from recipes.train.trainer import Trainer


def _deepspeed_engine(settings):
    from recipes.train.deepspeed_engine import DeepSpeedEngine  # imports deepspeed: only when asked for

    return DeepSpeedEngine(settings)


ENGINES = {"builtin": Trainer, "megatron-lm": MegatronLMEngine, "deepspeed": _deepspeed_engine}


def _per_size(key: str) -> str:
    """A flag's effective default, per --model (help text)."""
    short = {name.replace("llama2-", ""): d[key] for name, d in llama2.RECIPE_DEFAULTS.items()}
    custom = llama2.CUSTOM_DEFAULTS[key]
    sizes = ", ".join(f"{k} {v}" for k, v in short.items())
    return f"default per --model: {sizes}; custom shapes {custom if custom is not None else 'the model positions'}"


def _model_flags(p):
    g = p.add_argument_group("model")
    g.add_argument("--model", choices=list(llama2.SIZES), default=None,
                   help="a LLaMA-2 size; sets the shape and the training defaults below")
    g.add_argument("--hf-config", default=None, help="an HF model folder whose config.json gives the shape")
    for flag, what in zip(run_settings.SHAPE_FLAGS, ("transformer layers", "hidden size", "SwiGLU inner size",
                                                     "attention heads", "kv groups (GQA); default: the heads")):
        g.add_argument("--" + flag.replace("_", "-"), type=int, default=None,
                       help=f"{what}; overrides --model / --hf-config / the checkpoint")
    g.add_argument("--group-query-attention", action="store_true",
                   help="accepted for Megatron-LM scripts: GQA follows from --num-query-groups")
    g.add_argument("--vocab-size", type=int, default=None, help="default: the tokenizer's")
    flags.add_vocab_padding_flag(g)
    g.add_argument("--max-position-embeddings", type=int, default=None, help="default: the shape's positions")
    g.add_argument("--rotary-base", type=float, default=None, help="RoPE theta; default: the shape's (1e4, 34B 1e6)")
    g.add_argument("--norm-epsilon", type=float, default=None, help="RMSNorm epsilon; default 1e-5")
    g.add_argument("--hidden-dropout", type=float, default=0.0, help="default 0.0")
    g.add_argument("--attention-dropout", type=float, default=0.0, help="default 0.0")


def _parallel_flags(p):
    g = p.add_argument_group("parallelism")
    flags.add_layout_flags(g, _per_size("tensor_model_parallel_size"), _per_size("pipeline_model_parallel_size"))
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None,
                   help="interleaved pipeline schedule with this many layers per virtual stage (default: off)")
    g.add_argument("--sequence-parallel", action="store_true", help="Megatron sequence parallelism (needs TP > 1)")
    g.add_argument("--context-parallel-size", type=int, default=1,
                   help="split each sequence over this many ranks (ring attention; default 1)")
    g.add_argument("--context-parallel-algo", default="megatron_cp_algo",
                   help="MindSpeed's name for the CP algorithm: megatron_cp_algo (ring attention, the default) or "
                        "ulysses_cp_algo (all-to-all over heads); hybrid_cp_algo is refused")
    g.add_argument("--use-distributed-optimizer", action="store_true",
                   help="shard the optimizer state over data-parallel ranks (ZeRO-1, Megatron's)")
    g.add_argument("--overlap-grad-reduce", action="store_true",
                   help="reduce data-parallel gradients bucket by bucket during the backward (Megatron-LM's flag; "
                        "buckets of max(40M, 1M x DP) elements, its default)")
    g.add_argument("--overlap-param-gather", action="store_true",
                   help="with --use-distributed-optimizer and --overlap-grad-reduce: all-gather the updated "
                        "parameters during the next forward, bucket by bucket")


def _training_flags(p):
    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=None, help=_per_size("micro_batch_size"))
    g.add_argument("--global-batch-size", type=int, default=None, help=_per_size("global_batch_size"))
    g.add_argument("--seq-length", type=int, default=None, help=_per_size("seq_length"))
    g.add_argument("--train-iters", type=int, default=None,
                   help="iterations (global batches) to train; this or --train-samples is required")
    g.add_argument("--lr", type=float, default=None, help=_per_size("lr"))
    g.add_argument("--min-lr", type=float, default=None, help=_per_size("min_lr") + "; --lr / 10 when --lr is given")
    g.add_argument("--lr-decay-style", choices=("cosine", "linear", "constant"), default="cosine",
                   help="default cosine")
    g.add_argument("--lr-warmup-iters", type=int, default=0, help="linear warm-up from 0 (default 0)")
    g.add_argument("--lr-warmup-fraction", type=float, default=None, help="warm-up as a fraction of --train-iters")
    g.add_argument("--lr-decay-iters", type=int, default=None, help="default: --train-iters")
    # default None, so a DeepSpeed config's optimizer.params can be told from a flag given
    g.add_argument("--weight-decay", type=float, default=None, help="default 0.1")
    g.add_argument("--clip-grad", type=float, default=None, help="gradient norm clip (default 1.0)")
    g.add_argument("--adam-beta1", type=float, default=None, help="default 0.9")
    g.add_argument("--adam-beta2", type=float, default=None, help="default 0.95")
    g.add_argument("--adam-eps", type=float, default=None, help="default 1e-8")
    g.add_argument("--bf16", action="store_true", default=None, help=_per_size("bf16"))
    g.add_argument("--fp16", action="store_true", help="fp16 with dynamic loss scaling")
    g.add_argument("--fp32", action="store_true", help="fp32, overriding a size's bf16 default")
    g.add_argument("--initial-loss-scale", type=float, default=2.0 ** 16, help="fp16 only (default 65536)")
    g.add_argument("--compile-fused-ops", action="store_true",
                   help="CPU: run RMSNorm, SwiGLU and RoPE forward and backward as torch.compile-generated "
                        "kernels (ascend_patches compile_ops; the first step compiles them)")
    g.add_argument("--no-gradient-accumulation-fusion", action="store_false", dest="gradient_accumulation_fusion",
                   help="add weight gradients to the fp32 main_grad after the GEMM, not in it (on by default "
                        "where the accelerator has the kernel: Apex on CUDA, ascend_patches on the CPU; never "
                        "with LoRA, whose frozen weights have no main_grad)")
    g.add_argument("--seed", type=int, default=1234, help="default 1234")
    g.add_argument("--use-cpu-initialization", action="store_true",
                   help="initialise the weights on the host, then move the model to the accelerator (Megatron-LM's "
                        "flag: the same weights at any TP size); the default on the CPU backend. Elsewhere each "
                        "rank initialises its own shard on its device")


def _data_flags(p):
    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", required=True,
                   help="indexed dataset prefix(es), optionally weighted: [w1] p1 [w2] p2 ...")
    g.add_argument("--split", default="949,50,1", help="train,valid,test weights (default 949,50,1)")
    g.add_argument("--is-instruction-dataset", action="store_true",
                   help="the packed instruction pair from recipes.preprocess_data; only responses train")
    g.add_argument("--reset-position-ids", action="store_true",
                   help="each sample its own sequence: with --is-instruction-dataset, samples are packed whole into "
                        "rows of --seq-length (MindSpeed-LLM's pack fine-tuning); in pretraining (with "
                        "--reset-attention-mask), documents split at EOD. Attention stays in each, positions restart")
    g.add_argument("--reset-attention-mask", action="store_true",
                   help="attention within each document or sample (with --reset-position-ids)")
    g.add_argument("--eod-mask-loss", action="store_true", help="pretraining: no loss on EOD tokens")
    g.add_argument("--variable-seq-lengths", action="store_true",
                   help="--is-instruction-dataset, unpacked: pad each micro-batch to its longest sample, not "
                        "--seq-length")
    add_tokenizer_flags(g, "the one --load records")
    g.add_argument("--data-cache-path", default=None, help="where GPTDataset caches its indices (default: beside the data)")


def _checkpoint_flags(p):
    g = p.add_argument_group("checkpoints and logging")
    flags.add_load_flags(g, "resumed (or, with --finetune, fine-tuned from); an empty or missing one starts "
                            "from scratch, as in Megatron-LM", "resumed (adapters, optimizer, data)")
    g.add_argument("--save", default=None, help="where checkpoints go (iter_XXXXXXX/, written atomically)")
    g.add_argument("--save-interval", type=int, default=None, help="save every N iterations (and at the end)")
    g.add_argument("--accept-data-change", action="store_true",
                   help="continue a checkpoint with another --data-path, --split, --seed, --seq-length or packing "
                        "flag than it was written with (refused without it: its consumed samples would mean other "
                        "batches); the change is logged")
    g.add_argument("--finetune", action="store_true", help="load weights only; reset optimizer, iteration, data")
    g.add_argument("--overwrite", action="store_true",
                   help="let a run that does not continue the --save folder's checkpoint write into it anyway "
                        "(without it that is refused: the folder's tracker would move back)")
    g.add_argument("--eval-interval", type=int, default=None, help="validation loss every N iterations (default: off)")
    g.add_argument("--eval-iters", type=int, default=2, help="global batches per validation (default 2)")
    g.add_argument("--log-interval", type=int, default=1, help="print every N iterations (default 1)")
    g.add_argument("--metrics-file", default=None, help="JSONL, one record per iteration; default <save>/metrics.jsonl")
    g.add_argument("--peak-tflops", type=float, default=None,
                   help="per device, for MFU; default: the device's known peak, or on a CPU its measured GEMM rate")
    g.add_argument("--measure-peak-every", type=int, default=0,
                   help="CPU: re-measure the GEMM peak every N iterations (untimed), so CPU-MFU compares each step "
                        "with the machine's speed at that time; a shared machine's speed drifts (default: never)")
    g.add_argument("--log-tensor-memory", action="store_true",
                   help="log the bytes held in tensors after each step (parameters, gradients, optimizer state, "
                        "flat buffers; untimed): on a CPU the resident size also counts heap the allocator keeps "
                        "after freeing, so it cannot compare what each optimizer holds")
    g.add_argument("--exit-after-iters", type=int, default=None, help="stop after N iterations (to test resume)")
    g.add_argument("--skip-memory-check", action="store_true",
                   help="start even where recipes.memory_plan says the layout does not fit the device")
    g.add_argument("--device-memory-gb", type=float, default=None,
                   help="each device's memory for the memory check, in GB (default: the accelerator's; on the CPU "
                        "backend the host's available memory)")


def _lora_flags(p):
    g = p.add_argument_group("LoRA (recipes.model.lora)")
    g.add_argument("--lora-target-modules", nargs="+", default=None,
                   help="query_key_value dense gate_proj up_proj down_proj (or linear_qkv ... linear_fc2)")
    g.add_argument("--lora-r", type=int, default=16, help="adapter rank (default 16)")
    g.add_argument("--lora-alpha", type=float, default=32, help="scaling alpha / r (default 32)")
    g.add_argument("--lora-dropout", type=float, default=0.0, help="default 0.0")
    g.add_argument("--lora-modules-to-save", nargs="*", default=None,
                   help="modules trained in full beside the adapters: word_embeddings lm_head.lm_head")


def _engine_flags(p):
    g = p.add_argument_group("engine")
    g.add_argument("--megatron-lm", default=None, metavar="DIR",
                   help="run stock Megatron-LM's pretrain_gpt.py from this checkout (default: $MEGATRON_LM_PATH, "
                        "else the built-in loop); flags this recipe does not know pass through to it")
    g = p.add_argument_group("DeepSpeed (DeepSpeed's and AscendSpeed's flag names)")
    g.add_argument("--deepspeed", action="store_true", help="train under deepspeed.initialize (ZeRO, its pipeline)")
    g.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config", default=None,
                   help="the DeepSpeed config file; flags that contradict it are an error")
    g.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), default=None,
                   help="ZeRO stage (default: the config's zero_optimization.stage, else 0)")
    g.add_argument("--no-pipeline-parallel", action="store_true",
                   help="no DeepSpeed pipeline (default: a PipelineModule of PP stages when PP > 1)")
    g.add_argument("--deepspeed-activation-checkpointing", action="store_true",
                   help="recompute every layer through deepspeed.checkpointing")
    g.add_argument("--partition-activations", action="store_true",
                   help="partition DeepSpeed's activation checkpoints over TP ranks")
    g.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None,
                   help="set by DeepSpeed's launcher (the rank also comes from LOCAL_RANK)")


def _pasted_flags(p):
    g = p.add_argument_group("Megatron-LM / AscendSpeed script flags (accepted so a launch script pastes in; "
                             "docs/megatron_lm_flags.md)")
    for flag, dest, value in llama2.ARCHITECTURE_FLAGS:
        if value is True:
            g.add_argument(flag, dest=dest, action="store_true", help="LLaMA-2 already is this")
        else:
            g.add_argument(flag, dest=dest, default=None, help=f"LLaMA-2's is {value}; another value is refused")
    for flag, dest, why in llama2.KERNEL_FLAGS:
        g.add_argument(flag, dest=dest, action="store_true", help=why)
    g.add_argument("--distributed-backend", default=None,
                   help="nccl (Megatron-LM's default) means the accelerator's own: hccl on an NPU, nccl on CUDA, "
                        "gloo on the CPU; another library is refused (default: the accelerator's)")
    g.add_argument("--train-samples", type=int, default=None,
                   help="instead of --train-iters: iterations = samples // --global-batch-size, as Megatron-LM "
                        "counts them")


def build_parser():
    p = ArgumentParser(description="LLaMA-2 pretraining / fine-tuning on stock Megatron-Core", allow_abbrev=False)
    for group in (_model_flags, _parallel_flags, _training_flags, recompute.add_flags, offload.add_flags, _data_flags,
                  _checkpoint_flags, _lora_flags, _engine_flags, _pasted_flags):
        group(p)
    return p


def main(argv=None):
    args, unknown = build_parser().parse_known_args(argv)
    settings = run_settings.resolve(args, passthrough=unknown)
    if not args.skip_memory_check and settings.engine != "deepspeed":  # ZeRO's memory is not the plan's model
        memory_plan.refuse_if_it_does_not_fit(settings, args.device_memory_gb)
    return ENGINES[settings.engine](settings).run()


if __name__ == "__main__":
    main()
