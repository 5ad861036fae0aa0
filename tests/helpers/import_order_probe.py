"""Run in a fresh interpreter: import megatron before or after ascend_patches, then report
whether every target ended patched, whether re-applying changes anything, and whether
revert restores the originals.  Prints one JSON line."""
import json
import sys

order = sys.argv[1]
if order == "megatron_first":
    import megatron.core.optimizer  # noqa: F401  (0.16 imports it transitively, 0.14-0.15 do not)
    import megatron.core.tensor_parallel.mappings as mappings
    from megatron.core.transformer.mlp import MLP
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    import tests.helpers.binds_targets as user

    originals = {"rope": user._apply_rotary_pos_emb_bshd, "rs": mappings.dist_reduce_scatter_func,
                 "fwd": user.DotProductAttention.forward, "mlp": MLP.forward,
                 "norm_new": WrappedTorchNorm.__dict__["__new__"]}
    import ascend_patches
else:
    import ascend_patches
    import megatron.core.optimizer  # noqa: F401
    import megatron.core.tensor_parallel.mappings as mappings
    from megatron.core.transformer.mlp import MLP
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    import tests.helpers.binds_targets as user

    originals = None

R = ascend_patches.REGISTRY


def snapshot():
    return {"rope": user._apply_rotary_pos_emb_bshd, "rs": mappings.dist_reduce_scatter_func,
            "fwd": user.DotProductAttention.forward, "mlp": MLP.forward,
            "norm_new": WrappedTorchNorm.__dict__["__new__"]}


patched = snapshot()
expect = {"rope": R.applied["rope"].new, "rs": R.applied["collectives.reduce_scatter_tensor"].new,
          "fwd": R.applied["flash_attention"].new, "mlp": R.applied["swiglu"].new,
          "norm_new": R.applied["rms_norm"].new}
if originals is None:
    originals = {"rope": R.original("rope"), "rs": R.original("collectives.reduce_scatter_tensor"),
                 "fwd": R.original("flash_attention"), "mlp": R.original("swiglu"),
                 "norm_new": R.applied["rms_norm"].saved}
all_patched = {k: patched[k] is expect[k] for k in patched}
ascend_patches.apply()
idempotent = snapshot() == patched
statuses = {n: s for n, (s, _) in R.status.items()}
ascend_patches.revert()
restored = {k: v is originals[k] for k, v in snapshot().items()}
ascend_patches.apply()
reapplied = {k: snapshot()[k] is not originals[k] for k in patched}
print(json.dumps({"patched": all_patched, "idempotent": idempotent, "restored": restored,
                  "reapplied": reapplied, "statuses": statuses}))
