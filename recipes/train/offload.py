"""Offload to the host: Megatron-LM's flags, and MindSpeed's names for two of them, resolved once
into the megatron-core fields that do the work.  An accelerator's memory is what they save; on
the CPU backend the device is the host, so each is refused there in one line.

- ``--fine-grained-activation-offloading --offload-modules M ...``: megatron-core's
  fine-grained activation offloading.  Autograd's saved tensors inside each named module
  (attn_norm, qkv_linear, core_attn, attn_proj, mlp_norm: those of a dense layer) are copied to
  pinned host memory in the forward and back before the module's backward.  Tensors under
  ``--min-offloaded-tensor-size`` elements (megatron-core's default 1M) stay.
- MindSpeed's ``--swap-attention`` is the same for the attention's own activations: modules
  ``core_attn`` (q, k, v and what flash attention keeps) and ``attn_proj`` (its output).
- ``--optimizer-cpu-offload [--optimizer-offload-fraction F]``: megatron-core's
  ``HybridDeviceOptimizer``; the first F of the fp32 main parameters, their Adam states and
  update live on the host (torch's AdamW there), the rest on the device.  As Megatron-LM, it
  needs ``--use-precision-aware-optimizer`` (the hybrid optimizer takes that code path) and so
  the distributed optimizer.  MindSpeed's ``--swap-optimizer`` is the same at fraction 1.
- ``--use-precision-aware-optimizer`` alone asks Transformer Engine's FusedAdam for master
  weights and states kept in the optimizer in the dtypes of ``--main-params-dtype``,
  ``--exp-avg-dtype`` and ``--exp-avg-sq-dtype``.  No NPU or CPU kernel here has that form, so
  without ``--optimizer-cpu-offload`` (or with a non-fp32 dtype, which the hybrid optimizer
  would not read) it is refused with the reason, never ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

from recipes.errors import BadInput

# the offloadable modules of a dense LLaMA-2 layer (megatron-core's others are MoE's)
MODULES = ("attn_norm", "qkv_linear", "core_attn", "attn_proj", "mlp_norm")
SWAP_ATTENTION = ("core_attn", "attn_proj")
DTYPES = ("fp32", "fp16", "bf16", "fp8")  # Megatron-LM's choices for the Adam states


@dataclass(frozen=True)
class Offload:
    modules: Tuple[str, ...] = ()       # fine-grained activation offloading; () off
    min_tensor_size: int = 1024 * 1024  # elements: smaller saved tensors stay on the device
    optimizer: bool = False             # HybridDeviceOptimizer
    fraction: float = 1.0               # of the optimizer's parameters, on the host
    overlap_d2h_h2d: bool = False       # one host optimizer per parameter, copies on side streams

    @property
    def any(self) -> bool:
        return bool(self.modules) or self.optimizer

    def transformer_config(self) -> dict:
        if not self.modules:
            return {}
        return {"fine_grained_activation_offloading": True, "offload_modules": list(self.modules),
                "min_offloaded_tensor_size": self.min_tensor_size}

    def optimizer_config(self) -> dict:
        if not self.optimizer:
            return {}
        return {"optimizer_cpu_offload": True, "optimizer_offload_fraction": self.fraction,
                "overlap_cpu_optimizer_d2h_h2d": self.overlap_d2h_h2d, "use_precision_aware_optimizer": True}

    def argv(self) -> list:
        """Megatron-LM's flags for the same offload."""
        out = []
        if self.modules:
            out += ["--fine-grained-activation-offloading", "--offload-modules", *self.modules,
                    "--min-offloaded-tensor-size", self.min_tensor_size]
        if self.optimizer:
            out += ["--optimizer-cpu-offload", "--optimizer-offload-fraction", self.fraction,
                    "--use-precision-aware-optimizer"] + (["--overlap-cpu-optimizer-d2h-h2d"]
                                                          if self.overlap_d2h_h2d else [])
        return out

    def describe(self) -> str:
        parts = []
        if self.modules:
            parts.append("activations of " + ", ".join(self.modules))
        if self.optimizer:
            parts.append(f"{self.fraction:g} of the optimizer")
        return "; ".join(parts) or "off"


