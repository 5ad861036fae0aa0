"""Will a layout fit?  Per device: weights, gradients, optimizer states and activations (the
micro-batches in flight under the pipeline schedule), against the device's memory, before
anything is built.  The arithmetic: ``docs/memory.md`` (``recipes/train/memory_plan.py``).

    python -m recipes.memory_plan --model llama2-70b --tensor-model-parallel-size 8 \\
        --pipeline-model-parallel-size 4 --seq-length 4096 --micro-batch-size 1 \\
        [--world-size 64] [--device-memory-gb 64] [any recipes.pretrain flag]

The device's memory is the accelerator's when one is present, on the CPU backend the host's
available memory, or ``--device-memory-gb``.  The last line says whether the layout fits; the
exit code is 0 when it does and 1 when it does not.
"""

from __future__ import annotations

from recipes.errors import BadInput
from recipes.model import llama2
from recipes.train import memory_plan, pretrain, run_settings


def build_parser():
    p = pretrain.build_parser()
    p.description = __doc__.splitlines()[0]
    for action in p._actions:  # a plan needs no data: the flag stays for scripts that paste theirs in
        if action.dest in ("data_path", "train_iters"):
            action.required = False
    g = p.add_argument_group("memory plan")
    g.add_argument("--world-size", type=int, default=None,
                   help="devices in the run (default: TP x PP x CP, one data-parallel replica)")
    return p


def main(argv=None):
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:
        raise BadInput(f"unrecognized arguments: {' '.join(unknown)}")
    world = args.world_size
    if world is None:  # one data-parallel replica of the layout the flags (or the size's defaults) give
        d = llama2.RECIPE_DEFAULTS[args.model] if args.model else llama2.CUSTOM_DEFAULTS
        world = (args.tensor_model_parallel_size or d["tensor_model_parallel_size"]) * \
            (args.pipeline_model_parallel_size or d["pipeline_model_parallel_size"]) * args.context_parallel_size
    if args.train_iters is None and args.train_samples is None:
        args.train_iters = 1  # a plan trains nothing
    if args.data_path is None:
        args.data_path = []  # a plan reads no data
    args.plan_only = True  # plans for an accelerator from any host: offload flags are not refused here
    s = run_settings.resolve(args, world=world)
    limit, where = memory_plan.device_memory_bytes(args.device_memory_gb)
    fits, text = memory_plan.check(s, limit, where)
    print(s.describe())
    print(text)
    return 0 if fits else 1
