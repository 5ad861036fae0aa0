"""What stock Megatron-LM's ``tools/checkpoint/convert.py`` (core_v0.16.1: loader
``llama_mistral``, saver ``core``) needs to run where Transformer Engine is absent.  Its
modules are top-level there (``saver_base``, ``loader_llama_mistral``: convert.py puts
``tools/checkpoint`` on ``sys.path``), so the targets are those names.

- The saver asserts Transformer Engine >= 0.12 before anything else, even when told
  ``--saver-transformer-impl local``, which builds no TE module.  With the local
  implementation the check is left out; the rest of that step (the checkout's root and
  ``--megatron-path`` on ``sys.path``) is kept.
- The saver fakes its model-parallel groups (one process writes every rank) but sets no
  data-parallel group, and ``GPTModel`` asks ``parallel_state`` for all of them
  (``ProcessGroupCollection.use_mpu_process_groups``: "Intra partial data parallel group is
  not initialized"), and the checkpoint writer for the pipeline group.  The converter is
  data-parallel size 1 and walks the pipeline stages itself, so those groups get the same kind
  of stand-in: size 1, and the stage the saver has set.
- The loader's transformers check reads ``minor >= 31`` alone, so 5.x (5.24 has minor 24)
  fails it; the requirement, 4.31 or newer, is compared as a version.
- ``megatron.legacy``'s ``get_norm`` (the loader builds the legacy model) reads
  ``args.apply_layernorm_1p``, a flag Megatron-LM 0.16's parser no longer defines; where it is
  absent it is False, the default it had.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path


def check_te_wrapper(original):
    """``MegatronCheckpointSaverBase.insert_megatron_path_and_check_te``."""

    def insert_megatron_path_and_check_te(self):
        if getattr(self.args, "saver_transformer_impl", None) != "local":
            return original(self)
        root = Path(inspect.getfile(type(self))).resolve().parents[2]  # tools/checkpoint/saver_*.py -> checkout
        sys.path.append(str(root))
        if getattr(self.args, "megatron_path", None) is not None:
            sys.path.insert(0, self.args.megatron_path)
        return None

    insert_megatron_path_and_check_te.__wrapped__ = original
    return insert_megatron_path_and_check_te


class _SizeOneGroup:
    """A data-parallel group of one process, as the saver's own stand-ins for its TP/EP groups."""

    def rank(self) -> int:
        return 0

    def size(self) -> int:
        return 1


class _PipelineGroup:
    """The pipeline group as the saver walks it: the rank and size it sets on parallel_state
    (``set_pipeline_model_parallel_rank`` / ``_world_size``) for each stage it writes."""

    def rank(self) -> int:
        from megatron.core import parallel_state

        return parallel_state.get_pipeline_model_parallel_rank()

    def size(self) -> int:
        from megatron.core import parallel_state

        return parallel_state.get_pipeline_model_parallel_world_size()


_STAND_INS = {"_DATA_PARALLEL_GROUP": _SizeOneGroup, "_DATA_PARALLEL_GROUP_WITH_CP": _SizeOneGroup,
              "_INTRA_PARTIAL_DATA_PARALLEL_GROUP_WITH_CP": _SizeOneGroup,
              "_PIPELINE_MODEL_PARALLEL_GROUP": _PipelineGroup}


def saver_env_wrapper(original):
    """``MegatronCheckpointSaverBase.initialize_megatron_env``: its fake groups, plus the
    data-parallel ones where none is set."""

    def initialize_megatron_env(self):
        result = original(self)
        from megatron.core import parallel_state

        for name, stand_in in _STAND_INS.items():
            if getattr(parallel_state, name, None) is None:
                setattr(parallel_state, name, stand_in())
        return result

    initialize_megatron_env.__wrapped__ = original
    return initialize_megatron_env


def verify_transformers_version() -> None:
    """``loader_llama_mistral.verify_transformers_version``: transformers 4.31 or newer."""
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) < Version("4.31"):
        raise AssertionError(f"transformers {transformers.__version__}: the llama_mistral loader needs 4.31 or newer")


def legacy_norm_wrapper(original):
    """``megatron.legacy.model.utils.get_norm``."""

    def get_norm(config):
        from megatron.training import get_args

        args = get_args()
        if not hasattr(args, "apply_layernorm_1p"):
            args.apply_layernorm_1p = False
        return original(config)

    get_norm.__wrapped__ = original
    return get_norm