def add_flags(p) -> None:
    g = p.add_argument_group("offload to the host (Megatron-LM's flags; MindSpeed's two names); accelerators only")
    g.add_argument("--fine-grained-activation-offloading", action="store_true",
                   help="copy the saved activations of --offload-modules to the host in the forward, back in the "
                        "backward")
    g.add_argument("--offload-modules", nargs="+", default=None, metavar="MODULE",
                   help=f"with --fine-grained-activation-offloading: of {', '.join(MODULES)}")
    g.add_argument("--min-offloaded-tensor-size", type=int, default=None,
                   help="saved tensors of fewer elements stay on the device (megatron-core's default 1048576)")
    g.add_argument("--swap-attention", action="store_true",
                   help="MindSpeed's name: offload the attention's activations (modules core_attn, attn_proj)")
    g.add_argument("--optimizer-cpu-offload", action="store_true",
                   help="megatron-core's HybridDeviceOptimizer: main parameters, Adam states and update on the host "
                        "(needs --use-precision-aware-optimizer and --use-distributed-optimizer, as Megatron-LM)")
    g.add_argument("--optimizer-offload-fraction", type=float, default=None,
                   help="the share of the optimizer's parameters on the host (default 1.0)")
    g.add_argument("--overlap-cpu-optimizer-d2h-h2d", action="store_true",
                   help="one host optimizer per parameter; gradients and updated parameters copied on side streams")
    g.add_argument("--swap-optimizer", action="store_true",
                   help="MindSpeed's name: --optimizer-cpu-offload --use-precision-aware-optimizer, fraction 1")
    g.add_argument("--use-precision-aware-optimizer", action="store_true",
                   help="optimizer-held master weights and states; here only with --optimizer-cpu-offload")
    for flag, choices in (("--main-grads-dtype", ("fp32", "bf16")), ("--main-params-dtype", ("fp32", "fp16")),
                          ("--exp-avg-dtype", DTYPES), ("--exp-avg-sq-dtype", DTYPES)):
        g.add_argument(flag, choices=choices, default="fp32",
                       help="with --use-precision-aware-optimizer (Megatron-LM's flag); here fp32 only")


def resolve(args, backend: str, distributed_optimizer: bool, half: bool) -> Offload:
    """The offload a run's flags ask for; ``args.plan_only`` (recipes.memory_plan) plans one
    for an accelerator from any machine."""
    modules = _modules(args)
    optimizer, fraction = _optimizer(args, distributed_optimizer)
    if optimizer and not half:
        raise BadInput(f"{_given(args)} with fp32 weights: megatron-core's HybridDeviceOptimizer takes 16-bit "
                       "weights (the distributed optimizer's fp32 shards are views it refuses: \"can't optimize a "
                       "non-leaf Tensor\"); add --bf16")
    if (modules or optimizer) and backend == "cpu" and not getattr(args, "plan_only", False):
        given = _given(args)
        raise BadInput(f"{given} offloads to the host, and on the CPU backend the device is the host: there is "
                       "nothing to free; drop it, or run on an accelerator (ASCEND_PATCHES_BACKEND=npu|cuda)")
    size = args.min_offloaded_tensor_size
    if size is not None and size < 0:
        raise BadInput(f"--min-offloaded-tensor-size {size}: give 0 or more elements")
    out = Offload(modules=modules, min_tensor_size=Offload.min_tensor_size if size is None else size,
                  optimizer=optimizer, fraction=fraction, overlap_d2h_h2d=args.overlap_cpu_optimizer_d2h_h2d)
    check_installed(out)
    return out


def _given(args) -> str:
    for dest, flag in (("fine_grained_activation_offloading", "--fine-grained-activation-offloading"),
                       ("swap_attention", "--swap-attention"), ("optimizer_cpu_offload", "--optimizer-cpu-offload"),
                       ("swap_optimizer", "--swap-optimizer")):
        if getattr(args, dest):
            return flag
    return "offload"


