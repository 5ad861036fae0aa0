"""Activation recomputation: Megatron-LM's flags, and MindSpeed's names for two of its
selective modules, resolved once into the ``TransformerConfig`` fields megatron-core reads.

- ``--recompute-granularity full --recompute-method uniform|block --recompute-num-layers N``:
  whole layers; each recomputed chunk keeps only its input.
- ``--recompute-granularity selective [--recompute-modules core_attn mlp layernorm]``: parts of
  every layer (megatron-core's default module: ``core_attn``).  ``--recompute-activations`` is
  Megatron-LM's alias for ``--recompute-granularity selective``.
- MindSpeed's ``--recompute-norm`` is the ``layernorm`` module (both RMSNorms of a layer).
  MindSpeed's ``--recompute-activation-function`` recomputes the MLP's activation alone; a dense
  layer in megatron-core has no unit that small, so it is the ``mlp`` module here: the whole
  MLP is recomputed (fc1, SwiGLU, fc2), which saves at least what MindSpeed's saves, at the cost
  of one more fc1 and fc2 forward per layer.

A flag that would be ignored (a method without full granularity, modules without selective)
is refused in one line, as is a combination that contradicts itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

from recipes.errors import BadInput

# the selective modules a dense LLaMA-2 layer has (megatron-core's others are MoE's and MLA's)
MODULES = ("core_attn", "mlp", "layernorm")
MINDSPEED = (("recompute_norm", "--recompute-norm", "layernorm"),
             ("recompute_activation_function", "--recompute-activation-function", "mlp"))


@dataclass(frozen=True)
class Recompute:
    granularity: Optional[str] = None  # "full" | "selective"; None: every activation is kept
    method: Optional[str] = None       # full: "uniform" | "block"
    num_layers: Optional[int] = None   # full: layers per recomputed chunk (uniform) or per stage (block)
    modules: Tuple[str, ...] = ()      # selective: megatron-core's recompute_modules; () its default (core_attn)

    def config(self) -> dict:
        """The TransformerConfig fields (none when off)."""
        if self.granularity is None:
            return {}
        if self.granularity == "full":
            return {"recompute_granularity": "full", "recompute_method": self.method,
                    "recompute_num_layers": self.num_layers}
        return {"recompute_granularity": "selective", **({"recompute_modules": list(self.modules)} if self.modules
                                                          else {})}

    def argv(self) -> list:
        """Megatron-LM's flags for the same recomputation."""
        if self.granularity is None:
            return []
        if self.granularity == "full":
            return ["--recompute-granularity", "full", "--recompute-method", self.method,
                    "--recompute-num-layers", self.num_layers]
        return ["--recompute-granularity", "selective"] + (["--recompute-modules", *self.modules] if self.modules
                                                            else [])

    def describe(self) -> str:
        if self.granularity is None:
            return "off"
        if self.granularity == "full":
            return f"full, {self.method}, {self.num_layers} layer(s)"
        return "selective: " + (", ".join(self.modules) or "core_attn")


def add_flags(p) -> None:
    g = p.add_argument_group("activation recomputation (Megatron-LM's flags; MindSpeed's two names)")
    g.add_argument("--recompute-granularity", choices=("full", "selective"), default=None,
                   help="full: whole layers keep only their input; selective: the --recompute-modules of every "
                        "layer (default: off)")
    g.add_argument("--recompute-method", choices=("uniform", "block"), default=None,
                   help="full only: uniform chunks of --recompute-num-layers layers, or the first "
                        "--recompute-num-layers layers of each pipeline stage (block)")
    g.add_argument("--recompute-num-layers", type=int, default=None, help="full only: see --recompute-method")
    g.add_argument("--recompute-activations", action="store_true",
                   help="Megatron-LM's alias for --recompute-granularity selective")
    g.add_argument("--recompute-modules", nargs="+", default=None, metavar="MODULE",
                   help=f"selective only: of {', '.join(MODULES)} (default core_attn)")
    g.add_argument("--recompute-norm", action="store_true",
                   help="MindSpeed's name: recompute both RMSNorms of each layer (selective, module layernorm)")
    g.add_argument("--recompute-activation-function", action="store_true",
                   help="MindSpeed's name: recompute the MLP's activation; here the whole MLP (selective, module "
                        "mlp: megatron-core has no smaller unit for a dense layer)")


def resolve(args) -> Recompute:
    granularity = args.recompute_granularity
    if args.recompute_activations:
        if granularity == "full":
            raise BadInput("--recompute-activations is --recompute-granularity selective (Megatron-LM's alias); "
                           "it contradicts --recompute-granularity full: give one")
        granularity = "selective"
    mindspeed = [(flag, module) for dest, flag, module in MINDSPEED if getattr(args, dest)]
    modules = list(args.recompute_modules or ())
    if mindspeed:
        if granularity == "full":
            raise BadInput(f"{mindspeed[0][0]} recomputes part of each layer; --recompute-granularity full recomputes "
                           "whole layers, which includes it: give one")
        granularity = "selective"
        modules += [m for _, m in mindspeed if m not in modules]
    if args.recompute_modules is not None and granularity != "selective":
        raise BadInput("--recompute-modules needs --recompute-granularity selective (megatron-core reads it only "
                       "there)")
    unknown = [m for m in modules if m not in MODULES]
    if unknown:
        raise BadInput(f"--recompute-modules {' '.join(unknown)}: a dense LLaMA-2 layer has {', '.join(MODULES)}")
    if granularity != "full" and (args.recompute_method is not None or args.recompute_num_layers is not None):
        raise BadInput("--recompute-method and --recompute-num-layers apply to --recompute-granularity full only"
                       + ("" if granularity else "; it is not given"))
    if granularity == "full":
        if args.recompute_method is None or args.recompute_num_layers is None:
            raise BadInput("--recompute-granularity full needs --recompute-method uniform|block and "
                           "--recompute-num-layers N (megatron-core's rule)")
        if args.recompute_num_layers < 1:
            raise BadInput(f"--recompute-num-layers {args.recompute_num_layers}: give 1 or more")
        return Recompute("full", args.recompute_method, args.recompute_num_layers)
    if granularity == "selective":
        _check_installed_has_modules(modules)
        return Recompute("selective", modules=tuple(modules))
    return Recompute()


def _check_installed_has_modules(modules) -> None:
    from megatron.core.transformer.transformer_config import TransformerConfig

    from ascend_patches.versions import lacking_fields, version_of

    if modules and lacking_fields(TransformerConfig, ["recompute_modules"]):
        raise BadInput(f"--recompute-modules: megatron-core {version_of('megatron-core')} has no recompute_modules "
                       "(it recomputes core attention only); drop the modules or install a release that has them")