def _modules(args) -> Tuple[str, ...]:
    modules = list(args.offload_modules or ())
    if args.offload_modules is not None and not args.fine_grained_activation_offloading:
        raise BadInput("--offload-modules needs --fine-grained-activation-offloading (megatron-core reads it only "
                       "there)")
    if args.min_offloaded_tensor_size is not None and not (args.fine_grained_activation_offloading
                                                           or args.swap_attention):
        raise BadInput("--min-offloaded-tensor-size applies to --fine-grained-activation-offloading or "
                       "--swap-attention only")
    if args.fine_grained_activation_offloading and not modules:
        raise BadInput("--fine-grained-activation-offloading needs --offload-modules (of " + ", ".join(MODULES) + ")")
    unknown = [m for m in modules if m not in MODULES]
    if unknown:
        raise BadInput(f"--offload-modules {' '.join(unknown)}: a dense LLaMA-2 layer has {', '.join(MODULES)}")
    if "attn_proj" in modules and "core_attn" not in modules:
        raise BadInput("--offload-modules attn_proj needs core_attn too: attn_proj's input is core attention's "
                       "output, which core attention's backward needs on the device (megatron-core's rule)")
    if args.swap_attention:
        modules += [m for m in SWAP_ATTENTION if m not in modules]
    return tuple(m for m in MODULES if m in modules)


def _optimizer(args, distributed_optimizer: bool):
    optimizer = args.optimizer_cpu_offload or args.swap_optimizer
    precision_aware = args.use_precision_aware_optimizer or args.swap_optimizer
    fraction = 1.0 if args.optimizer_offload_fraction is None else args.optimizer_offload_fraction
    if args.swap_optimizer and args.optimizer_offload_fraction not in (None, 1.0):
        raise BadInput("--swap-optimizer offloads the whole optimizer; for a share use --optimizer-cpu-offload "
                       "--optimizer-offload-fraction F --use-precision-aware-optimizer")
    if not optimizer and (args.optimizer_offload_fraction is not None or args.overlap_cpu_optimizer_d2h_h2d):
        raise BadInput("--optimizer-offload-fraction and --overlap-cpu-optimizer-d2h-h2d apply to "
                       "--optimizer-cpu-offload only")
    if not 0.0 < fraction <= 1.0:
        raise BadInput(f"--optimizer-offload-fraction {fraction:g}: give a share in (0, 1]")
    if optimizer and not precision_aware:
        raise BadInput("--optimizer-cpu-offload needs --use-precision-aware-optimizer: the hybrid optimizer takes "
                       "that code path (Megatron-LM's rule)")
    if precision_aware and not optimizer:
        raise BadInput("--use-precision-aware-optimizer without --optimizer-cpu-offload needs Transformer Engine's "
                       "FusedAdam (master weights and low-precision states inside the kernel), which neither "
                       "torch-npu nor torch has: add --optimizer-cpu-offload, or drop it")
    low = [f"--{name.replace('_', '-')} {getattr(args, name)}"
           for name in ("main_grads_dtype", "main_params_dtype", "exp_avg_dtype", "exp_avg_sq_dtype")
           if getattr(args, name) != "fp32"]
    if low:
        raise BadInput(f"{low[0]}: the host optimizer (torch's AdamW) keeps fp32 master weights and states and "
                       "would not read it; low-precision states need Transformer Engine's FusedAdam: give fp32")
    if precision_aware and not distributed_optimizer:
        raise BadInput("--use-precision-aware-optimizer needs --use-distributed-optimizer (megatron-core's rule)")
    return optimizer, fraction  # --use-precision-aware-optimizer is given exactly when the optimizer offloads


def check_installed(o: Offload) -> None:
    """A megatron-core release without the fields refuses the flags in one line."""
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.transformer.transformer_config import TransformerConfig

    from ascend_patches.versions import lacking_fields, version_of

    for wanted, config, flag in ((o.transformer_config(), TransformerConfig, "--fine-grained-activation-offloading"),
                                 (o.optimizer_config(), OptimizerConfig, "--optimizer-cpu-offload")):
        missing = lacking_fields(config, wanted)
        if missing:
            raise BadInput(f"{flag}: megatron-core {version_of('megatron-core')} has no {missing} "
                           "(fine-grained activation offloading is in 0.16+); install a release that has it")


def check_with_recompute(o: Offload, granularity) -> None:
    """Full recomputation keeps only each layer's input, which attn_norm's offload frees on the
    device (megatron-core resizes the residual's storage to 0) and the recomputed forward then
    reads: "data is not allocated" on the emulated NPU, freed memory on a device.  Offloading
    the attention's tensors instead offloads nothing (a recomputed layer saves none)."""
    if o.modules and granularity == "full":
        raise BadInput("activation offload with --recompute-granularity full: a fully recomputed layer saves "
                       "nothing inside it to offload, and attn_norm's offload frees the input its recomputation "
                       "reads; use selective recomputation, or drop the offload")
